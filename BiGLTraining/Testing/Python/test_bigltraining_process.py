"""TrainingProcess: a command in its own group with its output in a file, stopped with its whole tree,
and never outliving Python.

How a tree is ended (SIGTERM, SIGKILL after the timeout, workers in sessions of their own) is
BiGLSegmentationLib.processtree's, tested in BiGLSegmentation/Testing/Python/test_segmentation_processtree.py;
these tests check that the training process uses it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import module_checks  # Testing/, on sys.path through conftest.py
from BiGLTrainingLib.process import TrainingProcess, live_processes

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups and signals are tested on POSIX")


def start_tree(tmp_path: Path, mode: str) -> tuple[TrainingProcess, list[int]]:
    pid_file = tmp_path / "pids.json"
    process = TrainingProcess(module_checks.tree_command(pid_file, mode), log_path=tmp_path / "logs" / "console.log")
    process.start()
    return process, module_checks.tree_pids(pid_file)


def test_stop_ends_the_whole_tree_and_marks_the_run_stopped(tmp_path):
    process, pids = start_tree(tmp_path, "workers")
    assert process.running and process in live_processes()
    code = process.stop(timeout=1.0)
    assert module_checks.wait_dead(pids) == []
    assert code is not None and code != 0
    assert process.stopped and not process.running and not process.stopping
    assert process not in live_processes()


def test_terminate_does_not_wait_and_polling_reports_the_end_of_the_tree(tmp_path):
    """What the GUI does: ask, return at once, then poll from a timer until the tree is gone."""
    process, pids = start_tree(tmp_path, "workers")
    started = time.monotonic()
    process.terminate(timeout=1.0)
    assert time.monotonic() - started < 0.5
    assert process.stopping and process.stopped
    while process.poll() is None:
        assert time.monotonic() - started < 10
        assert process in live_processes()
        time.sleep(0.05)
    assert module_checks.wait_dead(pids, seconds=0.5) == []
    assert not process.stopping and process not in live_processes()


def test_output_goes_to_the_log_file(tmp_path):
    process, pids = start_tree(tmp_path, "obey")
    deadline = time.monotonic() + 10
    log = tmp_path / "logs" / "console.log"
    while "to stderr" not in log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "tree started" in log.read_text()
    process.stop(timeout=1.0)
    assert module_checks.wait_dead(pids) == []


def test_exit_status_of_a_command_that_ends_by_itself(tmp_path):
    process = TrainingProcess([sys.executable, "-c", "import sys; sys.exit(3)"], log_path=tmp_path / "c.log")
    process.start()
    assert process.wait(timeout=30) == 3
    assert process.poll() == 3 and not process.stopped
    process.terminate()
    assert not process.stopping  # nothing left to stop
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
    repo = Path(__file__).resolve().parents[3]
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path[:0] = [{str(repo / "BiGLTraining")!r}, {str(repo / "BiGLSegmentation")!r}, {str(repo / "Testing")!r}]
        import module_checks
        from BiGLTrainingLib.process import TrainingProcess
        pid_file = Path({str(pid_file)!r})
        process = TrainingProcess(module_checks.tree_command(pid_file, "ignore"), log_path={str(tmp_path / "c.log")!r})
        process.start()
        module_checks.tree_pids(pid_file)  # exit once the tree runs
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    pids = module_checks.tree_pids(pid_file)
    assert module_checks.wait_dead(pids) == []
