"""The training event log (``events.jsonl``) and the loss-curve figure drawn from it.

One JSON object per line, always with ``"event"`` and ``"time"`` (unix seconds); the event kinds
and their fields are listed in docs/architecture.md ("Training"). The file is only ever appended
to and flushed after every line, so a GUI can follow it while training runs, a resumed run
continues it, and nothing already written is lost when a run fails.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from bigl.files import atomic_output

from bigl.runfolder import EVENTS_FILE  # noqa: F401  (the event log's name, re-exported)


def _json_safe(value: Any) -> Any:
    """Non-finite floats become null (strict JSON readers refuse NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class EventLog:
    """Appends events to ``path``; a disabled log (ranks other than 0) writes nothing."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, **_json_safe(fields), "time": round(time.time(), 3)}
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps(record, allow_nan=False)
            with open(self.path, "a", encoding="utf-8") as stream:
                stream.write(line + "\n")
                stream.flush()
        return record


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All events of a log, skipping lines that do not parse (e.g. a line cut by a crash)."""
    path = Path(path)
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events


def loss_history(events: list[dict[str, Any]], stage: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per loss name, (steps, values) of a stage's step events. After a resume the steps between
    the checkpoint and the interruption are logged twice; the later value wins."""
    by_step: dict[int, dict[str, float]] = {}
    for event in events:
        if event.get("event") == "step" and event.get("stage") == stage and isinstance(event.get("losses"), dict):
            by_step[int(event["step"])] = event["losses"]
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for step in sorted(by_step):
        for name, value in by_step[step].items():
            if isinstance(value, (int, float)):
                steps, values = curves.setdefault(name, ([], []))
                steps.append(step)
                values.append(float(value))
    return curves


def plot_losses(events_path: str | os.PathLike, out_path: str | os.PathLike) -> Path | None:
    """Draw the loss curves of every stage in the log into one PNG (one panel per stage)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    events = read_events(events_path)
    histories = {stage: loss_history(events, stage) for stage in ("translator", "adapt")}
    stages = [stage for stage, history in histories.items() if history]
    if not stages:
        return None
    figure = Figure(figsize=(6.5 * len(stages), 4.2))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(stages), squeeze=False)
    for axis, stage in zip(axes[0], stages):
        for name, (steps, values) in histories[stage].items():
            axis.plot(steps, values, label=name, linewidth=1.2)
        axis.set_title({"translator": "Stage 1: translator", "adapt": "Stage 2: adaptation"}[stage])
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.set_yscale("symlog", linthresh=1e-3)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    out_path = Path(out_path)
    with atomic_output(out_path) as tmp:
        figure.savefig(tmp, dpi=100)
    return out_path
