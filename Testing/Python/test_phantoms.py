"""Tests of bigl.data.phantoms and `bigl phantoms`: MR physics, labels, reproducibility, layout."""

from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest

from bigl.cli import main
from bigl.data.brats import MODALITIES, find_cases
from bigl.data.phantoms import (
    CSF,
    ENHANCING,
    GM,
    NECROSIS,
    OEDEMA,
    WM,
    generate_phantom,
    make_phantom,
    phantom_affine,
    phantom_shape,
    write_cohort,
)
from bigl.errors import ConfigError

SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def phantoms():
    return [generate_phantom(40, np.random.default_rng(seed), MODALITIES) for seed in SEEDS]


def tissue_means(phantom, modality):
    image = phantom.images[modality].astype(float)
    return {t: image[phantom.tissue == t].mean() for t in (CSF, GM, WM, OEDEMA, NECROSIS, ENHANCING)}


def test_images_and_labels(phantoms):
    for phantom in phantoms:
        assert set(phantom.images) == set(MODALITIES)
        for image in phantom.images.values():
            assert image.dtype == np.int16 and image.shape == (40, 40, 40)
            assert image.min() >= 0 and image.max() > 100
            assert np.all(image[phantom.tissue == 0][:, None] >= 0)
        labels = phantom.labels
        assert labels.dtype == np.uint8 and labels.shape == (40, 40, 40)
        assert set(np.unique(labels)) == {0, 1, 2, 4}  # every tumour has all three parts
        np.testing.assert_array_equal(labels == 1, phantom.tissue == NECROSIS)
        np.testing.assert_array_equal(labels == 2, phantom.tissue == OEDEMA)
        np.testing.assert_array_equal(labels == 4, phantom.tissue == ENHANCING)
        # The tumour is inside the brain, and the images are skull-stripped like BraTS.
        brain = phantom.tissue > 0
        assert np.all(brain[labels > 0])
        assert np.all(phantom.images["t1"][~_dilated(brain)] == 0)
        assert (phantom.images["t1"][brain] > 0).mean() > 0.99


def _dilated(mask):
    from scipy import ndimage as ndi

    return ndi.binary_dilation(mask)


def test_t1_contrast(phantoms):
    for phantom in phantoms:
        m = tissue_means(phantom, "t1")
        assert m[WM] > m[GM] > m[CSF]
        assert m[OEDEMA] < m[WM] and m[NECROSIS] < m[GM] and m[ENHANCING] < m[WM]
    # oedema darker than grey matter on average (per case the tissue levels vary by a few percent)
    assert np.mean([tissue_means(p, "t1")[OEDEMA] / tissue_means(p, "t1")[GM] for p in phantoms]) < 1.0


def test_t2_contrast(phantoms):
    for phantom in phantoms:
        m = tissue_means(phantom, "t2")
        assert m[CSF] > m[GM] > m[WM]
        assert m[OEDEMA] > m[GM] and m[NECROSIS] > m[GM] and m[ENHANCING] > m[WM]
        # the core shows on T2: fluid-bright necrosis inside a rim darker than the oedema around it
        assert m[NECROSIS] > m[OEDEMA] > m[ENHANCING]


def test_t1ce_and_flair_contrast(phantoms):
    for phantom in phantoms:
        t1, t1ce, flair = (tissue_means(phantom, m) for m in ("t1", "t1ce", "flair"))
        assert t1ce[ENHANCING] > t1ce[WM] and t1ce[ENHANCING] > t1ce[NECROSIS]
        assert t1ce[ENHANCING] / t1ce[WM] > 1.5 * t1[ENHANCING] / t1[WM]  # contrast uptake
        assert flair[CSF] < 0.7 * min(flair[WM], flair[GM])  # fluid suppressed
        assert flair[OEDEMA] == max(flair.values())


def test_domain_gap_tumour_dark_on_t1_bright_on_t2(phantoms):
    for phantom in phantoms:
        tumour = phantom.labels > 0
        white = phantom.tissue == WM
        t1, t2 = phantom.images["t1"].astype(float), phantom.images["t2"].astype(float)
        assert t1[tumour].mean() < 0.9 * t1[white].mean()
        assert t2[tumour].mean() > 1.5 * t2[white].mean()


def test_tissue_intensities_vary_between_cases(phantoms):
    ratios = [tissue_means(p, "t1")[GM] / tissue_means(p, "t1")[WM] for p in phantoms]
    assert np.ptp(ratios) > 0.01


def test_tumours_differ_in_size_and_position(phantoms):
    centres = np.array([np.argwhere(p.labels > 0).mean(axis=0) for p in phantoms])
    sizes = np.array([(p.labels > 0).sum() for p in phantoms])
    assert min(np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1 :]) > 1.0
    assert sizes.max() > 1.3 * sizes.min()


def test_same_seed_same_phantom_and_modalities_are_independent():
    images_a, labels_a = make_phantom(32, np.random.default_rng(7), ("t1", "t2"))
    images_b, labels_b = make_phantom(32, np.random.default_rng(7), ("t2",))
    np.testing.assert_array_equal(labels_a, labels_b)
    np.testing.assert_array_equal(images_a["t2"], images_b["t2"])
    assert list(images_b) == ["t2"]
    _, labels_c = make_phantom(32, np.random.default_rng(8), ("t2",))
    assert not np.array_equal(labels_a, labels_c)


def test_anisotropic_spacing(tmp_path):
    images, labels = make_phantom(32, np.random.default_rng(0), ("t1",), spacing=(1.0, 1.0, 2.0))
    assert labels.shape == images["t1"].shape == (32, 32, 16)
    (folder,) = write_cohort(tmp_path, cases=1, size=32, modalities=("t1",), spacing=(1.0, 1.0, 2.0))
    (case,) = find_cases(folder)
    assert case.load_image("t1").spacing == pytest.approx((1.0, 1.0, 2.0))


@pytest.mark.parametrize("spacing", [(0.9, 1.2, 2.5), (1.0, 1.0, 3.0), (0.5, 0.5, 3.0), (3.0, 1.0, 1.0),
                                     (1.0, 3.0, 3.0), (3.0, 3.0, 3.0)])
def test_coarse_anisotropic_grids_get_a_whole_tumour(spacing):
    """Grids with few thick slices (down to 8) still get a tumour with all three parts, inside the brain."""
    for size in (32, 40, 48):
        for seed in range(3):
            phantom = generate_phantom(size, np.random.default_rng([seed, size]), ("t1",), spacing=spacing)
            assert phantom.labels.shape == phantom_shape(size, spacing)
            counts = np.bincount(phantom.labels.ravel(), minlength=5)
            assert min(counts[1], counts[2], counts[4]) >= 4, (size, seed, counts)
            assert np.all(phantom.tissue[phantom.labels > 0] > 0)


def test_a_grid_with_no_room_for_a_tumour_is_a_config_error(monkeypatch):
    from bigl.data import phantoms as phantoms_module

    monkeypatch.setattr(phantoms_module, "_add_tumour", lambda *args, **kwargs: None)
    with pytest.raises(ConfigError, match="cannot place a tumour") as info:
        make_phantom(32, np.random.default_rng(0), ("t1",), spacing=(1.0, 1.0, 3.0))
    assert "32x32x11" in info.value.message and "--size" in info.value.hint


def test_write_cohort_round_trip(tmp_path):
    folders = write_cohort(tmp_path, cases=2, size=32, seed=3, modalities=("t1", "flair"))
    assert [f.name for f in folders] == ["Phantom_001", "Phantom_002"]
    cases = find_cases(tmp_path, modalities=("t1", "flair"), require_labels=True)
    assert [c.name for c in cases] == ["Phantom_001", "Phantom_002"]
    case = cases[0]
    assert case.naming == "brats2018" and case.modalities == ("t1", "flair")
    assert case.images["t1"].name == "Phantom_001_t1.nii.gz"
    case.check_grid()
    image = nib.load(str(case.images["t1"]))
    assert image.get_data_dtype() == np.int16
    expected = np.array([[-1.0, 0, 0, 31], [0, -1.0, 0, 31], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.affine, expected)
    np.testing.assert_allclose(phantom_affine((32, 32, 32)), expected)
    images, labels = make_phantom(32, np.random.default_rng([3, 0]), ("t1", "flair"))
    np.testing.assert_array_equal(case.load_image("flair").data, images["flair"])
    np.testing.assert_array_equal(case.load_labels().data, labels)


def test_shared_phantom_cohort_fixture(phantom_cohort):
    cases = find_cases(phantom_cohort, modalities=MODALITIES, require_labels=True)
    assert len(cases) == 4
    for case in cases:
        case.check_grid()
        assert case.load_image("t2").data.shape == (48, 48, 48)
        assert set(np.unique(case.load_labels().data)) == {0, 1, 2, 4}


def test_write_cohort_brats2023_naming(tmp_path):
    write_cohort(tmp_path, cases=1, size=32, modalities=("t1", "t2"), naming="brats2023", prefix="BraTS-PHA")
    (case,) = find_cases(tmp_path)
    assert case.name == "BraTS-PHA-001" and case.naming == "brats2023"
    assert sorted(p.name for p in case.files().values()) == [
        "BraTS-PHA-001-seg.nii.gz", "BraTS-PHA-001-t1n.nii.gz", "BraTS-PHA-001-t2w.nii.gz"
    ]  # fmt: skip
    on_disk = np.asarray(nib.load(str(case.labels)).dataobj)
    assert set(np.unique(on_disk)) == {0, 1, 2, 3}
    assert set(np.unique(case.load_labels().data)) == {0, 1, 2, 4}


def test_write_cohort_is_reproducible_byte_for_byte(tmp_path):
    first = write_cohort(tmp_path / "a", cases=2, size=24, seed=11, modalities=("t2",))
    second = write_cohort(tmp_path / "b", cases=3, size=24, seed=11, modalities=("t2",))
    for a, b in zip(first, second):
        for file in sorted(a.iterdir()):
            assert file.read_bytes() == (b / file.name).read_bytes()
    other = write_cohort(tmp_path / "c", cases=1, size=24, seed=12, modalities=("t2",))
    assert (other[0] / "Phantom_001_t2.nii.gz").read_bytes() != (first[0] / "Phantom_001_t2.nii.gz").read_bytes()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cases": 0}, "number of cases"),
        ({"size": 8}, "size"),
        ({"seed": -1}, "seed"),
        ({"naming": "brats2017"}, "naming"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"prefix": "a/b"}, "prefix"),
    ],
)
def test_write_cohort_refuses_bad_arguments(tmp_path, kwargs, message):
    arguments = {"cases": 1, "size": 24, **kwargs}
    with pytest.raises(ConfigError, match=message):
        write_cohort(tmp_path, **arguments)


def test_cli_writes_a_cohort(tmp_path, capsys):
    out = tmp_path / "cohort"
    status = main(["phantoms", "--out", str(out), "--cases", "2", "--size", "24", "--seed", "4",
                   "--modalities", "T1,t2w", "--naming", "brats2023"])  # fmt: skip
    assert status == 0
    assert "2 case(s): t1 2, t2 2, labels 2" in capsys.readouterr().out
    cases = find_cases(out, modalities=("t1", "t2"), require_labels=True)
    assert [c.name for c in cases] == ["Phantom-001", "Phantom-002"]
    assert cases[0].images["t2"].name == "Phantom-001-t2w.nii.gz"


@pytest.mark.parametrize(
    "arguments, message",
    [(["--cases", "0"], "number of cases"), (["--modalities", "t1,pd"], "unknown modality")],
)
def test_cli_reports_bad_arguments(tmp_path, capsys, arguments, message):
    assert main(["phantoms", "--out", str(tmp_path), "--size", "24", *arguments]) == 2
    assert message in capsys.readouterr().err
