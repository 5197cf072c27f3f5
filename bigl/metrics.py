"""Segmentation metrics for the BraTS regions: Dice and HD95 in millimetres.

Regions follow the BraTS protocol (:data:`bigl.labels.REGIONS`): whole tumour WT = labels {1, 2, 4},
tumour core TC = {1, 4}, enhancing tumour ET = {4}.

Dice is ``2 |A & B| / (|A| + |B|)``, a fraction in [0, 1].

HD95 (95th percentile Hausdorff distance), as in MONAI's ``compute_hausdorff_distance(percentile=95)``:

* the surface of a mask is the mask minus its binary erosion (6-connected in 3D; voxels on the
  image border count as surface);
* the directed distances from A to B are, for every surface voxel of A, the Euclidean distance in
  millimetres (voxel spacing taken into account) to the nearest surface voxel of B, computed with
  ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``;
* HD95 is the larger of the two directed 95th percentiles (linear interpolation).

Why this definition: medpy's ``hd95``, used by many BraTS evaluation scripts, takes the 95th
percentile of both directions pooled together instead, which is never larger than the value here
(at most 5% of the pooled distances can exceed the larger directed percentile). BiGL follows MONAI,
a maintained reference implementation the test suite checks against; the two agree closely unless
one surface has far outliers (e.g. a false-positive blob) that the other lacks, where pooling
dilutes them.

Empty masks follow the BraTS convention (MONAI instead returns NaN / inf):
both empty gives Dice 1 and HD95 0; exactly one empty gives Dice 0 and HD95 :data:`HD95_EMPTY_MM`.

Both masks are cropped to the bounding box of their union plus one voxel before the erosion and
distance transforms, so a 240 x 240 x 155 pair scores all three regions in a fraction of a second.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from bigl.data import naming
from bigl.data.brats import parse_case_file
from bigl.data.io import check_same_grid, is_nifti_path, load_volume
from bigl.errors import InputError
from bigl.labels import LABELS, REGIONS, region_mask

#: HD95 (mm) when exactly one of the two masks is empty: the diagonal of the 240 x 240 x 155 mm
#: BraTS volume, the value the BraTS challenge assigns to such cases.
HD95_EMPTY_MM = 373.13

#: The metrics reported per region, in display order.
METRICS: tuple[str, ...] = ("dice", "hd95")

#: Score columns of :func:`write_cases_csv` after ``case``: ``WT_dice, WT_hd95, TC_dice, ...``.
CSV_COLUMNS: tuple[str, ...] = tuple(f"{region}_{metric}" for region in REGIONS for metric in METRICS)

#: Suffixes stripped from file names to get case names (``<case>_seg.nii.gz`` -> ``<case>``).
LABEL_SUFFIXES: tuple[str, ...] = (
    "_seg", "-seg", "_pred", "-pred", "_prediction", "-prediction",
    "_labels", "-labels", "_label", "-label",
)

#: How deep case folders are looked for under a folder of label maps (e.g. ``HGG/<case>/``).
_MAX_DEPTH = 4

#: Scores of one case: region -> {"dice": ..., "hd95": ...}. Per-case results are
#: ``dict[str, RegionScores]`` (case -> scores); summaries map "mean" and "std" to the same shape.
RegionScores = dict[str, dict[str, float]]


# --------------------------------------------------------------------------- binary metrics


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    a, b = _as_mask_pair(a, b)
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile Hausdorff distance (mm) between two boolean masks; see the module docstring."""
    a, b = _as_mask_pair(a, b)
    sampling = _check_spacing(spacing, a.ndim)
    a_any, b_any = bool(a.any()), bool(b.any())
    if not a_any and not b_any:
        return 0.0
    if not a_any or not b_any:
        return HD95_EMPTY_MM
    box = _union_box(a | b)
    a, b = a[box], b[box]
    surface_a = a & ~ndimage.binary_erosion(a)
    surface_b = b & ~ndimage.binary_erosion(b)
    a_to_b = ndimage.distance_transform_edt(~surface_b, sampling=sampling)[surface_a]
    b_to_a = ndimage.distance_transform_edt(~surface_a, sampling=sampling)[surface_b]
    return float(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))


def _as_mask_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise InputError(
            f"masks have different shapes {a.shape} and {b.shape}",
            "compare a prediction and a reference on the same voxel grid",
        )
    return a, b


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    values = tuple(float(s) for s in np.ravel(spacing))
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise InputError(
            f"voxel spacing {values} does not fit a {ndim}D mask",
            f"give {ndim} positive voxel sizes in millimetres",
        )
    return values


def _union_box(union: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask, grown by one voxel on every side (inside the image)."""
    box = []
    for axis in range(union.ndim):
        others = tuple(i for i in range(union.ndim) if i != axis)
        hits = np.flatnonzero(union.any(axis=others))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, union.shape[axis])))
    return tuple(box)


# --------------------------------------------------------------------------- label maps


def check_labels(labels: np.ndarray, what: str = "label map") -> None:
    """Raise :class:`InputError` when ``labels`` holds values other than the BraTS 0, 1, 2, 4."""
    labels = np.asarray(labels)
    bad = ~np.isin(labels, LABELS)
    if not bad.any():
        return
    values = np.unique(labels[bad])
    shown = ", ".join(f"{v:g}" for v in values[:10].tolist()) + (" ..." if values.size > 10 else "")
    hint = "predictions and references must use the BraTS labels 0 background, 1 NCR/NET, 2 oedema, 4 enhancing tumour"
    if values.size == 1 and values[0] == 3:
        hint = "this looks like a BraTS 2023+ label map (3 = enhancing tumour): relabel 3 to 4 before scoring"
    raise InputError(f"{what} has label values {shown} outside the BraTS labels 0, 1, 2, 4", hint)


def score_case(
    pred_labels: np.ndarray, ref_labels: np.ndarray, spacing: Sequence[float]
) -> RegionScores:
    """Dice and HD95 (mm) per BraTS region: ``{"WT": {"dice": .., "hd95": ..}, "TC": .., "ET": ..}``."""
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise InputError(
            f"prediction shape {pred_labels.shape} differs from reference shape {ref_labels.shape}",
            "compare a prediction and a reference on the same voxel grid",
        )
    check_labels(pred_labels, "prediction")
    check_labels(ref_labels, "reference")
    return _score_regions(pred_labels, ref_labels, spacing)


def _score_regions(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing: Sequence[float]) -> RegionScores:
    scores = {}
    for region in REGIONS:
        pred, ref = region_mask(pred_labels, region), region_mask(ref_labels, region)
        scores[region] = {"dice": dice(pred, ref), "hd95": hd95(pred, ref, spacing)}
    return scores


def summarise(cases: Mapping[str, RegionScores]) -> dict[str, RegionScores]:
    """Mean and (population) standard deviation over cases: ``{"mean": {region: {dice, hd95}}, "std": ...}``."""
    if not cases:
        raise InputError("no scored cases to summarise", "score at least one prediction against a reference")
    summary: dict[str, RegionScores] = {"mean": {}, "std": {}}
    for region in REGIONS:
        summary["mean"][region], summary["std"][region] = {}, {}
        for metric in METRICS:
            values = np.array([scores[region][metric] for scores in cases.values()], dtype=np.float64)
            summary["mean"][region][metric] = float(values.mean())
            summary["std"][region][metric] = float(values.std())
    return summary


# --------------------------------------------------------------------------- files and folders


def score_files(pred_path: str | Path, ref_path: str | Path) -> RegionScores:
    """Score one predicted label file against its reference (same voxel grid required)."""
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    pred = load_volume(pred_path, kind="labels")
    ref = load_volume(ref_path, kind="labels")
    try:
        check_same_grid({"reference": ref, "prediction": pred})
    except InputError as exc:
        raise InputError(
            f"prediction {pred_path} and reference {ref_path} are not on the same voxel grid: {exc.message}",
            "score a prediction written on the reference's grid (same shape and affine), "
            "e.g. the output of `bigl segment` for that case's image",
        ) from None
    check_labels(pred.data, f"prediction {pred_path}")
    check_labels(ref.data, f"reference {ref_path}")
    return _score_regions(pred.data, ref.data, ref.spacing)


def case_name(path: str | Path) -> str:
    """Case name of a label file or case folder: ``.nii(.gz)`` (:func:`bigl.data.naming.case_name`) and
    suffixes like ``_seg`` stripped."""
    name = naming.case_name(path)
    stripped = True
    while stripped:
        stripped = False
        for suffix in LABEL_SUFFIXES:
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                name, stripped = name[: -len(suffix)], True
    return name


def find_label_files(path: str | Path) -> dict[str, Path]:
    """Label maps in a file or folder, by case name.

    A folder may hold ``<case>.nii.gz`` or ``<case>_seg.nii.gz`` files, or case folders (nested a
    few levels deep, like BraTS ``HGG/`` and ``LGG/``) with ``<case>_seg.nii.gz`` or
    ``<case>.nii.gz``. Modality images such as ``<case>_t1.nii.gz`` are skipped.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path} does not exist", "give a label file (.nii/.nii.gz) or a folder of them")
    if path.is_file():
        if not is_nifti_path(path):
            raise InputError(f"{path} is not a NIfTI file", "give a .nii or .nii.gz label map, or a folder of them")
        return {case_name(path): path}
    found: dict[str, Path] = {}
    root_depth = len(path.parts)
    for folder, dirs, files in os.walk(path):
        folder = Path(folder)
        depth = len(folder.parts) - root_depth
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < _MAX_DEPTH else []
        for file in sorted(files):
            if _is_label_file(file, None if depth == 0 else folder.name):
                _add_case(found, case_name(file), folder / file)
    if not found:
        raise InputError(
            f"no label maps found in {path}",
            "give a folder of <case>.nii.gz or <case>_seg.nii.gz files, or BraTS case folders with <case>_seg.nii.gz",
        )
    return found


def _is_label_file(name: str, case_folder: str | None) -> bool:
    """A NIfTI file that is not a modality image; inside a case folder, ``<case>_seg`` or ``<case>`` itself."""
    if name.startswith(".") or not is_nifti_path(name):
        return False
    parsed = parse_case_file(name)
    if parsed is not None and parsed[1] != "seg":
        return False
    has_suffix = case_name(name) != naming.case_name(name)
    return case_folder is None or has_suffix or case_name(name) == case_folder


def _add_case(found: dict[str, Path], name: str, file: Path) -> None:
    if name in found:
        raise InputError(
            f"case {name} has two label maps: {found[name]} and {file}",
            "keep one label map per case",
        )
    found[name] = file


@dataclass
class PathScores:
    """Scores of the predictions matched to references by case name."""

    cases: dict[str, RegionScores]  # case -> region -> {"dice", "hd95"}
    pairs: dict[str, tuple[Path, Path]]  # case -> (prediction, reference)
    missing_predictions: list[str] = field(default_factory=list)  # references without a prediction
    extra_predictions: list[str] = field(default_factory=list)  # predictions without a reference

    def summary(self) -> dict[str, RegionScores]:
        return summarise(self.cases)


def score_paths(
    pred: str | Path, ref: str | Path, *, progress: Callable[[int, int], None] | None = None
) -> PathScores:
    """Score a prediction file or folder against a reference file or folder.

    Two files are scored as one case (named after the reference); otherwise cases are matched by
    name (see :func:`find_label_files`). Unmatched cases are listed in the result; no match at all
    is an :class:`InputError`. ``progress(done, total)`` is called after each case.
    """
    pred, ref = Path(pred).expanduser(), Path(ref).expanduser()
    predictions, references = find_label_files(pred), find_label_files(ref)
    if pred.is_file() and ref.is_file():
        pairs = {next(iter(references)): (pred, ref)}
    else:
        pairs = {name: (predictions[name], references[name]) for name in sorted(references) if name in predictions}
    if not pairs:
        raise InputError(
            f"no prediction in {pred} matches a reference case in {ref} "
            f"(predictions: {_preview(predictions)}; references: {_preview(references)})",
            "name predictions after their case: <case>.nii.gz or <case>_seg.nii.gz, "
            "or BraTS case folders <case>/<case>_seg.nii.gz",
        )
    cases = {}
    for done, (name, (pred_file, ref_file)) in enumerate(pairs.items(), start=1):
        cases[name] = score_files(pred_file, ref_file)
        if progress is not None:
            progress(done, len(pairs))
    return PathScores(
        cases=cases,
        pairs=pairs,
        missing_predictions=sorted(set(references) - set(pairs)) if not ref.is_file() else [],
        extra_predictions=sorted(set(predictions) - set(pairs)) if not pred.is_file() else [],
    )


def _preview(names: Mapping[str, object], limit: int = 5) -> str:
    shown = sorted(names)[:limit]
    return ", ".join(shown) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------- tables


def _cell(value: float, std: float | None = None, *, percent: bool = False) -> str:
    scale = 100.0 if percent else 1.0
    text = f"{value * scale:.2f}"
    return text if std is None else f"{text} ± {std * scale:.2f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_label(metric: str) -> str:
    return "Dice (%)" if metric == "dice" else "HD95 (mm)"


def _summary_cells(summary: Mapping[str, RegionScores], metric: str) -> list[str]:
    """``mean ± std`` per region, then the average over regions of the means."""
    percent = metric == "dice"
    cells = [_cell(summary["mean"][r][metric], summary["std"][r][metric], percent=percent) for r in REGIONS]
    average = float(np.mean([summary["mean"][r][metric] for r in REGIONS]))
    return [*cells, _cell(average, percent=percent)]


def format_summary_markdown(summary: Mapping[str, RegionScores], title: str | None = None) -> str:
    """Mean ± std per region as a Markdown table (Dice in percent, HD95 in mm), like Tables 1-2 of the paper.

    The Average column is the mean over the three regions of the per-region means.
    """
    rows = [[_metric_label(metric), *_summary_cells(summary, metric)] for metric in METRICS]
    table = _markdown(["Metric", *REGIONS, "Average"], rows)
    return f"**{title}**\n\n{table}" if title else table


def format_comparison_markdown(summaries: Mapping[str, Mapping], metric: str = "dice") -> str:
    """One row per method (``{method: summary}``) for one metric, like Table 1 (Dice) or 2 (HD95) of the paper."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
    rows = [[method, *_summary_cells(summary, metric)] for method, summary in summaries.items()]
    return _markdown([f"Method: {_metric_label(metric)}", *REGIONS, "Average"], rows)


def format_case_table(cases: Mapping[str, RegionScores]) -> str:
    """Per-case Markdown table: Dice (%) and HD95 (mm) for each region."""
    columns = [(metric, region) for metric in METRICS for region in REGIONS]
    header = ["Case"] + [_metric_label(m).replace(" (", f" {r} (") for m, r in columns]
    rows = [[name] + [_cell(scores[r][m], percent=m == "dice") for m, r in columns] for name, scores in cases.items()]
    return _markdown(header, rows)


def write_cases_csv(
    path: str | Path,
    cases: Mapping[str, RegionScores],
    pairs: Mapping[str, tuple[Path, Path]] | None = None,
) -> Path:
    """One row per case: ``case``, Dice (0-1) and HD95 (mm) per region, and the files when ``pairs`` is given.
    Written atomically (:func:`bigl.files.atomic_write_text`); InputError when it cannot be written."""
    from bigl.files import atomic_write_text

    path = Path(path).expanduser()
    header = ["case", *CSV_COLUMNS] + (["prediction", "reference"] if pairs is not None else [])
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(header)
    for name, scores in cases.items():
        row = [name] + [f"{scores[r][m]:.8g}" for r in REGIONS for m in METRICS]
        if pairs is not None:
            row += [str(p) for p in pairs[name]]
        writer.writerow(row)
    return atomic_write_text(path, table.getvalue())
