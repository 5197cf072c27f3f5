"""Tumour volumes in millilitres from a BraTS label map and its voxel spacing.

Used by the Slicer module's volume table and by anyone reporting sizes: the three BraTS evaluation
regions (whole tumour, tumour core, enhancing tumour) and the two sub-regions that are not regions
themselves (necrotic / non-enhancing core, oedema). The enhancing sub-region is the ET region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bigl.errors import InputError
from bigl.labels import CLASS_NAMES, LABELS, REGIONS

#: Rows of a volume report, in order: (key, description, BraTS labels counted).
REPORTED_REGIONS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("WT", "whole tumour", REGIONS["WT"]),
    ("TC", "tumour core", REGIONS["TC"]),
    ("ET", "enhancing tumour", REGIONS["ET"]),
    ("NCR/NET", CLASS_NAMES[1], (LABELS[1],)),
    ("ED", CLASS_NAMES[2], (LABELS[2],)),
)


@dataclass(frozen=True)
class RegionVolume:
    key: str
    description: str
    labels: tuple[int, ...]
    voxels: int
    volume_ml: float


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    """Volume of one voxel in millilitres (spacing in mm)."""
    values = [float(s) for s in spacing]
    if len(values) != 3 or not all(np.isfinite(values)) or min(values) <= 0:
        raise InputError(
            f"voxel spacing must be three positive sizes in mm, got {tuple(spacing)}",
            "take the spacing from the image header (e.g. bigl.data.io.Volume.spacing)",
        )
    return float(np.prod(values)) / 1000.0


def tumour_volumes(labels: np.ndarray, spacing: Sequence[float]) -> list[RegionVolume]:
    """Voxel counts and volumes (mL) of WT, TC, ET, NCR/NET and ED in a BraTS label map."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"a label map must be 3D, got shape {labels.shape}", "give the whole 3D label map")
    if labels.dtype.kind not in "iub":
        raise InputError(f"a label map must hold integers, got {labels.dtype}", "give a label map, not an image")
    if labels.size and labels.min() < 0:
        raise InputError("the label map has negative values", "use BraTS labels 0, 1, 2, 4")
    counts = np.bincount(labels.ravel().astype(np.int64, copy=False), minlength=max(LABELS) + 1)
    unknown = [int(value) for value in np.flatnonzero(counts) if value not in LABELS]
    if unknown:
        raise InputError(
            f"the label map has values {unknown} outside the BraTS convention {list(LABELS)}",
            "use labels 0 background, 1 NCR/NET, 2 oedema, 4 enhancing tumour",
        )
    voxel_ml = voxel_volume_ml(spacing)
    report = []
    for key, description, members in REPORTED_REGIONS:
        voxels = int(sum(counts[label] for label in members))
        report.append(RegionVolume(key, description, members, voxels, voxels * voxel_ml))
    return report
