"""Packaging a report-split protocol run as the shipped model (benchmarks/make_reference_model.py),
on a protocol folder built here: the bundle gets the report table of its seed and the over-seeds
summary of every method, and refuses runs that were not scored on the report cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bigl.bundle import read_metadata
from bigl.testing import load_script

REPO = Path(__file__).resolve().parents[2]


def _script():
    return load_script(REPO / "benchmarks" / "make_reference_model.py")


def _summary(cases: list[str], dice: float) -> dict:
    scores = {region: {"dice": dice, "hd95": 10.0} for region in ("WT", "TC", "ET")}
    zero = {region: {"dice": 0.0, "hd95": 0.0} for region in ("WT", "TC", "ET")}
    return {"modality": "t2", "cases": {case: scores for case in cases}, "summary": {"mean": scores, "std": zero}}


def _protocol(root: Path, bundle: Path, cases: list[str], split: str = "report") -> Path:
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"split": split, "scored": cases, "data": ["/data"],
                                                    "settings": {"recipe": ["adapt.dice=regions"]}}))
    (root / "recipe" / "seed0").mkdir(parents=True)
    shutil.copy(bundle, root / "recipe" / "seed0" / "model.safetensors")
    (root / "recipe" / "seed0" / "events.jsonl").write_text(
        json.dumps({"event": "end", "stage": "adapt", "seconds": 120.0}) + "\n" + "a line cut by a crash\n")
    dice = {"recipe": (0.6, 0.5), "source-only": (0.1, 0.1), "invert-histmatch": (0.4, 0.4), "target-only": (0.8, 0.7)}
    for name, per_seed in dice.items():
        for seed, value in enumerate(per_seed):
            folder = root / name / f"eval-seed{seed}"
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps(_summary(cases, value)))
    return root


def test_the_packaged_model_carries_its_seed_and_the_spread_over_seeds(tiny_bundle, tmp_path, capsys):
    script = _script()
    root = _protocol(tmp_path / "protocol", tiny_bundle, script.REPORT_CASES)
    destination = tmp_path / "shipped" / "default_model.safetensors"
    destination.parent.mkdir()
    assert script.main([str(root), "--setting", "recipe", "--seed", "0", "--target-only", "target-only",
                        "--destination", str(destination)]) == 0
    report = read_metadata(destination)["metrics"]["report"]
    assert set(report["methods"]) == {"source-only", "invert-histmatch", "bigl", "target-only"}
    assert report["methods"]["bigl"]["mean"]["WT"]["dice"] == pytest.approx(0.6)  # seed 0's, not seed 1's
    spread = report["over_seeds"]["bigl"]
    assert spread["seeds"] == [0, 1] and spread["regions"]["WT"]["per_seed"] == [60.0, 50.0]
    assert spread["regions"]["WT"]["seed_mean"] == pytest.approx(55.0)
    training = read_metadata(destination)["training"]
    assert training["wall_seconds"] == {"recipe": 120} and training["protocol"]["overrides"] == ["adapt.dice=regions"]
    assert destination.with_suffix(".onnx").is_file()  # the export is written again beside it
    assert "55.0 ± 7.1" in capsys.readouterr().out


def test_an_inference_variant_becomes_the_models_default_and_its_row(tiny_bundle, tmp_path):
    """--inference NAME: the variant's options become the bundle's inference defaults and its
    scores the bigl row; the scores without options stay, as bigl-plain."""
    script = _script()
    root = _protocol(tmp_path / "protocol", tiny_bundle, script.REPORT_CASES)
    variant = root / "recipe" / "eval-refine-seed0"
    variant.mkdir()
    options = {"flip": False, "invert_view": False, "refine_edges": True, "postprocess": True}
    variant.joinpath("summary.json").write_text(json.dumps({**_summary(script.REPORT_CASES, 0.65), "inference": options}))
    destination = tmp_path / "model.safetensors"
    assert script.main([str(root), "--setting", "recipe", "--inference", "refine", "--confidence-floor", "0.87",
                        "--destination", str(destination)]) == 0
    metadata = read_metadata(destination)
    assert metadata["inference"] == {"refine_edges": True, "postprocess": True}
    assert metadata["confidence_floor"] == 0.87
    report = metadata["metrics"]["report"]
    assert report["methods"]["bigl"]["mean"]["WT"]["dice"] == pytest.approx(0.65)
    assert report["methods"]["bigl-plain"]["mean"]["WT"]["dice"] == pytest.approx(0.6)
    assert report["inference"] == {"bigl": {"refine_edges": True, "postprocess": True}}
    with pytest.raises(SystemExit, match="eval-post-seed0 has no summary.json"):
        script.main([str(root), "--setting", "recipe", "--inference", "post", "--destination", str(destination)])


def test_a_development_split_run_is_not_packaged(tiny_bundle, tmp_path):
    script = _script()
    root = _protocol(tmp_path / "protocol", tiny_bundle, ["Dev_1", "Dev_2"], split="dev")
    with pytest.raises(SystemExit, match="report split"):
        script.main([str(root), "--setting", "recipe", "--destination", str(tmp_path / "model.safetensors")])


def test_damaged_protocol_files_and_clashing_names_are_refused_with_the_file_named(tiny_bundle, tmp_path):
    script = _script()
    root = _protocol(tmp_path / "protocol", tiny_bundle, script.REPORT_CASES)
    destination = str(tmp_path / "model.safetensors")
    for setting, target_only in (("source-only", None), ("recipe", "recipe"), ("recipe", "invert-histmatch")):
        with pytest.raises(SystemExit, match="two different protocol settings"):
            script.main([str(root), "--setting", setting, *(["--target-only", target_only] if target_only else []),
                         "--destination", destination])
    summary = root / "source-only" / "eval-seed0" / "summary.json"
    summary.write_text('{"cases": [')
    with pytest.raises(SystemExit, match=f"cannot read {summary}"):
        script.main([str(root), "--setting", "recipe", "--destination", destination])
    (root / "manifest.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="manifest.json does not hold a JSON object"):
        script.main([str(root), "--setting", "recipe", "--destination", destination])
    assert not Path(destination).exists()
