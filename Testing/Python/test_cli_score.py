"""`bigl score` end to end on small synthetic label maps written with nibabel."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from bigl.cli import main
from bigl.labels import REGIONS
from bigl.metrics import score_files

AFFINE = np.diag([-1.0, -1.0, 1.5, 1.0])  # LPS-like, anisotropic like many clinical scans


def label_map(shift: int = 0) -> np.ndarray:
    labels = np.zeros((24, 24, 16), np.uint8)
    labels[6:18, 6:18, 4:12] = 2
    labels[8:15, 8:15, 5:11] = 1
    labels[10:13, 10:13, 6:9] = 4
    return np.roll(labels, shift, axis=2)  # along the 1.5 mm axis


def write(path, labels, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, affine), str(path))
    return path


@pytest.fixture
def cohort(tmp_path):
    """BraTS-style references for three cases and flat predictions, one per case, shifted by 0, 1, 2 voxels."""
    for index, name in enumerate(("Case_A", "Case_B", "Case_C")):
        write(tmp_path / "ref" / name / f"{name}_seg.nii.gz", label_map())
        write(tmp_path / "ref" / name / f"{name}_t2.nii.gz", label_map().astype(np.float32) * 100)
        write(tmp_path / "pred" / f"{name}.nii.gz", label_map(shift=index))
    return tmp_path


def run(capsys, *args):
    status = main(["score", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def test_json_output_has_cases_mean_and_std(cohort, capsys):
    status, out, _ = run(capsys, "--pred", cohort / "pred", "--ref", cohort / "ref", "--json")
    assert status == 0
    report = json.loads(out)
    assert list(report["cases"]) == ["Case_A", "Case_B", "Case_C"]
    assert report["cases"]["Case_A"] == {region: {"dice": 1.0, "hd95": 0.0} for region in REGIONS}
    wt_dice = [report["cases"][name]["WT"]["dice"] for name in report["cases"]]
    assert wt_dice[0] > wt_dice[1] > wt_dice[2]  # larger shifts score worse
    expected_b = score_files(cohort / "pred" / "Case_B.nii.gz", cohort / "ref" / "Case_B" / "Case_B_seg.nii.gz")
    assert report["cases"]["Case_B"] == expected_b
    # a box shifted by one / two 1.5 mm slices: the faces that moved are 1.5 / 3.0 mm from the other surface
    assert [report["cases"][name]["WT"]["hd95"] for name in report["cases"]] == pytest.approx([0.0, 1.5, 3.0])
    for region in REGIONS:
        for metric in ("dice", "hd95"):
            values = [report["cases"][name][region][metric] for name in report["cases"]]
            assert report["mean"][region][metric] == pytest.approx(np.mean(values))
            assert report["std"][region][metric] == pytest.approx(np.std(values))
    assert report["missing_predictions"] == [] and report["extra_predictions"] == []


def test_table_and_csv_output(cohort, capsys, tmp_path):
    csv_path = tmp_path / "out" / "scores.csv"
    status, out, err = run(capsys, "--pred", cohort / "pred", "--ref", cohort / "ref", "--csv", csv_path)
    assert status == 0
    assert "Dice WT (%)" in out and "HD95 ET (mm)" in out
    assert "| Case_A | 100.00 | 100.00 | 100.00 | 0.00 | 0.00 | 0.00 |" in out
    assert "| Dice (%) |" in out and "| HD95 (mm) |" in out and "Mean ± std over 3 case(s)" in out
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["case"] for row in rows] == ["Case_A", "Case_B", "Case_C"]
    assert float(rows[0]["WT_dice"]) == 1.0 and 0 < float(rows[2]["ET_hd95"])
    assert rows[1]["reference"].endswith("Case_B_seg.nii.gz") and str(csv_path) in err


def test_partial_match_warns_and_scores_the_rest(cohort, capsys):
    (cohort / "pred" / "Case_C.nii.gz").unlink()
    write(cohort / "pred" / "Stray_seg.nii.gz", label_map())
    status, out, err = run(capsys, "--pred", cohort / "pred", "--ref", cohort / "ref", "--json")
    assert status == 0
    report = json.loads(out)
    assert list(report["cases"]) == ["Case_A", "Case_B"]
    assert report["missing_predictions"] == ["Case_C"] and report["extra_predictions"] == ["Stray"]
    assert "Case_C" in err and "Stray" in err


def test_no_matching_case_exits_with_status_2(cohort, capsys, tmp_path):
    write(tmp_path / "other" / "Unrelated.nii.gz", label_map())
    status, out, err = run(capsys, "--pred", tmp_path / "other", "--ref", cohort / "ref")
    assert status == 2 and out == ""
    assert "no prediction" in err and "Unrelated" in err and "Case_A" in err and "fix:" in err


def test_mismatched_grid_exits_with_status_2_naming_both_files(cohort, capsys):
    moved = AFFINE.copy()
    moved[:3, 3] = (10.0, 0.0, 0.0)
    pred = write(cohort / "pred" / "Case_B.nii.gz", label_map(), moved)
    status, _, err = run(capsys, "--pred", cohort / "pred", "--ref", cohort / "ref")
    assert status == 2
    assert str(pred) in err and "Case_B_seg.nii.gz" in err and "same voxel grid" in err


def test_brats_2023_labels_exit_with_status_2(cohort, capsys):
    labels = label_map()
    labels[labels == 4] = 3
    write(cohort / "ref" / "Case_A" / "Case_A_seg.nii.gz", labels)
    ref = cohort / "ref" / "Case_A" / "Case_A_seg.nii.gz"
    status, _, err = run(capsys, "--pred", cohort / "pred" / "Case_A.nii.gz", "--ref", ref)
    assert status == 2
    assert "Case_A_seg.nii.gz" in err and "3" in err and "relabel 3 to 4" in err


def test_missing_path_exits_with_status_2(cohort, capsys):
    status, _, err = run(capsys, "--pred", cohort / "nowhere", "--ref", cohort / "ref")
    assert status == 2 and "does not exist" in err
