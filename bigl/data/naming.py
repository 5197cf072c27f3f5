"""Names: NIfTI suffixes, case names, modality names and the modality a file name states, and the
files ``bigl segment`` writes.

Standard library only (no numpy, nibabel or torch), so the command line and the Slicer modules can
use these before BiGL's heavier dependencies are installed or imported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

from bigl.errors import InputError

PathLike = Union[str, os.PathLike]

#: Canonical modality names used everywhere in BiGL.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: Modality names as written in file names and by users (lower case, without spaces, "_" or "-")
#: -> canonical name; BraTS 2023 uses t1n, t1c, t2w, t2f.
MODALITY_ALIASES: dict[str, str] = {
    "t1": "t1", "t1n": "t1", "t1w": "t1", "t1native": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce", "t1post": "t1ce", "t1wce": "t1ce",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair", "t2flair": "flair",
}  # fmt: skip

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


def normalise_modality(name: str) -> str:
    """Canonical modality name: ``"T1"``/``"t1n"`` -> ``"t1"``, ``"t1c"``/``"t1gd"`` -> ``"t1ce"``,
    ``"t2w"`` -> ``"t2"``, ``"t2f"``/``"FLAIR"`` -> ``"flair"``; InputError for anything else."""
    try:
        return MODALITY_ALIASES[_alias_key(name)]
    except KeyError:
        raise InputError(
            f"unknown modality {name!r}",
            f"use one of {', '.join(MODALITIES)} (BraTS 2023 names t1n, t1c, t2w, t2f also work)",
        ) from None


def modality_from_name(path: PathLike) -> str | None:
    """The modality a BraTS-style file name states (``..._t2.nii.gz``, ``...-t2w.nii.gz`` -> "t2"), else None."""
    parts = re.split(r"[_\-.]", case_name(path))
    if len(parts) < 2:
        return None
    return MODALITY_ALIASES.get(_alias_key(parts[-1]))


def _alias_key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", str(name)).lower()


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
