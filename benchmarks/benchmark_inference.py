"""Time and memory of whole-volume inference on CPU.

Builds a default-sized bundle (SegmenterConfig, TranslatorConfig and PreprocessConfig defaults,
random weights: the cost does not depend on the weight values) unless --model is given, and a
synthetic 240 x 240 x 155 brain-like volume (the BraTS grid) unless --input is given. Each
measurement runs in a fresh Python process so that its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own:

* ``labels``: the label map only;
* ``all``: labels plus probabilities, attention maps and the translated image.

Target on 2 CPU cores: at most 15 s and 2.5 GB peak RSS per volume.

    python benchmarks/benchmark_inference.py [--threads 2] [--model BUNDLE] [--input SCAN.nii.gz]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
TARGET_SECONDS = 15.0
TARGET_RSS_GB = 2.5
SHAPE = (240, 240, 155)


def make_default_bundle(path: Path) -> Path:
    import torch

    from bigl.bundle import make_metadata, save_bundle
    from bigl.data.preprocess import PreprocessConfig
    from bigl.models import DualAttentionUNet, ResnetGenerator, SegmenterConfig, TranslatorConfig

    torch.manual_seed(0)
    seg_cfg, tr_cfg = SegmenterConfig(), TranslatorConfig()
    return save_bundle(
        path,
        segmenter=DualAttentionUNet(seg_cfg),
        translator_s2t=ResnetGenerator(tr_cfg),
        translator_t2s=ResnetGenerator(tr_cfg),
        metadata=make_metadata(method="bigl", modality="t2", source_modality="t1", segmenter_config=seg_cfg,
                               translator_config=tr_cfg, preprocessing=PreprocessConfig(),
                               description="random weights, for timing only"),
    )


def make_volume(path: Path) -> Path:
    """A BraTS-sized int16 volume: textured ellipsoid brain, a bright lesion, zero background."""
    import numpy as np
    from scipy import ndimage

    from bigl.data.io import save_volume

    rng = np.random.default_rng(0)
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in SHAPE]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    brain = (x / 0.62) ** 2 + (y / 0.75) ** 2 + (z / 0.8) ** 2 < 1
    lesion = (x - 0.2) ** 2 + (y + 0.1) ** 2 + (z - 0.1) ** 2 < 0.03
    texture = ndimage.gaussian_filter(rng.standard_normal(SHAPE).astype(np.float32), 2) * 400
    volume = np.where(brain, 600 + texture + 700 * lesion, 0).clip(0, 32000).astype(np.int16)
    return save_volume(path, volume, np.diag([-1.0, -1.0, 1.0, 1.0]))


def worker(mode: str, model: str, scan: str, threads: int, batch_size: int) -> None:
    """Runs in a fresh process; prints one JSON line with its timings and peak RSS."""
    import resource

    start = time.perf_counter()
    from bigl.data.io import load_volume
    from bigl.inference import BiGLPredictor

    imported = time.perf_counter()
    volume = load_volume(scan)
    predictor = BiGLPredictor.from_path(model, device="cpu", batch_size=batch_size, num_threads=threads)
    loaded = time.perf_counter()
    extras = mode == "all"
    result = predictor.predict(volume.data, volume.affine, probabilities=extras, attention=extras,
                               translated=extras and predictor.bundle.translator_t2s is not None, progress=lambda d, t: None)
    done = time.perf_counter()
    assert result.labels.shape == volume.shape
    print(json.dumps({
        "mode": mode,
        "import_s": imported - start,
        "load_s": loaded - imported,
        "predict_s": done - loaded,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,  # KiB on Linux
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="bundle to time (default: a default-sized random one)")
    parser.add_argument("--input", type=Path, help="NIfTI scan (default: synthetic 240x240x155)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, model, scan, threads, batch = args.worker
        worker(mode, model, scan, int(threads), int(batch))
        return 0

    with tempfile.TemporaryDirectory(prefix="bigl-bench-") as tmp:
        model = args.model or make_default_bundle(Path(tmp) / "default-size.safetensors")
        scan = args.input or make_volume(Path(tmp) / "synthetic_t2.nii.gz")
        from bigl.bundle import parameter_counts

        print(f"model: {model} ({sum(parameter_counts(model).values()) / 1e6:.2f} M parameters)")
        print(f"input: {scan}; {args.threads} thread(s), batch size {args.batch_size}\n")
        print(f"{'outputs':<8} {'import s':>9} {'load s':>7} {'predict s':>10} {'load+predict s':>15} {'peak RSS GB':>12}  target")
        ok = True
        for mode in ("labels", "all"):
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, str(model), str(scan),
                       str(args.threads), str(args.batch_size)]
            run = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            if run.returncode != 0:
                print(run.stderr, file=sys.stderr)
                return 1
            r = json.loads(run.stdout.strip().splitlines()[-1])
            total = r["load_s"] + r["predict_s"]
            met = total <= TARGET_SECONDS and r["peak_rss_gb"] <= TARGET_RSS_GB
            ok &= met
            print(f"{mode:<8} {r['import_s']:>9.2f} {r['load_s']:>7.2f} {r['predict_s']:>10.2f} {total:>15.2f} "
                  f"{r['peak_rss_gb']:>12.2f}  {'met' if met else 'MISSED'} (<= {TARGET_SECONDS:g} s, <= {TARGET_RSS_GB:g} GB)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
