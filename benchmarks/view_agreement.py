#!/usr/bin/env python3
"""Does a label-free check tell which scans a model fails on? Per model and case: the whole-tumour
agreement of the plain prediction with its views (:func:`view_agreement`), the tumour confidence
(:func:`bigl.prediction.tumour_confidence`), and, for the prediction with the shipped model's inference defaults (--refine-edges
--postprocess), the whole-tumour volume and Dice against the labels; then the rank correlation of
each check with that Dice over all rows.

    python benchmarks/view_agreement.py --data ../shared/data/brats18 --data ../shared/data/brats-extra \\
        --model seed0=runs/x/seed0/model.safetensors --model seed1=runs/x/seed1/model.safetensors \\
        --cases Brats18_2013_11_1,Brats18_CBICA_ABM_1 --out runs/agreement/dev.csv

Use it on development cases (report-case labels decide nothing); ``--no-labels`` gives the checks
alone, for scans whose labels must not be read. ``--wt-thresholds 0.2 0.3`` adds the WT Dice of
the plain prediction's 1 - p(background) > tau, for each tau. ``--gammas 0.7 1.4`` adds, for each
contrast view (``Predictor.predict(contrast_gamma=g)``, with the inference defaults), its tumour
confidence and WT Dice, and then what keeping each scan's most confident view would change, on
every scan and on the scans below ``--floor`` only (the contrast search, ``--contrast-search``),
over the given gammas and over the search's own (``CONTRAST_GAMMAS``) when they are among them.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

CHECKS = ("flipped", "translated", "inverted", "confidence", "wt_ml")
#: The views compared with the plain prediction: its left-right mirror image, the scan translated to
#: the source modality by the bundle's G_t->s (which BiGL's output-consistency term trains the
#: segmenter to segment alike), and the scan with mirrored brain intensities (bigl.data.preprocess.mirror_brain).
VIEWS = ("flipped", "translated", "inverted")


def view_agreement(predictor, volume: np.ndarray, affine: np.ndarray | None = None,
                   views: Sequence[str] = VIEWS) -> dict[str, float]:
    """Whole-tumour Dice (0-1) between the plain prediction of ``volume`` and each view's, on the
    network's slices (where every view is compared alike), and the plain prediction's
    ``confidence`` (nan when it finds no tumour).

    ``predictor``: a :class:`bigl.prediction.Predictor` of one model; its test-time options are
    not used (each view is one pass of the segmenter). ``translated`` needs a bundle with a
    translator; ``flipped`` needs an affine whose left-right axis lies in the slices.
    """
    from bigl.data.preprocess import left_right_axis, mirror_brain, prepare_volume
    from bigl.metrics import dice
    from bigl.prediction import Progress, _as_scan, tumour_confidence, tumour_pixels

    unknown = sorted(set(views) - set(VIEWS))
    if unknown:
        raise ValueError(f"unknown view(s) {', '.join(unknown)}; choose from {', '.join(VIEWS)}")
    if "translated" in views and not predictor.has_translator:
        raise predictor.no_translator_error()
    data = _as_scan(volume, "the scan")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    slices = prepare_volume(data, predictor.preprocessing).slices
    flip_axis = left_right_axis(affine, predictor.preprocessing.slice_axis)
    if "flipped" in views and not flip_axis:
        raise ValueError("the scan's left-right axis runs through its slices, so no slice can be mirrored")

    def segment(images: np.ndarray) -> np.ndarray:
        with Progress(None, total=len(images), batches=0) as report:
            return predictor._segment_slices(np.ascontiguousarray(images, dtype=np.float32), False, report)["probabilities"]

    plain = segment(slices)
    tumour = tumour_pixels(plain)
    confidence = tumour_confidence(plain)
    result = {"confidence": float("nan") if confidence is None else confidence}
    for view in views:
        if view == "flipped":
            other = np.flip(segment(np.flip(slices, flip_axis)), flip_axis)
        elif view == "inverted":
            other = segment(mirror_brain(slices))
        else:
            with Progress(None, total=len(slices), batches=0) as report:
                other = segment(predictor._translate_slices(slices, report))
        result[view] = dice(tumour, tumour_pixels(other))
    return result


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties), over the rows where both are finite."""
    from scipy.stats import spearmanr

    keep = np.isfinite(x) & np.isfinite(y)
    return float(spearmanr(x[keep], y[keep]).statistic) if keep.sum() > 2 else float("nan")


def main() -> int:
    from bigl.data.brats import find_cases
    from bigl.metrics import dice
    from bigl.prediction import open_predictor
    from bigl.volumes import voxel_volume_ml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="data folder (repeat for several)")
    parser.add_argument("--model", action="append", required=True, help="NAME=MODEL (repeat for several)")
    parser.add_argument("--cases", required=True, help="comma-separated case names")
    parser.add_argument("--modality", default="t2")
    parser.add_argument("--no-labels", action="store_true", help="do not read labels (no Dice column)")
    parser.add_argument("--out", type=Path, required=True, help="CSV file of the rows")
    parser.add_argument("--wt-thresholds", type=float, nargs="*", default=[],
                        help="also the WT Dice of 1 - p(background) > each of these (plain prediction, on the scan's grid)")
    parser.add_argument("--gammas", type=float, nargs="*", default=[],
                        help="also the confidence and WT Dice of these contrast views (gamma 1: the scan as it is)")
    parser.add_argument("--floor", type=float, default=None,
                        help="with --gammas: the confidence floor below which a scan is searched (default: the "
                             "shipped model's, bigl.plausibility.CONFIDENCE_FLOOR)")
    args = parser.parse_args()

    cases = {case.name: case for case in find_cases(args.data)}
    names = [name.strip() for name in args.cases.split(",") if name.strip()]
    missing = [name for name in names if name not in cases]
    if missing:
        parser.error(f"cases not in the data folders: {', '.join(missing)}")
    rows = []
    for spec in args.model:
        label, _, path = spec.partition("=")
        check = open_predictor(path, engine="torch", flip=False, invert_view=False, postprocess=False,
                               refine_edges=False, translated=True)
        final = open_predictor(path, engine="torch", refine_edges=True, postprocess=True)  # the shipped defaults
        for name in names:
            image = cases[name].load_image(args.modality)
            data, affine = np.asarray(image.data, dtype=np.float32), image.affine
            row = {"model": label, "case": name, **view_agreement(check, data, affine)}
            labels = final.predict(data, affine, modality=args.modality, name=name).labels
            row["wt_ml"] = float(np.count_nonzero(labels)) * voxel_volume_ml(image.spacing)
            if not args.no_labels:
                truth = np.asarray(cases[name].load_labels().data)
                row["wt_dice"] = float(dice(labels > 0, truth > 0))
                if args.wt_thresholds:
                    background = check.predict(data, affine, probabilities=True, modality=args.modality).probabilities[0]
                    for tau in args.wt_thresholds:
                        row[f"wt_dice_tau{tau:g}"] = float(dice(1.0 - background > tau, truth > 0))
            for gamma in args.gammas:
                view = final.predict(data, affine, modality=args.modality, name=name, contrast_gamma=gamma)
                row[f"confidence_g{gamma:g}"] = float("nan") if view.confidence is None else view.confidence
                if not args.no_labels:
                    row[f"wt_dice_g{gamma:g}"] = float(dice(view.labels > 0, truth > 0))
            rows.append(row)
            print(", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if not args.no_labels:
        dice = np.array([row["wt_dice"] for row in rows])
        print(f"\nrank correlation with the WT Dice over {len(rows)} rows:")
        for key in CHECKS:
            print(f"  {key}: {spearman(np.array([row[key] for row in rows]), dice):+.2f}")
        if args.gammas:
            from bigl.plausibility import CONFIDENCE_FLOOR

            from bigl.prediction import CONTRAST_GAMMAS

            floor = CONFIDENCE_FLOOR if args.floor is None else args.floor
            shipped = [gamma for gamma in CONTRAST_GAMMAS if gamma != 1.0]
            for gammas in [list(args.gammas)] + ([shipped] if set(shipped) < set(args.gammas) else []):
                report_search(rows, gammas, floor)
    return 0


def search_choice(row: dict, gammas: Sequence[float], floor: float | None) -> float:
    """The view the contrast search keeps for a row: the scan as it is when its confidence is at or
    above ``floor`` (None: search every scan), else the most confident of it and the ``gammas``."""
    from bigl.prediction import most_confident_view

    plain = row["confidence"]
    if floor is not None and np.isfinite(plain) and plain >= floor:
        return 1.0
    return most_confident_view({1.0: plain, **{gamma: row[f"confidence_g{gamma:g}"] for gamma in gammas}})


def report_search(rows: list[dict], gammas: Sequence[float], floor: float) -> None:
    """The WT Dice change of keeping each row's most confident view, searched on every row and on the
    rows below ``floor``, in points (mean over rows; the rows it changes)."""
    def wt(row: dict, gamma: float) -> float:
        return row["wt_dice"] if gamma == 1.0 else row[f"wt_dice_g{gamma:g}"]

    for label, rule_floor in (("every scan", None), (f"below {floor:g}", floor)):
        change = np.array([wt(row, search_choice(row, gammas, rule_floor)) - row["wt_dice"] for row in rows]) * 100
        moved = ", ".join(f"{row['model']}/{row['case']} {delta:+.1f}" for row, delta in zip(rows, change) if delta)
        print(f"contrast search over {', '.join(f'{g:g}' for g in gammas)} on {label}: WT {change.mean():+.2f} points "
              f"on average over {len(rows)} rows; changed: {moved or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
