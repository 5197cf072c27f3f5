#!/usr/bin/env python3
"""Label-free brain intensity statistics of every case, for picking development cases by look.

    python benchmarks/case_intensities.py --data ../shared/data/brats18 --data ../shared/data/brats-extra

Per case and modality, the brain voxels are normalised as training and inference do it (the
default ``PreprocessConfig``) and summarised by their 10th, 50th and 90th percentiles and the
fraction above 0.3 on [-1, 1]. No label is read, so report cases can be listed beside the others:
this is how ``SITE_DEVELOPMENT_CASES`` (benchmarks/protocol.py) were matched to the report scans of
the same contributing groups.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

BRIGHT = 0.3


def brain_summary(image: np.ndarray, config) -> tuple[float, float, float, float]:
    """10th, 50th, 90th percentile and the fraction above BRIGHT of the normalised brain."""
    from bigl.data.preprocess import brain_mask, intensity_window, normalise

    brain = image[brain_mask(image)].astype(np.float32)
    levels = normalise(brain, *intensity_window(brain, config))
    q10, q50, q90 = np.percentile(levels, [10, 50, 90])
    return float(q10), float(q50), float(q90), float(np.mean(levels > BRIGHT))


def main() -> int:
    from bigl.data.brats import find_cases
    from bigl.data.preprocess import PreprocessConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="BraTS-style folder (repeat for several)")
    parser.add_argument("--modalities", nargs="+", default=["t2", "t1"])
    args = parser.parse_args()

    config = PreprocessConfig()
    columns = [f"{m} {c}" for m in args.modalities for c in ("q10", "median", "q90", f"> {BRIGHT}")]
    print("| case | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for folder in args.data:
        for case in find_cases(folder):
            cells = []
            for modality in args.modalities:
                q10, q50, q90, bright = brain_summary(np.asarray(case.load_image(modality).data), config)
                cells += [f"{q10:+.2f}", f"{q50:+.2f}", f"{q90:+.2f}", f"{bright:.3f}"]
            print(f"| {case.name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
