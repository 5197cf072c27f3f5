"""Checkpoints and resume: an interrupted run continued with --resume ends with exactly the
weights of the uninterrupted run (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bigl.errors import ConfigError, InputError
from bigl.training import load_config, run_training
from bigl.training.adapt_stage import AdaptTrainer
from bigl.training.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from bigl.training.events import read_events
from bigl.training.translator_stage import TranslatorTrainer

REPO = Path(__file__).resolve().parents[2]
SHORT = ["translator_training.iterations=5", "adapt.iterations=5", "run.checkpoint_every=2", "run.threads=1"]


class SimulatedCrash(RuntimeError):
    pass


def crash_at(monkeypatch, trainer_class, crash_step: int):
    """Make ``trainer_class`` fail at step ``crash_step`` (a simulated power cut); returns the
    function that puts the real step back."""
    original = trainer_class.train_step

    def crashing(self, step):
        if step == crash_step:
            raise SimulatedCrash("power cut")
        return original(self, step)

    monkeypatch.setattr(trainer_class, "train_step", crashing)
    return lambda: monkeypatch.setattr(trainer_class, "train_step", original)


def config_for(data: Path, *overrides: str) -> dict:
    return load_config("smoke", [f"data.source_dir={data}", f"data.target_dir={data}", *SHORT, *overrides])


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = tensors(a), tensors(b)
    assert first.keys() == second.keys()
    different = [key for key in first if not torch.equal(first[key], second[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference_runs(phantom_cohort, tmp_path_factory):
    """Uninterrupted runs, by translator mode."""
    runs = {}
    for mode in ("paired", "unpaired"):
        out = tmp_path_factory.mktemp(f"reference_{mode}")
        run_training(config_for(phantom_cohort, f"translator_training.mode={mode}"), out, progress=False)
        runs[mode] = out
    return runs


@pytest.mark.parametrize(
    ("mode", "trainer_class", "crash_step"),
    [("paired", TranslatorTrainer, 3), ("unpaired", TranslatorTrainer, 3), ("paired", AdaptTrainer, 3)],
    ids=["translator-paired", "translator-unpaired-with-image-pool", "adapt"],
)
def test_resume_after_a_crash_reproduces_the_uninterrupted_run(
    phantom_cohort, reference_runs, tmp_path, monkeypatch, mode, trainer_class, crash_step
):
    config = config_for(phantom_cohort, f"translator_training.mode={mode}")
    out = tmp_path / "run"
    repair = crash_at(monkeypatch, trainer_class, crash_step)
    with pytest.raises(SimulatedCrash):
        run_training(config, out, progress=False)
    events = read_events(out / "events.jsonl")
    assert events[-1]["event"] == "error" and "power cut" in events[-1]["message"]
    assert not (out / "model.safetensors").exists()

    repair()
    run_training(config, out, resume=True, progress=False)
    events = read_events(out / "events.jsonl")
    resumed = [e for e in events if e["event"] == "start" and e.get("resumed")]
    assert [(e["stage"], e["step"]) for e in resumed] == [(trainer_class.stage, 2)]
    assert events[-1]["event"] == "done"
    reference = reference_runs[mode]
    assert_same_weights(out / "translator.safetensors", reference / "translator.safetensors")
    assert_same_weights(out / "model.safetensors", reference / "model.safetensors")


def test_resume_of_an_empty_folder_starts_a_new_run(phantom_cohort, tmp_path):
    out = tmp_path / "run"
    run_training(config_for(phantom_cohort, "adapt.method=source-only"), out, resume=True, progress=False)
    assert (out / "model.safetensors").exists()


KILL_OVERRIDES = ["adapt.iterations=60", "run.checkpoint_every=5", "translator_training.iterations=4", "run.threads=1"]


@pytest.fixture(scope="module")
def kill_reference(phantom_cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kill_reference")
    config = load_config("smoke", [f"data.source_dir={phantom_cohort}", f"data.target_dir={phantom_cohort}", *KILL_OVERRIDES])
    run_training(config, out, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_resume_after_stopping_the_process(phantom_cohort, kill_reference, tmp_path, signum):
    out = tmp_path / "stopped"
    command = [sys.executable, "-m", "bigl", "train", "--config", "smoke", "--data", str(phantom_cohort), "--out", str(out),
               *KILL_OVERRIDES]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    try:
        while time.time() < deadline:
            if any(e["event"] == "checkpoint" and e["stage"] == "adapt" for e in read_events(out / "events.jsonl")):
                break
            time.sleep(0.02)
        os.kill(process.pid, signum)
        status = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    events = read_events(out / "events.jsonl")
    assert not any(e["event"] == "done" for e in events), "the run ended before it could be stopped"
    if signum == signal.SIGTERM:  # a GUI's Stop: the log says so
        assert status == 130
        assert events[-1]["event"] == "error" and "interrupted" in events[-1]["message"]
    config = load_config("smoke", [f"data.source_dir={phantom_cohort}", f"data.target_dir={phantom_cohort}", *KILL_OVERRIDES])
    run_training(config, out, resume=True, progress=False)
    assert_same_weights(out / "model.safetensors", kill_reference / "model.safetensors")


# ------------------------------------------------------------------------------------------
# checkpoint files


def _toy(step: int, folder: Path) -> Path:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return save_checkpoint(folder / f"adapt_{step:08d}.safetensors", stage="adapt", step=step,
                           modules={"segmenter": model}, optimizers={"segmenter": optimizer})


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    _toy(2, tmp_path)
    newest = _toy(4, tmp_path)
    assert latest_checkpoint(tmp_path, "adapt").step == 4
    newest.write_bytes(newest.read_bytes()[:100])
    assert latest_checkpoint(tmp_path, "adapt").step == 2


def test_a_crash_while_saving_leaves_the_previous_checkpoints_intact(tmp_path, monkeypatch):
    _toy(2, tmp_path)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(InputError, match="cannot write .*disk full"):  # a message, not a traceback
        _toy(4, tmp_path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["adapt_00000002.safetensors"], "no partial file may remain"
    assert latest_checkpoint(tmp_path, "adapt").step == 2


def test_checkpoints_are_safetensors_with_json_state(tmp_path):
    path = _toy(3, tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        meta = handle.metadata()
    assert "rng.torch" in keys and any(k.startswith("optim.segmenter.state.") for k in keys)
    assert "bigl_checkpoint" in meta
    assert list_checkpoints(tmp_path, "adapt") == [path]


def test_resume_refuses_a_checkpoint_of_another_length(phantom_cohort, tmp_path):
    out = tmp_path / "run"
    config = config_for(phantom_cohort, "adapt.method=source-only")
    run_training(config, out, progress=False)
    (out / "config.json").unlink()  # pretend a config without record
    with pytest.raises(ConfigError, match="steps"):
        run_training(config_for(phantom_cohort, "adapt.method=source-only", "adapt.iterations=9"), out, resume=True, progress=False)
