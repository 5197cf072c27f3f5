"""The test-time contrast search (``contrast_search``): each brain-intensity gamma view
(bigl.data.preprocess.gamma_brain) is segmented once, the one the model is most confident of is kept,
and the choice reaches the user (Prediction, ``bigl segment``'s summary and JSON events, ``bigl
evaluate``'s summary.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bigl.bundle import annotate_bundle
from bigl.data.preprocess import BACKGROUND, EMPTY_SLICE_MAX, gamma_brain, prepare_volume
from bigl.inference import BiGLPredictor
from bigl.prediction import CONTRAST_GAMMAS, Progress, tumour_confidence

from synthetic import synthetic_scan
from test_cli_segment import segment, write_scan

AFFINE = np.diag([1.2, 1.2, 1.5, 1.0])


def test_gamma_views_change_the_brain_and_leave_the_background():
    slices = np.full((2, 4, 4), BACKGROUND, dtype=np.float32)
    slices[:, 1:3, 1:3] = [[-0.5, 0.0], [0.5, 1.0]]  # u = 0.25, 0.5, 0.75, 1 on the [0, 1] brain scale
    for gamma in (0.5, 2.0):
        view = gamma_brain(slices, gamma)
        assert view.dtype == np.float32
        assert np.array_equal(view[slices <= EMPTY_SLICE_MAX], slices[slices <= EMPTY_SLICE_MAX])
        u = (slices[0, 1:3, 1:3] + 1.0) / 2.0
        assert np.allclose((view[0, 1:3, 1:3] + 1.0) / 2.0, u ** gamma, atol=1e-6)
    assert np.array_equal(gamma_brain(slices, 1.0), slices)
    # the darkest brain tissue stays brain (above the background) under any gamma
    dark = np.array([[[-1.0, -0.998]]], dtype=np.float32)  # background, and brain at u = 0.001
    assert gamma_brain(dark, 2.0)[0, 0, 1] > EMPTY_SLICE_MAX and gamma_brain(dark, 2.0)[0, 0, 0] == BACKGROUND


class SureOfDarkBrains(torch.nn.Module):
    """Oedema wherever there is brain, with a logit margin that grows as the batch's brain gets
    darker (``sign`` +1) or brighter (-1): the model is most confident of the darkest (brightest)
    contrast view."""

    def __init__(self, sign: float = 1.0):
        super().__init__()
        self.sign = sign

    def forward(self, x, return_aux=False):
        brain = (x[:, 0] > EMPTY_SLICE_MAX).float()
        mean = (x[:, 0] * brain).sum() / brain.sum().clamp(min=1.0)
        margin = 3.0 - self.sign * 1.5 * mean  # 1.5-4.5: some tumour in every view
        logits = torch.full((x.shape[0], 4, *x.shape[2:]), -30.0)
        logits[:, 0] = (1.0 - brain) * 30.0
        logits[:, 2] = brain * margin
        return logits


def _predictor(bundle, sign: float, **options) -> BiGLPredictor:
    predictor = BiGLPredictor.from_path(bundle, device="cpu", **options)
    predictor.bundle.segmenter = SureOfDarkBrains(sign)
    return predictor


class Counting(torch.nn.Module):
    """Wraps a segmenter and counts the slices it sees."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.slices = inner, 0

    def forward(self, x, return_aux=False):
        self.slices += x.shape[0]
        return self.inner(x)


@pytest.mark.parametrize("sign, chosen", [(1.0, max(CONTRAST_GAMMAS)), (-1.0, min(CONTRAST_GAMMAS))])
def test_the_search_keeps_the_view_the_model_is_most_confident_of(tiny_bundle, sign, chosen):
    scan = synthetic_scan((60, 64, 40))
    searching = _predictor(tiny_bundle, sign, contrast_search=True)  # no floor: every scan is searched
    found = searching.predict(scan, AFFINE, modality="t2")
    assert found.contrast_gamma == chosen
    # its confidence is that of the chosen view's plain pass, the highest of all views
    slices = prepare_volume(scan, searching.preprocessing).slices
    confidences = {}
    for gamma in CONTRAST_GAMMAS:
        with Progress(None, total=len(slices), batches=0) as report:
            maps = searching._segment_slices(gamma_brain(slices, gamma), False, report)
        confidences[gamma] = tumour_confidence(maps["probabilities"])
    assert max(confidences, key=confidences.get) == chosen
    assert len(set(round(value, 4) for value in confidences.values())) == len(CONTRAST_GAMMAS)
    assert found.confidence == pytest.approx(confidences[chosen], abs=1e-5)
    plain = _predictor(tiny_bundle, sign).predict(scan, AFFINE, modality="t2")
    assert plain.contrast_gamma is None and plain.confidence == pytest.approx(confidences[1.0], abs=1e-5)
    found_maps = searching.predict(scan, AFFINE, modality="t2", probabilities=True).probabilities
    plain_maps = _predictor(tiny_bundle, sign).predict(scan, AFFINE, modality="t2", probabilities=True).probabilities
    if chosen == 1.0:  # no view beats the scan as it is: its prediction is kept as it was
        assert found.confidence == plain.confidence and np.array_equal(found_maps, plain_maps)
        return
    assert found.confidence > plain.confidence
    # ...and the maps behind its labels are that view's (the confidence comes from the same pass)
    tumour = found.labels > 0
    assert found_maps[2][tumour].mean() > plain_maps[2][tumour].mean() + 1e-3


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("floor, searched", [(0.99, True), (0.5, False)])
def test_only_scans_below_the_models_floor_are_searched(tiny_bundle, tmp_path, floor, searched, flip):
    """With a floor, a scan the model is sure of costs no extra pass and keeps its prediction; one
    it is unsure of gets one plain pass per other gamma, and the chosen view is segmented again
    only when its prediction needs more than that pass (here: test-time flips)."""
    bundle = annotate_bundle(tiny_bundle, tmp_path / "floored.safetensors", confidence_floor=floor)
    scan = synthetic_scan((60, 64, 40))
    predictor = BiGLPredictor.from_path(bundle, device="cpu", contrast_search=True, flip=flip)
    counting = predictor.bundle.segmenter = Counting(SureOfDarkBrains(-1.0))
    progress = []
    prediction = predictor.predict(scan, AFFINE, modality="t2", progress=lambda done, total: progress.append((done, total)))
    count = len(prepare_volume(scan, predictor.preprocessing).slices)
    views = 2 if flip else 1  # network passes per slice of a full prediction
    others = len(CONTRAST_GAMMAS) - 1
    expected = count * views + (count * others + (count * views if flip else 0) if searched else 0)
    assert counting.slices == expected
    assert prediction.contrast_gamma == (min(CONTRAST_GAMMAS) if searched else 1.0)
    # the progress counts each slice once per prediction or search pass, and ends at its total
    assert progress[-1][0] == progress[-1][1] == count * (1 + (others + flip if searched else 0))
    plain = BiGLPredictor.from_path(bundle, device="cpu", flip=flip)
    plain.bundle.segmenter = SureOfDarkBrains(-1.0)
    unchanged = plain.predict(scan, AFFINE, modality="t2")
    assert (prediction.confidence != pytest.approx(unchanged.confidence, abs=1e-6)) == searched


def test_the_scan_as_it_is_wins_when_no_view_shows_a_tumour(tiny_bundle):
    class NoTumour(torch.nn.Module):
        def forward(self, x, return_aux=False):
            logits = torch.zeros((x.shape[0], 4, *x.shape[2:]))
            logits[:, 0] = 5.0
            return logits

    predictor = BiGLPredictor.from_path(tiny_bundle, device="cpu", contrast_search=True)
    predictor.bundle.segmenter = NoTumour()
    prediction = predictor.predict(synthetic_scan((60, 64, 40)), AFFINE, modality="t2")
    assert prediction.contrast_gamma == 1.0 and prediction.confidence is None and not prediction.labels.any()


def test_the_search_is_a_model_default_and_a_cli_switch(tiny_bundle, tmp_path, capsys, monkeypatch):
    searching = annotate_bundle(tiny_bundle, tmp_path / "search.safetensors", inference={"contrast_search": True})
    assert BiGLPredictor.from_path(searching, device="cpu").contrast_search
    assert not BiGLPredictor.from_path(searching, device="cpu", contrast_search=False).contrast_search
    assert not BiGLPredictor.from_path(tiny_bundle, device="cpu").contrast_search

    original = BiGLPredictor.from_path

    def with_fixed_segmenter(*args, **kwargs):
        predictor = original(*args, **kwargs)
        predictor.bundle.segmenter = SureOfDarkBrains(-1.0)
        return predictor

    monkeypatch.setattr(BiGLPredictor, "from_path", with_fixed_segmenter)
    scan = write_scan(tmp_path / "case_t2.nii.gz", data=synthetic_scan((60, 64, 40)), affine=AFFINE)
    out = tmp_path / "seg.nii.gz"
    status, stdout, _ = segment(capsys, "-i", scan, "-o", out, "-m", tiny_bundle, "--engine", "torch",
                                "--contrast-search", "--progress", "json")
    assert status == 0 and out.is_file()
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    (done,) = [event for event in events if event["event"] == "done"]
    assert done["contrast_gamma"] == min(CONTRAST_GAMMAS)
    status, stdout, _ = segment(capsys, "-i", scan, "-o", out, "-m", tiny_bundle, "--engine", "torch",
                                "--contrast-search", "--progress", "none")
    assert status == 0 and f"at contrast gamma {min(CONTRAST_GAMMAS):g}" in stdout
    status, stdout, _ = segment(capsys, "-i", scan, "-o", out, "-m", tiny_bundle, "--engine", "torch",
                                "--progress", "none")
    assert status == 0 and "contrast gamma" not in stdout


def test_evaluate_records_the_chosen_contrast(tiny_bundle, phantom_cohort):
    from bigl.evaluate import evaluate_bundle, format_report_markdown

    predictor = BiGLPredictor.from_path(tiny_bundle, device="cpu", contrast_search=True)
    predictor.bundle.segmenter = SureOfDarkBrains(-1.0)
    searching = evaluate_bundle(predictor, phantom_cohort, "t2", cases=["Phantom_001", "Phantom_002"], progress=False)
    assert searching["inference"]["contrast_search"] is True
    assert searching["contrast_gamma"] == {"Phantom_001": min(CONTRAST_GAMMAS), "Phantom_002": min(CONTRAST_GAMMAS)}
    assert f"Phantom_002 (gamma {min(CONTRAST_GAMMAS):g})" in format_report_markdown(searching)
    plain = evaluate_bundle(BiGLPredictor.from_path(tiny_bundle, device="cpu"), phantom_cohort, "t2",
                            cases=["Phantom_001"], progress=False)
    assert plain["contrast_gamma"] is None


def test_a_chosen_contrast_view_is_segmented_without_a_search(tiny_bundle):
    from bigl.errors import ConfigError

    scan = synthetic_scan((60, 64, 40))
    searching = _predictor(tiny_bundle, -1.0, contrast_search=True)
    searched = searching.predict(scan, AFFINE, modality="t2")
    forced = searching.predict(scan, AFFINE, modality="t2", contrast_gamma=1.4)  # any gamma, not only the searched ones
    assert forced.contrast_gamma == 1.4 and searched.contrast_gamma == min(CONTRAST_GAMMAS)
    assert forced.confidence < searched.confidence
    for bad in (0, -1.0, float("nan"), float("inf"), "1.4", True):
        with pytest.raises(ConfigError, match="contrast gamma"):
            searching.predict(scan, AFFINE, modality="t2", contrast_gamma=bad)


def test_the_benchmark_applies_the_search_rule_to_its_rows():
    """benchmarks/view_agreement.py --gammas: a row above the floor keeps the scan as it is; below
    it (or with no floor) the most confident view wins, the scan as it is on ties."""
    from pathlib import Path

    from bigl.testing import load_script

    script = load_script(Path(__file__).resolve().parents[2] / "benchmarks" / "view_agreement.py")
    row = {"confidence": 0.85, "confidence_g0.7": 0.88, "confidence_g1.4": 0.86}
    assert script.search_choice(row, [0.7, 1.4], 0.87) == 0.7
    assert script.search_choice({**row, "confidence": 0.9}, [0.7, 1.4], 0.87) == 1.0
    assert script.search_choice({**row, "confidence": 0.9}, [0.7, 1.4], None) == 1.0
    assert script.search_choice({**row, "confidence": 0.88}, [0.7, 1.4], None) == 1.0  # a tie keeps the scan
    assert script.search_choice({**row, "confidence": float("nan")}, [0.7, 1.4], 0.87) == 0.7
