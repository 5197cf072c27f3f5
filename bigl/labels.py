"""The label convention used everywhere in BiGL.

Label maps on disk use the BraTS 2018-2021 values 0 background, 1 necrotic / non-enhancing core
(NCR/NET), 2 peritumoural oedema (ED), 4 enhancing tumour (ET). BraTS 2023+ files use 3 for ET and
are mapped to 4 on reading (:mod:`bigl.data.brats`). Networks predict contiguous class indices
0..3; ``LABELS[i]`` is the BraTS label of class ``i``.
"""

from __future__ import annotations

import numpy as np

from bigl.errors import InputError

LABELS: tuple[int, ...] = (0, 1, 2, 4)
NUM_CLASSES = len(LABELS)
CLASS_NAMES: tuple[str, ...] = (
    "background",
    "necrotic / non-enhancing tumour core",
    "peritumoral edema",
    "enhancing tumor",
)
#: Display colours (RGB 0-1) per BraTS label, shared by figures and the Slicer segments.
LABEL_COLORS: dict[int, tuple[float, float, float]] = {
    1: (0.90, 0.20, 0.20),
    2: (0.20, 0.80, 0.20),
    4: (1.00, 0.85, 0.10),
}
#: BraTS evaluation regions: whole tumour, tumour core, enhancing tumour.
REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
#: Colours of the regions in figures (as in Fig. 3 of the paper: WT green, TC yellow, ET red).
REGION_COLORS: dict[str, tuple[float, float, float]] = {
    "WT": (0.0, 0.8, 0.0),
    "TC": (1.0, 0.9, 0.0),
    "ET": (0.9, 0.0, 0.0),
}

_LABEL_TO_CLASS = np.zeros(256, dtype=np.uint8)
_VALID = np.zeros(256, dtype=bool)
for _index, _label in enumerate(LABELS):
    _LABEL_TO_CLASS[_label] = _index
    _VALID[_label] = True


def labels_to_classes(labels: np.ndarray) -> np.ndarray:
    """Map BraTS labels {0,1,2,4} to class indices {0,1,2,3} (uint8)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise InputError(
            f"label map has values outside 0-255 (min {labels.min()}, max {labels.max()})",
            "give a BraTS label map with values 0, 1, 2 and 4",
        )
    as_int = labels.astype(np.int64)
    if labels.size and not np.all(np.equal(as_int, labels)):
        raise InputError("label map has non-integer values", "give a label map, not an image")
    bad = ~_VALID[as_int]
    if bad.any():
        values = sorted(set(np.unique(as_int[bad]).tolist()))
        raise InputError(
            f"label map has values {values} outside the BraTS convention {list(LABELS)}",
            "use labels 0 background, 1 NCR/NET, 2 oedema, 4 enhancing (BraTS 2023 files with 3 are mapped when read with bigl.data.brats)",
        )
    return _LABEL_TO_CLASS[as_int]


def classes_to_labels(classes: np.ndarray) -> np.ndarray:
    """Map class indices {0,1,2,3} back to BraTS labels {0,1,2,4} (uint8)."""
    return np.asarray(LABELS, dtype=np.uint8)[np.asarray(classes, dtype=np.int64)]


def region_mask(labels: np.ndarray, region: str) -> np.ndarray:
    """Boolean mask of a BraTS region (``"WT"``, ``"TC"`` or ``"ET"``) in a label map."""
    return np.isin(labels, REGIONS[region])
