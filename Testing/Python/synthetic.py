"""Small synthetic volumes shared by the test modules (import them: ``from synthetic import ...``)."""

from __future__ import annotations

import numpy as np


def synthetic_scan(shape=(40, 44, 30), seed=0) -> np.ndarray:
    """An ellipsoid 'brain' with texture and a bright blob, zero background around it (float32)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid**2 / np.array([0.7, 0.75, 0.8])[:, None, None, None] ** 2).sum(0) < 1
    blob = ((grid - np.array([0.2, -0.1, 0.1])[:, None, None, None]) ** 2).sum(0) < 0.06
    scan = np.where(brain, 300 + 40 * rng.standard_normal(shape) + 500 * blob, 0.0)
    return scan.astype(np.float32)
