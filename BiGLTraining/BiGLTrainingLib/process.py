"""A training process that runs beside Slicer and can always be ended with everything it started.

The command is started from an argument list (never through a shell), with its console output
written to a file rather than a pipe (a pipe that nobody reads fills up and stalls the trainer while
the GUI is busy). It runs in its own process group / session, so that stopping it reaches the whole
tree: ``torch.distributed.run`` workers and data-loader processes included. Stopping asks politely
first (SIGTERM) and kills what is left after a timeout; on Windows, where a console-less process
ignores CTRL_BREAK, ``taskkill /T /F`` ends the tree at once. Every process
still running when Python exits is killed by an ``atexit`` hook, so closing Slicer never leaves an
orphaned trainer behind.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

IS_WINDOWS = os.name == "nt"
#: Seconds a process tree gets to exit after the polite signal before it is killed.
DEFAULT_STOP_TIMEOUT_S = 10.0

#: Started processes that have not been seen ending (strong references: the atexit hook needs them).
_live_processes: set[TrainingProcess] = set()


def _new_group_options() -> dict:
    """Popen options that put the child in a process group of its own."""
    if IS_WINDOWS:
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    return {"start_new_session": True}


def _process_table() -> dict[int, int]:
    """pid -> parent pid of every process (POSIX, through ``ps``); empty when ``ps`` is missing."""
    try:
        output = subprocess.run(
            ["ps", "-A", "-o", "pid=", "-o", "ppid="],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    parents = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            parents[int(fields[0])] = int(fields[1])
    return parents


def descendant_pids(root: int) -> list[int]:
    """The pids of every process below ``root`` (children first level first), POSIX only.

    ``torch.distributed.run`` starts its workers in sessions of their own, so a signal to the
    trainer's process group does not reach them: they are found here before the tree is signalled.
    """
    parents = _process_table()
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(0), []):
            if child not in found and child != root:
                found.append(child)
                queue.append(child)
    return found


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (zombies count as ended)."""
    if IS_WINDOWS:
        result = subprocess.run(
            ["tasklist", "/FI", f"PID eq {pid}", "/NH"], capture_output=True, text=True, check=False
        )
        return str(pid) in result.stdout
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            state = stream.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _taskkill_tree(pid: int) -> None:  # pragma: no cover - Windows only
    subprocess.run(
        ["taskkill", "/PID", str(pid), "/T", "/F"],
        capture_output=True,
        check=False,
        creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
    )


def _signal(pid: int, sig: int, *, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


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
        #: True once terminate() or stop() ended the command (rather than it ending by itself).
        self.stopped = False
        self._log_stream = None
        self._kill_deadline: float | None = None
        self._tree: list[int] = []

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
                **_new_group_options(),
            )
        except OSError:
            self._close_log()
            raise
        _live_processes.add(self)

    def poll(self) -> int | None:
        """The exit status once the command has ended, else None.

        After :meth:`terminate`, the command counts as ended only when its whole tree is gone; a
        tree still there after the timeout is killed here, so polling is all a GUI has to do.
        """
        if self.popen is None:
            return None
        code = self.popen.poll()
        if code is None:
            self.kill_overdue()
            return None
        if self._kill_deadline is not None:
            if self._tree_alive():
                self.kill_overdue()
                if self._tree_alive():
                    return None
            self._kill_deadline = None
        self._finished()
        return code

    @property
    def running(self) -> bool:
        return self.popen is not None and self.poll() is None

    @property
    def stopping(self) -> bool:
        """True between :meth:`terminate` and the end of the whole tree."""
        return self._kill_deadline is not None

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

        The tree gets SIGTERM; whatever is left ``timeout`` seconds later is killed by the next
        :meth:`poll` (or :meth:`kill_overdue`). On Windows ``taskkill /T /F`` ends it at once. The
        trainer saves nothing on the way out: resuming starts from the last checkpoint it wrote.
        """
        if self.popen is None or self._kill_deadline is not None:
            return
        still_running = self.popen.poll() is None
        if not still_running and (IS_WINDOWS or not pid_alive_group(self.popen.pid)):
            return
        self.stopped = self.stopped or still_running
        self._kill_deadline = time.monotonic() + timeout
        if IS_WINDOWS:  # pragma: no cover - exercised on Windows only
            # A console-less child ignores CTRL_BREAK; taskkill /T walks the tree while its root lives.
            _taskkill_tree(self.popen.pid)
            return
        root = self.popen.pid
        # torch.distributed.run starts its workers in sessions of their own: find them now, while
        # the launcher still links them to the tree.
        self._tree = descendant_pids(root)
        _signal(root, signal.SIGTERM, group=True)
        for pid in self._tree:
            _signal(pid, signal.SIGTERM, group=False)

    def kill_overdue(self, *, force: bool = False) -> None:
        """Kill what is left of a terminated tree once its timeout has passed (at once with ``force``)."""
        if self._kill_deadline is None or (not force and time.monotonic() < self._kill_deadline):
            return
        if IS_WINDOWS:  # pragma: no cover - exercised on Windows only
            if self.popen.poll() is None:
                _taskkill_tree(self.popen.pid)
            return
        root = self.popen.pid
        self._tree = list(dict.fromkeys(self._tree + descendant_pids(root)))  # and any started meanwhile
        _signal(root, signal.SIGKILL, group=True)
        for pid in self._tree:
            _signal(pid, signal.SIGKILL, group=True)
            _signal(pid, signal.SIGKILL, group=False)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        """End the command and every process it started, waiting for it; returns its exit status."""
        if self.popen is None:
            return None
        self.terminate(timeout)
        deadline = time.monotonic() + timeout + 5.0
        while True:
            code = self.poll()
            if code is not None or self.popen.poll() is not None and self._kill_deadline is None:
                return self.popen.returncode
            if time.monotonic() > deadline:  # pragma: no cover - only if SIGKILL itself failed
                self.kill_overdue(force=True)
                return self.popen.poll()
            time.sleep(0.05)

    def _tree_alive(self) -> bool:
        if self.popen.poll() is None:
            return True
        if IS_WINDOWS:  # pragma: no cover
            return False
        return pid_alive_group(self.popen.pid) or any(pid_alive(pid) for pid in self._tree)

    def _finished(self) -> None:
        _live_processes.discard(self)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_stream is not None:
            self._log_stream.close()
            self._log_stream = None


def pid_alive_group(pgid: int) -> bool:
    """True while a process of group ``pgid`` runs (POSIX; zombies count as ended where /proc exists)."""
    if IS_WINDOWS:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    members = _group_members(pgid)
    return True if members is None else any(pid_alive(pid) for pid in members)


def _group_members(pgid: int) -> list[int] | None:
    """pids whose process group is ``pgid`` (Linux /proc); None where /proc is missing."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid).encode():
            members.append(int(entry.name))
    return members


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
