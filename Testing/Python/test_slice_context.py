"""2.5D input (``segmenter.in_channels`` adjacent slices): the same neighbours in training and
inference, every stage and engine runs with it, and bad values are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from synthetic import synthetic_scan

from bigl.data.preprocess import BACKGROUND, context_offsets, context_stack
from bigl.errors import BundleError, ConfigError
from bigl.training import load_config, run_training
from bigl.training.runner import TrainingRun
from bigl.training.translator_stage import per_slice

AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def smoke(phantom_cohort: Path, *overrides: str) -> dict:
    return load_config("smoke", [f"data.source_dir={phantom_cohort}", f"data.target_dir={phantom_cohort}",
                                 "run.threads=1", *overrides])


def test_context_stack_puts_the_slice_in_the_middle_and_background_beyond_the_ends():
    slices = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32) / 10
    stack = context_stack(slices, 0, 4, 3)
    assert stack.shape == (4, 3, 2, 2) and stack.dtype == np.float32
    assert np.allclose(stack[:, :, 0, 0], [[BACKGROUND, 0.0, 0.1], [0.0, 0.1, 0.2], [0.1, 0.2, 0.3], [0.2, 0.3, BACKGROUND]])
    assert np.array_equal(context_stack(slices, 1, 3, 1)[:, 0], slices[1:3])
    assert np.array_equal(context_offsets(5), [-2, -1, 0, 1, 2])
    with pytest.raises(ValueError, match="odd"):
        context_offsets(2)


def test_training_neighbours_are_those_inference_stacks(phantom_cohort, tmp_path):
    """A training slice's channels are the prepared volume's adjacent slices, as inference builds
    them; neighbours that hold no brain (not kept in training) are background in both."""
    from bigl.data.brats import find_cases
    from bigl.data.preprocess import brain_mask, prepare_volume

    run = TrainingRun(smoke(phantom_cohort, "segmenter.in_channels=3"), tmp_path / "run", progress=False)
    run.prepare()
    source = run.ctx.data.labelled
    case = next(c for c in find_cases(phantom_cohort, modalities=("t1", "t2")) if c.name == source.case_names[1])
    t1, t2 = case.load_image("t1"), case.load_image("t2")
    prepared = prepare_volume(t1.data, run.config.preprocessing, mask=brain_mask(t1.data) | brain_mask(t2.data))
    rows = np.flatnonzero(source.case_index == 1)
    kept = source.slice_index[rows]
    assert kept[0] > 0, "the phantom crop should have empty end slices for this test to mean anything"
    expected = np.concatenate([context_stack(prepared.slices, int(k), int(k) + 1, 3) for k in kept])
    assert np.allclose(source.stack(rows, 3), expected, atol=2e-3)
    neighbours = source.context_rows(3)[rows]
    assert neighbours[0, 0] == -1 and neighbours[-1, 2] == -1  # the first and last brain slices of the case
    assert np.array_equal(neighbours[1:, 0], rows[:-1]) and np.array_equal(neighbours[:, 1], rows)


def test_per_slice_translation_equals_one_slice_at_a_time():
    generator = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    together = per_slice(generator, x)
    for channel in range(3):
        assert torch.allclose(together[:, channel:channel + 1], generator(x[:, channel:channel + 1]), atol=1e-6)


def test_a_2_5d_bigl_run_trains_self_trains_and_segments(phantom_cohort, tmp_path):
    """Both stages, self-training with the translated pseudo-label view, a bundle that says it
    takes three slices, and a prediction that reads the neighbours."""
    from bigl.bundle import read_metadata
    from bigl.inference import BiGLPredictor

    config = smoke(phantom_cohort, "segmenter.in_channels=3", "adapt.iterations=3", "translator_training.iterations=2",
                   "adapt.self_training_iterations=2", "adapt.pseudo_views=both")
    bundle = run_training(config, tmp_path / "run", progress=False)
    assert read_metadata(bundle)["segmenter"]["in_channels"] == 3
    predictor = BiGLPredictor.from_path(bundle, device="cpu")
    conv = next(m for m in predictor.bundle.segmenter.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.in_channels == 3
    scan = synthetic_scan()
    before = predictor.predict(scan, AFFINE, probabilities=True, translated=True)
    assert before.labels.shape == scan.shape and before.translated.shape == scan.shape
    # change one slice: the predictions of its two neighbours change, those of the others do not
    from bigl.data.preprocess import prepare_volume

    slices = prepare_volume(scan, predictor.preprocessing).slices
    middle = len(slices) // 2
    changed = slices.copy()
    changed[middle] = np.where(changed[middle] > BACKGROUND, 0.9, BACKGROUND)
    probabilities = [predictor._segment_slices(s, False, lambda count: None)["probabilities"] for s in (slices, changed)]
    difference = np.abs(probabilities[1] - probabilities[0]).reshape(len(slices), -1).max(axis=1)
    assert difference[middle - 1] > 1e-4 and difference[middle + 1] > 1e-4
    others = [k for k in range(len(slices)) if abs(k - middle) > 1]
    assert difference[others].max() < 1e-5


def test_an_even_number_of_slices_is_refused_by_name(phantom_cohort):
    with pytest.raises(ConfigError, match="segmenter.in_channels") as info:
        smoke(phantom_cohort, "segmenter.in_channels=2")
    assert "odd" in info.value.hint


def test_a_bundle_with_an_even_slice_context_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from bigl.bundle import read_metadata
    from bigl.testing import make_test_bundle

    bundle = make_test_bundle(tmp_path / "model.safetensors", in_channels=3)
    described = read_metadata(bundle)
    assert described["segmenter"]["in_channels"] == 3
    described["segmenter"]["in_channels"] = 2
    broken = tmp_path / "broken.safetensors"
    save_file(load_file(str(bundle)), str(broken), metadata={"bigl": json.dumps(described)})
    with pytest.raises(BundleError, match="2 input channel"):
        read_metadata(broken)


def test_onnx_export_of_a_2_5d_model_agrees_with_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from bigl.export import export_bundle
    from bigl.inference import BiGLPredictor
    from bigl.onnxengine import OnnxPredictor
    from bigl.testing import make_test_bundle

    bundle = make_test_bundle(tmp_path / "model.safetensors", in_channels=3, sharpen=20.0)
    export_bundle(bundle)
    scan = synthetic_scan()
    expected = BiGLPredictor.from_path(bundle, device="cpu", batch_size=8).predict(scan, AFFINE, probabilities=True)
    got = OnnxPredictor.from_path(bundle.with_suffix(".onnx"), device="cpu", batch_size=5).predict(
        scan, AFFINE, probabilities=True)
    assert len(np.unique(expected.labels)) > 1
    assert np.abs(got.probabilities - expected.probabilities).max() <= 1e-4
