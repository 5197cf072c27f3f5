"""Plausibility of a scan and of its segmentation: warnings, never refusals.

A file can be a valid 3D NIfTI volume and still not be the brain MR scan a model can make sense
of: a header with wrong voxel sizes, a small crop or a test volume, a scan of another modality
than the model's. The network answers anyway, so :func:`scan_warnings` and
:func:`tumour_warning` say when a result is unlikely to mean anything, and
:func:`confidence_warning` when the model itself is unsure of what it found. They only warn: the user
may know better (an unusual protocol, a phantom), and the result is still written.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bigl.data.io import affine_spacing
from bigl.volumes import voxel_volume_ml

#: Voxel sizes (mm) of brain MR scans, from sub-millimetre research scans to thick clinical slices.
VOXEL_RANGE_MM = (0.2, 8.0)
#: A head is 140-200 mm across. A field of view that spans less than this (mm) along two of its
#: axes holds at most a small part of one (lenient, so that small phantoms pass).
HEAD_EXTENT_MM = 40.0
#: An adult brain is about 1,100-1,500 mL; no real tumour is larger than this.
BRAIN_VOLUME_ML = 2000.0
#: The shipped model's confidence floor (its metadata's ``confidence_floor``): below this tumour
#: confidence (bigl.prediction.tumour_confidence) it is unsure of a scan. Set on the two
#: development splits before any report scan was checked, from seven models of the `reference`
#: and `pseudo-refine` settings: 0.89-0.94 on the 32 segmentations with whole-tumour Dice 54-88 %,
#: 0.82-0.84 on the 3 that missed most of the tumour (Dice 8-47 %). A model of another recipe or
#: scale needs its own floor (benchmarks/view_agreement.py measures what it needs).
CONFIDENCE_FLOOR = 0.87


def _size(values: Sequence[float], unit: str) -> str:
    return " x ".join(f"{v:.3g}" for v in values) + f" {unit}"


def scan_warnings(shape: Sequence[int], affine: np.ndarray, *, name: str = "the scan") -> list[str]:
    """Warnings about a scan's voxel sizes and field of view (empty when both look like a head MR)."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.asarray(affine_spacing(affine))
    extent = np.asarray(shape[:3], dtype=np.float64) * spacing
    warnings = []
    low, high = VOXEL_RANGE_MM
    if spacing.min() < low or spacing.max() > high:
        warnings.append(
            f"{name} has voxels of {_size(spacing, 'mm')}, far from brain MR scans ({low:g} to {high:g} mm): "
            "the voxel sizes in its header are probably wrong, and so would be the result and its volumes in mL"
        )
    if np.count_nonzero(extent >= HEAD_EXTENT_MM) < 2:
        warnings.append(
            f"{name} covers only {_size(extent, 'mm')} ({_size(shape[:3], 'voxels')}), too small to hold a head "
            "(a brain is about 140 x 170 x 120 mm): give the whole head scan; a result on this is unlikely to mean anything"
        )
    return warnings


def modality_warning(modality: str | None, expected: str, *, name: str = "the scan") -> str | None:
    """A warning when the scan's modality is unknown, so it cannot be checked against the model's."""
    if modality is not None:
        return None
    return (f"the modality of {name} cannot be checked: neither its name (like *_{expected}.nii.gz) nor the "
            f"command states it; the model segments {expected.upper()} scans, and on another modality its result "
            f"means little (state it with --modality {expected})")


def tumour_warning(labels: np.ndarray, affine: np.ndarray, *, name: str = "the scan") -> str | None:
    """A warning when the segmented tumour is larger than a whole brain."""
    voxel_ml = voxel_volume_ml(affine_spacing(affine))
    tumour_ml = float(np.count_nonzero(labels)) * voxel_ml
    if tumour_ml <= BRAIN_VOLUME_ML:
        return None
    return (f"the tumour found in {name} measures {tumour_ml:,.0f} mL, more than a whole brain "
            f"(about 1,100-1,500 mL): the voxel sizes or the scan are wrong; do not use this result")


def confidence_warning(confidence: float | None, floor: float | None, *, name: str = "the scan") -> str | None:
    """A warning when the model is unsure of the tumour it found: its mean tumour probability is below
    the model's ``floor`` (None: the model has none, so no warning), under which, on the scans it was
    set on, the model had missed most of the tumour."""
    if confidence is None or floor is None or confidence >= floor:
        return None
    return (f"the model is unsure of {name}: its mean confidence in the tumour it found is {confidence:.2f}, "
            f"below its floor of {floor:.2f}; on the test scans where that happened it had missed most of "
            f"the tumour, so check the segmentation against the scan and do not rely on its volumes")
