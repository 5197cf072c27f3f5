"""``bigl evaluate``: segment a labelled folder, score it, write tables, figure and predictions."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bigl.cli import main
from bigl.data.io import load_volume, save_volume
from bigl.errors import InputError
from bigl.evaluate import evaluate_bundle, figure_case_names, select_cases
from bigl.inference import BiGLPredictor
from bigl.labels import REGIONS
from bigl.metrics import score_files, summarise


class BrightIsOedema(nn.Module):
    """A stand-in segmenter with image-dependent output: bright (normalised > 0.3) pixels are oedema."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x, return_aux=False):
        zeros = torch.zeros_like(x)
        return torch.cat([zeros, zeros - 10, self.scale * (x - 0.3), zeros - 10], dim=1)


@pytest.fixture(scope="module")
def bright_predictor(tiny_bundle) -> BiGLPredictor:
    predictor = BiGLPredictor.from_path(tiny_bundle, device="cpu")
    predictor.bundle.segmenter = BrightIsOedema()
    return predictor


def case_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def read_csv(path: Path) -> dict[str, dict[str, float]]:
    with path.open(newline="") as handle:
        return {row.pop("case"): {k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)}


def test_evaluate_writes_tables_figure_and_predictions(phantom_cohort, tiny_bundle, tmp_path):
    out = tmp_path / "eval"
    result = evaluate_bundle(tiny_bundle, phantom_cohort, "T2", out, device="cpu", progress=False)
    names = case_names(phantom_cohort)
    assert result["modality"] == "t2" and result["n_cases"] == len(names) == 4
    assert sorted(result["cases"]) == names
    assert result["method"] == "BiGL"

    rows = read_csv(out / "cases.csv")
    assert sorted(rows) == names
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == result["cases"] and summary["summary"] == result["summary"]
    markdown = (out / "summary.md").read_text()
    assert "| Method: Dice (%) | WT | TC | ET | Average |" in markdown
    assert "| Method: HD95 (mm) |" in markdown
    assert all(name in markdown for name in names)

    for name in names:
        prediction = load_volume(out / "predictions" / f"{name}_seg.nii.gz", kind="labels")
        image = load_volume(phantom_cohort / name / f"{name}_t2.nii.gz")
        assert prediction.shape == image.shape
        np.testing.assert_allclose(prediction.affine, image.affine)

    from matplotlib.image import imread

    png = imread(out / "cases.png")
    # three cases x three planes as rows, input / prediction / ground truth as columns
    assert png.shape[0] > 2 * png.shape[1] > 600


def test_scores_equal_bigl_metrics_on_the_saved_predictions(phantom_cohort, bright_predictor, tmp_path):
    out = tmp_path / "eval"
    result = evaluate_bundle(bright_predictor, phantom_cohort, "t2", out, figure=False, progress=False)
    assert not (out / "cases.png").exists()
    rows = read_csv(out / "cases.csv")
    dice_seen = []
    for name in case_names(phantom_cohort):
        expected = score_files(out / "predictions" / f"{name}_seg.nii.gz", phantom_cohort / name / f"{name}_seg.nii.gz")
        for region in REGIONS:
            for metric in ("dice", "hd95"):
                assert result["cases"][name][region][metric] == pytest.approx(expected[region][metric], abs=1e-9)
                assert rows[name][f"{region}_{metric}"] == pytest.approx(expected[region][metric], rel=1e-5)
        dice_seen.append(expected["WT"]["dice"])
    # The stand-in model finds part of the bright T2 tumour, so the check above is not all zeros.
    assert min(dice_seen) > 0.05
    assert result["summary"] == summarise(result["cases"])


def test_cases_without_labels_or_modality_are_listed_and_skipped(phantom_cohort, tiny_bundle, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_cohort, data)
    first, second, third, fourth = case_names(data)
    (data / second / f"{second}_seg.nii.gz").unlink()
    (data / third / f"{third}_t2.nii.gz").unlink()
    notes = []
    result = evaluate_bundle(tiny_bundle, data, "t2", tmp_path / "eval", device="cpu", progress=False,
                             log=notes.append, figure_cases=1)
    assert sorted(result["cases"]) == [first, fourth]
    assert result["skipped"] == {"unlabelled": [second], "missing_modality": [third]}
    assert sorted(read_csv(tmp_path / "eval" / "cases.csv")) == [first, fourth]
    markdown = (tmp_path / "eval" / "summary.md").read_text()
    assert f"Skipped (no labels): {second}" in markdown
    assert f"Skipped (no t2 image): {third}" in markdown
    assert any(second in note for note in notes) and any(third in note for note in notes)

    with pytest.raises(InputError, match="no case .* has both a t2 image and a label map"):
        evaluate_bundle(tiny_bundle, data, "t2", cases=[second, third], device="cpu", progress=False, log=notes.append)


def test_case_selection_and_unknown_names(phantom_cohort):
    names = case_names(phantom_cohort)
    selection = select_cases(phantom_cohort, "flair", [names[2], names[0]])
    assert [case.name for case in selection.evaluable] == [names[2], names[0]]
    with pytest.raises(InputError, match="NoSuchCase"):
        select_cases(phantom_cohort, "t2", ["NoSuchCase"])


def test_a_transform_runs_before_prediction_and_must_keep_the_shape(phantom_cohort, bright_predictor, tmp_path):
    seen = []

    def negate(volume):
        seen.append(volume.shape)
        return volume.max() - volume

    negate.name = "negate"
    names = case_names(phantom_cohort)[:2]
    plain = evaluate_bundle(bright_predictor, phantom_cohort, "t2", cases=names, progress=False)
    negated = evaluate_bundle(bright_predictor, phantom_cohort, "t2", cases=names, transform=negate, progress=False)
    assert len(seen) == 2
    assert negated["method"].endswith("+ negate") and negated["transform"] == "negate"
    assert negated["cases"] != plain["cases"]
    assert negated["outputs"] == {}  # nothing written without out_dir

    with pytest.raises(InputError, match="changed the shape"):
        evaluate_bundle(bright_predictor, phantom_cohort, "t2", cases=names[:1], transform=lambda v: v[1:], progress=False)


def test_a_case_that_cannot_be_segmented_is_named_in_the_error(phantom_cohort, bright_predictor):
    def refuse(volume):  # an error raised deep inside, where the case is not known
        raise InputError("no brain found in the volume", "check that the file is a brain MR scan")

    names = case_names(phantom_cohort)[:2]
    with pytest.raises(InputError, match=f"^{names[0]} .*no brain found") as info:
        evaluate_bundle(bright_predictor, phantom_cohort, "t2", cases=names, transform=refuse, progress=False)
    assert info.value.hint == "check that the file is a brain MR scan"


def test_labels_on_another_grid_are_refused(phantom_cohort, tiny_bundle, tmp_path):
    data = tmp_path / "data"
    name = case_names(phantom_cohort)[0]
    shutil.copytree(phantom_cohort / name, data / name)
    seg = data / name / f"{name}_seg.nii.gz"
    labels = load_volume(seg, kind="labels")
    save_volume(seg, labels.data, labels.affine @ np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(InputError, match="not on the same voxel grid|different position"):
        evaluate_bundle(tiny_bundle, data, "t2", device="cpu", progress=False)


def test_figure_cases_span_best_median_worst():
    scores = {f"c{i}": {r: {"dice": d, "hd95": 1.0} for r in REGIONS} for i, d in enumerate([0.5, 0.9, 0.1, 0.7, 0.3])}
    assert figure_case_names(scores, 3) == ["c1", "c0", "c2"]
    assert figure_case_names(scores, 1) == ["c0"]
    assert figure_case_names(scores, 9) == ["c1", "c3", "c0", "c4", "c2"]


def test_cli_prints_json_only(phantom_cohort, tiny_bundle, tmp_path, capsys):
    status = main(["evaluate", "--model", str(tiny_bundle), "--data", str(phantom_cohort), "--modality", "t2",
                   "--cases", ",".join(case_names(phantom_cohort)[:2]), "--device", "cpu", "--json",
                   "--out", str(tmp_path / "eval"), "--no-save-predictions", "--figure-cases", "1"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_cases"] == 2 and "predictions" not in result["outputs"]
    assert not (tmp_path / "eval" / "predictions").exists()
    assert (tmp_path / "eval" / "cases.png").is_file()


def test_cli_baseline_writes_a_reusable_reference(phantom_cohort, tiny_bundle, tmp_path, capsys):
    case = case_names(phantom_cohort)[0]
    args = ["evaluate", "--model", str(tiny_bundle), "--data", str(phantom_cohort), "--modality", "t2",
            "--cases", case, "--device", "cpu", "--baseline", "invert-histmatch"]
    assert main(args) == 2
    assert "--reference-data" in capsys.readouterr().err

    out = tmp_path / "baseline"
    assert main(args + ["--reference-data", str(phantom_cohort), "--reference-modality", "t1", "--out", str(out),
                        "--reference-exclude", case]) == 0
    printed = capsys.readouterr().out
    assert "BiGL + invert-histmatch" in printed and "| Method: Dice (%) |" in printed
    reference = json.loads((out / "reference.json").read_text())
    assert reference["modality"] == "t1" and len(reference["cases"]) == 3 and case not in reference["cases"]

    # the saved reference replaces the source images; the modality defaults to the bundle's source (t1)
    assert main(args + ["--reference-data", str(out / "reference.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "BiGL + invert-histmatch"
