"""Fixtures of the BiGLTraining tests: module paths, a phantom cohort and a headless MRML scene.

The module's library (``BiGLTrainingLib``), BiGLSegmentation's library (model folder, installer)
and the headless-Slicer helper (``Testing/slicer_support.py``) are put on ``sys.path`` the way
Slicer has them. Tests that need MRML nodes use ``headless_slicer``, which skips with the reason
when the slicer-core wheel cannot be imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
MODULE_DIR = REPO / "BiGLTraining"
for folder in (REPO, REPO / "Testing", MODULE_DIR, REPO / "BiGLSegmentation"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


@pytest.fixture(scope="session")
def phantom_cases(tmp_path_factory) -> Path:
    """Three 48^3 phantom cases with T1, T2 and labels (BraTS 2018 naming)."""
    from bigl.data.phantoms import write_cohort

    folder = tmp_path_factory.mktemp("phantoms") / "cases"
    write_cohort(folder, cases=3, size=48, seed=0, modalities=("t1", "t2"))
    return folder


@pytest.fixture
def headless_slicer():
    """A fresh headless Slicer scene (slicer-core); skipped where the wheel is missing."""
    import slicer_support

    yield from slicer_support.headless_slicer_or_skip()
