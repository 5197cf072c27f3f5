"""The shipped reference model (bigl/resources/default_model.safetensors): present, small, loadable
without pickle, described by its model card; used by `bigl segment` when no model is given; and,
on the real BraTS cases when they are beside the repository, a working T2 segmenter."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bigl.bundle import default_bundle_path, load_bundle, read_metadata
from bigl.cli import main
from bigl.metrics import score_case

from conftest import REPO

MODEL_CARD = REPO / "bigl" / "resources" / "MODEL_CARD.md"
MAX_BYTES = 50 * 1024 * 1024


@pytest.fixture(scope="module")
def metadata() -> dict:
    return read_metadata(default_bundle_path())


def test_reference_model_is_shipped_small_and_loads_as_a_t1_to_t2_bigl_model(metadata):
    path = default_bundle_path()
    assert path.stat().st_size < MAX_BYTES
    assert metadata["method"] == "bigl" and metadata["modality"] == "t2" and metadata["source_modality"] == "t1"
    bundle = load_bundle(path)
    assert bundle.translator_s2t is not None and bundle.translator_t2s is not None


def test_reference_model_ships_its_current_onnx_export():
    """Segmenting without PyTorch uses default_model.onnx: it must be the export of the shipped bundle."""
    from bigl import onnxengine

    path = default_bundle_path()
    export = onnxengine.export_path(path)
    assert onnxengine.export_problem(export, path) is None, "run `bigl export bigl/resources/default_model.safetensors`"
    assert onnxengine.translator_path(export).is_file()
    assert export.stat().st_size + onnxengine.translator_path(export).stat().st_size < MAX_BYTES


def test_reference_model_warns_below_the_floor_set_on_the_development_splits(metadata):
    from bigl.plausibility import CONFIDENCE_FLOOR

    assert metadata["confidence_floor"] == CONFIDENCE_FLOOR


def test_report_cases_took_no_part_in_training(metadata):
    training = metadata["training"]
    report = metadata["metrics"]["report"]["cases"]
    assert len(report) >= 5 and report == training["report_cases"]
    assert set(report) <= set(training["config"]["data"]["exclude"])
    for domain in ("labelled", "unlabelled"):
        assert not set(report) & set(training[domain]["case_names"])


def test_model_card_table_is_the_measured_one(metadata):
    """Every mean ± std in the shipped metrics appears in the model card, as the card prints it."""
    card = MODEL_CARD.read_text(encoding="utf-8")
    methods = metadata["metrics"]["report"]["methods"]
    assert {"source-only", "bigl", "target-only"} <= set(methods)
    for summary in methods.values():
        for region, scores in summary["mean"].items():
            dice = f"{100 * scores['dice']:.2f} ± {100 * summary['std'][region]['dice']:.2f}"
            hd95 = f"{scores['hd95']:.2f} ± {summary['std'][region]['hd95']:.2f}"
            assert dice in card and hd95 in card, (region, dice, hd95)


def test_segment_uses_the_reference_model_when_no_model_is_given(tmp_path, capsys):
    from bigl.data.phantoms import write_cohort

    write_cohort(tmp_path / "cohort", cases=1, size=64, seed=3, modalities=("t2",))
    scan = next((tmp_path / "cohort").rglob("*_t2.nii.gz"))
    common = ["segment", "--input", str(scan), "--progress", "none", "--threads", "2"]
    assert main([*common, "--output", str(tmp_path / "default.nii.gz")]) == 0
    assert f"shipped reference model; model card: {MODEL_CARD}" in capsys.readouterr().out
    assert main([*common, "--output", str(tmp_path / "named.nii.gz"), "--model", str(default_bundle_path())]) == 0
    default, named = (nib.load(str(tmp_path / name)) for name in ("default.nii.gz", "named.nii.gz"))
    assert default.shape == nib.load(str(scan)).shape
    assert np.array_equal(np.asarray(default.dataobj), np.asarray(named.dataobj))
    assert set(np.unique(np.asarray(default.dataobj))) <= {0, 1, 2, 4}


def test_reference_model_reproduces_its_recorded_scores_on_a_real_report_case(brats_dir, metadata, tmp_path):
    """A report case's T2 (its labels took part in nothing but the report), segmented here, scores
    what the model's metadata and card say, and far above the source-only model on the same case."""
    methods = metadata["metrics"]["report"]["methods"]
    case = metadata["metrics"]["report"]["cases"][0]
    scan = brats_dir / case / f"{case}_t2.nii.gz"
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", "--input", str(scan), "--output", str(out), "--progress", "none", "--threads", "2"]) == 0
    reference = nib.load(str(brats_dir / case / f"{case}_seg.nii.gz"))
    scores = score_case(np.asarray(nib.load(str(out)).dataobj), np.asarray(reference.dataobj), reference.header.get_zooms())
    recorded = methods["bigl"]["cases"][case]
    for region in ("WT", "TC", "ET"):
        assert scores[region]["dice"] == pytest.approx(recorded[region]["dice"], abs=1e-3), region
    assert scores["WT"]["dice"] > methods["source-only"]["cases"][case]["WT"]["dice"] + 0.2
