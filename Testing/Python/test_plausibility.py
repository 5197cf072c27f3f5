"""Warnings (never refusals) where a segmentation is unlikely to mean anything: voxel sizes far from
brain MR, a field of view too small for a head, a modality that cannot be checked, a tumour larger
than a brain. Printed by ``bigl segment`` and sent as ``warning`` events with ``--progress json``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bigl import plausibility
from bigl.cli import main
from bigl.inference import BiGLPredictor

from synthetic import synthetic_scan
from test_cli_segment import write_scan


def segment(capsys, *args) -> tuple[int, str, str]:
    status = main(["segment", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def warnings_of(stdout: str) -> list[str]:
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [event["message"] for event in events if event["event"] == "warning"]


def test_a_tiny_noise_volume_is_segmented_with_a_warning(capsys, tmp_path, tiny_bundle):
    noise = write_scan(tmp_path / "noise_t2.nii.gz", data=np.random.default_rng(0).random((10, 10, 10)), affine=np.eye(4))
    status, stdout, err = segment(capsys, "-i", noise, "-o", tmp_path / "seg.nii.gz", "-m", tiny_bundle, "--progress", "json")
    assert status == 0 and (tmp_path / "seg.nii.gz").is_file()
    (message,) = warnings_of(stdout)
    assert "covers only 10 x 10 x 10 mm" in message and "too small to hold a head" in message
    assert "warning: noise_t2.nii.gz covers only" in err


def test_voxels_of_50_mm_are_warned_about(capsys, tmp_path, tiny_bundle):
    scan = write_scan(tmp_path / "case_t2.nii.gz", affine=np.diag([50.0, 50.0, 50.0, 1.0]))
    status, stdout, _ = segment(capsys, "-i", scan, "-o", tmp_path / "seg.nii.gz", "-m", tiny_bundle, "--progress", "json")
    assert status == 0
    (message,) = warnings_of(stdout)
    assert "voxels of 50 x 50 x 50 mm" in message and "far from brain MR" in message


def test_a_modality_that_cannot_be_checked_is_warned_about(capsys, tmp_path, tiny_bundle):
    plain = write_scan(tmp_path / "scan.nii.gz")
    status, _, err = segment(capsys, "-i", plain, "-o", tmp_path / "seg.nii.gz", "-m", tiny_bundle, "--progress", "none")
    assert status == 0 and "the modality of scan.nii.gz cannot be checked" in err
    assert "the model segments T2 scans" in err and "--modality t2" in err
    # stated by the name or by --modality: checked, so nothing to warn about
    named = write_scan(tmp_path / "scan_t2.nii.gz")
    for args in (("-i", named), ("-i", plain, "--modality", "t2")):
        status, _, err = segment(capsys, *args, "-o", tmp_path / "seg.nii.gz", "-m", tiny_bundle, "--progress", "none")
        assert status == 0 and "warning" not in err


def test_an_ordinary_scan_gets_no_warning(capsys, tmp_path, tiny_bundle):
    scan = write_scan(tmp_path / "case_t2.nii.gz", data=synthetic_scan((120, 140, 100)), affine=np.diag([1.2, 1.2, 1.5, 1.0]))
    status, stdout, err = segment(capsys, "-i", scan, "-o", tmp_path / "seg.nii.gz", "-m", tiny_bundle, "--progress", "json")
    assert status == 0 and warnings_of(stdout) == [] and "warning" not in err


class EverythingIsOedema(torch.nn.Module):
    def forward(self, x, return_aux=False):
        logits = torch.zeros(x.shape[0], 4, *x.shape[2:])
        logits[:, 2] = 10.0
        return logits


def test_a_tumour_larger_than_a_brain_is_warned_about(tiny_bundle):
    predictor = BiGLPredictor.from_path(tiny_bundle, device="cpu")
    predictor.bundle.segmenter = EverythingIsOedema()
    prediction = predictor.predict(synthetic_scan(), np.diag([8.0, 8.0, 8.0, 1.0]), modality="t2", name="big.nii.gz")
    (message,) = prediction.warnings
    assert "the tumour found in big.nii.gz measures" in message and "more than a whole brain" in message
    assert prediction.labels.any()  # a warning, not a refusal


@pytest.mark.parametrize(
    ("shape", "spacing", "warned"),
    [((240, 240, 155), (1, 1, 1), False), ((512, 512, 24), (0.45, 0.45, 6.0), False), ((64, 64, 64), (1, 1, 1), False),
     ((10, 10, 10), (1, 1, 1), True), ((240, 240, 155), (0.05, 0.05, 0.05), True), ((30, 30, 30), (12, 12, 12), True)],
)
def test_scan_warnings(shape, spacing, warned):
    assert bool(plausibility.scan_warnings(shape, np.diag([*spacing, 1.0]))) == warned
