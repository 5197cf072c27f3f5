"""JsonLineProcess: events from stdout JSON lines, a capped log, cancel that ends the whole tree."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

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


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (Linux)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks processes through /proc (Linux)")
def test_cancel_ends_the_child_and_the_processes_it_started(tmp_path):
    process = JsonLineProcess(_python(f"""
        import json, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(json.dumps({{"event": "child", "pid": child.pid}}), flush=True)
        time.sleep(60)
    """))
    process.start()
    deadline = time.monotonic() + 20
    events = []
    while not events and time.monotonic() < deadline:
        events = process.poll()
        time.sleep(0.05)
    assert events, "the child never reported"
    grandchild = events[0]["pid"]
    assert _alive(process.pid) and _alive(grandchild)
    started = time.monotonic()
    process.cancel(grace_seconds=1.0)
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(process.pid)
    assert not _alive(grandchild), "cancel left a grandchild process running"
    assert process.cancelled and process.returncode is not None and process.returncode != 0


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
