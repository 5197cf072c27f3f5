"""``bigl evaluate``: segment one modality of every labelled case in a folder and score it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bigl.cli import add_inference_options
from bigl.runfolder import DEVICE_CHOICES

DESCRIPTION = """\
Segment the given modality of every case in a BraTS-style folder that has labels, and score it:
Dice and HD95 (mm) for the whole tumour (WT), tumour core (TC) and enhancing tumour (ET), mean ±
std over cases as in Tables 1-2 of the paper. Cases without labels or without the modality are
listed and skipped. With --out, writes cases.csv, summary.md, summary.json, cases.png (a few
cases in three planes: input, prediction, ground truth) and predictions/<case>_seg.nii.gz;
summary.json has each case's tumour confidence, and summary.md names the cases the model was
unsure of (confidence below the floor the model records, if it records one).

--baseline invert-histmatch evaluates the no-learning translation baseline: the model (a
source-only bundle) is applied to each image after inverting its intensities inside the brain and
matching their histogram to the source modality's. The reference histogram comes from the source
training images (--reference-data DIR --reference-modality t1) or from a reference.json that an
earlier baseline run wrote to its --out folder."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="segment and score a labelled data folder (Dice, HD95; tables, figure)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", "-m", type=Path, metavar="BUNDLE", action="append",
                        help="model bundle (.safetensors); default: the model shipped with BiGL; repeat it to evaluate "
                             "an ensemble (the labels of the models' averaged class probabilities)")
    parser.add_argument("--data", "-d", required=True, type=Path, metavar="DIR", action="append",
                        help="BraTS-style data folder (case folders with images and <case>_seg.nii.gz); "
                             "repeat it to evaluate the cases of several folders as one set")
    parser.add_argument("--modality", metavar="NAME",
                        help="modality to segment (t1, t1ce, t2, flair; default: the one the model segments)")
    parser.add_argument("--out", "-o", type=Path, metavar="DIR",
                        help="write tables, figure and predictions here (default: only print the summary)")
    parser.add_argument("--cases", metavar="A,B,...", help="only these cases (comma-separated names)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="where to run the networks (default: auto, the GPU when there is one)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="slices per forward pass (default 16)")
    add_inference_options(parser)
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch (default: PyTorch's choice)")
    parser.add_argument("--no-save-predictions", dest="save_predictions", action="store_false",
                        help="do not write predictions/<case>_seg.nii.gz")
    parser.add_argument("--figure-cases", type=int, default=3, metavar="N",
                        help="cases shown in cases.png: best, median, worst mean Dice for 3 (0: no figure)")
    parser.add_argument("--baseline", choices=_baseline_names(),
                        help="evaluate a no-learning baseline with the model instead of the model alone")
    parser.add_argument("--reference-data", type=Path, metavar="DIR|JSON",
                        help="for --baseline: source-modality training images (a data folder) or a reference.json")
    parser.add_argument("--reference-modality", metavar="NAME",
                        help="for --baseline: modality of the reference images (default: the model's source modality)")
    parser.add_argument("--reference-exclude", metavar="A,B,...",
                        help="for --baseline with a data folder: leave these cases out of the reference (e.g. the test cases)")
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON object (Dice as a fraction 0-1, HD95 in mm)")
    parser.set_defaults(func=run)


def _baseline_names() -> tuple[str, ...]:
    from bigl.baselines import BASELINES

    return BASELINES


def run(args: argparse.Namespace) -> int:
    from bigl.errors import InputError
    from bigl.evaluate import evaluate_bundle, format_summary_text
    from bigl.files import same_file
    from bigl.prediction import open_predictor

    cases = [name.strip() for name in args.cases.split(",") if name.strip()] if args.cases else None
    if args.figure_cases < 0:
        raise InputError(f"--figure-cases must be 0 or more, got {args.figure_cases}", "use e.g. --figure-cases 3")
    if args.baseline is None and (args.reference_data or args.reference_modality or args.reference_exclude):
        raise InputError("--reference-data / --reference-modality / --reference-exclude are only used with --baseline",
                         "add --baseline invert-histmatch, or leave them out")
    predictor = open_predictor(args.model or [None], engine="torch", device=args.device, batch_size=args.batch_size,
                               num_threads=args.threads, flip=args.flip, postprocess=args.postprocess,
                               invert_view=args.invert_view, refine_edges=args.refine_edges,
                               contrast_search=args.contrast_search)
    transform = reference_file = None
    if args.baseline is not None:
        transform = _baseline_transform(args, predictor.source_modality)
        if args.out is not None:  # reusable later as --reference-data OUT/reference.json
            reference_file = args.out / "reference.json"
            if not same_file(reference_file, args.reference_data):  # never rewrite the file this run reads
                transform.reference.save(reference_file)

    result = evaluate_bundle(
        predictor, args.data[0] if len(args.data) == 1 else args.data, args.modality, args.out, cases=cases, transform=transform,
        save_predictions=args.save_predictions, figure_cases=args.figure_cases,
    )
    if reference_file is not None:
        result["outputs"]["reference"] = str(reference_file)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['method']} on {result['modality'].upper()}: {result['n_cases']} case(s) "
          f"(Dice in %, HD95 in mm, mean ± std)\n")
    print(format_summary_text(result))
    if args.out is not None:
        print(f"\nwrote {args.out}/: " + ", ".join(Path(p).name for p in result["outputs"].values()))
    return 0


def _baseline_transform(args: argparse.Namespace, source_modality: str | None):
    from bigl.baselines import load_reference, make_baseline
    from bigl.errors import InputError

    if args.reference_data is None:
        raise InputError(
            f"--baseline {args.baseline} needs the source-modality reference",
            "give --reference-data DIR (the source training images) --reference-modality t1, "
            "or --reference-data reference.json from an earlier baseline run",
        )
    modality = args.reference_modality or source_modality
    print(f"building the {args.baseline} reference from {args.reference_data}"
          + (f" ({modality})" if modality else ""), file=sys.stderr)
    exclude = [name.strip() for name in (args.reference_exclude or "").split(",") if name.strip()]
    reference = load_reference(args.reference_data, modality, exclude=exclude)
    return make_baseline(args.baseline, reference)
