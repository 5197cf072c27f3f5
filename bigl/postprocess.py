"""Post-processing of a predicted BraTS label map (beyond the paper; off unless asked for or set
in a bundle's ``inference`` metadata).

``postprocess_labels``: two rules, the ones BraTS challenge entries commonly apply:

- connected components: tumour components (labels 1, 2, 4 together, 26-connectivity) smaller than
  ``MIN_COMPONENT_FRACTION`` of the largest one are removed; a 2D segmenter leaves specks on
  single slices far from the tumour, which cost Dice and dominate HD95;
- small enhancing tumour: when the enhancing tumour (label 4) adds up to less than
  ``MIN_ET_ML``, it is relabelled necrotic / non-enhancing core (label 1), as scattered ET voxels
  are far more often false positives than real enhancement (Isensee et al., BraTS 2020).

``refine_edges``: the edge of the predicted whole tumour redrawn on the scan itself with a random
walker (Grady 2006): the predicted tumour's interior is the tumour seed, the brain
farther than a band beyond it the background seed, and the band between is given to whichever
seed a random walk on the image reaches first, so the new edge follows the scan's own intensity
edge. An adapted segmenter knows where a tumour is better than where its oedema ends (the edge
is faint in the source modality it learned from, docs/results.md); the scan shows that edge.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from bigl.volumes import voxel_volume_ml

MIN_COMPONENT_FRACTION = 0.1
MIN_ET_ML = 0.5

#: Depth (mm) inside the predicted whole tumour's edge from which on it seeds the tumour.
EDGE_INSIDE_MM = 3.0
#: Distance (mm) beyond the edge up to which the random walker decides; farther is background.
EDGE_OUTSIDE_MM = 8.0
#: scikit-image's random-walker beta (its default): how strongly an intensity step stops the walk.
EDGE_BETA = 130.0
#: The label given to voxels the refinement adds to the tumour: oedema, the tumour's outer layer.
ADDED_LABEL = 2


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


def refine_edges(labels: np.ndarray, image: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 brain: np.ndarray | None = None) -> np.ndarray:
    """A copy of a label map {0, 1, 2, 4} whose whole-tumour edge follows ``image`` (the scan that
    was segmented, on the same grid; ``spacing`` in mm): the voxels less than ``EDGE_INSIDE_MM``
    inside the edge and up to ``EDGE_OUTSIDE_MM`` outside it go to tumour or background by a random
    walker, so the edge moves by at most those distances. Removed voxels become background, added
    ones oedema (``ADDED_LABEL``); the sub-regions inside are kept. Outside ``brain`` (a mask on the
    same grid; None: bigl.data.preprocess.brain_mask of the image) the band counts as background. A
    tumour too thin to have an interior that deep is left as it is."""
    from bigl.data.preprocess import brain_mask

    out = np.array(labels, dtype=np.uint8, copy=True)
    if out.shape != image.shape:
        raise ValueError(f"labels {out.shape} and image {image.shape} must share one grid")
    tumour = out > 0
    if not tumour.any():
        return out
    spacing = np.asarray(spacing, dtype=float)
    box = _box(tumour, margin=int(np.ceil(EDGE_OUTSIDE_MM / spacing.min())) + 1)
    region_tumour = tumour[box]
    inside = ndimage.distance_transform_edt(region_tumour, sampling=spacing) > EDGE_INSIDE_MM
    if not inside.any():
        return out
    near = ndimage.distance_transform_edt(~region_tumour, sampling=spacing) <= EDGE_OUTSIDE_MM
    brain = brain_mask(image) if brain is None else np.asarray(brain, dtype=bool)
    undecided = near & ~inside & brain[box]
    if not undecided.any():
        return out
    # Brain intensities on [0, 1] by their 0.5th-99.5th percentiles, so bright outliers do not set the scale.
    low, high = np.percentile(image[brain], [0.5, 99.5])  # the band is inside the brain, so it is not empty
    scan = np.clip((np.asarray(image[box], dtype=np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    walked = inside.copy()
    walked[undecided] = _tumour_probability(scan, undecided, inside, spacing) > 0.5
    region = out[box]
    region[~walked] = 0
    region[walked & (region == 0)] = ADDED_LABEL
    return out


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The bounding box of ``mask`` grown by ``margin`` voxels, inside the array."""
    where = np.argwhere(mask)
    low = np.maximum(where.min(axis=0) - margin, 0)
    high = np.minimum(where.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def _tumour_probability(scan: np.ndarray, undecided: np.ndarray, tumour: np.ndarray,
                        spacing: np.ndarray) -> np.ndarray:
    """For each ``undecided`` voxel, the probability that a random walk on ``scan`` from it reaches a
    ``tumour`` voxel before any other decided one (Grady 2006; 6-neighbour edges weighted
    exp(-beta * gradient^2 / (10 * std)) as in scikit-image). Written here rather than calling
    ``skimage.segmentation.random_walker``, which builds its graph over every voxel it is given and
    solves once per label: with two labels one system over the band is enough, several times faster."""
    from scipy import sparse
    from scipy.sparse.linalg import cg

    count = int(undecided.sum())
    index = np.full(scan.shape, -1, dtype=np.int64)
    index[undecided] = np.arange(count)
    scale = EDGE_BETA / (10.0 * max(float(scan.std()), 1e-12))
    rows, cols, values = [], [], []
    degree = np.zeros(count)
    reach = np.zeros(count)  # summed weight of the edges to tumour voxels
    for axis in range(3):
        head = tuple(slice(None, -1) if a == axis else slice(None) for a in range(3))
        tail = tuple(slice(1, None) if a == axis else slice(None) for a in range(3))
        weight = np.exp(-scale * (np.diff(scan, axis=axis) / spacing[axis]) ** 2) + 1e-10
        for one, other in ((head, tail), (tail, head)):
            mine = undecided[one]
            at, w = index[one][mine], weight[mine]
            degree += np.bincount(at, w, minlength=count)
            neighbour = index[other][mine]
            linked = neighbour >= 0
            rows.append(at[linked])
            cols.append(neighbour[linked])
            values.append(-w[linked])
            reach += np.bincount(at, w * tumour[other][mine], minlength=count)
    laplacian = sparse.csr_array((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                                 shape=(count, count)) + sparse.diags_array(degree)
    jacobi = sparse.diags_array(1.0 / degree)
    probability, _ = cg(laplacian, reach, M=jacobi, rtol=1e-3, maxiter=2000)
    return probability


def finish_labels(labels: np.ndarray, image: np.ndarray, spacing: Sequence[float], *,
                  refine: bool, postprocess: bool, brain: np.ndarray | None = None) -> np.ndarray:
    """The label rules a predictor applies after the arg-max: the edge refinement, then the clean-up."""
    if refine:
        labels = refine_edges(labels, image, spacing, brain)
    if postprocess:
        labels = postprocess_labels(labels, spacing)
    return labels
