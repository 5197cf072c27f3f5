"""The invert-histmatch no-learning baseline: reference histograms and the intensity transform."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bigl.baselines import (
    InvertHistMatch,
    ReferenceHistogram,
    load_reference,
    make_baseline,
    reference_from_folder,
    reference_from_volumes,
)
from bigl.data.phantoms import BACKGROUND, CONTRASTS, CSF, ENHANCING, GM, NECROSIS, OEDEMA, WM, make_phantom
from bigl.data.preprocess import brain_mask
from bigl.errors import InputError


def tissue_phantom(seed: int, size: int = 40) -> np.ndarray:
    """A tissue map with known codes: WM ball, GM shell, CSF ventricle and rim, a three-part tumour."""
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, size),) * 3, indexing="ij"))
    radius = np.sqrt((grid**2).sum(axis=0))
    rng = np.random.default_rng(seed)
    tissue = np.full((size,) * 3, BACKGROUND, dtype=np.uint8)
    tissue[radius < 0.9] = CSF
    tissue[radius < 0.85] = GM
    tissue[radius < 0.7] = WM
    tissue[(np.abs(grid[0]) < 0.08) & (np.abs(grid[1]) < 0.3) & (np.abs(grid[2]) < 0.15)] = CSF
    centre = np.array([0.35, rng.uniform(-0.2, 0.2), 0.1])[:, None, None, None]
    tumour_radius = np.sqrt(((grid - centre) ** 2).sum(axis=0))
    tissue[(tumour_radius < 0.3) & (tissue != CSF)] = OEDEMA
    tissue[tumour_radius < 0.15] = ENHANCING
    tissue[tumour_radius < 0.09] = NECROSIS
    return tissue


def render(tissue: np.ndarray, modality: str, seed: int, gain: float) -> np.ndarray:
    """Piecewise-constant image of a tissue map in the phantom contrasts, with noise, zero background."""
    rng = np.random.default_rng(seed)
    image = np.asarray(CONTRASTS[modality], dtype=np.float32)[tissue] * gain
    image += rng.normal(0.0, 0.02 * gain, tissue.shape).astype(np.float32)
    image[tissue == BACKGROUND] = 0.0
    return np.clip(image, 0.0, None)


@pytest.fixture(scope="module")
def t1_reference() -> ReferenceHistogram:
    volumes = [render(tissue_phantom(seed), "t1", seed, gain=300.0 + 200.0 * seed) for seed in range(3)]
    return reference_from_volumes(volumes, "t1", names=["a", "b", "c"])


def test_inverting_and_matching_gives_t2_the_t1_tissue_order(t1_reference):
    tissue = tissue_phantom(7)
    t2 = render(tissue, "t2", 7, gain=500.0)
    wt = np.isin(tissue, (OEDEMA, NECROSIS, ENHANCING))
    csf, wm = tissue == CSF, tissue == WM
    # On T2 CSF is the brightest tissue, above tumour and white matter.
    assert np.median(t2[csf]) > np.median(t2[wt]) > np.median(t2[wm])

    out = InvertHistMatch(t1_reference)(t2)

    # After the transform the order is T1's: CSF darkest, tumour above it, white matter brightest.
    assert np.median(out[csf]) < np.median(out[wt]) < np.median(out[wm])
    assert np.median(out[tissue == GM]) < np.median(out[wm])


def test_background_is_left_alone_and_the_brain_mask_kept(t1_reference):
    images, _ = make_phantom(40, np.random.default_rng(3), ("t2",))
    t2 = images["t2"]
    mask = brain_mask(t2)
    out = InvertHistMatch(t1_reference)(t2)
    assert out.shape == t2.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out[~mask], t2[~mask])
    assert not np.array_equal(out[mask], t2[mask])
    # The segmenter recomputes the brain mask from the transformed image: it must find the same brain.
    overlap = np.count_nonzero(brain_mask(out) & mask) / np.count_nonzero(mask)
    assert overlap > 0.98


def test_brain_histogram_matches_the_reference(t1_reference):
    images, _ = make_phantom(40, np.random.default_rng(4), ("t2",))
    t2 = images["t2"]
    mask = brain_mask(t2)
    out = InvertHistMatch(t1_reference)(t2)
    probabilities = np.linspace(0.05, 0.95, 19)
    reference_quantiles = np.interp(probabilities, np.linspace(0, 1, t1_reference.quantiles.size), t1_reference.quantiles)
    spread = t1_reference.quantiles[-1] - t1_reference.quantiles[0]
    # The reference is in units of each scan's robust maximum; the result keeps the input's units.
    scale = np.percentile(np.abs(t2[mask]), 99.5)
    assert np.median(t2[mask]) > 10 * t1_reference.quantiles[-1]  # the raw image is in scanner units
    np.testing.assert_allclose(np.quantile(out[mask], probabilities) / scale, reference_quantiles, atol=0.02 * spread)


def test_bright_voxels_outside_the_brain_mask_do_not_hide_the_brain(t1_reference):
    """A real scan keeps bright voxels outside its brain mask (specks, cut-off fragments: in BraTS
    cases up to a few percent of the brain); they keep their value, and the transformed brain must
    still be found beside them."""
    images, _ = make_phantom(40, np.random.default_rng(5), ("t2",))
    t2 = images["t2"].astype(np.float32)
    mask = brain_mask(t2)
    from scipy import ndimage as ndi

    outside = np.argwhere(ndi.distance_transform_edt(~mask) > 3)
    specks = tuple(outside[:: len(outside) // (mask.sum() // 30)].T)  # isolated voxels, ~3 % of the brain
    t2[specks] = float(t2.max())
    assert not brain_mask(t2)[specks].any()
    out = InvertHistMatch(t1_reference)(t2)
    np.testing.assert_array_equal(out[specks], t2[specks])
    overlap = np.count_nonzero(brain_mask(out) & mask) / np.count_nonzero(mask)
    assert overlap > 0.98


def test_reference_ignores_each_scans_intensity_scale():
    volumes = [render(tissue_phantom(seed), "t1", seed, gain=400.0) for seed in range(2)]
    rescaled = [volumes[0] * 25.0, volumes[1] * 0.5]
    a = reference_from_volumes(volumes, "t1")
    b = reference_from_volumes(rescaled, "t1")
    np.testing.assert_allclose(a.quantiles, b.quantiles, rtol=1e-6)
    assert np.all(np.diff(a.quantiles) >= 0)
    # Scaled so that the 99.5th percentile of every scan is 1.
    assert 0.9 < np.quantile(a.quantiles, 0.995) < 1.2


def test_reference_from_a_folder_uses_the_named_modality_and_cases(phantom_cohort, tmp_path):
    reference = reference_from_folder(phantom_cohort, "T1")
    assert reference.modality == "t1"
    assert reference.cases == sorted(p.name for p in phantom_cohort.iterdir() if p.is_dir())
    assert reference.quantiles[0] > 0  # brain voxels of a skull-stripped scan, background excluded

    subset = reference_from_folder(phantom_cohort, "t1", cases=reference.cases[:2])
    assert subset.cases == reference.cases[:2]
    rest = reference_from_folder(phantom_cohort, "t1", exclude=reference.cases[:2])
    assert rest.cases == reference.cases[2:]
    with pytest.raises(InputError, match="after the exclusions"):
        reference_from_folder(phantom_cohort, "t1", exclude=reference.cases)
    t2_reference = reference_from_folder(phantom_cohort, "t2")
    assert not np.allclose(t2_reference.quantiles, reference.quantiles, atol=0.01)

    with pytest.raises(InputError, match="NoSuchCase"):
        reference_from_folder(phantom_cohort, "t1", cases=["NoSuchCase"])


def test_reference_json_round_trip_and_foreign_files(t1_reference, tmp_path):
    path = t1_reference.save(tmp_path / "ref" / "reference.json")
    loaded = load_reference(path)
    np.testing.assert_allclose(loaded.quantiles, t1_reference.quantiles)
    assert loaded.modality == "t1" and loaded.cases == ["a", "b", "c"]
    assert load_reference(path, "T1").modality == "t1"
    with pytest.raises(InputError, match="t1 intensities, not t2"):
        load_reference(path, "t2")

    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"quantiles": [0, 1]}))
    with pytest.raises(InputError, match="not a BiGL reference histogram"):
        load_reference(foreign)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InputError, match="cannot read reference histogram"):
        load_reference(broken)
    with pytest.raises(InputError, match="not sorted"):
        ReferenceHistogram("t1", np.array([0.0, 2.0, 1.0]))


def test_folder_reference_needs_a_modality_and_names_unknown_baselines(phantom_cohort, t1_reference):
    with pytest.raises(InputError, match="--reference-modality"):
        load_reference(phantom_cohort, None)
    with pytest.raises(InputError, match="unknown baseline"):
        make_baseline("magic", t1_reference)
    transform = make_baseline("invert-histmatch", t1_reference)
    assert isinstance(transform, InvertHistMatch) and transform.name == "invert-histmatch"


def test_an_empty_image_is_a_clear_error(t1_reference):
    with pytest.raises(InputError, match="no brain voxels"):
        InvertHistMatch(t1_reference)(np.zeros((16, 16, 16), dtype=np.float32))
