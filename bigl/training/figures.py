"""Sample grids written during training (``samples/<stage>_<step>.png``).

One row per kind of image (real, translated, cycled; or images with predicted and true labels),
one column per fixed sample slice, so that figures of successive steps can be compared. Slices
are shown transposed (for BraTS-like axial slices: anterior up). Matplotlib's object API is used
(no pyplot state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from bigl.figures import region_overlay
from bigl.files import atomic_output
from bigl.labels import classes_to_labels


def sample_grid(
    path: Path,
    rows: Mapping[str, np.ndarray],
    *,
    overlays: Mapping[str, np.ndarray] | None = None,
    title: str = "",
) -> Path:
    """PNG grid of slices: ``rows`` maps a row title to images [n, S, S] in [-1, 1]; ``overlays``
    maps a row title to class indices [n, S, S] drawn as BraTS regions over that row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    overlays = overlays or {}
    columns = max(len(images) for images in rows.values())
    figure = Figure(figsize=(1.9 * columns + 1.2, 1.9 * len(rows) + 0.4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(columns):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c >= len(images):
                axis.set_visible(False)
                continue
            axis.imshow(np.asarray(images[c], dtype=np.float32).T, cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")
            if name in overlays:
                axis.imshow(region_overlay(classes_to_labels(overlays[name][c])).transpose(1, 0, 2), interpolation="nearest")
            if c == 0:
                axis.set_ylabel(name, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, dpi=80)
    return path
