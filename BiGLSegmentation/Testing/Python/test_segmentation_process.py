"""JsonLineProcess: events from stdout JSON lines, a capped log, cancel that ends the whole tree."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

import module_checks  # Testing/, on sys.path through conftest.py
from BiGLSegmentationLib.process import JsonLineProcess, parse_event


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_parse_event_accepts_only_objects_with_an_event_key():
    assert parse_event('{"event": "progress", "done": 1, "total": 4}\n') == {"event": "progress", "done": 1, "total": 4}
    assert parse_event("plain text") is None
    assert parse_event('{"no_event": 1}') is None
    assert parse_event('["event"]') is None
    assert parse_event('{"event": "done"') is None  # truncated JSON
    assert parse_event('{"event": 3}') is None


def test_events_and_log_are_separated_and_the_exit_status_kept():
    process = JsonLineProcess(_python("""
        import json, sys
        print("loading model")
        for done in (1, 2, 3):
            print(json.dumps({"event": "progress", "done": done, "total": 3}), flush=True)
        print("a warning", file=sys.stderr)
        print(json.dumps({"event": "done", "output": "x"}))
        sys.exit(3)
    """))
    process.start()
    assert process.wait(timeout=30) == 3
    events = process.poll()
    assert [event["event"] for event in events] == ["progress"] * 3 + ["done"]
    assert [event["done"] for event in events[:3]] == [1, 2, 3]
    assert process.poll() == []  # each event is delivered once
    log = process.log_tail()
    assert "loading model" in log and "a warning" in log
    assert "progress" not in log
    assert process.returncode == 3 and process.finished and not process.running


def test_poll_does_not_block_while_the_process_runs():
    process = JsonLineProcess(_python("""
        import json, time
        print(json.dumps({"event": "progress", "done": 1, "total": 2}), flush=True)
        time.sleep(30)
    """))
    process.start()
    try:
        deadline = time.monotonic() + 20
        events = []
        while not events and time.monotonic() < deadline:
            started = time.monotonic()
            events = process.poll()
            assert time.monotonic() - started < 0.5
            time.sleep(0.02)
        assert events == [{"event": "progress", "done": 1, "total": 2}]
        assert process.running
    finally:
        process.cancel()
    assert not process.running and process.cancelled


def test_log_keeps_only_the_last_lines_and_truncates_long_ones():
    process = JsonLineProcess(_python("""
        for index in range(500):
            print(f"line {index}")
        print("x" * 10000)
    """), log_lines=50)
    process.start()
    process.wait(timeout=30)
    lines = process.log_tail(1000).splitlines()
    assert len(lines) == 50
    assert lines[0] == "line 451"
    assert len(lines[-1]) < 2100 and lines[-1].endswith("[...]")


def test_command_must_be_an_argument_list():
    with pytest.raises(TypeError):
        JsonLineProcess("python -c 'print(1)'")
    with pytest.raises(TypeError):
        JsonLineProcess([])


def test_arguments_reach_the_child_unchanged(tmp_path):
    tricky = "a b; echo $HOME 'quoted' \"double\""
    process = JsonLineProcess(_python("""
        import json, sys
        print(json.dumps({"event": "args", "argv": sys.argv[1:]}))
    """) + [tricky, str(tmp_path)])
    process.start()
    process.wait(timeout=30)
    assert process.poll() == [{"event": "args", "argv": [tricky, str(tmp_path)]}]


@pytest.mark.skipif(sys.platform == "win32", reason="checks process groups and sessions (POSIX)")
def test_cancel_ends_the_whole_tree_through_process_tree(tmp_path):
    """A worker in a session of its own that ignores SIGTERM is killed too (test_segmentation_processtree.py
    checks the termination itself)."""
    process = JsonLineProcess(module_checks.tree_command(tmp_path / "pids.json", "workers"))
    process.start()
    pids = module_checks.tree_pids(tmp_path / "pids.json")
    assert process.running
    process.cancel(grace_seconds=0.5)
    assert module_checks.wait_dead(pids, seconds=1.0) == []
    assert process.cancelled and process.finished
    assert process.returncode is not None and process.returncode != 0
    assert "tree started" in process.log_tail()


def test_environment_and_working_folder_are_passed(tmp_path):
    env = dict(os.environ, BIGL_TEST_VALUE="42")
    process = JsonLineProcess(_python("""
        import json, os
        print(json.dumps({"event": "env", "value": os.environ.get("BIGL_TEST_VALUE"), "cwd": os.getcwd()}))
    """), env=env, cwd=tmp_path)
    process.start()
    process.wait(timeout=30)
    (event,) = process.poll()
    assert event["value"] == "42"
    assert Path(event["cwd"]).resolve() == tmp_path.resolve()
    assert json.dumps(event)  # plain JSON types
