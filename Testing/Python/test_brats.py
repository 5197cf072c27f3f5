"""Tests of bigl.data.brats: both BraTS naming schemes, folder layouts, missing files, grid checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bigl.data.brats import (
    MODALITIES,
    case_file_name,
    find_cases,
    normalise_modalities,
    normalise_modality,
    parse_case_file,
    summarise_cases,
)
from bigl.data.io import save_volume
from bigl.errors import InputError

LPS = np.array([[-1.0, 0, 0, 7], [0, -1.0, 0, 7], [0, 0, 1.0, 0], [0, 0, 0, 1]])
SHAPE = (8, 8, 6)


def _labels(enhancing: int) -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:6, 2:6, 1:5] = 2
    labels[3:5, 3:5, 2:4] = enhancing
    labels[3, 3, 2] = 1
    return labels


def write_case(
    root: Path, name: str, items, naming="brats2018", *, suffix=".nii.gz", labels=None, shapes=None, affines=None
):
    """A tiny case folder with one file per item (modality or "seg")."""
    folder = root / name
    shapes, affines = shapes or {}, affines or {}
    rng = np.random.default_rng(len(name))
    for item in items:
        file = case_file_name(name, item, naming, compressed=suffix == ".nii.gz")
        if item == "seg":
            data = labels if labels is not None else _labels(3 if naming == "brats2023" else 4)
        else:
            data = rng.integers(1, 500, size=shapes.get(item, SHAPE)).astype(np.int16)
        save_volume(folder / file, data, affines.get(item, LPS))
    return folder


ALL = ("t1", "t1ce", "t2", "flair", "seg")


@pytest.mark.parametrize(
    "given, canonical",
    [("T1", "t1"), ("t1n", "t1"), ("t1c", "t1ce"), ("T1Gd", "t1ce"), ("t1ce", "t1ce"), ("t2w", "t2"),
     ("T2", "t2"), ("t2f", "flair"), ("FLAIR", "flair"), ("T2-FLAIR", "flair")],
)  # fmt: skip
def test_normalise_modality(given, canonical):
    assert normalise_modality(given) == canonical


def test_unknown_modality_is_an_input_error():
    with pytest.raises(InputError, match="unknown modality 'pd'") as info:
        normalise_modality("pd")
    assert "t1ce" in info.value.hint
    assert normalise_modalities("t2, T1,t2w") == ("t2", "t1")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Brats18_2013_11_1_t1ce.nii.gz", ("Brats18_2013_11_1", "t1ce", "brats2018")),
        ("Brats18_2013_11_1_seg.nii", ("Brats18_2013_11_1", "seg", "brats2018")),
        ("BraTS-GLI-00000-000-t2f.nii.gz", ("BraTS-GLI-00000-000", "flair", "brats2023")),
        ("BraTS-GLI-00000-000-seg.nii.gz", ("BraTS-GLI-00000-000", "seg", "brats2023")),
        ("Case_FLAIR.NII.GZ", ("Case", "flair", "brats2018")),
        ("Case_mask.nii.gz", None),
        ("Case_t1.mha", None),
        ("README.md", None),
    ],
)
def test_parse_case_file(name, expected):
    assert parse_case_file(name) == expected


def test_brats2018_cohort(tmp_path):
    write_case(tmp_path, "B_002", ALL)
    write_case(tmp_path, "A_001", ("t1", "t2", "seg"), suffix=".nii")
    (tmp_path / "README.txt").write_text("not data")
    (tmp_path / "A_001" / "A_001_brainmask.nii.gz").write_bytes(b"ignored: unknown suffix")
    (tmp_path / "A_001" / "._A_001_t1.nii.gz").write_bytes(b"ignored: hidden macOS resource fork")
    cases = find_cases(tmp_path)
    assert [c.name for c in cases] == ["A_001", "B_002"]
    a, b = cases
    assert a.naming == "brats2018" and a.folder == tmp_path / "A_001"
    assert a.modalities == ("t1", "t2") and a.missing == ("t1ce", "flair")
    assert a.has("T1") and not a.has("flair")
    assert a.images["t2"].name == "A_001_t2.nii" and a.labels.name == "A_001_seg.nii"
    assert b.modalities == MODALITIES
    assert str(a) == "A_001 (brats2018): t1, t2 + labels (missing t1ce, flair)"
    assert "missing" not in str(b)
    labels = a.load_labels()
    assert labels.data.dtype == np.uint8 and set(np.unique(labels.data)) == {0, 1, 2, 4}
    assert a.load_image("t2").data.shape == SHAPE
    assert summarise_cases(cases) == "2 case(s): t1 2, t1ce 1, t2 2, flair 1, labels 2"


def test_brats2023_naming_maps_enhancing_3_to_4(tmp_path):
    write_case(tmp_path, "BraTS-GLI-00001-000", ALL, naming="brats2023")
    (case,) = find_cases(tmp_path, modalities=("t2", "flair"), require_labels=True)
    assert case.naming == "brats2023"
    assert {m: p.name for m, p in case.images.items()} == {
        "t1": "BraTS-GLI-00001-000-t1n.nii.gz",
        "t1ce": "BraTS-GLI-00001-000-t1c.nii.gz",
        "t2": "BraTS-GLI-00001-000-t2w.nii.gz",
        "flair": "BraTS-GLI-00001-000-t2f.nii.gz",
    }
    on_disk = _labels(3)
    loaded = case.load_labels().data
    np.testing.assert_array_equal(loaded, np.where(on_disk == 3, 4, on_disk))
    assert 3 not in loaded


def test_brats2023_file_with_label_4_is_refused(tmp_path):
    write_case(tmp_path, "X-001", ("t2w", "seg"), naming="brats2023", labels=_labels(4))
    with pytest.raises(InputError, match="contains label 4"):
        find_cases(tmp_path)[0].load_labels()


def test_brats2018_file_with_label_3_points_to_2023_naming(tmp_path):
    write_case(tmp_path, "X_001", ("t2", "seg"), labels=_labels(3))
    with pytest.raises(InputError, match=r"labels \[3\]") as info:
        find_cases(tmp_path)[0].load_labels()
    assert "-seg.nii.gz" in info.value.hint


def test_root_may_be_a_single_case_folder(tmp_path):
    folder = write_case(tmp_path, "Only_001", ("t1", "t2", "seg"))
    (case,) = find_cases(folder)
    assert case.name == "Only_001" and case.folder == folder


def test_nested_cohort_folders(tmp_path):
    write_case(tmp_path / "HGG", "H_001", ("t1", "t2", "seg"))
    write_case(tmp_path / "LGG", "L_001", ("t1", "t2", "seg"))
    assert [c.name for c in find_cases(tmp_path)] == ["H_001", "L_001"]


def test_linked_case_folders_are_followed(tmp_path):
    write_case(tmp_path / "store", "S_001", ("t1", "seg"))
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    try:
        (cohort / "S_001").symlink_to(tmp_path / "store" / "S_001", target_is_directory=True)
    except OSError:
        pytest.skip("symbolic links are not available here")
    (case,) = find_cases(cohort)
    assert case.folder == cohort / "S_001" and case.has("t1")


def test_filters_on_modalities_and_labels(tmp_path):
    write_case(tmp_path, "C_001", ("t1", "t2", "seg"))
    write_case(tmp_path, "C_002", ("t1", "seg"))
    write_case(tmp_path, "C_003", ("t1", "t2"))
    assert [c.name for c in find_cases(tmp_path, modalities=("t2w",))] == ["C_001", "C_003"]
    assert [c.name for c in find_cases(tmp_path, modalities="t2", require_labels=True)] == ["C_001"]
    with pytest.raises(InputError, match="none of the 3 case") as info:
        find_cases(tmp_path, modalities=("flair",))
    assert "flair" in str(info.value) and "t1 3, t2 2" in str(info.value)


def test_missing_modality_error_says_what_the_case_has(tmp_path):
    write_case(tmp_path, "C_001", ("t1", "flair"))
    (case,) = find_cases(tmp_path)
    with pytest.raises(InputError, match="has no t2 image") as info:
        case.load_image("T2")
    assert "t1, flair" in str(info.value) and "C_001_t2.nii.gz" in info.value.hint
    with pytest.raises(InputError, match="no label map"):
        case.load_labels()


@pytest.mark.parametrize("make", ["empty", "missing", "file"])
def test_bad_roots(tmp_path, make):
    root = tmp_path / "data"
    if make == "empty":
        root.mkdir()
        (root / "notes.txt").write_text("x")
    elif make == "file":
        root.write_text("x")
    with pytest.raises(InputError) as info:
        find_cases(root)
    assert str(root) in str(info.value) and info.value.hint


def test_duplicate_files_for_one_modality(tmp_path):
    write_case(tmp_path, "D_001", ("t1", "seg"))
    write_case(tmp_path, "D_001", ("t1",), suffix=".nii")
    with pytest.raises(InputError, match="several files for t1"):
        find_cases(tmp_path)


def test_check_grid_passes_on_a_consistent_case(tmp_path):
    write_case(tmp_path, "G_001", ALL)
    find_cases(tmp_path)[0].check_grid()


def test_check_grid_names_the_file_with_another_shape(tmp_path):
    write_case(tmp_path, "G_001", ALL, shapes={"flair": (8, 8, 7)})
    with pytest.raises(InputError, match="shape") as info:
        find_cases(tmp_path)[0].check_grid()
    assert "G_001_flair.nii.gz" in str(info.value)


def test_check_grid_names_the_file_with_another_affine(tmp_path):
    shifted = LPS.copy()
    shifted[1, 3] += 3.0
    write_case(tmp_path, "G_001", ALL, affines={"seg": shifted})
    with pytest.raises(InputError, match="position/orientation") as info:
        find_cases(tmp_path)[0].check_grid()
    assert "G_001_seg.nii.gz" in str(info.value)


def test_real_brats_case(brats_dir):
    from bigl.data.preprocess import PreprocessConfig, brain_mask, prepare_volume

    cases = find_cases(brats_dir, modalities=MODALITIES, require_labels=True)
    case = cases[0]
    assert case.naming == "brats2018" and case.modalities == MODALITIES
    case.check_grid()
    labels = case.load_labels()
    t2 = case.load_image("t2")
    assert t2.data.shape == labels.data.shape == (240, 240, 155)
    assert t2.spacing == pytest.approx((1.0, 1.0, 1.0))
    np.testing.assert_allclose(t2.affine[:3, :3], np.diag([-1.0, -1.0, 1.0]))
    assert set(np.unique(labels.data)) <= {0, 1, 2, 4} and (labels.data > 0).any()
    # The brain mask follows the skull-stripped foreground and holds the whole tumour.
    mask = brain_mask(t2.data)
    foreground = t2.data > 0
    assert (mask & foreground).sum() / foreground.sum() > 0.95
    assert (mask & ~foreground).sum() / foreground.sum() < 0.01
    assert mask[labels.data > 0].mean() > 0.99
    prepared = prepare_volume(t2.data, PreprocessConfig())
    assert prepared.slices.shape[1:] == (128, 128)
    brain_values = prepared.slices[prepared.slices > -1]
    assert brain_values.size and np.median(brain_values) < 0.5  # not squashed by bright outliers
