"""Ensembles (bigl.ensemble): several models' class probabilities averaged on the scan's grid, from
the Python API and from ``bigl segment --model A --model B``."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from synthetic import synthetic_scan

from bigl.cli import main
from bigl.ensemble import EnsemblePredictor
from bigl.errors import ConfigError
from bigl.labels import classes_to_labels
from bigl.prediction import open_predictor

AFFINE = np.diag([1.0, 1.2, 2.5, 1.0])


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three tiny bundles with other weights (and one with another normalisation), all for T2."""
    from bigl.testing import make_test_bundle

    folder = tmp_path_factory.mktemp("ensemble")
    return [make_test_bundle(folder / "a.safetensors", seed=0, sharpen=20.0),
            make_test_bundle(folder / "b.safetensors", seed=1, sharpen=20.0),
            make_test_bundle(folder / "c.safetensors", seed=2, sharpen=20.0, intensity="zscore", image_size=48)]


def _predict(model, **options):
    return open_predictor(model, engine="torch", device="cpu", **options).predict(
        synthetic_scan(), AFFINE, probabilities=True, modality="t2")


def test_the_ensemble_averages_the_members_probabilities(members):
    alone = [_predict(path) for path in members]
    ensemble = open_predictor(members, engine="torch", device="cpu")
    assert isinstance(ensemble, EnsemblePredictor) and len(ensemble.members) == 3
    result = ensemble.predict(synthetic_scan(), AFFINE, probabilities=True, modality="t2")
    mean = np.mean([r.probabilities for r in alone], axis=0)
    np.testing.assert_allclose(result.probabilities, mean, atol=1e-6)
    np.testing.assert_array_equal(result.labels, classes_to_labels(np.argmax(mean, axis=0)))
    # The members disagree, so the ensemble is not simply one of them.
    assert all((r.labels != result.labels).any() for r in alone)
    assert result.labels.shape == synthetic_scan().shape and result.labels.dtype == np.uint8


def test_attention_and_translation_come_from_the_first_member(members):
    first = open_predictor(members[0], engine="torch", device="cpu").predict(
        synthetic_scan(), AFFINE, attention=True, translated=True)
    ensemble = open_predictor(members[:2], engine="torch", device="cpu", translated=True).predict(
        synthetic_scan(), AFFINE, attention=True, translated=True)
    np.testing.assert_array_equal(ensemble.translated, first.translated)
    for kind in ("position", "channel"):
        np.testing.assert_array_equal(ensemble.attention[kind], first.attention[kind])


def test_progress_counts_every_members_work(members):
    calls = []
    open_predictor(members[:2], engine="torch", device="cpu", batch_size=8).predict(
        synthetic_scan(), AFFINE, progress=lambda done, total: calls.append((done, total)))
    totals = {total for _, total in calls}
    assert len(totals) == 1
    assert calls[-1][0] == calls[-1][1] and [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_one_model_is_no_ensemble_and_modalities_must_agree(members):
    assert not isinstance(open_predictor([members[0]], engine="torch", device="cpu"), EnsemblePredictor)
    single = open_predictor(members[0], engine="torch", device="cpu")
    with pytest.raises(ConfigError, match="at least two models"):
        EnsemblePredictor([single])
    flair = open_predictor(members[1], engine="torch", device="cpu")
    flair.metadata = {**flair.metadata, "modality": "flair"}
    with pytest.raises(ConfigError, match="must segment one modality, these segment FLAIR, T2"):
        EnsemblePredictor([single, flair])


def test_cli_segment_with_several_models(members, tmp_path, capsys):
    scan = tmp_path / "case_t2.nii.gz"
    nib.save(nib.Nifti1Image(synthetic_scan(), AFFINE), str(scan))
    out = tmp_path / "out" / "seg.nii.gz"
    argv = ["segment", "-i", str(scan), "-o", str(out), "--engine", "torch", "--progress", "none"]
    assert main(argv + [arg for m in members for arg in ("--model", str(m))]) == 0
    printed = capsys.readouterr().out
    assert "ensemble of 3 models" in printed and all(str(m) in printed for m in members)
    expected = open_predictor(members, engine="torch", device="cpu").predict(synthetic_scan(), AFFINE, modality="t2")
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), expected.labels)



def test_every_members_files_are_protected_from_outputs(members):
    from bigl.prediction import model_paths

    protected = set(model_paths(members))
    assert set(members) <= protected
    assert set(model_paths(open_predictor(members, engine="torch", device="cpu"))) == protected


def test_evaluate_scores_the_ensemble(members, phantom_cohort, tmp_path, capsys):
    from bigl.data.io import load_volume
    from bigl.evaluate import evaluate_bundle
    from bigl.metrics import score_case

    result = evaluate_bundle(members[:2], phantom_cohort, "t2", tmp_path / "eval", device="cpu", figure=False,
                             progress=False)
    assert result["method"].endswith("(ensemble of 2)") and result["model"] == str(members[0])
    ensemble = open_predictor(members[:2], engine="torch", device="cpu")
    case = min(result["cases"])
    image = load_volume(phantom_cohort / case / f"{case}_t2.nii.gz")
    truth = load_volume(phantom_cohort / case / f"{case}_seg.nii.gz")
    expected = score_case(ensemble.predict(image.data, image.affine).labels, truth.data, truth.spacing)
    assert result["cases"][case] == expected
    # The command line takes --model twice and says it is an ensemble.
    assert main(["evaluate", "--model", str(members[0]), "--model", str(members[1]), "--data", str(phantom_cohort),
                 "--modality", "t2", "--device", "cpu", "--json"]) == 0
    printed = capsys.readouterr().out
    assert '"method": "' in printed and "(ensemble of 2)" in printed
