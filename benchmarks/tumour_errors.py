#!/usr/bin/env python3
"""Where a model's whole-tumour errors lie, per case: missed voxels by true class, false positives
by their distance to the tumour, and predicted components that do not touch it.

    bigl evaluate --model MODEL --data DIR --cases A,B --out runs/eval-A     # writes predictions/
    python benchmarks/tumour_errors.py --data ../shared/data/brats18 --data ../shared/data/brats-extra \\
        runs/eval-A runs/eval-B

Each argument is a ``bigl evaluate --out`` folder; its ``predictions/<case>_seg.nii.gz`` are
compared with the cases' labels, so use it on development cases only (report-case labels decide
nothing). Volumes in mL. False positives are split by their distance to the nearest true tumour
voxel: at the edge (<= 2 voxels), near it (2-10) and far (> 10); ``apart`` is the volume of
predicted components (26-connected) that share no voxel with the tumour, what ``--postprocess``
may remove.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

#: Distance bands (voxels) of the false positives: edge, near, far.
EDGE, NEAR = 2.0, 10.0
#: True classes the missed voxels are counted for (BraTS labels).
CLASSES = {"NCR": 1, "ED": 2, "ET": 4}


def whole_tumour_errors(truth: np.ndarray, predicted: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """Volumes (mL) of the true and predicted whole tumour and of where they differ."""
    from scipy import ndimage

    tumour, found = truth > 0, predicted > 0
    false_positive = found & ~tumour
    distance = ndimage.distance_transform_edt(~tumour) if tumour.any() else np.full(truth.shape, np.inf)
    components, _ = ndimage.label(found, structure=np.ones((3, 3, 3), dtype=bool))
    touching = np.unique(components[found & tumour])
    apart = found & ~np.isin(components, touching)
    result = {
        "true": tumour.sum(), "predicted": found.sum(), "hit": (found & tumour).sum(),
        "fp_edge": (false_positive & (distance <= EDGE)).sum(),
        "fp_near": (false_positive & (distance > EDGE) & (distance <= NEAR)).sum(),
        "fp_far": (false_positive & (distance > NEAR)).sum(),
        "apart": apart.sum(),
    }
    for name, label in CLASSES.items():
        result[f"missed_{name}"] = ((truth == label) & ~found).sum()
    return {key: float(value) * voxel_ml for key, value in result.items()}


def main() -> int:
    import nibabel as nib

    from bigl.data.brats import find_cases
    from bigl.volumes import voxel_volume_ml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evaluations", nargs="+", type=Path, help="bigl evaluate --out folders")
    parser.add_argument("--data", action="append", required=True, help="data folder (repeat for several)")
    args = parser.parse_args()
    cases = {case.name: case for case in find_cases(args.data)}
    columns = ["true", "predicted", "hit", "missed_NCR", "missed_ED", "missed_ET", "fp_edge", "fp_near", "fp_far", "apart"]
    for folder in args.evaluations:
        print(f"{folder} (mL)")
        print("| case | " + " | ".join(columns) + " |")
        print("|---|" + "---:|" * len(columns))
        for path in sorted((folder / "predictions").glob("*_seg.nii.gz")):
            name = path.name[: -len("_seg.nii.gz")]
            if name not in cases or cases[name].labels is None:
                print(f"| {name} | no labels in the data folders |")
                continue
            labels = cases[name].load_labels()
            predicted = np.asarray(nib.load(str(path)).dataobj)
            errors = whole_tumour_errors(np.asarray(labels.data), predicted, voxel_volume_ml(labels.spacing))
            print(f"| {name} | " + " | ".join(f"{errors[key]:.1f}" for key in columns) + " |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
