"""Package a BiGL model of a report-split protocol run as the shipped default model.

    python benchmarks/make_reference_model.py PROTOCOL_DIR --setting bigl --seed 0 \\
        [--target-only target-only] [--inference refine+post] [--destination bigl/resources/default_model.safetensors]

PROTOCOL_DIR is the output folder of ``benchmarks/protocol.py --split report --baselines``. The
bundle of SETTING/seedN is copied with what was measured on the report cases in its metadata: for
that seed, the Dice and HD95 per region (mean, std and per case) of the model, source-only, the
no-learning invert + histogram-match baseline and (when given) the target-only setting; over every
seed the protocol ran, each method's mean +- std of the per-seed Dice. The report cases and the
training wall times (from the run folders' event logs) are recorded too, so ``bigl info`` on the
shipped model shows what it was measured to do. The weights are not touched; the ONNX export
beside the destination is written again (`bigl export`), so it stays that of the bundle. Prints
the tables as Markdown, for the model card.

With ``--inference NAME`` (a variant the protocol scored with ``--inference "NAME=--flag;..."``,
folder SETTING/eval-NAME-seedN) the shipped model runs with that variant's options by default
(the bundle's ``inference`` metadata, as the variant's ``bigl evaluate`` recorded them): the
``bigl`` row is then that variant's scores, and the scores without options become ``bigl-plain``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from bigl.bundle import annotate_bundle, read_metadata
from bigl.errors import BiGLError
from bigl.metrics import format_comparison_markdown
from bigl.runfolder import BUNDLE_FILE, EVENTS_FILE
from bigl.training.events import read_events

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import REPORT_CASES, summarise  # noqa: E402

DEFAULT_DESTINATION = Path(__file__).resolve().parents[1] / "bigl" / "resources" / "default_model.safetensors"
MAX_BYTES = 50 * 1024 * 1024
#: Row names of the model card's tables.
LABELS = {"source-only": "Source only", "invert-histmatch": "Source only + invert/histogram match (no learning)",
          "bigl": "**BiGL**", "bigl-plain": "BiGL, no inference options", "target-only": "Target only (T2 labels, upper bound)"}


def _read_json(path: Path) -> dict:
    """A JSON object the protocol wrote; exits naming the file when it is damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        sys.exit(f"cannot read {path} ({exc}): run the protocol again for it")
    if not isinstance(data, dict):
        sys.exit(f"{path} does not hold a JSON object: run the protocol again for it")
    return data


def _summary(folder: Path) -> dict | None:
    path = folder / "summary.json"
    summary = _read_json(path) if path.is_file() else None
    if summary is not None and not {"cases", "summary", "modality"} <= set(summary):
        sys.exit(f"{path} is not a `bigl evaluate` summary: run the protocol again for it")
    return summary


def _stage_seconds(run_dir: Path) -> dict[str, float]:
    """Wall seconds of each finished stage of a run folder (``end`` events, summed over resumes)."""
    seconds: dict[str, float] = {}
    for event in read_events(run_dir / EVENTS_FILE):
        stage, value = event.get("stage"), event.get("seconds")
        if event["event"] == "end" and isinstance(stage, str) and isinstance(value, (int, float)):
            seconds[stage] = seconds.get(stage, 0.0) + float(value)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("protocol_dir", type=Path, help="output folder of benchmarks/protocol.py --split report --baselines")
    parser.add_argument("--setting", required=True, help="the protocol setting whose model is packaged")
    parser.add_argument("--seed", type=int, default=0, help="which seed's model (default 0)")
    parser.add_argument("--target-only", help="the protocol setting of the target-only upper bound, if it ran")
    parser.add_argument("--inference", metavar="NAME",
                        help="the protocol's inference variant whose options the model runs with by default")
    parser.add_argument("--confidence-floor", type=float, metavar="C",
                        help="the tumour confidence below which the model warns that it is unsure (set on development "
                             "scans with benchmarks/view_agreement.py; the shipped model's: bigl.plausibility.CONFIDENCE_FLOOR)")
    parser.add_argument("--destination", type=Path, default=DEFAULT_DESTINATION, help="where to write the packaged model")
    args = parser.parse_args(argv)

    root = args.protocol_dir
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        sys.exit(f"{manifest_path} not found: give the output folder of benchmarks/protocol.py")
    manifest = _read_json(manifest_path)
    if manifest.get("split") != "report":
        sys.exit(f"{root} is a protocol on the {manifest.get('split')} split: the shipped model is measured on the report split")
    if sorted(manifest.get("scored", [])) != sorted(REPORT_CASES):
        sys.exit(f"{root} scored other cases than the report cases ({', '.join(REPORT_CASES)}): run the protocol "
                 "with --split report of this version")
    reserved = {"source-only", "invert-histmatch"}
    if args.setting in reserved or args.target_only in reserved or (args.target_only and args.target_only == args.setting):
        sys.exit("--setting and --target-only name two different protocol settings, neither of them "
                 "source-only or invert-histmatch (the baselines' own folders)")
    #: protocol setting -> method key in the metadata (as `bigl info` and the tests read it)
    methods = {"source-only": "source-only", "invert-histmatch": "invert-histmatch", args.setting: "bigl",
               **({args.target_only: "target-only"} if args.target_only else {})}
    model = root / args.setting / f"seed{args.seed}" / BUNDLE_FILE
    if not model.is_file():
        sys.exit(f"{model} not found: run the protocol with --setting {args.setting} and seed {args.seed} first")
    try:
        method = read_metadata(model)["method"]
    except BiGLError as exc:
        sys.exit(f"{model}: {exc.message}: run the protocol again for it")
    if method != "bigl":
        sys.exit(f"{model} is not a BiGL model")

    this_seed, over_seeds = {}, {}
    for name in methods:
        summary = _summary(root / name / f"eval-seed{args.seed}")
        if summary is None:
            sys.exit(f"{root / name / f'eval-seed{args.seed}'} has no summary.json: run the protocol with --baselines"
                     + (f" and --setting {name}" if name in (args.setting, args.target_only) else ""))
        if sorted(summary["cases"]) != sorted(REPORT_CASES):
            sys.exit(f"{name} seed {args.seed} was scored on other cases than the report cases: rerun the protocol")
        this_seed[name] = summary
        seeds = {int(folder.name.removeprefix("eval-seed")): _summary(folder)
                 for folder in sorted((root / name).glob("eval-seed*")) if folder.name.removeprefix("eval-seed").isdigit()}
        over_seeds[name] = summarise({name: {seed: s for seed, s in seeds.items() if s is not None}})[name]

    defaults = None
    if args.inference:
        folder = root / args.setting / f"eval-{args.inference}-seed{args.seed}"
        variant = _summary(folder)
        if variant is None:
            sys.exit(f"{folder} has no summary.json: run the protocol with --inference \"{args.inference}=...\"")
        if sorted(variant["cases"]) != sorted(REPORT_CASES):
            sys.exit(f"{folder} was scored on other cases than the report cases: rerun the protocol")
        defaults = {name: True for name, on in variant.get("inference", {}).items() if on}
        if not defaults:
            sys.exit(f"{folder} was scored without inference options: name a variant that has some")
        methods["bigl-plain"] = "bigl-plain"
        this_seed["bigl-plain"], this_seed[args.setting] = this_seed[args.setting], variant

    wall = {"translator": _stage_seconds(root / "translators" / f"seed{args.seed}").get("translator"),
            **{name: _stage_seconds(root / name / f"seed{args.seed}").get("adapt")
               for name in methods if name not in ("invert-histmatch", "bigl-plain")}}
    metrics = {
        "report": {
            "modality": this_seed[args.setting]["modality"],
            "cases": sorted(REPORT_CASES),
            "seed": args.seed,
            "note": "cases whose labels took part in no training, tuning or checkpoint choice",
            "methods": {methods[name]: {**s["summary"], "cases": s["cases"]} for name, s in this_seed.items()},
            "over_seeds": {methods[name]: entry for name, entry in over_seeds.items()},
        }
    }
    if defaults:
        metrics["report"]["inference"] = {"bigl": defaults}  # over_seeds stay without options
    training = {"wall_seconds": {key: round(value) for key, value in wall.items() if value is not None},
                "machine": f"{platform.machine()}, {platform.system()}, CPU", "report_cases": sorted(REPORT_CASES),
                "protocol": {"setting": args.setting, "seed": args.seed, "data": manifest["data"],
                             "overrides": manifest["settings"].get(args.setting, [])}}
    out = annotate_bundle(model, args.destination, metrics=metrics, training=training, inference=defaults,
                          confidence_floor=args.confidence_floor)
    size = out.stat().st_size
    if size > MAX_BYTES:
        out.unlink()
        sys.exit(f"the model is {size / 2**20:.1f} MiB, over the 50 MiB limit for a shipped model")
    print(f"wrote {out} ({size / 2**20:.2f} MiB)")
    from bigl.export import export_bundle

    exports = export_bundle(out)  # segmenting without PyTorch runs the export: keep it that of this bundle
    print(f"exported {', '.join(str(path) for path in exports)} ({sum(p.stat().st_size for p in exports) / 2**20:.2f} MiB)")
    print()
    rows = {LABELS[methods[name]]: s["summary"] for name, s in this_seed.items()}
    print(f"Seed {args.seed}, {len(REPORT_CASES)} report cases:\n")
    print(format_comparison_markdown(rows, "dice"))
    print()
    print(format_comparison_markdown(rows, "hd95"))
    print("\nDice % over seeds (mean ± sample std of the per-seed case means; per-seed means):\n")
    print("| Method | seeds | WT | TC | ET | mean |")
    print("|---|---|---:|---:|---:|---:|")
    for name, entry in over_seeds.items():
        cells = [f"{entry['regions'][r]['seed_mean']:.1f} ± {entry['regions'][r]['seed_std']:.1f} "
                 f"({', '.join(f'{v:.1f}' for v in entry['regions'][r]['per_seed'])})" for r in ("WT", "TC", "ET", "mean")]
        print(f"| {LABELS[methods[name]]} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    print(f"\nwall seconds: {training['wall_seconds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
