"""Package the BiGL model of a real-data benchmark run as the shipped default model.

    python benchmarks/make_reference_model.py RUN_DIR [--destination bigl/resources/default_model.safetensors]

RUN_DIR is the output folder of ``benchmarks/real_data_t1_t2.sh``. The BiGL bundle is copied with
the measured report table (Dice and HD95 per region: mean, std and per case, for every method
evaluated in RUN_DIR/eval-*), the report cases and the wall times recorded in its metadata, so
``bigl info`` on the shipped model shows what it was measured to do. The weights are not touched; the
ONNX export beside the destination is written again (`bigl export`), so it stays that of the bundle.
Prints the report table as Markdown, for the model card.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from bigl.bundle import annotate_bundle, read_metadata
from bigl.metrics import format_comparison_markdown

DEFAULT_DESTINATION = Path(__file__).resolve().parents[1] / "bigl" / "resources" / "default_model.safetensors"
#: Evaluation folders of the benchmark, in the order of the model card's table.
EVALUATIONS = {
    "eval-source-only": "Source only",
    "eval-invert-histmatch": "Source only + invert-histmatch",
    "eval-bigl": "BiGL",
    "eval-target-only": "Target only",
}
MAX_BYTES = 50 * 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="output folder of benchmarks/real_data_t1_t2.sh")
    parser.add_argument("--destination", type=Path, default=DEFAULT_DESTINATION, help="where to write the packaged model")
    args = parser.parse_args(argv)

    summaries = {}
    for folder in EVALUATIONS:
        path = args.run_dir / folder / "summary.json"
        if path.is_file():
            summaries[folder.removeprefix("eval-")] = json.loads(path.read_text())
    if "bigl" not in summaries:
        sys.exit(f"{args.run_dir}/eval-bigl/summary.json not found: run benchmarks/real_data_t1_t2.sh first")
    report_cases = sorted(summaries["bigl"]["cases"])
    for method, summary in summaries.items():
        if sorted(summary["cases"]) != report_cases:
            sys.exit(f"eval-{method} was scored on other cases than eval-bigl: rerun the benchmark")
    wall = {}
    wall_file = args.run_dir / "wall_seconds.txt"
    if wall_file.is_file():
        for line in wall_file.read_text().splitlines():
            method, _, seconds = line.partition(" ")
            wall[method] = int(seconds)

    model = args.run_dir / "bigl" / "model.safetensors"
    if read_metadata(model)["method"] != "bigl":
        sys.exit(f"{model} is not a BiGL model")
    metrics = {
        "report": {
            "modality": summaries["bigl"]["modality"],
            "cases": report_cases,
            "note": "cases whose labels took part in no training, tuning or checkpoint choice",
            "methods": {method: {**summary["summary"], "cases": summary["cases"]} for method, summary in summaries.items()},
        }
    }
    training = {"wall_seconds": wall, "machine": f"{platform.machine()}, {platform.system()}, CPU", "report_cases": report_cases}
    out = annotate_bundle(model, args.destination, metrics=metrics, training=training)
    size = out.stat().st_size
    if size > MAX_BYTES:
        out.unlink()
        sys.exit(f"the model is {size / 2**20:.1f} MiB, over the 50 MiB limit for a shipped model")
    print(f"wrote {out} ({size / 2**20:.2f} MiB)")
    from bigl.export import export_bundle

    exports = export_bundle(out)  # segmenting without PyTorch runs the export: keep it that of this bundle
    print(f"exported {', '.join(str(path) for path in exports)} ({sum(p.stat().st_size for p in exports) / 2**20:.2f} MiB)")
    print()
    rows = {EVALUATIONS[f"eval-{method}"]: summary["summary"] for method, summary in summaries.items()}
    print(format_comparison_markdown(rows, "dice"))
    print()
    print(format_comparison_markdown(rows, "hd95"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
