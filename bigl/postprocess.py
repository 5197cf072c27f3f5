"""Post-processing of a predicted BraTS label map (beyond the paper; off unless asked for or set
in a bundle's ``inference`` metadata).

Two rules, the ones BraTS challenge entries commonly apply:

- connected components: tumour components (labels 1, 2, 4 together, 26-connectivity) smaller than
  ``MIN_COMPONENT_FRACTION`` of the largest one are removed; a 2D segmenter leaves specks on
  single slices far from the tumour, which cost Dice and dominate HD95;
- small enhancing tumour: when the enhancing tumour (label 4) adds up to less than
  ``MIN_ET_ML``, it is relabelled necrotic / non-enhancing core (label 1), as scattered ET voxels
  are far more often false positives than real enhancement (Isensee et al., BraTS 2020).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from bigl.volumes import voxel_volume_ml

MIN_COMPONENT_FRACTION = 0.1
MIN_ET_ML = 0.5


def postprocess_labels(labels: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """A cleaned copy of a label map {0, 1, 2, 4}; ``spacing`` is the voxel size in mm."""
    out = np.array(labels, dtype=np.uint8, copy=True)
    tumour = out > 0
    if tumour.any():
        components, count = ndimage.label(tumour, structure=np.ones((3, 3, 3), dtype=bool))
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            small = np.flatnonzero(sizes < MIN_COMPONENT_FRACTION * sizes.max()) + 1
            out[np.isin(components, small)] = 0
    voxel_ml = voxel_volume_ml(spacing)
    enhancing = out == 4
    if 0 < enhancing.sum() * voxel_ml < MIN_ET_ML:
        out[enhancing] = 1
    return out
