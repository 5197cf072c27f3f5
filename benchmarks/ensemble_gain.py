#!/usr/bin/env python3
"""What averaging several models' probabilities would gain over each model alone (real data).

    python benchmarks/ensemble_gain.py --data ../shared/data/brats18 --data ../shared/data/brats-extra \\
        --cases Brats18_2013_11_1,Brats18_CBICA_ABM_1 --model runs/p/recipe/seed0/model.safetensors \\
        --model runs/p/recipe/seed1/model.safetensors --model runs/p/recipe/seed2/model.safetensors

Each model segments each case's T2 (``--modality``) with :meth:`bigl.prediction.Predictor.predict`;
the ensemble's labels are the arg-max of the members' class probabilities, averaged on the scan's
grid. Prints Dice (%) of WT / TC / ET and their mean per case for every member and for the
ensemble, and the means over cases. A measurement for the choice of an ensemble bundle, not a
product feature: it reads the labels of the cases it is given (give development cases).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

REGIONS = ("WT", "TC", "ET")


def main() -> int:
    import nibabel as nib

    from bigl.labels import classes_to_labels
    from bigl.metrics import score_case
    from bigl.prediction import open_predictor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--cases", required=True, help="comma-separated case names")
    parser.add_argument("--model", action="append", required=True, help="a model bundle (repeat: the members)")
    parser.add_argument("--modality", default="t2")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    predictors = [open_predictor(m, engine="torch", device="cpu", num_threads=args.threads) for m in args.model]
    names = [f"model {i}" for i in range(len(predictors))] + ["ensemble"]
    table: dict[str, list[list[float]]] = {name: [] for name in names}
    for case in args.cases.split(","):
        folder = next(Path(d) / case for d in args.data if (Path(d) / case).is_dir())
        image = nib.load(folder / f"{case}_{args.modality}.nii.gz")
        reference = np.asarray(nib.load(folder / f"{case}_seg.nii.gz").dataobj).astype(np.uint8)
        spacing = image.header.get_zooms()[:3]
        data = np.asarray(image.dataobj, dtype=np.float32)
        total = None
        for name, predictor in zip(names, predictors):
            prediction = predictor.predict(data, image.affine, probabilities=True, modality=args.modality)
            total = prediction.probabilities if total is None else total + prediction.probabilities
            table[name].append(_dice(score_case(prediction.labels, reference, spacing)))
        labels = classes_to_labels(np.argmax(total, axis=0)).astype(np.uint8)
        table["ensemble"].append(_dice(score_case(labels, reference, spacing)))
        print(f"{case}: " + "; ".join(f"{n} {' / '.join(f'{v:.1f}' for v in table[n][-1])}" for n in names), flush=True)
    print("\n| model | WT | TC | ET | mean |\n|---|---:|---:|---:|---:|")
    for name in names:
        means = np.mean(table[name], axis=0)
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in means) + " |")
    return 0


def _dice(scores: dict) -> list[float]:
    values = [100.0 * scores[r]["dice"] for r in REGIONS]
    return values + [float(np.mean(values))]


if __name__ == "__main__":
    raise SystemExit(main())
