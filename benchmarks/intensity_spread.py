#!/usr/bin/env python3
"""How consistently each intensity normalisation places tissue across scans (real BraTS cases).

    python benchmarks/intensity_spread.py --data ../shared/data/brats18 --data ../shared/data/brats-extra

For every case outside the report split (benchmarks/protocol.py REPORT_CASES; their labels stay
unread) and each modality, the brain voxels are normalised with each ``PreprocessConfig.intensity``
(:func:`bigl.data.preprocess.intensity_window`, as training and inference do it). Per case it takes
the median normalised level of normal brain (label 0 inside the brain mask) and of oedema (label 2).
It prints, per modality and normalisation, the mean and the standard deviation over cases of both
levels, the mean oedema-to-brain gap, and the two spreads divided by that gap: a segmenter trained
on some scans meets the others at levels this far apart, in units of the contrast it must detect.
Lower is better.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import REPORT_CASES


def case_levels(image: np.ndarray, labels: np.ndarray, config) -> tuple[float, float]:
    """Median normalised level of normal brain and of oedema in one scan."""
    from bigl.data.preprocess import brain_mask, intensity_window, normalise

    mask = brain_mask(image)
    brain = image[mask].astype(np.float32)
    levels = normalise(brain, *intensity_window(brain, config))
    inside = labels[mask]
    return float(np.median(levels[inside == 0])), float(np.median(levels[inside == 2]))


def main() -> int:
    import nibabel as nib

    from bigl.data.preprocess import INTENSITY_NORMALISATIONS, PreprocessConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="BraTS-style folder (repeat for several)")
    parser.add_argument("--modalities", nargs="+", default=["t1", "t2"])
    args = parser.parse_args()

    cases = sorted(p for folder in args.data for p in Path(folder).iterdir()
                   if p.is_dir() and p.name not in REPORT_CASES and (p / f"{p.name}_seg.nii.gz").exists())
    print(f"{len(cases)} cases (report cases left out)")
    print("| modality | normalisation | normal brain | oedema | gap | brain spread / gap | oedema spread / gap |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for modality in args.modalities:
        levels = {name: [] for name in INTENSITY_NORMALISATIONS}
        for case in cases:
            image = np.asarray(nib.load(case / f"{case.name}_{modality}.nii.gz").dataobj, dtype=np.float32)
            labels = np.asarray(nib.load(case / f"{case.name}_seg.nii.gz").dataobj)
            for name in INTENSITY_NORMALISATIONS:
                levels[name].append(case_levels(image, labels, PreprocessConfig(intensity=name)))
        for name, values in levels.items():
            brain, oedema = np.array(values).T
            gap = float(np.mean(np.abs(oedema - brain)))
            print(f"| {modality} | {name} | {brain.mean():+.2f} ± {brain.std():.2f} | {oedema.mean():+.2f} ± {oedema.std():.2f} "
                  f"| {gap:.2f} | {brain.std() / gap:.2f} | {oedema.std() / gap:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
