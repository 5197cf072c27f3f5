"""benchmarks/tumour_errors.py: the whole-tumour error breakdown on a hand-made label map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bigl.testing import load_script

REPO = Path(__file__).resolve().parents[2]


def test_errors_are_split_by_class_distance_and_component():
    errors_of = load_script(REPO / "benchmarks" / "tumour_errors.py").whole_tumour_errors
    truth = np.zeros((40, 40, 40), dtype=np.uint8)
    truth[10:20, 10:20, 10:20] = 2  # oedema, 1000 voxels
    truth[13:17, 13:17, 13:17] = 4  # enhancing core, 64 voxels
    predicted = np.zeros_like(truth)
    predicted[10:20, 10:20, 10:19] = 2  # misses the oedema plane z = 19 (100 voxels)
    predicted[20:22, 10:20, 10:20] = 2  # 200 voxels at the edge (1-2 voxels out), touching the tumour
    predicted[26:28, 10:20, 10:20] = 2  # 200 voxels 7-8 voxels out, a component apart
    predicted[35:37, 35:37, 35:37] = 1  # 8 voxels far away, a component apart
    errors = errors_of(truth, predicted, voxel_ml=0.5)
    assert errors["true"] == 500.0 and errors["hit"] == 450.0
    assert errors["missed_ED"] == 50.0 and errors["missed_ET"] == 0.0 and errors["missed_NCR"] == 0.0
    assert errors["fp_edge"] == 100.0 and errors["fp_near"] == 100.0 and errors["fp_far"] == 4.0
    assert errors["apart"] == 104.0
    assert errors["predicted"] == errors["hit"] + errors["fp_edge"] + errors["fp_near"] + errors["fp_far"]


def test_an_empty_label_map_counts_every_prediction_as_far():
    errors_of = load_script(REPO / "benchmarks" / "tumour_errors.py").whole_tumour_errors
    predicted = np.zeros((8, 8, 8), dtype=np.uint8)
    predicted[2:4, 2:4, 2:4] = 2
    errors = errors_of(np.zeros_like(predicted), predicted, voxel_ml=1.0)
    assert errors["true"] == 0.0 and errors["fp_far"] == 8.0 and errors["apart"] == 8.0
