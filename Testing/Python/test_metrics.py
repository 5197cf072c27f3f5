"""Dice and HD95 against MONAI, BraTS empty-mask conventions, label checks, folder matching, tables."""

from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bigl.errors import InputError
from bigl.labels import REGIONS
from bigl.metrics import (
    HD95_EMPTY_MM,
    case_name,
    check_labels,
    dice,
    find_label_files,
    format_case_table,
    format_comparison_markdown,
    format_summary_markdown,
    hd95,
    score_case,
    score_files,
    score_paths,
    summarise,
    write_cases_csv,
)

ANISOTROPIC = (1.0, 1.5, 3.0)


def random_blobs(shape, rng, threshold=0.1, sigma=2.5) -> np.ndarray:
    """Irregular, possibly multi-component masks: smoothed noise above a threshold."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise > threshold * noise.std() * 10


def random_label_map(shape, rng) -> np.ndarray:
    """Nested BraTS-like regions: oedema around a core with an enhancing part, from random blobs."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[random_blobs(shape, rng, 0.05)] = 2
    core = random_blobs(shape, rng, 0.1) & (labels == 2)
    labels[core] = 1
    labels[core & random_blobs(shape, rng, 0.1)] = 4
    return labels


def monai_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    import torch
    from monai.metrics import compute_hausdorff_distance

    value = compute_hausdorff_distance(
        torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None],
        include_background=True, percentile=95, spacing=spacing,
    )  # fmt: skip
    return float(value.item())


# --------------------------------------------------------------------------- against MONAI


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), ANISOTROPIC])
def test_hd95_and_dice_match_monai_on_random_blobs(seed, spacing):
    import torch
    from monai.metrics import compute_dice

    rng = np.random.default_rng(seed)
    a = random_blobs((36, 30, 24), rng, 0.05)
    b = random_blobs((36, 30, 24), rng, 0.08)
    assert a.any() and b.any() and (a != b).any()
    assert hd95(a, b, spacing) == pytest.approx(monai_hd95(a, b, spacing), rel=1e-5, abs=1e-5)
    expected_dice = compute_dice(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None], ignore_empty=False)
    assert dice(a, b) == pytest.approx(float(expected_dice.item()), rel=1e-6)


@pytest.mark.filterwarnings("ignore")
def test_hd95_matches_monai_for_masks_touching_the_image_border_and_in_2d():
    rng = np.random.default_rng(7)
    a = random_blobs((20, 18, 12), rng, 0.0)
    b = random_blobs((20, 18, 12), rng, 0.0)
    assert a[0].any() and b[:, :, -1].any()  # the union box reaches the border: the crop cannot grow there
    assert hd95(a, b, ANISOTROPIC) == pytest.approx(monai_hd95(a, b, ANISOTROPIC), rel=1e-5)
    a2, b2 = random_blobs((40, 30), rng, 0.05), random_blobs((40, 30), rng, 0.05)
    assert hd95(a2, b2, (0.5, 2.0)) == pytest.approx(monai_hd95(a2, b2, (0.5, 2.0)), rel=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_score_case_matches_monai_per_region_with_one_hot_channels():
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    rng = np.random.default_rng(3)
    pred, ref = random_label_map((40, 36, 20), rng), random_label_map((40, 36, 20), rng)
    scores = score_case(pred, ref, ANISOTROPIC)

    def one_hot(labels):  # channel 0 background, then the (overlapping) regions
        channels = [labels == 0] + [np.isin(labels, REGIONS[r]) for r in REGIONS]
        return torch.from_numpy(np.stack(channels))[None]

    hd = compute_hausdorff_distance(
        one_hot(pred), one_hot(ref), include_background=False, percentile=95, spacing=ANISOTROPIC
    )
    dsc = compute_dice(one_hot(pred), one_hot(ref), include_background=False, ignore_empty=False)
    for index, region in enumerate(REGIONS):
        assert scores[region]["hd95"] == pytest.approx(float(hd[0, index]), rel=1e-5)
        assert scores[region]["dice"] == pytest.approx(float(dsc[0, index]), rel=1e-6)


# --------------------------------------------------------------------------- exact properties


def test_hd95_of_single_voxels_is_their_distance_in_millimetres():
    a, b = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    a[2, 3, 4] = True
    b[5, 3, 6] = True  # 3 voxels along axis 0, 2 along axis 2
    expected = np.hypot(3 * ANISOTROPIC[0], 2 * ANISOTROPIC[2])
    assert hd95(a, b, ANISOTROPIC) == pytest.approx(expected)
    assert hd95(b, a, ANISOTROPIC) == pytest.approx(expected)


@pytest.mark.filterwarnings("ignore")
def test_hd95_matches_monai_for_small_masks_in_a_large_volume():
    rng = np.random.default_rng(11)
    a, b = random_blobs((16, 14, 10), rng, 0.0), random_blobs((16, 14, 10), rng, 0.0)
    big_a, big_b = np.zeros((60, 50, 40), bool), np.zeros((60, 50, 40), bool)
    big_a[20:36, 5:19, 25:35], big_b[20:36, 5:19, 25:35] = a, b
    # the crop to the union box (plus one voxel) must not change surfaces or distances
    assert hd95(big_a, big_b, ANISOTROPIC) == pytest.approx(monai_hd95(big_a, big_b, ANISOTROPIC), rel=1e-5)


def test_hd95_is_the_larger_directed_percentile():
    # b adds a far-away blob to a: a->b distances are all 0, b->a distances are large for the blob
    a = np.zeros((40, 12, 12), bool)
    a[2:8, 2:8, 2:8] = True
    b = a.copy()
    b[30:36, 2:8, 2:8] = True
    value = hd95(a, b, (1.0, 1.0, 1.0))
    assert value == hd95(b, a, (1.0, 1.0, 1.0))
    assert value > 20  # the pooled percentile of medpy would weigh the blob half as much


def test_dice_counts():
    a, b = np.zeros(10, bool), np.zeros(10, bool)
    a[:4], b[2:8] = True, True  # overlap 2, sizes 4 and 6
    assert dice(a, b) == pytest.approx(2 * 2 / 10)
    assert dice(a, a) == 1.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), ANISOTROPIC])
def test_brats_conventions_for_empty_masks(spacing):
    empty, full = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    full[2:5, 2:5, 2:5] = True
    assert (dice(empty, empty), hd95(empty, empty, spacing)) == (1.0, 0.0)
    assert (dice(full, empty), hd95(full, empty, spacing)) == (0.0, HD95_EMPTY_MM)
    assert (dice(empty, full), hd95(empty, full, spacing)) == (0.0, HD95_EMPTY_MM)
    assert HD95_EMPTY_MM == pytest.approx(np.sqrt(240**2 + 240**2 + 155**2), abs=0.01)


def test_score_case_regions_use_nested_labels():
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:10, 2:10, 2:10] = 2
    ref[4:8, 4:8, 4:8] = 1
    pred = ref.copy()
    pred[pred == 1] = 4  # core relabelled as enhancing: WT and TC unchanged, ET wrong
    scores = score_case(pred, ref, (1.0, 1.0, 1.0))
    assert scores["WT"] == {"dice": 1.0, "hd95": 0.0}
    assert scores["TC"] == {"dice": 1.0, "hd95": 0.0}
    assert scores["ET"] == {"dice": 0.0, "hd95": HD95_EMPTY_MM}  # reference has no ET


def test_full_size_brats_volume_scores():
    shape = (240, 240, 155)
    grid = np.indices(shape, dtype=np.float32)
    radius = np.sqrt(((grid[0] - 120) / 40) ** 2 + ((grid[1] - 110) / 35) ** 2 + ((grid[2] - 70) / 30) ** 2)
    ref = np.zeros(shape, np.uint8)
    ref[radius < 1] = 2
    ref[radius < 0.6] = 1
    ref[(radius < 0.6) & (radius > 0.4)] = 4
    pred = np.roll(ref, 4, axis=0)
    scores = score_case(pred, ref, (1.0, 1.0, 1.0))  # its speed: benchmarks/benchmark_data.py
    assert all(0 < scores[r]["dice"] < 1 and 0 < scores[r]["hd95"] <= 4 for r in REGIONS)


# --------------------------------------------------------------------------- input errors


def test_label_values_outside_brats_are_refused():
    labels = np.zeros((4, 4, 4), np.uint8)
    check_labels(labels)
    labels[0, 0, 0] = 3
    with pytest.raises(InputError, match="3") as info:
        check_labels(labels, "reference x.nii.gz")
    assert "x.nii.gz" in info.value.message and "2023" in info.value.hint
    labels[1, 1, 1] = 7
    with pytest.raises(InputError, match="3, 7"):
        score_case(labels, np.zeros_like(labels), (1, 1, 1))
    with pytest.raises(InputError, match="1.5"):
        check_labels(np.full((2, 2, 2), 1.5))


def test_shape_and_spacing_errors():
    with pytest.raises(InputError, match="shape"):
        score_case(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))
    mask = np.ones((4, 4, 4), bool)
    for spacing in [(1, 1), (1, 0, 1), (1, float("nan"), 1)]:
        with pytest.raises(InputError, match="spacing"):
            hd95(mask, mask, spacing)


# --------------------------------------------------------------------------- summaries and tables


def fake_scores(dice_value, hd_value):
    return {region: {"dice": dice_value, "hd95": hd_value} for region in REGIONS}


def test_summarise_mean_and_population_std():
    summary = summarise({"a": fake_scores(0.5, 2.0), "b": fake_scores(1.0, 6.0)})
    for region in REGIONS:
        assert summary["mean"][region] == pytest.approx({"dice": 0.75, "hd95": 4.0})
        assert summary["std"][region] == pytest.approx({"dice": 0.25, "hd95": 2.0})
    with pytest.raises(InputError):
        summarise({})


def test_markdown_tables_show_percent_dice_and_mm():
    cases = {"a": fake_scores(0.8, 10.0), "b": fake_scores(0.6, 20.0)}
    cases["b"]["ET"] = {"dice": 0.3, "hd95": 30.0}
    summary = summarise(cases)
    table = format_summary_markdown(summary, title="BiGL")
    lines = table.splitlines()
    assert lines[0] == "**BiGL**"
    dice_row = next(line for line in lines if line.startswith("| Dice (%)"))
    assert "| 70.00 ± 10.00 |" in dice_row  # WT: mean 0.7, std 0.1 in percent
    assert dice_row.rstrip(" |").endswith("65.00")  # average of 70, 70, 55
    assert any(line.startswith("| HD95 (mm) | 15.00 ± 5.00") for line in lines)
    case_lines = format_case_table(cases).splitlines()
    assert len(case_lines) == 2 + len(cases)
    assert case_lines[0].count("|") == 8 and "Dice WT (%)" in case_lines[0] and "HD95 ET (mm)" in case_lines[0]
    assert case_lines[3].split("|")[4].strip() == "30.00"  # case b, Dice ET in percent
    methods = {"Source only": summarise({"a": fake_scores(0.1, 50.0)}), "BiGL": summary}
    comparison = format_comparison_markdown(methods, "hd95")
    assert [line.split("|")[1].strip() for line in comparison.splitlines()[2:]] == ["Source only", "BiGL"]
    assert "HD95 (mm)" in comparison.splitlines()[0]


def test_csv_has_one_row_per_case(tmp_path):
    import csv

    cases = {"a": fake_scores(0.8, 10.0), "b": fake_scores(0.6, 20.0)}
    path = write_cases_csv(tmp_path / "sub" / "scores.csv", cases)
    rows = list(csv.DictReader(path.open()))
    assert [row["case"] for row in rows] == ["a", "b"]
    assert float(rows[1]["TC_dice"]) == 0.6 and float(rows[0]["ET_hd95"]) == 10.0
    with pytest.raises(InputError, match="cannot write"):
        write_cases_csv(tmp_path / "sub", cases)  # a folder, not a file


# --------------------------------------------------------------------------- files and folders


def write_labels(path, labels, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-1.0, -1.0, 2.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), str(path))
    return path


@pytest.mark.parametrize(
    ("name", "case"),
    [("X_seg.nii.gz", "X"), ("X-seg.nii.gz", "X"), ("X_pred.nii", "X"), ("X.nii.gz", "X"),
     ("BraTS-GLI-00001-000-seg.nii.gz", "BraTS-GLI-00001-000"),
     ("Brats18_2013_2_1_pred_seg.nii.gz", "Brats18_2013_2_1"), ("X_SEG.NII.GZ", "X"), ("/data/HGG/Y/Y_seg.nii", "Y"),
     ("Z_seg.nii.zip", "Z_seg.nii.zip")],
)  # fmt: skip
def test_case_name_strips_extensions_and_label_suffixes(name, case):
    assert case_name(name) == case


def test_find_label_files_in_flat_nested_and_brats_folders(tmp_path):
    labels = np.zeros((4, 4, 4), np.uint8)
    flat = tmp_path / "flat"
    write_labels(flat / "A.nii.gz", labels)
    write_labels(flat / "B_seg.nii.gz", labels)
    write_labels(flat / "C" / "C_seg.nii.gz", labels)
    write_labels(flat / "C" / "C_t1.nii.gz", labels)  # an image: skipped
    write_labels(flat / "HGG" / "D" / "D_seg.nii.gz", labels)
    write_labels(flat / "E" / "E.nii.gz", labels)
    write_labels(flat / "E" / "notes.nii.gz", labels)  # not named after the case folder: skipped
    found = find_label_files(flat)
    assert {name: path.relative_to(flat).as_posix() for name, path in found.items()} == {
        "A": "A.nii.gz", "B": "B_seg.nii.gz", "C": "C/C_seg.nii.gz", "D": "HGG/D/D_seg.nii.gz", "E": "E/E.nii.gz",
    }  # fmt: skip
    write_labels(flat / "A_seg.nii.gz", labels)
    with pytest.raises(InputError, match="two label maps"):
        find_label_files(flat)
    with pytest.raises(InputError, match="no label maps"):
        find_label_files((tmp_path / "empty").mkdir() or tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        find_label_files(tmp_path / "missing")


def test_score_files_checks_the_grid_and_names_both_files(tmp_path):
    rng = np.random.default_rng(5)
    labels = random_label_map((20, 16, 12), rng)
    ref = write_labels(tmp_path / "ref_seg.nii.gz", labels)
    same = write_labels(tmp_path / "same.nii.gz", labels)
    scores = score_files(same, ref)
    assert all(scores[r] == {"dice": 1.0, "hd95": 0.0} for r in REGIONS if (np.isin(labels, REGIONS[r])).any())
    shifted_affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    shifted_affine[0, 3] = 5.0
    for bad in [write_labels(tmp_path / "moved.nii.gz", labels, shifted_affine),
                write_labels(tmp_path / "small.nii.gz", labels[:-1])]:  # fmt: skip
        with pytest.raises(InputError) as info:
            score_files(bad, ref)
        assert str(bad) in info.value.message and str(ref) in info.value.message


def test_score_files_uses_spacing_from_the_affine(tmp_path):
    ref_labels = np.zeros((10, 10, 10), np.uint8)
    ref_labels[5, 5, 5] = 2
    pred_labels = np.zeros_like(ref_labels)
    pred_labels[5, 5, 8] = 2  # 3 voxels along the third axis, 2 mm voxels there
    ref = write_labels(tmp_path / "r.nii.gz", ref_labels)
    pred = write_labels(tmp_path / "p.nii.gz", pred_labels)
    assert score_files(pred, ref)["WT"]["hd95"] == pytest.approx(6.0)


def test_score_paths_matches_by_case_and_reports_unmatched(tmp_path):
    rng = np.random.default_rng(9)
    maps = {name: random_label_map((16, 16, 10), rng) for name in ("P1", "P2", "P3")}
    for name, labels in maps.items():
        write_labels(tmp_path / "ref" / name / f"{name}_seg.nii.gz", labels)
    write_labels(tmp_path / "pred" / "P1.nii.gz", maps["P1"])
    write_labels(tmp_path / "pred" / "P2_seg.nii.gz", maps["P3"])  # deliberately wrong for P2
    write_labels(tmp_path / "pred" / "Q9.nii.gz", maps["P1"])
    result = score_paths(tmp_path / "pred", tmp_path / "ref")
    assert list(result.cases) == ["P1", "P2"]
    assert result.missing_predictions == ["P3"] and result.extra_predictions == ["Q9"]
    assert result.cases["P1"]["WT"]["dice"] == 1.0 and result.cases["P2"]["WT"]["dice"] < 1.0
    expected_p2 = score_files(tmp_path / "pred" / "P2_seg.nii.gz", tmp_path / "ref" / "P2" / "P2_seg.nii.gz")
    assert result.cases["P2"] == expected_p2
    single = score_paths(tmp_path / "pred" / "P1.nii.gz", tmp_path / "ref")  # one file against a folder
    assert list(single.cases) == ["P1"]
    with pytest.raises(InputError, match="no prediction .* matches"):
        score_paths(tmp_path / "pred" / "Q9.nii.gz", tmp_path / "ref")


def test_real_brats_folder_is_matched_and_scored(brats_dir, tmp_path):
    references = find_label_files(brats_dir)
    assert references and all(path.name == f"{name}_seg.nii.gz" for name, path in references.items())
    name, ref = sorted(references.items())[0]
    image = nib.load(str(ref))
    shifted = np.roll(np.asarray(image.dataobj).astype(np.uint8), 2, axis=1)
    write_labels(tmp_path / "pred" / f"{name}.nii.gz", shifted, image.affine)
    result = score_paths(tmp_path / "pred", brats_dir)
    assert list(result.cases) == [name] and len(result.missing_predictions) == len(references) - 1
    scores = result.cases[name]
    assert 0.5 < scores["WT"]["dice"] < 1.0 and 0 < scores["WT"]["hd95"] <= 2.0 * max(image.header.get_zooms())
