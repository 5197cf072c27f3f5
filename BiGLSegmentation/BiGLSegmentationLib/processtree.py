"""End a child process together with every process it started, politely first, then by force.

A child started with :func:`new_group_options` leads a process group (POSIX: a session) of its
own, so one signal reaches it and the helpers it started (data-loader workers...). Some children
leave that group: ``torch.distributed.run`` starts each worker in a session of its own. So
:class:`ProcessTree` also looks up every descendant of the child (``/proc`` on Linux, ``ps``
elsewhere) before signalling, and signals those one by one and by group.

Stopping sends SIGTERM to the tree and SIGKILL to what is left after a timeout. A GUI calls
:meth:`ProcessTree.terminate` (returns at once) and then :meth:`ProcessTree.poll` from its timer;
scripts and tests call :meth:`ProcessTree.stop`, which waits. On Windows, where a console-less
child ignores CTRL_BREAK, ``taskkill /T /F`` ends the tree at once.

Used by BiGL Segmentation (``bigl segment``) and BiGL Training (``bigl train``, ``bigl evaluate``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

IS_WINDOWS = os.name == "nt"
#: Seconds a process tree gets to exit after the polite signal before it is killed.
DEFAULT_STOP_TIMEOUT_S = 10.0
#: How often the blocking calls look at the tree.
_POLL_INTERVAL_S = 0.05


def new_group_options() -> dict:
    """:class:`subprocess.Popen` options that put the child in a process group of its own, without a console window."""
    if IS_WINDOWS:
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    return {"start_new_session": True}


# ----------------------------------------------------------------------------- process table


def _proc_stat(pid_folder: Path) -> tuple[bytes, int, int] | None:
    """(state, parent pid, process group) from ``/proc/<pid>/stat``, or None when unreadable."""
    try:
        # the command name (field 2) may hold spaces and parentheses: split after its last ")"
        fields = (pid_folder / "stat").read_bytes().rsplit(b")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def _proc_table() -> dict[int, tuple[bytes, int, int]] | None:
    """pid -> (state, parent pid, process group) of every process, from /proc; None where it is missing."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():
        return None
    table = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(entry)
            if stat is not None:
                table[int(entry.name)] = stat
    return table


def _parent_table() -> dict[int, int]:
    """pid -> parent pid of every process (POSIX); empty when neither /proc nor ``ps`` is available."""
    table = _proc_table()
    if table is not None:
        return {pid: parent for pid, (_, parent, _) in table.items()}
    try:
        output = subprocess.run(
            ["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True, timeout=5, check=False
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
    """The pids of every process below ``root``, nearest first (POSIX; empty on Windows)."""
    if IS_WINDOWS:
        return []
    children: dict[int, list[int]] = {}
    for pid, parent in _parent_table().items():
        children.setdefault(parent, []).append(pid)
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(0), []):
            if child not in found and child != root:
                found.append(child)
                queue.append(child)
    return found


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (zombies count as ended where /proc exists)."""
    if IS_WINDOWS:
        result = subprocess.run(
            ["tasklist", "/FI", f"PID eq {pid}", "/NH"],
            capture_output=True,
            text=True,
            check=False,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
        )
        return str(pid) in result.stdout
    if not _signal_reaches(os.kill, pid):
        return False
    stat = _proc_stat(Path(f"/proc/{pid}"))
    return stat is None or stat[0] not in (b"Z", b"X")


def group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` runs (POSIX; zombies count as ended where /proc exists)."""
    if IS_WINDOWS:
        return False
    if not _signal_reaches(os.killpg, pgid):
        return False
    table = _proc_table()
    if table is None:
        return True
    return any(group == pgid and state not in (b"Z", b"X") for state, _, group in table.values())


def _signal_reaches(kill, target: int) -> bool:
    """Whether a process (``os.kill``) or group (``os.killpg``) exists: signal 0 checks without sending."""
    try:
        kill(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _signal(pid: int, signal_number: int, *, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, signal_number)
        else:
            os.kill(pid, signal_number)
    except (ProcessLookupError, PermissionError):
        pass


def _taskkill_tree(pid: int) -> None:  # pragma: no cover - Windows only
    subprocess.run(
        ["taskkill", "/PID", str(pid), "/T", "/F"],
        capture_output=True,
        check=False,
        creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
    )


# ------------------------------------------------------------------------------- the tree


class ProcessTree:
    """A child started with :func:`new_group_options` and everything it starts.

    After :meth:`terminate`, :meth:`poll` reports the exit status only once the whole tree is gone,
    and kills what is left when the timeout has passed: polling is all a GUI has to do.
    """

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self._kill_deadline: float | None = None
        self._members: list[int] = []
        #: Set once the whole tree was seen gone: its pids may then be reused by unrelated processes.
        self._gone = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stopping(self) -> bool:
        """True between :meth:`terminate` and the end of the whole tree."""
        return self._kill_deadline is not None

    def alive(self) -> bool:
        """True while the child or any process of its tree known here runs."""
        if self.popen.poll() is None:
            return True
        if not self._gone:
            # Windows: taskkill /T ended the tree with its root
            self._gone = IS_WINDOWS or not (group_alive(self.popen.pid) or any(pid_alive(pid) for pid in self._members))
        return not self._gone

    def terminate(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> bool:
        """Ask the tree to exit, without waiting; False when nothing was left to stop.

        What is left ``timeout`` seconds later is killed by the next :meth:`poll` (or
        :meth:`kill_overdue`). A second call while stopping changes nothing.
        """
        if self._kill_deadline is not None:
            return True
        if not self.alive():
            return False
        self._kill_deadline = time.monotonic() + timeout
        root = self.popen.pid
        if IS_WINDOWS:  # pragma: no cover - exercised on Windows only
            # taskkill /T walks the tree while its root lives; /F because CTRL_BREAK is ignored.
            _taskkill_tree(root)
            return True
        # Find workers in sessions of their own now, while their parents still link them to the tree.
        self._members = descendant_pids(root)
        _signal(root, signal.SIGTERM, group=True)
        for pid in self._members:
            _signal(pid, signal.SIGTERM, group=False)
        return True

    def kill_overdue(self, *, force: bool = False) -> None:
        """Kill what is left of a terminated tree once its timeout has passed (at once with ``force``)."""
        if self._kill_deadline is None or (not force and time.monotonic() < self._kill_deadline):
            return
        root = self.popen.pid
        if IS_WINDOWS:  # pragma: no cover - exercised on Windows only
            if self.popen.poll() is None:
                _taskkill_tree(root)
                self.popen.kill()
            return
        if self.popen.poll() is None:  # and any started meanwhile (the root's pid is still its own)
            self._members = list(dict.fromkeys(self._members + descendant_pids(root)))
        elif not self.alive():
            return
        _signal(root, signal.SIGKILL, group=True)
        for pid in self._members:
            _signal(pid, signal.SIGKILL, group=True)  # a worker's own session: its data loaders
            _signal(pid, signal.SIGKILL, group=False)

    def poll(self) -> int | None:
        """The child's exit status once it (and, after :meth:`terminate`, its whole tree) has ended, else None."""
        code = self.popen.poll()
        if code is None:
            self.kill_overdue()
            return None
        if self._kill_deadline is not None:
            if self.alive():
                self.kill_overdue()
                if self.alive():
                    return None
            self._kill_deadline = None
        return code

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        """End the whole tree and wait for it: SIGTERM, SIGKILL after ``timeout`` s; returns the exit status."""
        self.terminate(timeout)
        deadline = time.monotonic() + timeout + 5.0
        while True:
            code = self.poll()
            if code is not None:
                return code
            if time.monotonic() > deadline:  # pragma: no cover - only if SIGKILL itself failed
                self.kill_overdue(force=True)
                return self.popen.poll()
            time.sleep(_POLL_INTERVAL_S)
