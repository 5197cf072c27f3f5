"""Following the training event log (``events.jsonl``) while ``bigl train`` is still writing it.

The log holds one JSON object per line (see docs/architecture.md, "Training"). The reader is polled
from a GUI timer, so it never blocks and never fails on what it finds: a last line without its
newline is kept until the writer finishes it, a line that is not a JSON object with an ``"event"``
key is counted and skipped, and a log that shrank or was replaced is read again from its start.
:class:`TrainingState` folds the events into what the module shows (progress per stage, ETA, latest
losses, checkpoints, the final bundle or the error).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from bigl.runplan import format_duration

#: The two stages of ``bigl train`` in the order they run.
STAGES = ("translator", "adapt")
STAGE_TITLES = {"translator": "Stage 1: image translator", "adapt": "Stage 2: adaptation"}
#: Most bytes read per poll, so that a huge backlog never stalls the GUI; the rest comes next poll.
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024


class FileTail:
    """Reads the complete lines appended to a file since the previous call (never blocks)."""

    def __init__(self, path: str | os.PathLike, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, from_end: bool = False):
        self.path = Path(path)
        self.chunk_bytes = chunk_bytes
        self._offset = 0
        self._pending = b""
        self._identity: tuple[int, int] | None = None
        if from_end:
            self.skip_to_end()

    def reset(self) -> None:
        self._offset = 0
        self._pending = b""
        self._identity = None

    def skip_to_end(self) -> None:
        """Ignore what the file holds now (e.g. the console output of an earlier run)."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return
        self._identity = (stat.st_dev, stat.st_ino)
        self._offset = stat.st_size
        self._pending = b""

    def read_lines(self, *, final: bool = False) -> list[bytes]:
        """Lines completed since the last call; with ``final=True`` also an unfinished last line."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return []
        identity = (stat.st_dev, stat.st_ino)
        if identity != self._identity or stat.st_size < self._offset:
            self.reset()  # replaced or truncated: read it again from the start
            self._identity = identity
        lines: list[bytes] = []
        while True:
            try:
                with open(self.path, "rb") as stream:
                    stream.seek(self._offset)
                    data = stream.read(self.chunk_bytes)
            except OSError:
                return lines
            self._offset += len(data)
            parts = (self._pending + data).split(b"\n")
            self._pending = parts.pop()
            lines.extend(parts)
            if len(data) < self.chunk_bytes or not final:
                break
        if final and self._pending:
            lines.append(self._pending)
            self._pending = b""
        return lines

    def read_text(self, *, final: bool = False) -> list[str]:
        """Non-empty text lines; carriage-return updates (progress bars) keep their last state."""
        texts = []
        for raw in self.read_lines(final=final):
            text = raw.decode("utf-8", errors="replace").rstrip("\r").rsplit("\r", 1)[-1].rstrip()
            if text:
                texts.append(text)
        return texts


class EventLogReader(FileTail):
    """Reads the events appended to a JSON-lines file since the previous call."""

    def __init__(self, path: str | os.PathLike, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__(path, chunk_bytes)
        #: Lines dropped because they were not JSON objects with an "event" key.
        self.skipped = 0

    def read(self, *, final: bool = False) -> list[dict]:
        """Events written since the last call.

        With ``final=True`` (the writer has exited) a last line without newline is parsed too.
        """
        return self._parse_lines(self.read_lines(final=final))

    def _parse_lines(self, lines: Iterable[bytes]) -> list[dict]:
        events = []
        for raw in lines:
            text = raw.strip()
            if not text:
                continue
            try:
                event = json.loads(text.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                self.skipped += 1
                continue
            if not isinstance(event, dict) or not isinstance(event.get("event"), str):
                self.skipped += 1
                continue
            events.append(event)
        return events


def _number(value: Any) -> float | None:
    """A finite-or-NaN float from a JSON value, or None when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    number = _number(value)
    if number is None or not math.isfinite(number):
        return None
    return int(number)


def _first_int(value: Any, default: int | None) -> int | None:
    number = _int(value)
    return default if number is None else number


def numeric_items(mapping: Any) -> dict[str, float]:
    """The entries of a JSON object that are numbers (losses, learning rates), as floats."""
    if not isinstance(mapping, dict):
        return {}
    items = {}
    for key, value in mapping.items():
        number = _number(value)
        if number is not None:
            items[str(key)] = number
    return items


@dataclass
class StageProgress:
    """What the event log says about one stage."""

    stage: str
    status: str = "waiting"  # waiting | running | finished
    step: int = 0
    total: int | None = None
    losses: dict[str, float] = field(default_factory=dict)
    learning_rates: dict[str, float] = field(default_factory=dict)
    sec_per_step: float | None = None
    eta_s: float | None = None
    checkpoint: str | None = None
    checkpoint_step: int | None = None

    @property
    def title(self) -> str:
        return STAGE_TITLES.get(self.stage, self.stage)

    @property
    def fraction(self) -> float:
        """Progress in [0, 1]; 1 once the stage has ended."""
        if self.status == "finished":
            return 1.0
        if not self.total:
            return 0.0
        return min(max(self.step / self.total, 0.0), 1.0)


@dataclass
class TrainingState:
    """The training run as seen through its events."""

    stages: dict[str, StageProgress] = field(default_factory=lambda: {s: StageProgress(s) for s in STAGES})
    current_stage: str | None = None
    bundle: str | None = None
    done: bool = False
    error_message: str | None = None
    error_hint: str | None = None
    last_event_time: float | None = None

    def stage(self, name: str) -> StageProgress:
        if name not in self.stages:
            self.stages[name] = StageProgress(name)
        return self.stages[name]

    def apply(self, event: dict) -> None:
        """Update from one event; unknown events and fields of the wrong type are ignored."""
        kind = event.get("event")
        time = _number(event.get("time"))
        if time is not None:
            self.last_event_time = time
        stage_name = event.get("stage")
        stage = self.stage(stage_name) if isinstance(stage_name, str) and stage_name else None
        if kind == "start" and stage is not None:
            stage.status = "running"
            stage.total = _first_int(event.get("total"), stage.total)
            stage.step = _first_int(event.get("step"), stage.step)
            self.current_stage = stage.stage
            self.done = False  # a resumed run starts again after an earlier error
            self.error_message = self.error_hint = None
        elif kind == "step" and stage is not None:
            stage.status = "running"
            self.current_stage = stage.stage
            stage.step = _first_int(event.get("step"), stage.step)
            stage.total = _first_int(event.get("total"), stage.total)
            stage.losses = numeric_items(event.get("losses"))
            stage.learning_rates = numeric_items(event.get("lr"))
            stage.sec_per_step = _number(event.get("sec_per_step"))
            stage.eta_s = _number(event.get("eta_s"))
        elif kind == "checkpoint" and stage is not None:
            stage.checkpoint = event.get("path") if isinstance(event.get("path"), str) else stage.checkpoint
            stage.checkpoint_step = _int(event.get("step"))
        elif kind == "end" and stage is not None:
            stage.status = "finished"
            stage.eta_s = 0.0
            if stage.total:
                stage.step = stage.total
        elif kind == "done":
            self.done = True
            self.current_stage = None
            if isinstance(event.get("bundle"), str):
                self.bundle = event["bundle"]
        elif kind == "error":
            self.error_message = str(event.get("message") or "training failed")
            hint = event.get("hint")
            self.error_hint = str(hint) if hint else None

    def apply_all(self, events: Iterable[dict]) -> None:
        for event in events:
            self.apply(event)


def format_losses(losses: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.4g}" for name, value in losses.items())


def format_event(event: dict) -> str:
    """One human-readable log line for an event."""
    kind = event.get("event")
    stage = event.get("stage")
    prefix = f"[{stage}] " if isinstance(stage, str) and stage else ""
    if kind == "start":
        total = _int(event.get("total"))
        return f"{prefix}started" + (f": {total} iterations" if total else "")
    if kind == "step":
        step, total = _int(event.get("step")), _int(event.get("total"))
        text = f"{prefix}{step}/{total if total else '?'}  {format_losses(numeric_items(event.get('losses')))}"
        speed = _number(event.get("sec_per_step"))
        if speed is not None:
            text += f"  ({speed:.3g} s/step, ETA {format_duration(_number(event.get('eta_s')))})"
        return text
    if kind == "checkpoint":
        return f"{prefix}checkpoint at step {_int(event.get('step'))}: {event.get('path', '')}"
    if kind == "end":
        return f"{prefix}finished" + (f", bundle {event['bundle']}" if event.get("bundle") else "")
    if kind == "done":
        return f"training done: {event.get('bundle', '')}"
    if kind == "data":
        return "data: " + "; ".join(
            f"{role} {part.get('modality', '?')}: {part.get('cases', '?')} case(s), {part.get('slices', '?')} slices"
            for role, part in (("labelled", event.get("labelled")), ("unlabelled", event.get("unlabelled")))
            if isinstance(part, dict)
        ) + (f"; {event['pairs']} co-registered slice pairs" if isinstance(event.get("pairs"), int) else "")
    if kind == "plan":
        return str(event.get("summary", ""))
    if kind == "error":
        text = f"ERROR: {event.get('message', 'training failed')}"
        if event.get("hint"):
            text += f"\n  fix: {event['hint']}"
        return text
    return prefix + json.dumps({k: v for k, v in event.items() if k != "time"}, default=str)
