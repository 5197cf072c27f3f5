"""Data layer: NIfTI volumes, BraTS-style folders, preprocessing into 2D slices, synthetic phantoms.

Importing :mod:`bigl.data` is light: the names below are loaded from their modules on first use
(the naming helpers need the standard library only; io, brats and preprocess numpy and nibabel;
nothing needs torch).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Volume": "io",
    "load_volume": "io",
    "save_volume": "io",
    "read_grid": "io",
    "is_nifti_path": "naming",
    "check_same_grid": "io",
    "check_scan": "io",
    "MODALITIES": "naming",
    "MODALITY_ALIASES": "naming",
    "normalise_modality": "naming",
    "modality_from_name": "naming",
    "case_name": "naming",
    "output_path": "naming",
    "attention_paths": "naming",
    "is_output_name": "naming",
    "Case": "brats",
    "find_cases": "brats",
    "normalise_modalities": "brats",
    "summarise_cases": "brats",
    "parse_case_file": "brats",
    "PreprocessConfig": "preprocess",
    "SliceGeometry": "preprocess",
    "PreparedVolume": "preprocess",
    "brain_mask": "preprocess",
    "prepare_volume": "preprocess",
    "prepare_labels": "preprocess",
    "restore_maps": "preprocess",
    "restore_labels": "preprocess",
    "Phantom": "phantoms",
    "generate_phantom": "phantoms",
    "make_phantom": "phantoms",
    "write_cohort": "phantoms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bigl.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"bigl.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
