"""File names: NIfTI suffixes, case names, the modality a name states, and the files ``bigl segment`` writes.

Standard library only (no numpy, nibabel or torch), so the command line and the Slicer modules can
use these before BiGL's heavier dependencies are installed or imported. Only
:func:`modality_from_name` imports :mod:`bigl.data.brats` (nibabel), when called.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: What ``bigl segment`` writes for a case, by output: the suffix after the case name (before .nii.gz).
OUTPUT_SUFFIXES = {
    "labels": "_seg",
    "translated": "_translated",
    "probabilities": "_probabilities",
    "attention_position": "_attention_position",
    "attention_channel": "_attention_channel",
}
#: The attention maps inference can write.
ATTENTION_KINDS = ("position", "channel")


def is_nifti_path(path: PathLike) -> bool:
    """True for file names ending in ``.nii`` or ``.nii.gz`` (any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def case_name(path: PathLike) -> str:
    """File name without ``.nii`` / ``.nii.gz`` (any case)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def modality_from_name(path: PathLike) -> str | None:
    """The modality a BraTS-style file name states (``..._t2.nii.gz``, ``...-t2w.nii.gz`` -> "t2"), else None."""
    from bigl.data.brats import normalise_modality
    from bigl.errors import BiGLError

    parts = re.split(r"[_\-.]", case_name(path))
    if len(parts) < 2:
        return None
    try:
        return normalise_modality(parts[-1])
    except BiGLError:
        return None


def output_path(folder: PathLike, case: str, output: str) -> Path:
    """Where ``bigl segment`` writes one output of a case in a folder: ``<folder>/<case><suffix>.nii.gz``."""
    try:
        suffix = OUTPUT_SUFFIXES[output]
    except KeyError:
        raise ValueError(f"unknown output {output!r}; known: {', '.join(OUTPUT_SUFFIXES)}") from None
    return Path(folder).expanduser() / f"{case}{suffix}.nii.gz"


def attention_paths(folder: PathLike, case: str) -> dict[str, Path]:
    """Where the attention maps of a case are written: ``{"position": ..., "channel": ...}``."""
    return {kind: output_path(folder, case, f"attention_{kind}") for kind in ATTENTION_KINDS}


def is_output_name(path: PathLike) -> bool:
    """True for label maps and BiGL outputs (``<case>_seg.nii.gz``, ``<case>_translated.nii.gz``...)."""
    return case_name(path).lower().endswith(tuple(OUTPUT_SUFFIXES.values()))
