"""A training process that runs beside Slicer and can always be ended with everything it started.

The command is started from an argument list (never through a shell), with its console output
written to a file rather than a pipe (a pipe that nobody reads fills up and stalls the trainer while
the GUI is busy). It runs in its own process group / session and is stopped through BiGL
Segmentation's :class:`~BiGLSegmentationLib.processtree.ProcessTree`, so stopping reaches the whole
tree: ``torch.distributed.run`` workers and data-loader processes included. Every process still
running when Python exits is stopped by an ``atexit`` hook, so closing Slicer never leaves an
orphaned trainer behind.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from BiGLSegmentationLib.processtree import DEFAULT_STOP_TIMEOUT_S, ProcessTree, new_group_options

__all__ = ["DEFAULT_STOP_TIMEOUT_S", "TrainingProcess", "live_processes", "stop_all"]

#: Started processes that have not been seen ending (strong references: the atexit hook needs them).
_live_processes: set[TrainingProcess] = set()


class TrainingProcess:
    """One external command, started in its own process group with its output in a log file."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: str | os.PathLike,
        cwd: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
    ):
        if not argv:
            raise ValueError("empty command")
        self.argv = [os.fspath(arg) for arg in argv]
        self.log_path = Path(log_path)
        self.cwd = os.fspath(cwd) if cwd is not None else None
        self.env = dict(env) if env is not None else None
        self.popen: subprocess.Popen | None = None
        self.tree: ProcessTree | None = None
        #: True once terminate() or stop() ended the command (rather than it ending by itself).
        self.stopped = False
        self._log_stream = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self) -> None:
        if self.popen is not None:
            raise RuntimeError("this process was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_stream = open(self.log_path, "ab")
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log_stream,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                **new_group_options(),
            )
        except OSError:
            self._close_log()
            raise
        self.tree = ProcessTree(self.popen)
        _live_processes.add(self)

    def poll(self) -> int | None:
        """The exit status once the command has ended, else None.

        After :meth:`terminate`, the command counts as ended only when its whole tree is gone; a
        tree still there after the timeout is killed here, so polling is all a GUI has to do.
        """
        if self.tree is None:
            return None
        code = self.tree.poll()
        if code is not None:
            self._finished()
        return code

    @property
    def running(self) -> bool:
        return self.popen is not None and self.poll() is None

    @property
    def stopping(self) -> bool:
        """True between :meth:`terminate` and the end of the whole tree."""
        return self.tree is not None and self.tree.stopping

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode if self.popen else None

    def wait(self, timeout: float | None = None) -> int:
        """Block until the command ends (``subprocess.TimeoutExpired`` after ``timeout``)."""
        if self.popen is None:
            raise RuntimeError("the process was never started")
        code = self.popen.wait(timeout)
        self._finished()
        return code

    def terminate(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Ask the command and everything it started to exit, without waiting.

        Whatever is left ``timeout`` seconds later is killed by the next :meth:`poll`. The trainer
        saves nothing on the way out: resuming starts from the last checkpoint it wrote.
        """
        if self.tree is None or self.tree.stopping:
            return
        still_running = self.popen.poll() is None
        if self.tree.terminate(timeout):
            self.stopped = self.stopped or still_running

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        """End the command and every process it started, waiting for it; returns its exit status."""
        if self.tree is None:
            return None
        still_running = self.popen.poll() is None
        code = self.tree.stop(timeout)
        self.stopped = self.stopped or still_running
        self._finished()
        return code

    def _finished(self) -> None:
        _live_processes.discard(self)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_stream is not None:
            self._log_stream.close()
            self._log_stream = None


def stop_all(timeout: float = 3.0) -> None:
    """Stop every process started here that still runs (registered with ``atexit``)."""
    for process in list(_live_processes):
        try:
            process.stop(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - exiting: report and go on with the others
            print(f"BiGLTraining: could not stop process {process.pid}: {exc}", file=sys.stderr)


def live_processes() -> list[TrainingProcess]:
    return list(_live_processes)


atexit.register(stop_all)
