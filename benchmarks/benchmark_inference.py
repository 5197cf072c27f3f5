"""Time and memory of whole-volume inference on CPU: PyTorch vs ONNX Runtime, side by side.

Builds a default-sized bundle (SegmenterConfig, TranslatorConfig and PreprocessConfig defaults,
random weights: the cost does not depend on the weight values) unless --model is given, exports it
to ONNX (``bigl export``, beside a copy of the bundle), and makes a synthetic 240 x 240 x 155
brain-like volume (the BraTS grid) unless --input is given. Each measurement runs in a fresh Python
process so that its peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its
own, for each engine:

* ``labels``: the label map only;
* ``all``: labels plus probabilities, attention maps and the translated image.

The engines can run in different environments (``--torch-python``, ``--onnx-python``: the Python
of a venv with ``bigl[train]``, and of one with plain ``bigl``, no PyTorch); the installed size of
each environment's site-packages is reported, and the ONNX Runtime outputs are compared with the
PyTorch ones (labels agreement, largest probability and attention differences).

Targets on 2 CPU cores: the shipped default model (``--model``, labels with every default option)
at most 5 s and 1.5 GB peak RSS per volume; a default-sized random bundle with every output at most
15 s and 2.5 GB (either engine); ONNX Runtime at least 1.5x faster than PyTorch and its
environment under 300 MB.

    python benchmarks/benchmark_inference.py [--threads 2] [--model BUNDLE] [--input SCAN.nii.gz]
        [--torch-python VENV/bin/python] [--onnx-python VENV/bin/python] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
TARGET_SECONDS = 15.0
TARGET_RSS_GB = 2.5
#: For --model (the shipped model): labels by ONNX Runtime, what ``bigl segment`` runs, imports included.
SHIPPED_SECONDS = 5.0
SHIPPED_RSS_GB = 1.5
TARGET_SPEEDUP = 1.5
TARGET_INSTALL_MB = 300.0
SHAPE = (240, 240, 155)
ENGINES = ("torch", "onnx")
MODES = ("labels", "all")

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


def worker(engine: str, mode: str, model: str, scan: str, threads: int, batch_size: int, out: str) -> None:
    """Runs in a fresh process; prints one JSON line with its timings and peak RSS, saves the outputs."""
    import resource

    start = time.perf_counter()
    import numpy as np

    from bigl.data.io import load_volume
    from bigl.prediction import open_predictor

    imported = time.perf_counter()
    volume = load_volume(scan)
    predictor = open_predictor(model, engine=engine, device="cpu", batch_size=batch_size, num_threads=threads)
    assert predictor.engine == engine, (predictor.engine, engine)
    loaded = time.perf_counter()
    extras = mode == "all"
    result = predictor.predict(volume.data, volume.affine, probabilities=extras, attention=extras,
                               translated=extras and predictor.has_translator, progress=lambda d, t: None)
    done = time.perf_counter()
    assert result.labels.shape == volume.shape
    arrays = {"labels": result.labels}
    if extras:
        arrays.update(probabilities=result.probabilities, **{f"attention_{k}": v for k, v in result.attention.items()})
        if result.translated is not None:
            arrays["translated"] = result.translated
    np.savez(out, **arrays)
    print(json.dumps({
        "engine": engine,
        "mode": mode,
        "import_s": imported - start,
        "load_s": loaded - imported,
        "predict_s": done - loaded,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,  # KiB on Linux
        "torch_imported": "torch" in sys.modules,
    }))


def site_packages_mb(python: str) -> float:
    """Installed size of the environment of ``python`` (its purelib and platlib folders), in MB."""
    code = "import sysconfig, json; print(json.dumps(sorted({sysconfig.get_path('purelib'), sysconfig.get_path('platlib')})))"
    folders = json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)
    total = 0
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    total += os.path.getsize(path)
    return total / 1e6


def compare(torch_file: Path, onnx_file: Path) -> dict:
    import numpy as np

    a, b = np.load(torch_file), np.load(onnx_file)
    result = {"labels_agree": float((a["labels"] == b["labels"]).mean())}
    for key in a.files:
        if key != "labels" and key in b.files:
            result[f"max_diff_{key}"] = float(np.abs(a[key] - b[key]).max())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="bundle to time (default: a default-sized random one)")
    parser.add_argument("--input", type=Path, help="NIfTI scan (default: synthetic 240x240x155)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--torch-python", default=sys.executable, help="Python of the PyTorch environment")
    parser.add_argument("--onnx-python", default=sys.executable, help="Python of the ONNX Runtime environment")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        engine, mode, model, scan, threads, batch, out = args.worker
        worker(engine, mode, model, scan, int(threads), int(batch), out)
        return 0

    with tempfile.TemporaryDirectory(prefix="bigl-bench-") as tmp:
        tmp = Path(tmp)
        if args.model is None:
            model = make_default_bundle(tmp / "default-size.safetensors")
        else:
            model = tmp / args.model.name
            shutil.copyfile(args.model, model)
        from bigl.export import export_bundle

        export_bundle(model)
        scan = args.input or make_volume(tmp / "synthetic_t2.nii.gz")
        from bigl.bundle import parameter_counts

        print(f"model: {args.model or 'default-size, random weights'} ({sum(parameter_counts(model).values()) / 1e6:.2f} M parameters)")
        print(f"input: {args.input or 'synthetic 240x240x155'}; {args.threads} thread(s), batch size {args.batch_size}\n")
        pythons = {"torch": args.torch_python, "onnx": args.onnx_python}
        sizes = {engine: site_packages_mb(python) for engine, python in pythons.items()}
        results = {}
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
        for mode in MODES:
            for engine in ENGINES:
                out = tmp / f"{engine}-{mode}.npz"
                command = [pythons[engine], str(Path(__file__).resolve()), "--worker", engine, mode, str(model),
                           str(scan), str(args.threads), str(args.batch_size), str(out)]
                run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
                if run.returncode != 0:
                    print(run.stderr, file=sys.stderr)
                    return 1
                results[engine, mode] = json.loads(run.stdout.strip().splitlines()[-1])
            results["agreement", mode] = compare(tmp / f"torch-{mode}.npz", tmp / f"onnx-{mode}.npz")

    ok = True
    print(f"{'engine':<7} {'outputs':<8} {'import s':>9} {'load s':>7} {'predict s':>10} {'load+predict s':>15} "
          f"{'peak RSS GB':>12}  target")
    for mode in MODES:
        for engine in ENGINES:
            r = results[engine, mode]
            total = r["load_s"] + r["predict_s"]
            if args.model and (engine, mode) == ("onnx", "labels"):
                met = total + r["import_s"] <= SHIPPED_SECONDS and r["peak_rss_gb"] <= SHIPPED_RSS_GB
                target = f"(<= {SHIPPED_SECONDS:g} s with the import, <= {SHIPPED_RSS_GB:g} GB: a shipped model)"
            else:
                met = total <= TARGET_SECONDS and r["peak_rss_gb"] <= TARGET_RSS_GB
                target = f"(<= {TARGET_SECONDS:g} s, <= {TARGET_RSS_GB:g} GB)"
            ok &= met
            print(f"{engine:<7} {mode:<8} {r['import_s']:>9.2f} {r['load_s']:>7.2f} {r['predict_s']:>10.2f} {total:>15.2f} "
                  f"{r['peak_rss_gb']:>12.2f}  {'met' if met else 'MISSED'} {target}")
    print()
    for mode in MODES:
        speedup = (sum(results["torch", mode][k] for k in ("import_s", "load_s", "predict_s"))
                   / sum(results["onnx", mode][k] for k in ("import_s", "load_s", "predict_s")))
        predict_speedup = results["torch", mode]["predict_s"] / results["onnx", mode]["predict_s"]
        met = speedup >= TARGET_SPEEDUP
        ok &= met
        agreement = results["agreement", mode]
        diffs = ", ".join(f"{k.removeprefix('max_diff_')} {v:.1e}" for k, v in agreement.items() if k != "labels_agree")
        print(f"{mode:<7}: ONNX Runtime {speedup:.2f}x faster end to end, {predict_speedup:.2f}x in predict "
              f"({'met' if met else 'MISSED'} >= {TARGET_SPEEDUP:g}x); labels agree on "
              f"{100 * agreement['labels_agree']:.3f} % of voxels" + (f"; max differences: {diffs}" if diffs else ""))
    for engine in ENGINES:
        met = engine != "onnx" or sizes[engine] <= TARGET_INSTALL_MB
        ok &= met
        imported = any(results[engine, mode]["torch_imported"] for mode in MODES)
        print(f"{engine} environment: {sizes[engine]:.0f} MB of site-packages ({pythons[engine]}); torch imported: "
              f"{imported}" + ("" if engine != "onnx" else f" ({'met' if met else 'MISSED'} < {TARGET_INSTALL_MB:g} MB)"))
    if args.json:
        args.json.write_text(json.dumps({"results": {f"{k[0]}/{k[1]}": v for k, v in results.items()},
                                         "site_packages_mb": sizes, "threads": args.threads}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
