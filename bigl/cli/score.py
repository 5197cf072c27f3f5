"""``bigl score``: Dice and HD95 of predicted label maps against reference label maps."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DESCRIPTION = """\
Score predicted BraTS label maps (0/1/2/4) against references: Dice and HD95 (mm) for the
whole tumour (WT), tumour core (TC) and enhancing tumour (ET). --pred and --ref are each a label
file or a folder; folders are matched by case name (<case>.nii.gz, <case>_seg.nii.gz or BraTS case
folders <case>/<case>_seg.nii.gz). Tables show Dice in percent; --json and --csv give Dice as a
fraction (0-1). HD95 is always in millimetres."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "score",
        help="Dice and HD95 (mm) of predictions against reference label maps",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pred", required=True, type=Path, metavar="PATH", help="predicted label map or folder")
    parser.add_argument("--ref", required=True, type=Path, metavar="PATH", help="reference label map or folder")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: cases (case -> region -> dice, hd95), mean and std (region -> dice, hd95)",
    )
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write one row per case to FILE")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bigl.data.naming import is_nifti_path
    from bigl.errors import InputError
    from bigl.files import check_outputs
    from bigl.metrics import format_case_table, format_summary_markdown, score_paths, write_cases_csv

    if args.csv is not None and is_nifti_path(args.csv):
        raise InputError(f"--csv {args.csv} has a NIfTI name (.nii/.nii.gz), not a table's",
                         "give the table a .csv name, e.g. --csv scores.csv")
    with _Progress() as progress:
        result = score_paths(args.pred, args.ref, progress=progress)
    if args.csv is not None:
        read = [args.pred, args.ref, *(path for pair in result.pairs.values() for path in pair)]
        check_outputs({"--csv table": args.csv}, read, hint="give the table a new name, e.g. --csv scores.csv")
    summary = result.summary()
    _warn_unmatched("reference case(s) without a prediction", result.missing_predictions)
    _warn_unmatched("prediction(s) without a reference case", result.extra_predictions)
    if args.csv:
        write_cases_csv(args.csv, result.cases, result.pairs)
        print(f"wrote {args.csv}", file=sys.stderr)
    count = len(result.cases)
    if args.json:
        report = {
            "units": {"dice": "fraction (0-1)", "hd95": "mm"},
            "cases": result.cases,
            **summary,
            "missing_predictions": result.missing_predictions,
            "extra_predictions": result.extra_predictions,
        }
        print(json.dumps(report, indent=2))
    else:
        print(f"Per case (Dice in %, HD95 in mm), {count} case(s):\n")
        print(format_case_table(result.cases))
        print()
        print(format_summary_markdown(summary, title=f"Mean ± std over {count} case(s)"))
    return 0


def _warn_unmatched(what: str, names: list[str]) -> None:
    if names:
        print(f"bigl score: warning: {len(names)} {what}, not scored: {', '.join(names)}", file=sys.stderr)


class _Progress:
    """A tqdm bar on stderr (only on a terminal), created once the number of cases is known."""

    def __init__(self):
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="case", desc="scoring", file=sys.stderr, disable=None, leave=False)
        self._bar.update(done - self._bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
