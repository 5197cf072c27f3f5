"""``bigl train`` end to end on the smoke config: run folder, event log contract, bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigl.bundle import load_bundle
from bigl.cli import main
from bigl.training.events import read_events

#: Fields every event of a kind must have (docs/architecture.md, "Training").
CONTRACT = {
    "start": {"stage", "total"},
    "step": {"stage", "step", "total", "losses", "lr", "sec_per_step", "eta_s"},
    "checkpoint": {"stage", "step", "path"},
    "end": {"stage", "bundle", "slices_per_s"},
    "onnx_export": {"files"},
    "done": {"bundle"},
    "target_confidence": {"stage", "per_scan"},
    "error": {"message", "hint"},
}


@pytest.fixture(scope="module")
def smoke_run(phantom_cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    status = main(["train", "--config", "smoke", "--data", str(phantom_cohort), "--out", str(out), "--no-progress", "run.threads=1"])
    assert status == 0
    return out


def test_run_folder_layout(smoke_run):
    for name in ("config.json", "events.jsonl", "model.safetensors", "translator.safetensors", "losses.png",
                 "model.onnx", "model.translator.onnx"):
        assert (smoke_run / name).is_file(), name
    checkpoints = sorted(p.name for p in (smoke_run / "checkpoints").iterdir())
    assert checkpoints == [
        "adapt_00000002.safetensors", "adapt_00000004.safetensors",
        "translator_00000002.safetensors", "translator_00000004.safetensors",
    ]
    samples = sorted(p.name for p in (smoke_run / "samples").iterdir())
    assert samples == ["adapt_00000004.png", "translator_00000004.png"]
    assert (smoke_run / "losses.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((smoke_run / "config.json").read_text())
    assert config["adapt"]["method"] == "bigl" and config["run"]["threads"] == 1
    assert config["data"]["source_modality"] == "t1" and config["data"]["target_modality"] == "t2"


def test_event_log_follows_the_contract(smoke_run):
    lines = (smoke_run / "events.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is strict JSON
    for event in events:
        assert isinstance(event["time"], float)
        assert CONTRACT.get(event["event"], set()) <= set(event), event
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "done" and "error" not in kinds
    assert [e["stage"] for e in events if e["event"] == "start"] == ["translator", "adapt"]
    steps = [e for e in events if e["event"] == "step" and e["stage"] == "adapt"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and all(e["total"] == 4 for e in steps)
    assert {"seg", "seg_syn", "out", "adv_feature", "adv_position", "adv_channel", "d_feature"} <= set(steps[0]["losses"])
    assert set(steps[0]["lr"]) == {"segmenter", "discriminators"}
    assert steps[-1]["eta_s"] == 0
    ends = {e["stage"]: e for e in events if e["event"] == "end"}
    assert ends["translator"]["bundle"] == "translator.safetensors" and ends["adapt"]["bundle"] == "model.safetensors"
    assert all(e["slices_per_s"] > 0 for e in ends.values())
    assert events[-1]["bundle"] == "model.safetensors"
    exports = [e for e in events if e["event"] == "onnx_export"]
    assert [e["files"] for e in exports] == [["model.onnx", "model.translator.onnx"]]
    (confidence,) = [e for e in events if e["event"] == "target_confidence"]
    assert confidence["stage"] == "adapt" and kinds.index("target_confidence") < kinds.index("onnx_export")


def test_bigl_train_prints_how_sure_the_model_is_of_the_target_scans(smoke_run, capsys):
    from bigl.bundle import read_metadata
    from bigl.cli.train import _print_target_confidence

    recorded = read_metadata(smoke_run / "model.safetensors")["training"]["target_confidence"]
    _print_target_confidence(smoke_run / "model.safetensors")
    line = capsys.readouterr().out
    assert recorded["mean"] is not None  # the smoke model finds some tumour on the phantoms
    assert f"mean tumour confidence {recorded['mean']:.3f} on the {recorded['scans']} unlabelled target scans" in line
    assert recorded["unsure"] and all(name in line for name in recorded["unsure"])
    _print_target_confidence(smoke_run / "translator.safetensors")  # the translator stage's file: no model, no line
    assert capsys.readouterr().out == ""


def test_the_onnx_export_is_the_final_bundle(smoke_run):
    pytest.importorskip("onnxruntime")
    from bigl.prediction import choose_engine

    assert choose_engine(smoke_run / "model.safetensors", "auto") == ("onnx", smoke_run / "model.onnx")


def test_bundle_loads_with_translators_and_training_metadata(smoke_run):
    bundle = load_bundle(smoke_run / "model.safetensors")
    assert bundle.method == "bigl" and bundle.modality == "t2" and bundle.source_modality == "t1"
    assert bundle.translator_s2t is not None and bundle.translator_t2s is not None
    training = bundle.metadata["training"]
    assert training["config"]["adapt"]["lambda_gtl"] == 0.1
    assert training["iterations"] == {"adapt": 4, "translator": 4}
    assert training["translator_mode"] == "paired"
    assert bundle.metadata["preprocessing"]["image_size"] == 32
    # which cases trained the model, so a later test set can be checked against them
    cohort = sorted(p.name for p in Path(training["config"]["data"]["source_dir"]).iterdir() if p.is_dir())
    assert training["labelled"]["case_names"] == cohort and training["unlabelled"]["case_names"] == cohort


def test_source_only_baseline_from_the_command_line(phantom_cohort, tmp_path):
    out = tmp_path / "source_only"
    assert main(["train", "--config", "smoke", "--data", str(phantom_cohort), "--out", str(out), "--method", "source-only",
                 "--no-progress"]) == 0
    bundle = load_bundle(out / "model.safetensors")
    assert bundle.method == "source-only" and bundle.translator_s2t is None
    assert not (out / "translator.safetensors").exists()


def test_bad_override_exits_with_status_2_and_logs_the_error(phantom_cohort, tmp_path, capsys):
    out = tmp_path / "bad"
    status = main(["train", "--config", "smoke", "--data", str(phantom_cohort), "--out", str(out), "adapt.lamda_gtl=1"])
    assert status == 2
    err = capsys.readouterr().err
    assert "adapt.lamda_gtl" in err and "adapt.lambda_gtl" in err
    events = read_events(out / "events.jsonl")
    assert events[-1]["event"] == "error" and "adapt.lamda_gtl" in events[-1]["message"]


def test_resume_needs_a_run_folder(capsys):
    assert main(["train", "--config", "smoke", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
