"""Figures of segmentations: a case in three planes with the tumour regions drawn over the image.

Layout as in Fig. 3 of the paper: for each case, one row per plane (axial, sagittal, coronal) through
the tumour centre, one column per panel (the input image, then one column per label map, e.g.
prediction and ground truth). Regions are filled nested, WT first, then TC, then ET, in the colours
of :data:`bigl.labels.REGION_COLORS` (WT green, TC yellow, ET red).

Volumes are shown from a RAS-reordered copy in the neurological convention (patient right on the
right, anterior / superior up), whatever the voxel order on disk, with the true voxel aspect ratio. Matplotlib is used through its object API (no pyplot state), so figures can be drawn
from worker threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from bigl.files import atomic_output
from bigl.labels import REGION_COLORS, REGIONS, region_mask

#: Planes in display order: name -> the RAS axis the plane is perpendicular to.
PLANES: dict[str, int] = {"axial": 2, "sagittal": 0, "coronal": 1}
#: Opacity of the region colours over the image.
OVERLAY_ALPHA = 0.55


@dataclass
class FigureCase:
    """One case of a figure: an image and the label maps to draw over it (BraTS labels, same grid)."""

    name: str
    image: np.ndarray
    affine: np.ndarray
    label_maps: dict[str, np.ndarray] = field(default_factory=dict)  # column title -> label map
    centre_labels: np.ndarray | None = None  # labels that place the planes (default: the last map)
    image_title: str = "input"
    notes: dict[str, str] = field(default_factory=dict)  # column title -> a line under it (e.g. Dice)


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorder (flip / transpose) a volume to RAS voxel order; returns it with its voxel sizes in mm."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, io_orientation

    affine = np.asarray(affine, dtype=float)
    orientation = io_orientation(affine)
    spacing_on_disk = nib.affines.voxel_sizes(affine)
    spacing = [0.0, 0.0, 0.0]
    for axis_on_disk, (ras_axis, _flip) in enumerate(orientation):
        spacing[int(ras_axis)] = float(spacing_on_disk[axis_on_disk])
    return apply_orientation(np.asarray(data), orientation), (spacing[0], spacing[1], spacing[2])


def tumour_centre(labels: np.ndarray | None, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Voxel index of the whole-tumour centre of mass; the volume centre when there is no tumour."""
    if labels is not None:
        mask = region_mask(labels, "WT")
        if mask.any():
            return tuple(int(round(c)) for c in np.argwhere(mask).mean(axis=0))  # type: ignore[return-value]
    return tuple(s // 2 for s in shape)  # type: ignore[return-value]


def plane(volume: np.ndarray, plane_name: str, centre: Sequence[int]) -> np.ndarray:
    """The 2D cut of a RAS volume through ``centre``, oriented for ``imshow(origin="lower")``."""
    axis = PLANES[plane_name]
    return np.take(volume, int(centre[axis]), axis=axis).T


def plane_aspect(spacing: Sequence[float], plane_name: str) -> float:
    """Height / width of one displayed pixel for a plane (keeps anisotropic voxels undistorted)."""
    axis = PLANES[plane_name]
    width_axis, height_axis = [a for a in range(3) if a != axis]
    return float(spacing[height_axis]) / float(spacing[width_axis])


def region_overlay(labels: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """RGBA image (float, [H, W, 4]) with WT, TC and ET filled nested in their colours, clear elsewhere."""
    rgba = np.zeros(labels.shape + (4,), dtype=np.float32)
    for region in REGIONS:  # WT, TC, ET: later (inner) regions paint over earlier ones
        mask = region_mask(labels, region)
        rgba[mask, :3] = REGION_COLORS[region]
        rgba[mask, 3] = alpha
    return rgba


def display_window(image: np.ndarray) -> tuple[float, float]:
    """Grey-level window: 1st-99th percentile of the non-background voxels (whole range as fallback)."""
    image = np.asarray(image, dtype=np.float32)
    foreground = image[image > image.min()] if image.size else image
    if foreground.size == 0:
        return float(image.min(initial=0.0)), float(image.min(initial=0.0)) + 1.0
    low, high = np.percentile(foreground, [1.0, 99.0])
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def save_case_figure(
    path: str | Path,
    cases: Sequence[FigureCase],
    *,
    title: str | None = None,
    panel_size: float = 2.2,
    dpi: int = 110,
) -> Path:
    """Draw ``cases`` (three plane rows each; image column + one column per label map) into a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not cases:
        raise ValueError("save_case_figure needs at least one case")
    n_columns = 1 + max(len(case.label_maps) for case in cases)
    n_rows = len(PLANES) * len(cases)
    figure = Figure(figsize=(panel_size * n_columns, panel_size * n_rows + (0.6 if title else 0.3)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(n_rows, n_columns, squeeze=False)
    for case_index, case in enumerate(cases):
        image, spacing = to_ras(case.image, case.affine)
        maps = {name: to_ras(labels, case.affine)[0] for name, labels in case.label_maps.items()}
        if case.centre_labels is not None:
            centre_source = to_ras(case.centre_labels, case.affine)[0]
        else:
            centre_source = next(reversed(maps.values()), None)
        centre = tumour_centre(centre_source, image.shape)
        low, high = display_window(image)
        for plane_index, plane_name in enumerate(PLANES):
            row = case_index * len(PLANES) + plane_index
            aspect = plane_aspect(spacing, plane_name)
            background = plane(image, plane_name, centre)
            panels = [(case.image_title, None)] + list(maps.items())
            for column in range(n_columns):
                ax = axes[row, column]
                ax.set_xticks([])
                ax.set_yticks([])
                if column >= len(panels):
                    ax.set_axis_off()
                    continue
                panel_title, labels = panels[column]
                ax.imshow(background, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect,
                          interpolation="nearest")
                if labels is not None:
                    ax.imshow(region_overlay(plane(labels, plane_name, centre)), origin="lower", aspect=aspect,
                              interpolation="nearest")
                if plane_index == 0:
                    note = case.notes.get(panel_title)
                    ax.set_title(f"{panel_title}\n{note}" if note else panel_title, fontsize=8)
                if column == 0:
                    ax.set_ylabel(f"{case.name}\n{plane_name}" if plane_index == 0 else plane_name, fontsize=8)
    handles = [Patch(color=REGION_COLORS[r], label=r) for r in REGIONS]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.03, 1, 0.97 if title else 1))
    path = Path(path)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, dpi=dpi)
    return path
