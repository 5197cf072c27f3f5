"""Run a command that reports progress as JSON lines on stdout, without blocking the caller.

``bigl segment --progress json`` and ``bigl train`` print one JSON object per line on stdout
(``{"event": "progress", "done": 12, "total": 96}``...). :class:`JsonLineProcess` starts such a
command with :class:`subprocess.Popen` (an argument list, never a shell string), collects the
events on a reader thread, and keeps everything else it prints (stderr, non-JSON stdout) in a
size-capped log. The owner polls it (the Slicer widget from a QTimer, tests in a loop), so nothing
here needs Qt. :meth:`JsonLineProcess.cancel` ends the whole process tree (the command and any
worker processes it started, see :mod:`.processtree`).
"""

from __future__ import annotations

import collections
import json
import os
import queue
import subprocess
import threading
from pathlib import Path
from typing import IO, Mapping, Sequence

from .processtree import ProcessTree, new_group_options

#: Lines of log kept (older ones are dropped) and the longest line kept.
LOG_LINES = 2000
LOG_LINE_CHARS = 2000


class JsonLineProcess:
    """A child process whose stdout JSON lines become events; poll it, wait for it or cancel it."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        log_lines: int = LOG_LINES,
    ):
        if isinstance(command, (str, bytes)) or not command:
            raise TypeError("command must be a non-empty list of arguments (never a shell string)")
        self.command = [str(part) for part in command]
        self.env = dict(env) if env is not None else None
        self.cwd = Path(cwd) if cwd is not None else None
        self._events: queue.Queue[dict] = queue.Queue()
        self._log: collections.deque[str] = collections.deque(maxlen=log_lines)
        self._log_lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._tree: ProcessTree | None = None
        self._readers: list[threading.Thread] = []
        self.cancelled = False

    # -------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("this process was already started")
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **new_group_options(),  # own process group: cancel() ends the whole tree
        )
        self._tree = ProcessTree(self._process)
        self._readers = [
            threading.Thread(target=self._read_stdout, args=(self._process.stdout,), daemon=True),
            threading.Thread(target=self._read_log, args=(self._process.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended (negative: killed by that signal)."""
        return None if self._process is None else self._process.poll()

    @property
    def finished(self) -> bool:
        """Ended, and everything it printed has been read."""
        return self.returncode is not None and not any(reader.is_alive() for reader in self._readers)

    def poll(self) -> list[dict]:
        """The events that arrived since the last call (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process ends and its output is read; returns the exit status.

        Raises :class:`subprocess.TimeoutExpired` after ``timeout`` seconds (the process keeps running).
        """
        if self._process is None:
            raise RuntimeError("the process was not started")
        status = self._process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=5.0)
        return status

    def cancel(self, grace_seconds: float = 3.0) -> None:
        """End the process and everything it started: politely first, then by force."""
        if self._process is None or self._process.poll() is not None:
            return
        self.cancelled = True
        self._tree.stop(grace_seconds)
        for reader in self._readers:
            reader.join(timeout=2.0)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of what the process printed besides its events."""
        with self._log_lock:
            tail = list(self._log)[-lines:] if lines > 0 else []
        return "\n".join(tail)

    # -------------------------------------------------------------------------------------------

    def _remember(self, line: str) -> None:
        line = line.rstrip("\r\n")
        if len(line) > LOG_LINE_CHARS:
            line = line[:LOG_LINE_CHARS] + " [...]"
        with self._log_lock:
            self._log.append(line)

    def _read_stdout(self, stream: IO[str]) -> None:
        for line in stream:
            event = parse_event(line)
            if event is None:
                if line.strip():
                    self._remember(line)
            else:
                self._events.put(event)
        stream.close()

    def _read_log(self, stream: IO[str]) -> None:
        for line in stream:
            self._remember(line)
        stream.close()


def parse_event(line: str) -> dict | None:
    """A JSON object with an ``"event"`` key, or None for any other line."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict) and isinstance(value.get("event"), str):
        return value
    return None
