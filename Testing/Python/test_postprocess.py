"""Post-processing of label maps and the test-time flips of inference."""

from __future__ import annotations

import numpy as np
import pytest

from bigl.bundle import annotate_bundle, load_bundle
from bigl.errors import ConfigError
from bigl.inference import BiGLPredictor
from bigl.postprocess import ADDED_LABEL, postprocess_labels, refine_edges


def test_specks_far_from_the_tumour_are_removed_and_the_tumour_kept():
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[10:20, 10:20, 10:20] = 2  # oedema, 1000 voxels
    labels[13:17, 13:17, 13:17] = 4  # enhancing core, 64 voxels = 0.064 mL at 1 mm
    labels[30:33, 30:33, 30:33] = 2  # 27 voxels: under 10 % of the largest component
    labels[2:8, 30:38, 2:8] = 1  # 288 voxels: a second component above 10 %
    out = postprocess_labels(labels, (1.0, 1.0, 1.0))
    assert not out[30:33, 30:33, 30:33].any()
    assert (out[2:8, 30:38, 2:8] == 1).all()
    assert (out[10:20, 10:20, 10:20] > 0).all()
    # the ET (0.064 mL < 0.5 mL) becomes core; with 2 mm voxels it is 0.5 mL and stays
    assert (out[13:17, 13:17, 13:17] == 1).all()
    kept = postprocess_labels(labels, (2.0, 2.0, 2.0))
    assert (kept[13:17, 13:17, 13:17] == 4).all()
    assert labels[30, 30, 30] == 2  # the input is left as it was


def test_an_empty_prediction_stays_empty():
    assert not postprocess_labels(np.zeros((8, 8, 8), np.uint8), (1, 1, 1)).any()


def sphere(shape, centre, radius) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum((axis - c) ** 2 for axis, c in zip(grid, centre)) <= radius**2


def tumour_scan(radius: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """A T2-like scan: a noisy brain (100) with a bright tumour (180) of ``radius``; and the tumour."""
    shape, centre = (52, 52, 52), (26, 26, 26)
    brain = sphere(shape, centre, 24)
    tumour = sphere(shape, centre, radius)
    rng = np.random.default_rng(3)
    image = np.where(tumour, 180.0, 100.0) * brain + 8.0 * rng.standard_normal(shape) * brain
    return image.astype(np.float32), tumour


def dice(a, b) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("predicted_radius", [6, 13], ids=["too-small", "too-large"])
def test_the_edge_refinement_moves_the_tumour_edge_to_the_scans_edge(predicted_radius):
    """Inwards by up to EDGE_INSIDE_MM (3 mm here), outwards by up to EDGE_OUTSIDE_MM (4 mm here)."""
    image, tumour = tumour_scan(10)
    shape, centre = image.shape, (26, 26, 26)
    labels = np.where(sphere(shape, centre, predicted_radius), 2, 0).astype(np.uint8)
    labels[sphere(shape, centre, 3)] = 1  # a core inside, which the refinement keeps
    out = refine_edges(labels, image)
    assert dice(labels > 0, tumour) < 0.7
    assert dice(out > 0, tumour) > 0.9
    assert (out[sphere(shape, centre, 3)] == 1).all()
    added = (out > 0) & (labels == 0)
    assert (out[added] == ADDED_LABEL).all()
    assert labels.max() == 2 and (labels[sphere(shape, centre, 3)] == 1).all()  # the input is left as it was


def test_the_edge_refinement_leaves_empty_and_too_thin_tumours_and_checks_the_grid():
    image, _ = tumour_scan(10)
    empty = np.zeros(image.shape, np.uint8)
    np.testing.assert_array_equal(refine_edges(empty, image), empty)
    thin = empty.copy()
    thin[20:26, 10:30, 10:30] = 2  # 6 voxels thick: no voxel more than 3 mm inside its edge
    np.testing.assert_array_equal(refine_edges(thin, image), thin)
    with pytest.raises(ValueError, match="one grid"):
        refine_edges(empty[:-1], image)


def test_predictors_refine_edges_when_told_or_when_the_bundle_says(tiny_bundle, tmp_path):
    volume = scan()
    plain = BiGLPredictor.from_path(tiny_bundle, device="cpu").predict(volume, np.eye(4)).labels
    refined = BiGLPredictor.from_path(tiny_bundle, device="cpu", refine_edges=True).predict(volume, np.eye(4)).labels
    np.testing.assert_array_equal(refined, refine_edges(plain, volume))
    annotated = annotate_bundle(tiny_bundle, tmp_path / "r.safetensors", inference={"refine_edges": True})
    assert BiGLPredictor.from_path(annotated, device="cpu").refine_edges
    assert not BiGLPredictor.from_path(annotated, device="cpu", refine_edges=False).refine_edges


def scan(size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.arange(size)] * 3, indexing="ij")
    head = ((zz - 20) ** 2 / 1.2 + (yy - 20) ** 2 + (xx - 18) ** 2) < 15**2
    return (head * (100 + 50 * rng.random((size,) * 3) + 2.0 * zz)).astype(np.float32)


def test_test_time_flips_are_mirror_equivariant(tiny_bundle):
    """With flips the prediction of the mirrored scan is the mirror of the prediction (RAS axis 0 is left-right)."""
    predictor = BiGLPredictor.from_path(tiny_bundle, device="cpu", flip=True)
    volume = scan()
    straight = predictor.predict(volume, np.eye(4), probabilities=True).probabilities
    mirrored = predictor.predict(volume[::-1].copy(), np.eye(4), probabilities=True).probabilities
    assert np.abs(mirrored[:, ::-1] - straight).max() < 1e-4
    plain = BiGLPredictor.from_path(tiny_bundle, device="cpu", flip=False)
    unflipped = plain.predict(volume, np.eye(4), probabilities=True).probabilities
    assert np.abs(unflipped - straight).max() > 1e-4  # the flips do change the prediction


def test_mirroring_the_brain_is_the_same_on_numpy_and_torch_and_keeps_the_background():
    import torch

    from bigl.data.preprocess import MIRROR_FLOOR, mirror_brain

    slices = np.full((3, 8, 8), -1.0, np.float32)
    slices[:, 2:6, 2:6] = np.random.default_rng(1).uniform(-0.99, 1.0, (3, 4, 4))
    mirrored = mirror_brain(slices)
    np.testing.assert_array_equal(mirrored, mirror_brain(torch.from_numpy(slices)).numpy())
    assert (mirrored[slices == -1.0] == -1.0).all()
    u, v = (slices[slices > -1] + 1) / 2, (mirrored[slices > -1] + 1) / 2
    np.testing.assert_allclose(v, np.maximum(1 - u, MIRROR_FLOOR), atol=1e-6)
    assert (mirrored[slices > -1] > -1 + 1e-3).all()  # a mirrored brain never turns into background


def test_the_inverted_view_averages_each_slice_with_its_mirrored_intensities(tiny_bundle):
    from bigl.data.preprocess import mirror_brain, prepare_volume

    plain = BiGLPredictor.from_path(tiny_bundle, device="cpu")
    inverted = BiGLPredictor.from_path(tiny_bundle, device="cpu", invert_view=True)
    assert not plain.invert_view and inverted.invert_view
    slices = prepare_volume(scan(), plain.preprocessing).slices

    def probabilities(predictor, images):
        return predictor._segment_slices(images, False, lambda done: None)["probabilities"]

    expected = 0.5 * (probabilities(plain, slices) + probabilities(plain, mirror_brain(slices).astype(np.float32)))
    got = probabilities(inverted, slices)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.abs(got - probabilities(plain, slices)).max() > 1e-4


def test_inference_defaults_come_from_the_bundle_and_yield_to_the_caller(tiny_bundle, tmp_path):
    annotated = annotate_bundle(tiny_bundle, tmp_path / "m.safetensors", inference={"flip": True, "postprocess": True})
    assert load_bundle(annotated).metadata["inference"] == {"flip": True, "postprocess": True}
    default = BiGLPredictor.from_path(annotated, device="cpu")
    assert default.flip and default.postprocess
    told = BiGLPredictor.from_path(annotated, device="cpu", flip=False, postprocess=False)
    assert not told.flip and not told.postprocess
    assert not BiGLPredictor.from_path(tiny_bundle, device="cpu").flip
    inverted = annotate_bundle(tiny_bundle, tmp_path / "i.safetensors", inference={"invert_view": True})
    assert BiGLPredictor.from_path(inverted, device="cpu").invert_view
    assert not BiGLPredictor.from_path(inverted, device="cpu", invert_view=False).invert_view
    with pytest.raises(ConfigError, match="inference defaults"):
        annotate_bundle(tiny_bundle, tmp_path / "bad.safetensors", inference={"tta": True})


def test_evaluation_records_the_inference_options(tiny_bundle, phantom_cohort):
    from bigl.evaluate import evaluate_bundle

    predictor = BiGLPredictor.from_path(tiny_bundle, device="cpu", flip=True, postprocess=False)
    result = evaluate_bundle(predictor, phantom_cohort, "t2", cases=["Phantom_001"], progress=False)
    assert result["inference"] == {"flip": True, "invert_view": False, "refine_edges": False, "postprocess": False,
                                   "contrast_search": False}
    # ...and that is the inference the scores come from: every batch was mirrored
    axes = []
    original = predictor._segment_slices

    def spying(*args, flip_axis=0, **kwargs):
        axes.append(flip_axis)
        return original(*args, flip_axis=flip_axis, **kwargs)

    predictor._segment_slices = spying
    evaluate_bundle(predictor, phantom_cohort, "t2", cases=["Phantom_001", "Phantom_002"], progress=False)
    assert len(axes) == 2 and all(axis in (-2, -1) for axis in axes)
