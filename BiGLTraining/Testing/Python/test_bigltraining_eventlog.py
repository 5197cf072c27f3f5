"""Following the event log: incremental reads, unfinished and corrupt lines, replaced files, state."""

from __future__ import annotations

import json
import os

from bigl.runplan import format_duration
from BiGLTrainingLib.eventlog import EventLogReader, FileTail, TrainingState, format_event


def step(stage: str, n: int, total: int = 10, **losses: float) -> dict:
    return {"event": "step", "stage": stage, "step": n, "total": total, "losses": losses or {"seg": 1.0 / n},
            "sec_per_step": 0.5, "eta_s": 0.5 * (total - n), "time": 1000.0 + n}  # fmt: skip


def line(event: dict) -> bytes:
    return (json.dumps(event) + "\n").encode()


def test_reads_only_what_was_appended(tmp_path):
    path = tmp_path / "events.jsonl"
    reader = EventLogReader(path)
    assert reader.read() == []  # no file yet: nothing, no error
    path.write_bytes(line(step("translator", 1)) + line(step("translator", 2)))
    assert [e["step"] for e in reader.read()] == [1, 2]
    assert reader.read() == []
    with open(path, "ab") as stream:
        stream.write(line(step("translator", 3)))
    assert [e["step"] for e in reader.read()] == [3]


def test_unfinished_last_line_waits_for_its_end(tmp_path):
    path = tmp_path / "events.jsonl"
    whole = line(step("adapt", 7))
    path.write_bytes(line(step("adapt", 6)) + whole[:25])
    reader = EventLogReader(path)
    assert [e["step"] for e in reader.read()] == [6]
    assert reader.skipped == 0  # the half line is not counted as corrupt: it is still being written
    with open(path, "ab") as stream:
        stream.write(whole[25:])
    assert [e["step"] for e in reader.read()] == [7]
    assert reader.skipped == 0


def test_final_read_takes_a_last_line_without_newline(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(line(step("adapt", 1)) + json.dumps({"event": "done", "bundle": "model.safetensors"}).encode())
    reader = EventLogReader(path)
    assert [e["event"] for e in reader.read()] == ["step"]
    assert [e["event"] for e in reader.read(final=True)] == ["done"]


def test_corrupt_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "events.jsonl"
    garbage = [b"{\"event\": \"step\", \"stage\": \"ad", b"not json at all", b"[1, 2, 3]", b"{\"no_event\": 1}",
               b"\xff\xfe\x00 binary", b"{\"event\": 42}"]  # fmt: skip
    path.write_bytes(line(step("adapt", 1)) + b"\n".join(garbage) + b"\n\n" + line(step("adapt", 2)))
    reader = EventLogReader(path)
    events = reader.read()
    assert [e["step"] for e in events] == [1, 2]
    assert reader.skipped == len(garbage)


def test_a_truncated_line_followed_by_appended_lines_loses_only_that_line(tmp_path):
    """A crash mid-write, then a resumed run appending to the same log."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(line(step("adapt", 4)) + line(step("adapt", 5))[:30])  # the crash
    with open(path, "ab") as stream:  # the resumed run
        stream.write(line(step("adapt", 5)) + line(step("adapt", 6)))
    reader = EventLogReader(path)
    assert [e["step"] for e in reader.read()] == [4, 6]
    assert reader.skipped == 1


def test_replaced_or_truncated_file_is_read_from_its_start(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(line(step("adapt", 1)) + line(step("adapt", 2)))
    reader = EventLogReader(path)
    assert len(reader.read()) == 2
    path.write_bytes(line(step("translator", 9)))  # shorter than what was read
    assert [e["step"] for e in reader.read()] == [9]
    replacement = tmp_path / "new.jsonl"
    replacement.write_bytes(line(step("translator", 1)) * 3 + line(step("translator", 2)))
    os.replace(replacement, path)  # a new file of larger size: new identity
    assert [e["step"] for e in reader.read()] == [1, 1, 1, 2]


def test_large_backlog_comes_in_chunks_unless_final(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(line(step("adapt", n, total=500)) for n in range(1, 501)))
    reader = EventLogReader(path, chunk_bytes=4096)
    first = reader.read()
    assert 0 < len(first) < 500  # one chunk per poll keeps a GUI poll short
    rest = reader.read(final=True)
    assert [e["step"] for e in first + rest] == list(range(1, 501))


def test_console_tail_keeps_the_last_state_of_progress_lines(tmp_path):
    path = tmp_path / "console.log"
    path.write_bytes(b"old output\n")
    tail = FileTail(path, from_end=True)
    with open(path, "ab") as stream:
        stream.write(b"loading\r\n 10%|#\r 50%|#####\r100%|##########\nwarning: x \xc3\xbc\npartial")
    assert tail.read_text() == ["loading", "100%|##########", "warning: x \u00fc"]
    assert tail.read_text(final=True) == ["partial"]


def test_state_follows_both_stages():
    state = TrainingState()
    state.apply({"event": "start", "stage": "translator", "total": 4, "step": 0})
    assert state.current_stage == "translator" and state.stages["translator"].status == "running"
    for n in (1, 2):
        state.apply(step("translator", n, total=4, g_adv=0.5, d=0.25))
    translator = state.stages["translator"]
    assert (translator.step, translator.total, translator.fraction) == (2, 4, 0.5)
    assert translator.losses == {"g_adv": 0.5, "d": 0.25}
    assert translator.eta_s == 1.0
    state.apply({"event": "checkpoint", "stage": "translator", "step": 2, "path": "checkpoints/translator_00000002.safetensors"})
    assert translator.checkpoint_step == 2
    state.apply({"event": "end", "stage": "translator", "step": 4, "total": 4})
    assert translator.fraction == 1.0 and translator.status == "finished"
    assert state.stages["adapt"].fraction == 0.0 and state.stages["adapt"].status == "waiting"
    state.apply({"event": "start", "stage": "adapt", "total": 8, "step": 0})
    state.apply(step("adapt", 2, total=8, seg=0.9))
    assert state.current_stage == "adapt" and state.stages["adapt"].fraction == 0.25
    state.apply({"event": "done", "bundle": "model.safetensors"})
    assert state.done and state.bundle == "model.safetensors" and state.current_stage is None


def test_state_ignores_fields_of_the_wrong_type():
    state = TrainingState()
    state.apply({"event": "step", "stage": "adapt", "step": "seven", "total": None, "losses": {"seg": "x", "adv": 0.5, "gan": None}})
    adapt = state.stages["adapt"]
    assert adapt.step == 0 and adapt.total is None
    assert adapt.losses == {"adv": 0.5}
    state.apply({"event": "step", "stage": ["adapt"], "step": 3})  # no usable stage: ignored
    state.apply({"event": "something new", "stage": "adapt"})
    assert adapt.step == 0


def test_error_then_resumed_start_clears_the_error():
    state = TrainingState()
    state.apply({"event": "error", "message": "training was interrupted", "hint": "run with --resume"})
    assert state.error_message == "training was interrupted" and state.error_hint == "run with --resume"
    state.apply({"event": "start", "stage": "adapt", "total": 10, "step": 6, "resumed": True})
    assert state.error_message is None
    assert state.stages["adapt"].step == 6  # progress restarts at the checkpoint's step


def test_durations_and_log_lines():
    assert format_duration(7.2) == "7s"
    assert format_duration(584) == "9m44s"
    assert format_duration(3725) == "1h02m"
    assert format_duration(None) == "?" and format_duration(float("nan")) == "?"
    text = format_event(step("adapt", 120, total=2000, seg=0.8))
    assert "[adapt] 120/2000" in text and "seg 0.8" in text and "ETA 15m40s" in text
    error = format_event({"event": "error", "message": "disk full", "hint": "free space"})
    assert error.splitlines() == ["ERROR: disk full", "  fix: free space"]
    data = {"event": "data", "labelled": {"modality": "t1", "cases": 3, "slices": 126}, "unlabelled": None, "pairs": 126}
    assert format_event(data) == "data: labelled t1: 3 case(s), 126 slices; 126 co-registered slice pairs"
    assert format_event({"event": "sample", "stage": "adapt", "path": "s.png", "time": 1.0}) == '[adapt] {"event": "sample", "stage": "adapt", "path": "s.png"}'
