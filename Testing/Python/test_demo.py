"""``bigl demo``: phantoms -> source-only and BiGL training -> evaluation table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bigl.cli import main
from bigl.demo import METHODS, DemoSettings, format_results, make_data, results_table, training_overrides
from bigl.errors import ConfigError
from bigl.labels import REGIONS


def fake_evaluation(dice: float, hd95: float) -> dict:
    mean = {region: {"dice": dice, "hd95": hd95} for region in REGIONS}
    std = {region: {"dice": 0.1, "hd95": 2.0} for region in REGIONS}
    return {"summary": {"mean": mean, "std": std}}


def test_table_is_method_by_region():
    evaluations = {"source-only": fake_evaluation(0.12345, 40.0), "bigl": fake_evaluation(0.8, 9.5)}
    assert results_table(evaluations) == {
        "source-only": {"WT": 0.1235, "TC": 0.1235, "ET": 0.1235},
        "bigl": {"WT": 0.8, "TC": 0.8, "ET": 0.8},
    }
    assert results_table(evaluations, "hd95")["bigl"] == {"WT": 9.5, "TC": 9.5, "ET": 9.5}
    text = format_results(evaluations)
    assert "| Source only | 12.35 ± 10.00 |" in text and "| BiGL | 9.50 ± 2.00 |" in text


def test_settings_and_overrides_fit_the_training_config(tmp_path):
    from bigl.training import load_config

    quick = DemoSettings.for_mode(True)
    assert quick.config == "smoke" and DemoSettings.for_mode(False).config == "cpu"
    assert DemoSettings.for_mode(False, train_cases=5, test_cases=2).train_cases == 5
    with pytest.raises(ConfigError, match="at least one training case"):
        DemoSettings.for_mode(True, train_cases=0)

    config = load_config("smoke", training_overrides("source-only", tmp_path / "train", "cpu", 3))
    assert config["data"]["source_modality"] == "t1" and config["data"]["target_modality"] == "t2"
    assert config["data"]["source_dir"] == config["data"]["target_dir"] == str(tmp_path / "train")
    assert config["adapt"]["method"] == "source-only" and config["run"]["seed"] == 3
    assert config["adapt"]["dice"] == "regions" and config["adapt"]["ema_decay"] == 0.99
    assert not config["data"]["target_labels"] and config["adapt"]["self_training_iterations"] == 0
    for name in ("smoke", "cpu"):  # self-training as long as the adaptation
        bigl = load_config(name, training_overrides("bigl", tmp_path / "train", "cpu", 3, config=name))
        assert bigl["adapt"]["self_training_iterations"] == load_config(name)["adapt"]["iterations"]
    assert bigl["adapt"]["dice"] == "regions" and bigl["adapt"]["ema_decay"] == 0.99
    assert bigl["adapt"]["self_training_rounds"] == 2 and bigl["adapt"]["pseudo_views"] == "target"
    assert not bigl["data"]["target_labels"]  # BiGL never reads the target labels
    target = load_config("smoke", training_overrides("target-only", tmp_path / "train", "cpu", 3))
    assert target["adapt"]["method"] == "target-only" and target["data"]["target_labels"]


def test_test_cases_are_separate_from_training_cases(tmp_path):
    train, test = make_data(tmp_path, DemoSettings(train_cases=2, test_cases=2, size=24))
    train_names = {p.name for p in train.iterdir()}
    test_names = {p.name for p in test.iterdir()}
    assert len(train_names) == len(test_names) == 2 and not train_names & test_names
    from bigl.data.io import load_volume

    a = load_volume(next(train.glob("*_001/*_t2.nii.gz"))).data
    b = load_volume(next(test.glob("*_001/*_t2.nii.gz"))).data
    assert not np.array_equal(a, b)  # different seeds, different phantoms


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_prints_json_only(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--json", "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    table = json.loads(captured.out)  # nothing but the JSON table on stdout
    assert list(table) == list(METHODS)
    for regions in table.values():
        assert list(regions) == list(REGIONS)
        assert all(0.0 <= value <= 1.0 for value in regions.values())
    assert "[5/5]" in captured.err and "training Target only" in captured.err

    results = json.loads((out / "results.json").read_text())
    assert results["dice"] == table
    for method in METHODS:
        evaluation = results["evaluations"][method]
        assert evaluation["modality"] == "t2" and evaluation["n_cases"] == 2
        assert all(name.startswith("PhantomTest") for name in evaluation["cases"])
        assert (out / "eval" / method / "cases.png").is_file()
    config = json.loads((out / "runs" / "bigl" / "config.json").read_text())
    assert config["data"]["source_dir"].endswith("train") and config["adapt"]["method"] == "bigl"
    target = json.loads((out / "runs" / "target-only" / "config.json").read_text())
    assert target["adapt"]["method"] == "target-only" and target["data"]["target_labels"]
    assert (out / "comparison.png").is_file() and (out / "results.md").is_file()
