"""Time the data-side steps on BraTS-sized volumes (CPU, this process): phantom generation,
preprocessing of a 240 x 240 x 155 scan into slices, scoring one case (Dice + HD95, 3 regions) and
the edge refinement of a predicted label map (``--refine-edges``; the brain mask given, as the
predictors give it).

    python benchmarks/benchmark_data.py [--repeat 3]

Prints the best and the median of ``--repeat`` runs of each step, in seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def timed(function, repeat: int) -> tuple[float, float]:
    timings = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return min(timings), statistics.median(timings)


def main() -> int:
    import numpy as np
    from scipy import ndimage as ndi

    from bigl.data.phantoms import generate_phantom
    from bigl.data.preprocess import PreprocessConfig, brain_mask, prepare_volume
    from bigl.metrics import score_case
    from bigl.postprocess import refine_edges

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    small = generate_phantom(48, np.random.default_rng(0), ("t1", "t2"))
    zoom = (240 / 48, 240 / 48, 155 / 48)
    volume = ndi.zoom(small.images["t1"], zoom, order=1).astype(np.int16)
    labels = ndi.zoom(small.labels, zoom, order=0)
    shifted = np.roll(labels, 4, axis=0)
    t2 = ndi.zoom(small.images["t2"], zoom, order=1).astype(np.int16)
    brain = brain_mask(t2)
    steps = {
        "phantom 64^3, four modalities": lambda: generate_phantom(64, np.random.default_rng(1), ("t1", "t1ce", "t2", "flair")),
        "preprocess 240x240x155 -> 128 px slices": lambda: prepare_volume(volume, PreprocessConfig(image_size=128, margin=8)),
        "score one 240x240x155 case": lambda: score_case(shifted, labels, (1.0, 1.0, 1.0)),
        "refine the tumour edge, 240x240x155": lambda: refine_edges(shifted, t2, (1.0, 1.0, 1.0), brain),
    }
    for name, function in steps.items():
        best, median = timed(function, args.repeat)
        print(f"{name:45s} best {best:6.2f} s   median {median:6.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
