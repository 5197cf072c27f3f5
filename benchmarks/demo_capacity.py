#!/usr/bin/env python3
"""What the demo's segmenter can do in its own domain: train the demo's source-only model (T1
labels) and score it on the T1 test phantoms, with optional config overrides.

    python benchmarks/demo_capacity.py --out runs/demo-capacity
    python benchmarks/demo_capacity.py --out runs/demo-capacity --name base16 segmenter.base_channels=16

No adaptation is involved, so this is the ceiling of every method of `bigl demo` at that network
size and schedule: where it is low for a region, BiGL cannot be high. The phantoms are those of
``bigl demo`` (same sizes and seed, written once under --out).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main() -> int:
    from bigl.data.brats import find_cases
    from bigl.demo import SOURCE_MODALITY, DemoSettings, make_data, training_overrides
    from bigl.inference import BiGLPredictor
    from bigl.labels import REGIONS
    from bigl.metrics import score_case
    from bigl.training import load_config, run_training

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--name", default="demo", help="run folder name under OUT/runs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) on top of the demo's")
    args = parser.parse_args()

    settings = DemoSettings()
    if not (args.out / "data" / "test").exists():
        make_data(args.out, settings)
    train, test = args.out / "data" / "train", args.out / "data" / "test"
    overrides = training_overrides("source-only", train, "cpu", settings.seed, args.threads, settings.config)
    config = load_config(settings.config, overrides + args.overrides)
    started = time.perf_counter()
    bundle = run_training(config, args.out / "runs" / args.name, stage="all", resume=False, progress=False)
    seconds = time.perf_counter() - started
    predictor = BiGLPredictor.from_path(bundle, device="cpu", num_threads=args.threads)
    scores = []
    for case in find_cases(test):
        image = case.load_image(SOURCE_MODALITY)
        # the model is filed as a T2 model (the demo's target); here it is scored where it was trained
        labels = predictor.predict(image.data, image.affine).labels
        result = score_case(labels, case.load_labels().data, image.spacing)
        scores.append([100.0 * result[region]["dice"] for region in REGIONS])
    mean = np.mean(scores, axis=0)
    print(f"{args.name} ({' '.join(args.overrides) or 'the demo config'}): {SOURCE_MODALITY.upper()} test phantoms, "
          + ", ".join(f"{region} {value:.1f}" for region, value in zip(REGIONS, mean))
          + f" (Dice %, mean of {len(scores)}; training {seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
