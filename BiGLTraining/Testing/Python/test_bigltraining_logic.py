"""TrainingLogic: lifecycle, event log -> state / log / MRML nodes, and real ``bigl train`` runs.

The fast tests replace ``bigl train`` with a small script that writes an event log the way the
trainer does, to check the logic's reactions (finish, failure, crash, stop) in a second. The
tests marked slow run the real trainer with the smoke config on phantoms: to completion (with
registration into the models folder and an evaluation), stopped and resumed, and under
``torch.distributed.run`` with two processes.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from BiGLSegmentationLib.processtree import pid_alive
from BiGLTrainingLib import logic as logic_module
from BiGLTrainingLib.command import TrainingSettings
from BiGLTrainingLib.logic import FAILED, FINISHED, RUNNING, STOPPED, TrainingLogic, resume_point
from bigl.errors import BiGLError, InputError

ODD_FOLDER = "out dir/\u00fc & $x"

#: Writes an event log like ``bigl train`` (in the working directory, the run folder).
FAKE_TRAINER = textwrap.dedent(
    """
    import json, sys, time
    mode = sys.argv[1]
    def write(event, **fields):
        with open("events.jsonl", "a") as f:
            f.write(json.dumps({"event": event, **fields, "time": time.time()}) + "\\n")
    open("config.json", "w").write("{}")
    print("fake trainer started", flush=True)
    for stage, total in (("translator", 4), ("adapt", 6)):
        write("start", stage=stage, total=total, step=0)
        for step in range(1, total + 1):
            write("step", stage=stage, step=step, total=total, losses={"a": 1.0 / step, "b": 0.5},
                  sec_per_step=0.01, eta_s=0.01 * (total - step))
            if mode == "slow":
                time.sleep(0.3)
            if step % 2 == 0:
                write("checkpoint", stage=stage, step=step, path=f"checkpoints/{stage}_{step:08d}.safetensors")
            if mode == "fail" and stage == "adapt" and step == 3:
                write("error", message="training diverged", hint="lower the learning rate")
                sys.exit(2)
            if mode == "crash" and stage == "adapt" and step == 3:
                print("Segmentation fault", flush=True)
                sys.exit(139)
        write("end", stage=stage, step=total, total=total)
    write("done", bundle="model.safetensors")
    """
)


@pytest.fixture
def fake_trainer(monkeypatch):
    """Make the logic run FAKE_TRAINER in the given mode instead of ``bigl train``."""
    mode = {"value": "ok"}

    def command(settings, *, python=None, preset_config=None, resume=False, stage="all"):
        return [sys.executable, "-c", FAKE_TRAINER, mode["value"]]

    monkeypatch.setattr(logic_module, "train_command", command)
    return mode


def settings_for(cases: Path, out: Path, **changes) -> TrainingSettings:
    values = dict(output_dir=str(out), preset="custom", custom_config="smoke", source_dir=str(cases),
                  source_modality="t1", target_dir=str(cases), target_modality="t2", device="cpu")  # fmt: skip
    values.update(changes)
    return TrainingSettings(**values)


# ------------------------------------------------------------------------------------ fast


@pytest.mark.slicer
def test_finished_run_updates_state_log_and_curves(headless_slicer, phantom_cases, tmp_path, fake_trainer):
    logic = TrainingLogic(headless_slicer.scene, log_lines=8)
    seen = []
    logic.on_log = seen.append
    logic.start(settings_for(phantom_cases, tmp_path / "run"))
    assert logic.status == RUNNING and logic.busy
    assert logic.wait(timeout=60) == FINISHED
    assert logic.state.done and logic.bundle == tmp_path / "run" / "model.safetensors"
    assert [logic.state.stages[s].fraction for s in ("translator", "adapt")] == [1.0, 1.0]
    assert len(logic.log) == 8 and list(logic.log) == seen[-8:]  # the log view keeps the last lines
    assert len(seen) > 20 and "fake trainer started" in seen
    assert logic.curves.table_node("translator").GetNumberOfRows() == 4
    assert logic.curves.table_node("adapt").GetNumberOfRows() == 6
    assert logic.registered_bundle is None  # no models folder given
    assert logic.status_text().startswith("finished")


def test_error_event_becomes_the_failure_message(phantom_cases, tmp_path, fake_trainer):
    fake_trainer["value"] = "fail"
    logic = TrainingLogic()
    logic.start(settings_for(phantom_cases, tmp_path / "run"))
    assert logic.wait(timeout=60) == FAILED
    assert isinstance(logic.error, BiGLError)
    assert logic.error.message == "training diverged" and logic.error.hint == "lower the learning rate"
    assert "failed: training diverged" in logic.status_text()


def test_crash_without_error_event_points_to_the_console_log(phantom_cases, tmp_path, fake_trainer):
    fake_trainer["value"] = "crash"
    logic = TrainingLogic()
    logic.start(settings_for(phantom_cases, tmp_path / "run"))
    assert logic.wait(timeout=60) == FAILED
    assert "exit status 139" in logic.error.message
    assert "console.log" in logic.error.hint
    assert "Segmentation fault" in logic.log  # the console output reached the log view
    assert (tmp_path / "run" / "console.log").read_text().startswith("fake trainer started")


def test_stop_in_the_middle(phantom_cases, tmp_path, fake_trainer):
    fake_trainer["value"] = "slow"
    logic = TrainingLogic(stop_timeout=2.0)
    logic.start(settings_for(phantom_cases, tmp_path / "run"))
    deadline = time.monotonic() + 30
    while logic.state.stages["translator"].step < 2:
        assert time.monotonic() < deadline
        logic.poll()
        time.sleep(0.05)
    pid = logic.process.pid
    logic.request_stop()  # what the Stop button does: no waiting in the GUI thread
    assert logic.busy and logic.stopping and logic.status_text() == "stopping..."
    assert logic.wait(timeout=10) == STOPPED
    assert not logic.busy and not pid_alive(pid)
    assert "stopped" in logic.status_text()


def test_refusals_happen_before_anything_starts(phantom_cases, tmp_path, fake_trainer):
    logic = TrainingLogic()
    with pytest.raises(InputError, match="no output folder"):
        logic.start(settings_for(phantom_cases, tmp_path / "run", output_dir=""))
    with pytest.raises(InputError, match="cannot be used for training") as info:
        logic.start(settings_for(phantom_cases, tmp_path / "run", source_modality="flair"))
    assert "flair" in str(info.value)
    assert not (tmp_path / "run").exists() and logic.process is None
    with pytest.raises(InputError, match="no stopped run"):
        logic.resume(settings_for(phantom_cases, tmp_path / "run"))

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "translator_00000200.safetensors").write_bytes(b"")
    (run / "checkpoints" / "adapt_00000010.safetensors").write_bytes(b"")
    assert resume_point(run) == "adapt step 10"
    with pytest.raises(InputError, match="already holds a training run") as info:
        logic.start(settings_for(phantom_cases, run))
    assert "Resume" in info.value.hint and "adapt step 10" in info.value.hint
    (run / "model.safetensors").write_bytes(b"")
    assert resume_point(run) is None
    with pytest.raises(InputError, match="has finished"):
        logic.resume(settings_for(phantom_cases, run))
    with pytest.raises(InputError, match="no trained model"):
        logic.start_evaluation(phantom_cases)
    assert not logic.busy


def capture_train_command(monkeypatch) -> dict:
    """Replace the trainer's command line with a no-op; the dict receives the settings it was built from."""
    captured = {}

    def command(settings, **kwargs):
        captured["settings"] = settings
        return [sys.executable, "-c", "pass"]

    monkeypatch.setattr(logic_module, "train_command", command)
    return captured


def test_cases_the_check_leaves_out_are_excluded_from_the_run(phantom_cases, tmp_path, monkeypatch):
    import shutil

    cases = Path(shutil.copytree(phantom_cases, tmp_path / "cases"))
    (cases / "Phantom_002" / "Phantom_002_seg.nii.gz").unlink()
    captured = capture_train_command(monkeypatch)
    logic = TrainingLogic()
    logic.start(settings_for(cases, tmp_path / "run"))
    logic.wait(timeout=30)
    assert captured["settings"].exclude == ["Phantom_002"]
    assert captured["settings"].resolve_config()["data"]["exclude"] == ["Phantom_002"]


def test_several_data_folders_reach_the_run_as_one_data_set(phantom_cases, tmp_path, monkeypatch):
    import shutil

    from bigl.data.phantoms import write_cohort
    from bigl.training.data import find_training_cases

    first = Path(shutil.copytree(phantom_cases, tmp_path / "first"))
    second = tmp_path / "second"
    write_cohort(second, cases=2, size=32, seed=1, modalities=("t1", "t2"), prefix="More")
    (second / "More_001" / "More_001_seg.nii.gz").unlink()
    captured = capture_train_command(monkeypatch)
    logic = TrainingLogic()
    folders = [str(first), str(second)]
    report = logic.check_data(settings_for(first, tmp_path / "run", source_dir=folders, target_dir=folders))
    assert report.ok and report.source.usable == ["More_002", "Phantom_001", "Phantom_002", "Phantom_003"]
    logic.start(settings_for(first, tmp_path / "run", source_dir=folders, target_dir=folders))
    logic.wait(timeout=30)
    settings = captured["settings"]
    assert settings.source_dir == folders and settings.exclude == ["More_001"]
    config = settings.resolve_config()
    assert config["data"]["source_dir"] == config["data"]["target_dir"] == folders
    found = find_training_cases(config, need_source=True, need_target=True, labelled_role="source")
    assert [case.name for case in found["source"]] == ["More_002", "Phantom_001", "Phantom_002", "Phantom_003"]
    assert {case.folder.parent for case in found["target"]} == {first, second}

    shutil.copytree(first / "Phantom_001", second / "Phantom_001")  # now in both folders
    with pytest.raises(InputError, match="cannot be used for training") as info:
        TrainingLogic().start(settings_for(first, tmp_path / "run2", source_dir=folders, target_dir=folders))
    assert f"Phantom_001 in {first} and {second}" in info.value.message
    assert not (tmp_path / "run2").exists()


# ------------------------------------------------------------------------ real bigl train


def step_events(run: Path, stage: str) -> list[int]:
    steps = []
    for line in (run / "events.jsonl").read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "step" and event.get("stage") == stage:
            steps.append(event["step"])
    return steps


@pytest.mark.slow
@pytest.mark.slicer
def test_real_training_to_completion_registers_and_evaluates(headless_slicer, phantom_cases, tmp_path):
    from BiGLSegmentationLib.models import available_models

    models = tmp_path / "models"
    out = tmp_path / ODD_FOLDER
    logic = TrainingLogic(headless_slicer.scene, models_folder=models)
    settings = settings_for(phantom_cases, out, evaluation_dir=str(phantom_cases), evaluation_modality="t2")
    command = logic.start(settings)
    assert str(out) in command  # one argument, odd characters and all
    assert logic.wait(timeout=600) == FINISHED, "\n".join(logic.log)

    assert (out / "model.safetensors").is_file() and logic.bundle == out / "model.safetensors"
    assert logic.registered_bundle == models / "x.safetensors"  # named after the run folder
    assert [choice.path for choice in available_models(models) if not choice.is_default] == [models / "x.safetensors"]
    for stage in ("translator", "adapt"):
        table = logic.curves.table_node(stage)
        steps = step_events(out, stage)
        assert table.GetNumberOfRows() == len(steps) > 0
        assert logic.curves.chart_node(stage).GetNumberOfPlotSeriesNodes() == table.GetNumberOfColumns() - 1
        assert logic.state.stages[stage].status == "finished"
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["source_dir"] == str(phantom_cases)

    assert logic.evaluation_result is not None and logic.evaluation_result["n_cases"] == 3
    assert logic.evaluation_table.GetNumberOfRows() == 4
    assert (out / "evaluation" / "summary.json").is_file()


@pytest.mark.slow
@pytest.mark.slicer
def test_real_training_stopped_and_resumed(headless_slicer, phantom_cases, tmp_path):
    out = tmp_path / "run"
    logic = TrainingLogic(headless_slicer.scene, stop_timeout=5.0)
    settings = settings_for(phantom_cases, out, translator_iterations=6, adapt_iterations=4)
    logic.start(settings)
    deadline = time.monotonic() + 300
    while logic.state.stages["translator"].checkpoint_step is None:
        assert logic.busy and time.monotonic() < deadline, "\n".join(logic.log)
        logic.poll()
        time.sleep(0.1)
    pid = logic.process.pid
    logic.stop()
    assert logic.status == STOPPED
    assert not pid_alive(pid)
    if hasattr(os, "killpg"):
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # nothing of the process group is left
    point = resume_point(out)
    assert point is not None and point.startswith("translator step")
    stopped_at = step_events(out, "translator")[-1]
    assert stopped_at < 6

    with open(out / "events.jsonl", "ab") as stream:  # a line cut short, as by a crash
        stream.write(b'{"event": "step", "stage": "transl')
    logic.resume(settings)
    assert logic.wait(timeout=600) == FINISHED, "\n".join(logic.log)
    assert logic._events.skipped == 1  # the cut line (merged with the next one) was skipped, not fatal
    table = logic.curves.table_node("translator")
    import slicer.util

    steps = list(slicer.util.arrayFromTableColumn(table, "step"))
    assert steps == sorted(set(steps)) and steps[-1] == 6  # one row per step, across the resume
    assert logic.state.error_message is None


@pytest.mark.slow
def test_real_training_reads_two_data_folders(tmp_path):
    from bigl.data.phantoms import write_cohort

    write_cohort(tmp_path / "a", cases=2, size=32, seed=0, modalities=("t1", "t2"))
    write_cohort(tmp_path / "b", cases=1, size=32, seed=1, modalities=("t1", "t2"), prefix="More")
    folders = [str(tmp_path / "a"), str(tmp_path / "b")]
    out = tmp_path / "run"
    logic = TrainingLogic()
    logic.start(settings_for(tmp_path / "a", out, source_dir=folders, target_dir=folders))
    assert logic.wait(timeout=600) == FINISHED, "\n".join(logic.log)
    assert json.loads((out / "config.json").read_text())["data"]["source_dir"] == folders
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    data = next(event for event in events if event["event"] == "data")
    names = ["More_001", "Phantom_001", "Phantom_002"]  # the trainer read both folders
    assert data["labelled"]["case_names"] == data["unlabelled"]["case_names"] == names


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="process-tree check uses POSIX process groups")
def test_two_processes_under_torchrun_start_and_stop_cleanly(phantom_cases, tmp_path):
    from BiGLSegmentationLib.processtree import descendant_pids

    out = tmp_path / "run"
    logic = TrainingLogic(stop_timeout=5.0)
    settings = settings_for(phantom_cases, out, gpus=2, translator_iterations=200)
    command = logic.start(settings)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    deadline = time.monotonic() + 300
    while logic.state.stages["translator"].step < 1:
        assert logic.busy and time.monotonic() < deadline, "\n".join(logic.log)
        logic.poll()
        time.sleep(0.1)
    start = next(json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if '"start"' in line)
    assert start["world_size"] == 2
    tree = [logic.process.pid, *descendant_pids(logic.process.pid)]
    assert len(tree) >= 3  # the launcher and its two workers
    logic.stop()
    assert logic.status == STOPPED
    assert [pid for pid in tree if pid_alive(pid)] == []
