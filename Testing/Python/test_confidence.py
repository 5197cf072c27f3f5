"""The model's confidence in the tumour it found (bigl.prediction.tumour_confidence), the warning below
the floor a model records (the shipped one: bigl.plausibility.CONFIDENCE_FLOOR), and where both reach
the user: the Prediction, ``bigl segment``'s summary line, warnings and JSON events, ``bigl
evaluate``'s summaries, ensembles; and benchmarks/view_agreement.py's views."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bigl import plausibility
from bigl.ensemble import EnsemblePredictor
from bigl.inference import BiGLPredictor
from bigl.prediction import tumour_confidence
from bigl.testing import load_script

from synthetic import synthetic_scan
from test_cli_segment import segment, write_scan

AFFINE = np.diag([1.2, 1.2, 1.5, 1.0])


@pytest.fixture(scope="module")
def floored_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny test bundle with the shipped model's confidence floor in its metadata."""
    from bigl.bundle import annotate_bundle

    return annotate_bundle(tiny_bundle, tmp_path_factory.mktemp("floored") / "floored.safetensors",
                           confidence_floor=plausibility.CONFIDENCE_FLOOR)


class BrightIsOedema(torch.nn.Module):
    """Oedema where the slice is brighter than ``level``, with logit margin ``margin`` over the
    background there (background elsewhere, by the same margin): the tumour probability of every
    oedema pixel is sigmoid(margin)."""

    def __init__(self, margin: float, level: float = 0.0):
        super().__init__()
        self.margin, self.level = margin, level

    def forward(self, x, return_aux=False):
        bright = (x[:, 0] > self.level).float()
        logits = torch.full((x.shape[0], 4, *x.shape[2:]), -30.0)
        logits[:, 0] = (1.0 - bright) * self.margin
        logits[:, 2] = bright * self.margin
        return logits


def _predictor(bundle, margin: float, **options) -> BiGLPredictor:
    predictor = BiGLPredictor.from_path(bundle, device="cpu", **options)
    predictor.bundle.segmenter = BrightIsOedema(margin)
    return predictor


def sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def test_confidence_is_the_mean_tumour_probability_over_the_tumour_pixels():
    probabilities = np.array([[0.7, 0.1, 0.1, 0.1],   # background: not counted
                              [0.2, 0.6, 0.1, 0.1],   # tumour, 0.8
                              [0.1, 0.1, 0.1, 0.7],   # tumour, 0.9
                              [0.4, 0.3, 0.3, 0.0]],  # background by arg-max: not counted
                             dtype=np.float32).T.reshape(1, 4, 2, 2)
    assert tumour_confidence(probabilities) == pytest.approx(0.85)
    nothing = np.zeros((3, 4, 5, 5), dtype=np.float32)
    nothing[:, 0] = 1.0
    assert tumour_confidence(nothing) is None


@pytest.mark.parametrize("margin", [0.5, 1.5, 4.0])
def test_a_prediction_carries_its_confidence_and_warns_below_the_floor(floored_bundle, tiny_bundle, margin):
    prediction = _predictor(floored_bundle, margin).predict(synthetic_scan((60, 64, 40)), AFFINE, modality="t2",
                                                            name="case.nii.gz")
    assert prediction.labels.any()
    assert prediction.confidence == pytest.approx(sigmoid(margin), abs=1e-5)
    unsure = [warning for warning in prediction.warnings if "unsure" in warning]
    if sigmoid(margin) < plausibility.CONFIDENCE_FLOOR:
        (message,) = unsure
        assert f"is {sigmoid(margin):.2f}, below its floor of {plausibility.CONFIDENCE_FLOOR:.2f}" in message
        assert "the model is unsure of case.nii.gz" in message and "check the segmentation" in message
    else:
        assert unsure == []
    assert prediction.labels.any()  # a warning, not a refusal
    # a model without a floor reports the same confidence and warns of nothing
    bare = _predictor(tiny_bundle, margin).predict(synthetic_scan((60, 64, 40)), AFFINE, modality="t2")
    assert bare.confidence == prediction.confidence and not any("unsure" in w for w in bare.warnings)


def test_the_confidence_is_that_of_the_plain_view_when_test_time_views_are_averaged(tiny_bundle):
    """Averaging a slice's views (flips, the inverted view) blurs the probabilities wherever they
    disagree; the confidence stays that of the one pass the floors were set on."""
    scan = synthetic_scan((60, 64, 40))
    results = {}
    for flip in (False, True):
        predictor = BiGLPredictor.from_path(tiny_bundle, device="cpu", flip=flip)
        predictor.bundle.segmenter = LeftHalfIsOedema()
        results[flip] = predictor.predict(scan, AFFINE, probabilities=True, modality="t2")
    assert not np.allclose(results[True].probabilities, results[False].probabilities)
    assert results[True].confidence == pytest.approx(results[False].confidence, abs=1e-7)
    assert results[False].confidence == pytest.approx(sigmoid(10.0), abs=1e-6)


def test_no_tumour_means_no_confidence_and_no_warning(floored_bundle):
    predictor = _predictor(floored_bundle, 4.0)
    predictor.bundle.segmenter.level = 2.0  # nothing is that bright: all background
    prediction = predictor.predict(synthetic_scan((60, 64, 40)), AFFINE, modality="t2")
    assert not prediction.labels.any() and prediction.confidence is None
    assert not any("unsure" in warning for warning in prediction.warnings)
    assert plausibility.confidence_warning(None, 0.87) is None
    assert plausibility.confidence_warning(0.87, 0.87) is None and plausibility.confidence_warning(0.5, None) is None
    assert "below its floor of 0.87" in plausibility.confidence_warning(0.86, 0.87)


def test_an_ensemble_reports_the_mean_of_its_members_confidences(floored_bundle, tiny_bundle):
    members = [_predictor(floored_bundle, 0.5), _predictor(tiny_bundle, 4.0)]
    prediction = EnsemblePredictor(members).predict(synthetic_scan((60, 64, 40)), AFFINE, modality="t2")
    assert prediction.confidence == pytest.approx((sigmoid(0.5) + sigmoid(4.0)) / 2, abs=1e-5)
    assert any("below its floor of 0.87" in warning for warning in prediction.warnings)  # the first member's floor


@pytest.mark.parametrize("margin", [0.5, 4.0])
def test_bigl_segment_prints_the_confidence_and_sends_it_with_the_done_event(capsys, tmp_path, floored_bundle,
                                                                             monkeypatch, margin):
    original = BiGLPredictor.from_path

    def with_fixed_segmenter(*args, **kwargs):
        predictor = original(*args, **kwargs)
        predictor.bundle.segmenter = BrightIsOedema(margin)
        return predictor

    monkeypatch.setattr(BiGLPredictor, "from_path", with_fixed_segmenter)
    scan = write_scan(tmp_path / "case_t2.nii.gz", data=synthetic_scan((60, 64, 40)), affine=AFFINE)
    out = tmp_path / "seg.nii.gz"
    status, stdout, err = segment(capsys, "-i", scan, "-o", out, "-m", floored_bundle, "--engine", "torch",
                                   "--progress", "none")
    assert status == 0 and out.is_file()
    assert f"confidence {sigmoid(margin):.2f}" in stdout
    assert ("the model is unsure of case_t2.nii.gz" in err) == (margin == 0.5)

    status, stdout, _ = segment(capsys, "-i", scan, "-o", out, "-m", floored_bundle, "--engine", "torch",
                                 "--progress", "json")
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    (done,) = [event for event in events if event["event"] == "done"]
    assert done["confidence"] == pytest.approx(sigmoid(margin), abs=1e-5)
    assert any("unsure" in event["message"] for event in events if event["event"] == "warning") == (margin == 0.5)


def test_view_agreement_compares_each_view_on_the_networks_slices(tiny_bundle):
    """With a segmenter that thresholds each pixel, the flipped and translated (here: identity)
    views agree exactly, and the inverted view marks the other side of the threshold."""
    script = load_script(Path(__file__).resolve().parents[2] / "benchmarks" / "view_agreement.py")
    predictor = _predictor(tiny_bundle, 4.0)
    predictor._run_translator = lambda batch: batch
    scan = synthetic_scan((60, 64, 40))
    checks = script.view_agreement(predictor, scan, AFFINE)
    assert checks["flipped"] == pytest.approx(1.0) and checks["translated"] == pytest.approx(1.0)
    assert checks["inverted"] < 0.2
    assert checks["confidence"] == pytest.approx(sigmoid(4.0), abs=1e-5)
    # a segmenter that is not mirror-symmetric: the flipped view disagrees where it differs
    predictor.bundle.segmenter = LeftHalfIsOedema()
    assert script.view_agreement(predictor, scan, AFFINE, views=("flipped",))["flipped"] < 0.2
    with pytest.raises(ValueError, match="unknown view"):
        script.view_agreement(predictor, scan, AFFINE, views=("sideways",))


class LeftHalfIsOedema(torch.nn.Module):
    def forward(self, x, return_aux=False):
        logits = torch.zeros(x.shape[0], 4, *x.shape[2:])
        logits[:, 0] = 5.0
        logits[:, 0, : x.shape[2] // 2] = -5.0  # the first half of the rows: the left-right axis of AFFINE
        logits[:, 2, : x.shape[2] // 2] = 5.0
        return logits


def test_bigl_evaluate_records_each_cases_confidence_and_names_the_unsure_ones(phantom_cohort, floored_bundle,
                                                                            tiny_bundle, tmp_path):
    from bigl.evaluate import evaluate_bundle

    for bundle, margin in ((floored_bundle, 0.5), (floored_bundle, 4.0), (tiny_bundle, 0.5)):
        out = tmp_path / f"eval-{bundle.stem}-{margin}"
        result = evaluate_bundle(_predictor(bundle, margin), phantom_cohort, "T2", out, progress=False,
                                 figure=False)
        summary = json.loads((out / "summary.json").read_text())
        assert sorted(summary["confidence"]) == sorted(result["cases"])
        assert all(value == pytest.approx(sigmoid(margin), abs=1e-5) for value in summary["confidence"].values())
        floored = bundle == floored_bundle
        assert summary["confidence_floor"] == (plausibility.CONFIDENCE_FLOOR if floored else None)
        markdown = (out / "summary.md").read_text()
        assert ("The model was unsure of" in markdown) == (margin == 0.5 and floored)
        if margin == 0.5 and floored:
            assert all(f"{case} ({sigmoid(margin):.2f})" in markdown for case in result["cases"])


def test_a_confidence_floor_outside_0_to_1_is_refused(tiny_bundle, tmp_path):
    from bigl.bundle import BundleError, annotate_bundle

    for floor in (0.0, 1.5, True):
        with pytest.raises(BundleError, match="confidence_floor must be a number between 0 and 1"):
            annotate_bundle(tiny_bundle, tmp_path / "bad.safetensors", confidence_floor=floor)
    assert not (tmp_path / "bad.safetensors").exists()
