"""The run plan (bigl.runplan): steps of each stage and the rough duration shown before training."""

from __future__ import annotations

import math

import pytest

from bigl.runplan import config_value, estimate_run, format_duration, iterations_for, seconds_per_sample
from bigl.training import load_config


def test_self_training_steps_count_for_bigl_only():
    reference = load_config("reference")
    self_steps = reference["adapt"]["self_training_iterations"]
    assert self_steps > 0  # the reference config self-trains
    bigl = estimate_run(reference, 1000, 1000, device="cpu")
    assert bigl.self_training_steps == self_steps
    assert bigl.adapt_steps == reference["adapt"]["iterations"] + self_steps
    assert "self-training" in bigl.summary()
    for method in ("source-only", "target-only"):
        baseline = estimate_run(load_config("reference", [f"adapt.method={method}", "data.target_labels=true"]), 1000, 1000,
                                device="cpu")
        assert (baseline.translator_steps, baseline.self_training_steps) == (0, 0)
        assert baseline.adapt_steps == reference["adapt"]["iterations"]
        assert baseline.seconds < bigl.seconds


def test_reference_config_costs_what_was_measured():
    """The per-sample costs are those of the reference config on 2 CPU cores; other sizes scale
    with slice area and network width."""
    reference = load_config("reference")
    assert seconds_per_sample(reference, "adapt") == pytest.approx(0.12)
    assert seconds_per_sample(reference, "translator") == pytest.approx(0.045)
    twice_wide = load_config("reference", ["segmenter.base_channels=32"])
    assert seconds_per_sample(twice_wide, "adapt") == pytest.approx(0.24)
    cpu = load_config("cpu")  # 64 px, base 8: (2/3)^2 x 1/2 of the reference
    assert seconds_per_sample(cpu, "adapt") == pytest.approx(0.12 * (64 / 96) ** 2 / 2)


def test_epochs_and_dotted_keys():
    assert iterations_for({"epochs": 2, "batch_size": 4, "iterations": 7}, 10) == 5
    assert iterations_for({"epochs": None, "iterations": 7}, 10) == 7
    assert config_value({"adapt": {"lr": 1e-3}}, "adapt.lr") == 1e-3
    assert config_value({"adapt": {"lr": 1e-3}}, "adapt.missing", "x") == "x"
    assert config_value(None, "adapt.lr") is None
    assert format_duration(3725) == "1h02m" and format_duration(math.inf) == "?"
