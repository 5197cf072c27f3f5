"""``bigl demo``: phantoms -> source-only, BiGL, target-only (and a no-learning baseline) -> table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from bigl.runfolder import DEVICE_CHOICES

DESCRIPTION = """\
Run the whole method on synthetic data, with nothing to download: writes a phantom cohort (T1 with
labels as the source modality, T2 as the target, plus separate test cases never used in training),
trains a source-only model, a BiGL model and a target-only model (T2 labels: the supervised level)
with the small 'cpu' config, evaluates them and the no-learning invert-histmatch baseline on the T2
test cases, and prints a method x region table of mean Dice (%) and HD95 (mm). Takes a few minutes on two CPU cores (--quick: about a minute,
with a smoke-sized config whose numbers mean little). Everything is written under --out."""


def register(subparsers) -> None:
    from bigl.demo import DEFAULT_OUT

    parser = subparsers.add_parser(
        "demo",
        help="phantoms -> train source-only, BiGL and target-only -> evaluate on T2 (minutes on a CPU)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", "-o", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help="output folder (default: ./bigl-demo; its data, runs and eval subfolders are replaced)")
    parser.add_argument("--cases", type=int, metavar="N", help="training phantoms (default 24; 3 with --quick)")
    parser.add_argument("--test-cases", type=int, metavar="N", help="test phantoms (default 8; 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-sized run (seconds to a minute): checks that everything works, not how well")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the phantoms and the training (default 0)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="where to train and evaluate (default: auto, the GPU when there is one)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for PyTorch (default: one per core; 1 is steadier on a busy machine)")
    parser.add_argument("--json", action="store_true",
                        help="print only the table as JSON on stdout: method -> region -> mean Dice (0-1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bigl.demo import format_results, run_demo, stdout_to_stderr

    with stdout_to_stderr(args.json):
        results = run_demo(args.out, quick=args.quick, train_cases=args.cases, test_cases=args.test_cases,
                           seed=args.seed, device=args.device, threads=args.threads)
    if args.json:
        print(json.dumps(results["dice"], indent=2))
        return 0
    settings = results["settings"]
    print(f"\n{settings['source_modality'].upper()} -> {settings['target_modality'].upper()} on "
          f"{settings['test_cases']} test phantom(s), mean ± std (Dice in %, HD95 in mm):\n")
    print(format_results(results["evaluations"]))
    print(f"\nwrote {args.out}/results.md, results.json, comparison.png; "
          f"per-method tables and figures in {args.out}/eval/ ({results['seconds']['total']:.0f} s)")
    return 0
