"""Tests of bigl.data.preprocess: brain mask, normalisation, slicing and the exact inverse."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bigl.data.phantoms import CSF, generate_phantom
from bigl.data.preprocess import (
    PreprocessConfig,
    SliceGeometry,
    brain_mask,
    prepare_labels,
    prepare_volume,
    restore_labels,
    restore_maps,
)
from bigl.errors import ConfigError, InputError


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def assert_mask_matches_brain(mask: np.ndarray, brain: np.ndarray) -> None:
    """The mask holds the brain and reaches at most about one voxel beyond it (blurred edge)."""
    from scipy import ndimage as ndi

    assert mask[ndi.binary_erosion(brain)].mean() > 0.99
    assert (mask & ~ndi.binary_dilation(brain)).sum() < 0.01 * brain.sum()
    assert dice(mask, brain) > 0.85


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(40, np.random.default_rng(5), ("t1", "t2", "flair"))


@pytest.fixture(scope="module")
def noisy_phantom():
    return generate_phantom(40, np.random.default_rng(6), ("t1", "flair"), skull_stripped=False)


def test_config_round_trip_and_validation():
    config = PreprocessConfig(image_size=64, margin=3, slice_axis=1)
    assert PreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="unknown PreprocessConfig key"):
        PreprocessConfig.from_dict({"image_size": 64, "colour": "red"})
    for bad in ({"image_size": 4}, {"margin": -1}, {"lower_percentile": 60, "upper_percentile": 40}, {"slice_axis": 3},
                {"intensity": "peak"}, {"zscore_low": 2.0, "zscore_high": 1.0}, {"zscore_high": "5"}, {"zscore_low": True}):
        with pytest.raises(ConfigError):
            PreprocessConfig(**bad)


def test_geometry_is_json_serialisable(phantom):
    geometry = prepare_volume(phantom.images["t1"], PreprocessConfig(image_size=32)).geometry
    assert SliceGeometry.from_dict(json.loads(json.dumps(geometry.to_dict()))) == geometry


@pytest.mark.parametrize("modality", ["t1", "flair"])
def test_brain_mask_on_noisy_background(noisy_phantom, modality):
    image = noisy_phantom.images[modality]
    brain = noisy_phantom.tissue > 0
    assert (image[~brain] > 0).mean() > 0.9  # the background really is noisy
    mask = brain_mask(image)
    assert_mask_matches_brain(mask, brain)
    # FLAIR suppresses CSF: dark ventricles inside the brain are still brain.
    ventricles = (noisy_phantom.tissue == CSF) & (np.abs(np.indices(brain.shape)[0] - 20) < 8)
    assert mask[ventricles].mean() > 0.9


def test_brain_mask_keeps_the_largest_part_only(phantom):
    image = phantom.images["t1"].copy()
    image[1:3, 1:3, 1:3] = image.max()  # a bright blob in a corner, away from the brain
    mask = brain_mask(image)
    assert not mask[1:3, 1:3, 1:3].any()
    assert_mask_matches_brain(mask, phantom.tissue > 0)


def test_brain_mask_of_an_empty_volume_is_empty():
    assert not brain_mask(np.zeros((10, 10, 10), np.int16)).any()
    assert not brain_mask(np.full((10, 10, 10), 5.0)).any()


def test_prepared_slices_shape_range_and_background(phantom):
    config = PreprocessConfig(image_size=32, margin=2)
    prepared = prepare_volume(phantom.images["t2"], config)
    slices, geometry = prepared.slices, prepared.geometry
    assert slices.dtype == np.float32 and slices.shape == (geometry.n_slices, 32, 32)
    assert slices.min() == -1.0 and slices.max() <= 1.0 and (slices > 0.99).any()
    assert np.all(slices[:, 0, 0] == -1.0)
    # The crop is the brain's bounding box plus the margin, clipped at the volume edges.
    np.testing.assert_array_equal(prepared.mask, brain_mask(phantom.images["t2"]))  # the mask it cropped to
    brain = np.argwhere(prepared.mask)
    for axis, (start, stop) in enumerate(geometry.bbox):
        assert start == max(brain[:, axis].min() - 2, 0)
        assert stop == min(brain[:, axis].max() + 3, phantom.images["t2"].shape[axis])
    assert geometry.square == max(geometry.crop_shape[:2])


def test_crop_is_clipped_at_the_volume_edges():
    volume = np.zeros((20, 24, 16), np.float32)
    volume[0:10, 5:24, 3:9] = np.random.default_rng(0).uniform(100, 200, size=(10, 19, 6))
    geometry = prepare_volume(volume, PreprocessConfig(image_size=16, margin=4)).geometry
    assert geometry.bbox == ((0, 14), (1, 24), (0, 13))
    assert geometry.square == 23 and geometry.pad == ((4, 5), (0, 0))


def test_normalisation_is_robust_to_a_saturated_voxel(phantom):
    config = PreprocessConfig(image_size=40, margin=2)
    image = phantom.images["t1"]
    saturated = image.copy()
    index = tuple(np.argwhere(phantom.tissue > 0)[len(np.argwhere(phantom.tissue > 0)) // 2])
    saturated[index] = 32767
    plain, spiked = prepare_volume(image, config).slices, prepare_volume(saturated, config).slices
    assert plain.shape == spiked.shape
    assert np.median(np.abs(plain - spiked)) < 1e-3
    assert np.abs(plain - spiked).max() <= 2.0  # only around the voxel itself


def test_percentiles_set_the_range(phantom):
    image = phantom.images["t1"].astype(np.float32)
    low = PreprocessConfig(image_size=40, margin=0, lower_percentile=0.5, upper_percentile=99.5)
    wide = PreprocessConfig(image_size=40, margin=0, lower_percentile=0.0, upper_percentile=100.0)
    saturated_low = (prepare_volume(image, low).slices >= 1.0).mean()
    saturated_wide = (prepare_volume(image, wide).slices >= 1.0).mean()
    assert saturated_low > saturated_wide


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_labels_round_trip_exactly_without_downsampling(phantom, slice_axis):
    config = PreprocessConfig(image_size=48, margin=3, slice_axis=slice_axis)
    prepared = prepare_volume(phantom.images["t2"], config)
    assert prepared.geometry.square <= 48
    classes = prepare_labels(phantom.labels, prepared.geometry)
    assert classes.dtype == np.uint8 and classes.shape == prepared.slices.shape
    assert set(np.unique(classes)) == {0, 1, 2, 3}
    restored = restore_labels(classes, prepared.geometry)
    assert restored.dtype == np.uint8 and restored.shape == phantom.labels.shape
    np.testing.assert_array_equal(restored, phantom.labels)


@pytest.mark.parametrize("slice_axis", [0, 2])
def test_labels_round_trip_closely_with_downsampling(phantom, slice_axis):
    config = PreprocessConfig(image_size=32, margin=3, slice_axis=slice_axis)
    prepared = prepare_volume(phantom.images["t2"], config)
    assert prepared.geometry.square > 32
    restored = restore_labels(prepare_labels(phantom.labels, prepared.geometry), prepared.geometry)
    assert restored.shape == phantom.labels.shape
    assert dice(restored > 0, phantom.labels > 0) > 0.9
    assert dice(restored == 4, phantom.labels == 4) > 0.6


@pytest.mark.parametrize("image_size", [16, 64])
def test_restore_maps_of_a_constant(phantom, image_size):
    prepared = prepare_volume(phantom.images["t1"], PreprocessConfig(image_size=image_size, margin=1))
    geometry = prepared.geometry
    inside = np.zeros(geometry.original_shape, bool)
    inside[tuple(slice(a, b) for a, b in geometry.bbox)] = True
    restored = restore_maps(np.full(prepared.slices.shape, 0.7, np.float32), geometry, fill=-1.0)
    assert restored.dtype == np.float32 and restored.shape == geometry.original_shape
    np.testing.assert_allclose(restored[inside], 0.7, atol=1e-6)
    assert np.all(restored[~inside] == -1.0)
    channels = np.stack([np.full(prepared.slices.shape, v, np.float32) for v in (0.1, 0.2, 0.3)], axis=1)
    restored = restore_maps(channels, geometry)
    assert restored.shape == (3, *geometry.original_shape)
    for channel, value in enumerate((0.1, 0.2, 0.3)):
        np.testing.assert_allclose(restored[channel][inside], value, atol=1e-6)
    assert np.all(restored[:, ~inside] == 0.0)


def test_zscore_maps_standard_deviations_around_the_brain_mean(phantom):
    image = phantom.images["t2"].astype(np.float32)
    mask = brain_mask(image)
    square = prepare_volume(image, PreprocessConfig(margin=2)).geometry.square
    config = PreprocessConfig(image_size=square, margin=2, intensity="zscore", zscore_low=-3.0, zscore_high=4.0)
    prepared = prepare_volume(image, config)
    restored = restore_maps(prepared.slices, prepared.geometry, fill=-1.0)
    z = (image - image[mask].mean()) / image[mask].std()
    expected = np.where(mask, np.clip((z + 3.0) / 7.0 * 2 - 1, -1, 1), -1.0)
    np.testing.assert_allclose(restored, expected, atol=1e-4)
    # The brain's mean sits at the same level in every scan: here at -1 + 2 * 3 / 7.
    assert abs(float(np.mean(restored[mask])) - (-1 + 6 / 7)) < 0.02


def test_zscore_keeps_normal_tissue_level_when_the_bright_tail_grows(phantom):
    """A scan with more bright fluid (CSF, oedema) than another: the percentile scale moves the rest
    of the brain down, the z-score scale much less (the property that intensity=zscore is for)."""
    image = phantom.images["t2"].astype(np.float32)
    mask = brain_mask(image)
    tissue = mask & (image < np.percentile(image[mask], 60))
    brighter = image.copy()
    fluid = mask & ~tissue & (np.indices(image.shape)[0] % 2 == 0)
    brighter[fluid] = image[mask].max() * 3.0  # a brighter, larger fluid compartment
    shifts = {}
    for intensity in ("percentile", "zscore"):
        config = PreprocessConfig(image_size=40, margin=0, intensity=intensity)
        level = [np.median(restore_maps(prepare_volume(v, config, mask=mask).slices,
                                        prepare_volume(v, config, mask=mask).geometry)[tissue]) for v in (image, brighter)]
        shifts[intensity] = abs(level[0] - level[1])
    assert shifts["zscore"] < 0.5 * shifts["percentile"]


@pytest.mark.parametrize("intensity", ["percentile", "zscore"])
def test_normalisation_ignores_the_scanner_scale(phantom, intensity):
    image = phantom.images["t1"].astype(np.float32)
    config = PreprocessConfig(image_size=40, margin=0, intensity=intensity)
    mask = brain_mask(image)
    plain = prepare_volume(image, config, mask=mask).slices
    rescaled = prepare_volume(image * 37.5 + 400.0, config, mask=mask).slices
    np.testing.assert_allclose(plain, rescaled, atol=1e-4)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_restore_maps_puts_values_back_where_they_came_from(phantom, slice_axis):
    image = phantom.images["t2"]
    mask = brain_mask(image)
    square = prepare_volume(image, PreprocessConfig(margin=2, slice_axis=slice_axis)).geometry.square
    config = PreprocessConfig(image_size=square, margin=2, slice_axis=slice_axis)  # no resizing at all
    prepared = prepare_volume(image, config)
    restored = restore_maps(prepared.slices, prepared.geometry, fill=-1.0)
    low, high = np.percentile(image[mask], [0.5, 99.5])
    expected = np.where(mask, np.clip((image - low) / (high - low) * 2 - 1, -1, 1), -1.0)
    np.testing.assert_allclose(restored, expected, atol=1e-5)
    # With resizing, the restored intensities still follow the normalised ones voxel for voxel.
    resized = prepare_volume(image, PreprocessConfig(image_size=square + 9, margin=2, slice_axis=slice_axis))
    restored = restore_maps(resized.slices, resized.geometry, fill=-1.0)
    assert np.corrcoef(restored[mask], expected[mask])[0, 1] > 0.97


def test_all_background_slices_do_not_crash():
    volume = np.zeros((24, 24, 30), np.float32)
    volume[6:18, 6:18, 12:16] = np.random.default_rng(1).uniform(50, 100, size=(12, 12, 4))
    labels = np.zeros(volume.shape, np.uint8)
    prepared = prepare_volume(volume, PreprocessConfig(image_size=16, margin=5))
    assert prepared.slices.shape[0] == 14
    assert np.all(prepared.slices[:5] == -1.0) and np.all(prepared.slices[-5:] == -1.0)
    classes = prepare_labels(labels, prepared.geometry)
    assert not classes.any()
    assert not restore_labels(classes, prepared.geometry).any()


@pytest.mark.parametrize(
    "volume, message",
    [
        (np.zeros((16, 16, 16), np.int16), "no brain"),
        (np.full((16, 16, 16), 3.0), "no brain"),
        (np.zeros((16, 16)), "3D"),
        (np.where(np.arange(16**3).reshape(16, 16, 16) == 7, np.nan, 1.0), "NaN"),
    ],
    ids=["zeros", "constant", "2d", "nan"],
)
def test_unusable_volumes_are_input_errors(volume, message):
    with pytest.raises(InputError, match=message):
        prepare_volume(volume, PreprocessConfig(image_size=16))


def test_mask_and_label_shapes_are_checked(phantom):
    config = PreprocessConfig(image_size=16)
    with pytest.raises(InputError, match="mask"):
        prepare_volume(phantom.images["t1"], config, mask=np.ones((3, 3, 3), bool))
    flat_brain = np.zeros(phantom.images["t1"].shape, bool)
    flat_brain[10:30, 10:30, 20] = True
    for intensity in ("percentile", "zscore"):
        with pytest.raises(InputError, match="no contrast"):
            prepare_volume(np.where(flat_brain, 100, 0), PreprocessConfig(image_size=16, intensity=intensity), mask=flat_brain)
    geometry = prepare_volume(phantom.images["t1"], config).geometry
    with pytest.raises(InputError, match="label map has shape"):
        prepare_labels(np.zeros((4, 4, 4), np.uint8), geometry)
    with pytest.raises(InputError, match="outside the BraTS convention"):
        prepare_labels(np.full(phantom.labels.shape, 3, np.uint8), geometry)


@pytest.mark.slow
def test_prepare_volume_on_a_brats_sized_volume():
    from scipy import ndimage as ndi

    small = generate_phantom(48, np.random.default_rng(0), ("t1",)).images["t1"]
    volume = ndi.zoom(small, (240 / 48, 240 / 48, 155 / 48), order=1).astype(np.int16)
    assert volume.shape == (240, 240, 155)
    config = PreprocessConfig(image_size=128, margin=8)
    prepared = prepare_volume(volume, config)  # its speed: benchmarks/benchmark_data.py
    assert prepared.slices.shape[1:] == (128, 128)
    assert prepared.slices.min() == -1.0 and prepared.slices.max() <= 1.0
