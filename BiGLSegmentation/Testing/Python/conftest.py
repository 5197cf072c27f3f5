"""Fixtures of the BiGL Segmentation module tests (run by pytest from the repository root).

Makes ``BiGLSegmentationLib`` and ``Testing/slicer_support.py`` importable, and provides scans with
BraTS-like and anisotropic geometry, a headless MRML scene (skipped without slicer-core) and a
tiny untrained bundle whose labels vary from voxel to voxel.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

MODULE_DIR = Path(__file__).resolve().parents[2]
REPO = MODULE_DIR.parent
for path in (REPO, REPO / "Testing", MODULE_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import slicer_support  # noqa: E402  (needs the path above)


def write_scan(path: Path, *, size: int, spacing=(1.0, 1.0, 1.0), crop=None, seed=0, oblique=False) -> Path:
    """A T2 phantom made by bigl on a BraTS-like LPS grid, optionally cropped to a non-cubic shape
    (so that swapped axes show) and rotated about the z axis (an oblique grid)."""
    from bigl.data.io import save_volume
    from bigl.data.phantoms import make_phantom, phantom_affine

    images, _ = make_phantom(size, np.random.default_rng(seed), ("t2",), spacing=spacing)
    image = images["t2"]
    if crop is not None:
        image = image[tuple(slice(0, n) for n in crop)]
    affine = phantom_affine(image.shape, spacing)
    if oblique:
        angle = np.deg2rad(20.0)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0, 0], [np.sin(angle), np.cos(angle), 0, 0],
                             [0, 0, 1, 0], [0, 0, 0, 1]])
        affine = rotation @ affine
        affine[:3, 3] += (12.5, -7.25, 30.0)
    return save_volume(path, image, affine, dtype=np.int16)


@pytest.fixture
def lps_scan(tmp_path) -> Path:
    """A 40 x 36 x 28 T2 phantom with the BraTS affine diag(-1, -1, 1) (1 mm voxels)."""
    return write_scan(tmp_path / "Lps_t2.nii.gz", size=40, crop=(40, 36, 28), seed=1)


@pytest.fixture
def anisotropic_scan(tmp_path) -> Path:
    """A T2 phantom with 0.9 x 1.2 x 1.8 mm voxels (44 x 33 x 22) on a rotated (oblique) LPS-like grid."""
    return write_scan(tmp_path / "Aniso_t2.nii.gz", size=44, spacing=(0.9, 1.2, 1.8), seed=2, oblique=True)


@pytest.fixture
def headless():
    """A fresh headless Slicer scene with the module logics (skips without slicer-core)."""
    yield from slicer_support.headless_slicer_or_skip()


@pytest.fixture(scope="session")
def varied_bundle(tmp_path_factory) -> Path:
    """A tiny untrained bundle whose predictions on a phantom contain every BraTS label.

    An untrained network gives nearly uniform class scores; the bundle's last convolution is
    scaled up and seeds are tried until all four labels appear, so comparisons are not vacuous.
    """
    import torch

    from bigl.data.phantoms import make_phantom
    from bigl.inference import BiGLPredictor
    from bigl.testing import make_test_bundle

    torch.set_num_threads(1)
    images, _ = make_phantom(40, np.random.default_rng(1), ("t2",))
    folder = tmp_path_factory.mktemp("varied_bundle")
    for seed in range(20):
        path = make_test_bundle(folder / f"varied_{seed}.safetensors", seed=seed, sharpen=10.0)
        labels = BiGLPredictor.from_path(path, device="cpu", num_threads=1).predict(images["t2"]).labels
        if set(np.unique(labels).tolist()) == {0, 1, 2, 4}:
            return path
        path.unlink()
    pytest.fail("no seed gave a test bundle predicting all four labels; adjust make_test_bundle's sharpening")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A tiny untrained bundle (segmenter and both translators) for CPU tests."""
    from bigl.testing import make_test_bundle

    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "tiny.safetensors")
