"""The training process tree: started in its own group, always ended with everything it started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from BiGLTrainingLib.process import TrainingProcess, descendant_pids, live_processes, pid_alive

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups and signals are tested on POSIX")

#: A stand-in for `torch.distributed.run`: a parent that starts a worker in a session of its own
#: (as torch's launcher does) and a helper in its group. Modes: "obey" (all exit on SIGTERM),
#: "ignore" (none does), "workers" (the parent exits, its children ignore SIGTERM). Every pid is
#: written to a file.
TREE_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    pid_file, mode = sys.argv[1], sys.argv[2]
    if mode == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stubborn = mode in ("ignore", "workers")
    sleeper = "import signal, time\\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n" if stubborn else "") + "time.sleep(120)"
    worker = subprocess.Popen([sys.executable, "-c", sleeper], start_new_session=True)
    helper = subprocess.Popen([sys.executable, "-c", sleeper])
    with open(pid_file + ".tmp", "w") as f:
        json.dump([os.getpid(), worker.pid, helper.pid], f)
    os.replace(pid_file + ".tmp", pid_file)
    print("tree started", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    time.sleep(120)
    """
)


def start_tree(tmp_path: Path, mode: str) -> tuple[TrainingProcess, list[int]]:
    pid_file = tmp_path / "pids.json"
    process = TrainingProcess(
        [sys.executable, "-c", TREE_SCRIPT, str(pid_file), mode],
        log_path=tmp_path / "logs" / "console.log",
    )
    process.start()
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the process tree did not start"
        time.sleep(0.05)
    return process, json.loads(pid_file.read_text())


def wait_dead(pids: list[int], seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if pid_alive(pid)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


@pytest.mark.parametrize("mode", ["obey", "ignore", "workers"])
def test_stop_ends_the_whole_tree(tmp_path, mode):
    process, pids = start_tree(tmp_path, mode)
    assert os.getpgid(process.pid) == process.pid != os.getpgrp()  # a process group of its own
    assert set(pids[1:]) <= set(descendant_pids(pids[0]))  # the worker in its own session is found too
    assert process.running and process in live_processes()
    started = time.monotonic()
    code = process.stop(timeout=1.0)
    assert wait_dead(pids) == []
    assert code is not None and code != 0
    assert process.stopped and not process.running
    assert process not in live_processes()
    if mode == "obey":
        assert time.monotonic() - started < 1.0  # no waiting for the timeout when the tree obeys


def test_terminate_does_not_wait_and_polling_finishes_the_job(tmp_path):
    """What the GUI does: ask, return at once, then poll from a timer until the tree is gone."""
    process, pids = start_tree(tmp_path, "workers")
    started = time.monotonic()
    process.terminate(timeout=1.0)
    assert time.monotonic() - started < 0.5
    assert process.stopping
    codes = []
    while not codes or codes[-1] is None:
        assert time.monotonic() - started < 10
        codes.append(process.poll())
        time.sleep(0.05)
    # the parent obeyed at once, but the end is reported only once its stubborn workers are killed
    assert time.monotonic() - started >= 1.0
    assert wait_dead(pids, seconds=0.5) == []
    assert not process.stopping and process.stopped


def test_output_goes_to_the_log_file(tmp_path):
    process, pids = start_tree(tmp_path, "obey")
    deadline = time.monotonic() + 10
    log = tmp_path / "logs" / "console.log"
    while "to stderr" not in log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "tree started" in log.read_text()
    process.stop(timeout=1.0)
    assert wait_dead(pids) == []


def test_exit_status_of_a_command_that_ends_by_itself(tmp_path):
    process = TrainingProcess([sys.executable, "-c", "import sys; sys.exit(3)"], log_path=tmp_path / "c.log")
    process.start()
    assert process.wait(timeout=30) == 3
    assert process.poll() == 3 and not process.stopped
    assert process.stop() == 3 and not process.stopped  # stopping an ended process changes nothing
    with pytest.raises(RuntimeError):
        process.start()


def test_no_shell_and_no_empty_command(tmp_path):
    with pytest.raises(ValueError):
        TrainingProcess([], log_path=tmp_path / "c.log")
    marker = tmp_path / "marker"
    process = TrainingProcess(["echo", f"x; touch {marker}"], log_path=tmp_path / "c.log")
    process.start()
    process.wait(timeout=30)
    assert not marker.exists()  # the ; was an argument, not a shell separator
    assert (tmp_path / "c.log").read_text().strip() == f"x; touch {marker}"


def test_exiting_python_kills_what_is_still_running(tmp_path):
    """The atexit hook: an interpreter (Slicer) that exits leaves no orphaned trainer."""
    pid_file = tmp_path / "pids.json"
    module_dir = Path(__file__).resolve().parents[2]
    script = textwrap.dedent(
        f"""
        import json, sys, time
        sys.path.insert(0, {str(module_dir)!r})
        from BiGLTrainingLib.process import TrainingProcess
        process = TrainingProcess([sys.executable, "-c", {TREE_SCRIPT!r}, {str(pid_file)!r}, "ignore"],
                                  log_path={str(tmp_path / "c.log")!r})
        process.start()
        while True:
            try:
                json.load(open({str(pid_file)!r}))
                break
            except (OSError, ValueError):
                time.sleep(0.05)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    pids = json.loads(pid_file.read_text())
    assert wait_dead(pids) == []
