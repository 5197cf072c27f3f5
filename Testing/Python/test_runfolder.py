"""Run-folder names and choice lists (bigl.runfolder) and the one grid comparison (bigl.data.io)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bigl.data.io import grid_difference, same_grid
from bigl.runfolder import (
    CHECKPOINT_DIR,
    checkpoint_name,
    is_device,
    latest_checkpoint_name,
    parse_checkpoint_name,
)


def test_checkpoint_names_round_trip_and_sort_by_step():
    assert checkpoint_name("adapt", 200) == "adapt_00000200.safetensors"
    assert parse_checkpoint_name(checkpoint_name("translator", 1500)) == ("translator", 1500)
    names = [checkpoint_name("adapt", step) for step in (10, 200, 3000)]
    assert sorted(names) == names
    for other in ("adapt_200.safetensors.tmp", "model.safetensors", "Adapt_00000200.safetensors", "adapt_x.safetensors"):
        assert parse_checkpoint_name(other) is None


def test_latest_checkpoint_prefers_the_later_stage(tmp_path):
    assert latest_checkpoint_name(tmp_path) is None
    folder = tmp_path / CHECKPOINT_DIR
    folder.mkdir()
    for name in (checkpoint_name("translator", 1500), checkpoint_name("adapt", 200), checkpoint_name("adapt", 40), "notes.txt"):
        (folder / name).write_bytes(b"")
    assert latest_checkpoint_name(tmp_path) == ("adapt", 200)


@pytest.mark.parametrize("name, known", [("auto", True), ("CPU", True), ("cuda", True), ("cuda:1", True),
                                         ("cuda:", False), ("gpu", False), ("mps", False)])
def test_device_names(name, known):
    assert is_device(name) is known


@pytest.mark.parametrize("module", ["bigl.runfolder", "bigl.runplan"])
def test_run_names_and_plans_need_only_the_standard_library(module):
    code = (f"import sys, {module}; import bigl.runplan as plan; plan.estimate_run({{}}, 10, 10, device='cpu'); "
            "print(sorted({'numpy', 'torch'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_grid_comparison():
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    moved = affine.copy()
    moved[0, 3] = 0.5
    assert same_grid((4, 4, 4), affine, (4, 4, 4), affine + 1e-4)
    assert not same_grid((4, 4, 4), affine, (4, 4, 4), moved)
    assert grid_difference((4, 4, 4), affine, (4, 4, 4), moved) == pytest.approx(0.5)
    assert grid_difference((4, 4, 4), affine, (4, 4, 5), affine) is None
    assert not same_grid((4, 4, 4), affine, (4, 4, 5), affine)
