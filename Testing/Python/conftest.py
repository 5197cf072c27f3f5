"""Shared fixtures: a small synthetic phantom cohort and a tiny untrained model bundle.

Nothing here needs ../shared: the real BraTS cases are only used by tests marked with the
``brats_dir`` fixture, which skip when the data is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BRATS_DIR = REPO.parent / "shared" / "data" / "brats18"


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory) -> Path:
    """Four 48^3 phantom cases with all four modalities and labels (BraTS 2018 naming)."""
    from bigl.data.phantoms import write_cohort

    out = tmp_path_factory.mktemp("phantoms")
    write_cohort(out, cases=4, size=48, seed=0, modalities=("t1", "t1ce", "t2", "flair"))
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """An untrained but complete bundle (segmenter + both translators) small enough for CPU tests."""
    from bigl.testing import make_test_bundle

    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "tiny.safetensors")


@pytest.fixture(scope="session")
def brats_dir() -> Path:
    """The real BraTS 2018 cases beside the repository; tests using it skip when absent."""
    if not BRATS_DIR.is_dir():
        pytest.skip(f"real BraTS data not found at {BRATS_DIR} (optional; only for data checks)")
    return BRATS_DIR
