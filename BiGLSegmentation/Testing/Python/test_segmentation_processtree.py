"""ProcessTree: a child and everything it started end together, including workers in sessions of their own.

The tree is the stand-in of ``Testing/module_checks.py``: a parent, a worker in a session of its own
(as ``torch.distributed.run`` starts them) and a helper in the parent's group. BiGL Segmentation's
JsonLineProcess and BiGL Training's TrainingProcess both stop their commands through this class.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import module_checks  # Testing/, on sys.path through conftest.py
from BiGLSegmentationLib import processtree
from BiGLSegmentationLib.processtree import ProcessTree, descendant_pids, group_alive, new_group_options, pid_alive

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups and signals are tested on POSIX")


@pytest.fixture
def start_tree(tmp_path):
    """Starts the stand-in tree in a mode; returns (ProcessTree, [parent, worker, helper]). Kills leftovers."""
    started = []

    def start(mode: str) -> tuple[ProcessTree, list[int]]:
        pid_file = tmp_path / f"pids-{len(started)}.json"
        popen = subprocess.Popen(module_checks.tree_command(pid_file, mode), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, **new_group_options())
        tree = ProcessTree(popen)
        started.append(tree)
        return tree, module_checks.tree_pids(pid_file)

    yield start
    for tree in started:
        tree.stop(timeout=0.5)


@pytest.mark.parametrize("mode", ["obey", "ignore", "workers"])
def test_stop_ends_the_whole_tree(start_tree, mode):
    tree, pids = start_tree(mode)
    assert os.getpgid(tree.pid) == tree.pid != os.getpgrp()  # a process group of its own
    assert set(pids[1:]) <= set(descendant_pids(pids[0]))  # the worker in its own session is found too
    assert os.getsid(pids[1]) == pids[1] != os.getsid(pids[0])
    started = time.monotonic()
    code = tree.stop(timeout=1.0)
    assert module_checks.wait_dead(pids) == []
    assert code is not None and code != 0
    assert not tree.alive() and not tree.stopping
    if mode == "obey":
        assert time.monotonic() - started < 1.0  # no waiting for the timeout when the tree obeys
    else:
        assert time.monotonic() - started >= 1.0  # the stubborn ones were given their time, then killed


def test_terminate_does_not_wait_and_polling_finishes_the_job(start_tree):
    """What a GUI does: ask, return at once, then poll from a timer until the tree is gone."""
    tree, pids = start_tree("workers")
    started = time.monotonic()
    assert tree.terminate(timeout=1.0)
    assert time.monotonic() - started < 0.5
    assert tree.stopping and tree.terminate(timeout=1.0)  # asking again changes nothing
    codes = []
    while not codes or codes[-1] is None:
        assert time.monotonic() - started < 10
        codes.append(tree.poll())
        time.sleep(0.05)
    # the parent obeyed at once, but the end is reported only once its stubborn workers are killed
    assert len(codes) > 1 and time.monotonic() - started >= 1.0
    assert module_checks.wait_dead(pids, seconds=0.5) == []
    assert not tree.stopping


def test_a_command_that_ended_by_itself_needs_no_stopping():
    popen = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"], **new_group_options())
    tree = ProcessTree(popen)
    popen.wait(timeout=30)
    assert not tree.alive() and not group_alive(popen.pid)
    assert not tree.terminate() and not tree.stopping
    assert tree.poll() == 3 and tree.stop() == 3


def test_descendants_are_found_without_proc_through_ps(start_tree, monkeypatch):
    tree, pids = start_tree("obey")
    with_proc = descendant_pids(tree.pid)
    monkeypatch.setattr(processtree, "_proc_table", lambda: None)  # macOS: no /proc
    assert set(descendant_pids(tree.pid)) == set(with_proc) >= set(pids[1:])
    assert pid_alive(pids[1]) and group_alive(tree.pid)
