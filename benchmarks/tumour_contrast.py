#!/usr/bin/env python3
"""How bright is the tumour in the images the segmenter learns from? Per labelled case: the
tumour-minus-brain contrast (median whole-tumour intensity minus the median of the rest of the
brain, on the network's [-1, 1] slices) of the real source scan, of the real target scan, and of
the source scan translated to the target modality by a model's G_s->t (x_s->t, what stage 2 trains
the segmenter on with the source labels); with ``--segment``, also the model's tumour confidence and
WT Dice on the target scan (plain pass: no test-time options).

    python benchmarks/tumour_contrast.py --data ../shared/data/brats18 --data ../shared/data/brats-extra \\
        --model runs/protocol-full-dev/reference/seed0/model.safetensors --exclude-report --segment \\
        --out runs/tumour-contrast/dev-seed0.csv

The labels are the source labels of co-registered scans (BraTS shares one label map between its
modalities), so this reads nothing a source-labelled training run does not have; report cases are
left out with ``--exclude-report``, a split's scored cases with ``--exclude``: with ``--segment``
the rows are then a run's own unlabelled target scans, on which its mean confidence is the
label-free seed choice of docs/results.md ("Choosing a seed without labels").
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def tumour_contrast(slices: np.ndarray, labels: np.ndarray) -> float:
    """Median intensity of the whole tumour (labels > 0) minus that of the rest of the brain
    (above the background), on prepared slices; nan without tumour."""
    from bigl.data.preprocess import EMPTY_SLICE_MAX

    tumour = labels > 0
    brain = (slices > EMPTY_SLICE_MAX) & ~tumour
    if not tumour.any() or not brain.any():
        return float("nan")
    return float(np.median(slices[tumour]) - np.median(slices[brain]))


def main() -> int:
    import torch

    from bigl.bundle import load_bundle
    from bigl.data.brats import find_cases
    from bigl.data.preprocess import prepare_labels, prepare_volume
    from bigl.metrics import dice
    from bigl.prediction import open_predictor
    from protocol import REPORT_CASES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="data folder (repeat for several)")
    parser.add_argument("--model", required=True, help="a BiGL bundle (with its translators)")
    parser.add_argument("--cases", help="comma-separated case names (default: every labelled case)")
    parser.add_argument("--exclude-report", action="store_true", help="leave out the report cases")
    parser.add_argument("--exclude", default="", help="comma-separated cases to leave out (e.g. a split's scored cases)")
    parser.add_argument("--segment", action="store_true", help="also the model's confidence and WT Dice on the target scan")
    parser.add_argument("--out", type=Path, required=True, help="CSV file of the rows")
    args = parser.parse_args()

    bundle = load_bundle(args.model)
    if bundle.translator_s2t is None:
        parser.error(f"{args.model} has no translators (a BiGL bundle has)")
    source, target = bundle.source_modality, bundle.modality
    cases = find_cases(args.data, modalities=(source, target), require_labels=True)
    if args.cases:
        wanted = {name.strip() for name in args.cases.split(",") if name.strip()}
        cases = [case for case in cases if case.name in wanted]
    left_out = {name.strip() for name in args.exclude.split(",") if name.strip()} | set(REPORT_CASES if args.exclude_report else [])
    cases = [case for case in cases if case.name not in left_out]
    translator = bundle.translator_s2t.eval()
    predictor = (open_predictor(args.model, engine="torch", flip=False, invert_view=False, postprocess=False,
                                refine_edges=False, contrast_search=False) if args.segment else None)
    rows = []
    for case in cases:
        seg = np.asarray(case.load_labels().data)
        row = {"case": case.name}
        for name, modality in (("source", source), ("target", target)):
            image = case.load_image(modality)
            prepared = prepare_volume(np.asarray(image.data, dtype=np.float32), bundle.preprocessing)
            labels = prepare_labels(seg, prepared.geometry)
            row[name] = tumour_contrast(prepared.slices, labels)
            if name == "source":
                with torch.no_grad():
                    translated = torch.cat([translator(torch.from_numpy(prepared.slices[i:i + 16, None]))
                                            for i in range(0, len(prepared.slices), 16)])[:, 0].numpy()
                row["translated"] = tumour_contrast(translated, labels)
            elif predictor is not None:
                prediction = predictor.predict(image.data, image.affine, modality=modality, name=case.name)
                row["confidence"] = prediction.confidence
                row["wt_dice"] = float(dice(prediction.labels > 0, seg > 0))
        rows.append(row)
        print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    values = {key: np.array([row[key] for row in rows], dtype=float) for key in ("source", "target", "translated")}
    print(f"\n{len(rows)} cases; median tumour-minus-brain contrast: " + ", ".join(
        f"{key} {np.nanmedian(v):.3f}" for key, v in values.items()))
    print(f"translated fainter than the real target on {int(np.sum(values['translated'] < values['target']))} cases")
    if args.segment:
        confidence = [row["confidence"] for row in rows if row["confidence"] is not None]
        print(f"target scans: mean tumour confidence {np.mean(confidence):.4f}, mean WT Dice {np.mean([r['wt_dice'] for r in rows]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
