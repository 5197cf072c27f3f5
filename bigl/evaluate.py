"""Evaluate a model bundle on a labelled data folder: segment one modality of every case, score it.

For every case that has the chosen modality and a label map, the image is segmented (optionally
after an input ``transform``, e.g. a no-learning baseline from :mod:`bigl.baselines`) and scored
with :mod:`bigl.metrics` (Dice and HD95 for WT / TC / ET). Cases without labels or without the
modality are listed and skipped.

Written to the output folder (all optional except the summary):

* ``cases.csv``           one row per case (:func:`bigl.metrics.write_cases_csv`)
* ``summary.md``          mean ± std per region in the layout of Tables 1-2 of the paper, then per case,
                          and the cases the model was unsure of (tumour confidence below its floor)
* ``summary.json``        everything :func:`evaluate_bundle` returns (with each case's tumour confidence,
                          and with ``contrast_search`` the gamma chosen for it)
* ``predictions/<case>_seg.nii.gz``  the label maps, on each input's grid
* ``cases.png``           a few cases (best, median, worst mean Dice) in three planes:
                          input, prediction, ground truth
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bigl.data.brats import data_folders
from bigl.errors import InputError

#: Display names of the bundle training methods in tables.
METHOD_NAMES = {"bigl": "BiGL", "source-only": "Source only", "target-only": "Target only"}
Transform = Callable[[np.ndarray], np.ndarray]


@dataclass
class CaseSelection:
    """The cases of a folder split by whether they can be evaluated."""

    evaluable: list = field(default_factory=list)  # bigl.data.brats.Case with the modality and labels
    unlabelled: list[str] = field(default_factory=list)
    missing_modality: list[str] = field(default_factory=list)


def select_cases(data_dir: str | Path | Sequence[str | Path], modality: str, cases: Sequence[str] | None = None) -> CaseSelection:
    """Split the cases of ``data_dir`` (optionally only those named in ``cases``) by evaluability."""
    from bigl.data.brats import find_cases

    found = find_cases(data_dir)
    if cases:
        by_name = {case.name: case for case in found}
        unknown = [name for name in cases if name not in by_name]
        if unknown:
            shown = ", ".join(sorted(by_name)[:8]) + (" ..." if len(by_name) > 8 else "")
            raise InputError(f"case(s) {', '.join(unknown)} not found in {data_dir}", f"choose among: {shown}")
        found = [by_name[name] for name in dict.fromkeys(cases)]
    selection = CaseSelection()
    for case in found:
        if not case.has(modality):
            selection.missing_modality.append(case.name)
        elif case.labels is None:
            selection.unlabelled.append(case.name)
        else:
            selection.evaluable.append(case)
    if not selection.evaluable:
        raise InputError(
            f"no case in {data_dir} has both a {modality} image and a label map "
            f"({len(selection.unlabelled)} without labels, {len(selection.missing_modality)} without {modality})",
            f"evaluate on labelled cases (<case>_seg.nii.gz beside <case>_{modality}.nii.gz)",
        )
    return selection


def method_label(metadata: dict, transform: Transform | None = None, *, members: int = 0) -> str:
    """Table row name: the bundle's training method (of an ensemble's first model, with the number of
    models), plus the input transform if any."""
    label = METHOD_NAMES.get(metadata.get("method", ""), str(metadata.get("method", "model")))
    if members:
        label += f" (ensemble of {members})"
    if transform is not None:
        label += f" + {getattr(transform, 'name', 'transform')}"
    return label


def evaluate_bundle(
    model,
    data_dir: str | Path | Sequence[str | Path],
    modality: str | None = None,
    out_dir: str | Path | None = None,
    *,
    cases: Sequence[str] | None = None,
    device: str = "auto",
    transform: Transform | None = None,
    name: str | None = None,
    save_predictions: bool = True,
    figure: bool = True,
    figure_cases: int = 3,
    batch_size: int = 16,
    num_threads: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Segment and score every labelled case of ``data_dir`` in ``modality``.

    ``model``: a bundle path, a list of them (an ensemble, :mod:`bigl.ensemble`), a loaded
    :class:`~bigl.bundle.Bundle` or a :class:`~bigl.prediction.Predictor` of any engine (reused,
    e.g. by the demo), or None for the shipped default model. ``modality`` defaults to the one the model
    segments. ``transform``: applied to each image before prediction (a baseline such as
    :class:`bigl.baselines.InvertHistMatch`); the figure shows the untransformed input.
    ``name``: the method's row name in tables (default: from the bundle and the transform).
    ``out_dir``: where to write the files listed in the module docstring (nothing is written when
    None). ``log``: receives the notes on skipped cases (default: printed to stderr).

    Returns ``{"method", "model", "data", "modality", "model_modality", "source_modality",
    "transform", "cases": {case: {region: {"dice", "hd95"}}}, "summary": {"mean", "std"},
    "n_cases", "skipped": {"unlabelled": [...], "missing_modality": [...]}, "outputs": {...},
    "seconds"}``.
    """
    from bigl.bundle import Bundle
    from bigl.data.brats import normalise_modality
    from bigl.data.io import check_same_grid, save_volume
    from bigl.files import atomic_write_text
    from bigl.inference import BiGLPredictor
    from bigl.metrics import score_case, summarise, write_cases_csv
    from bigl.prediction import Predictor, open_predictor

    started = time.perf_counter()
    log = log or (lambda message: print(message, file=sys.stderr))
    if isinstance(model, Predictor):
        predictor = model
    elif isinstance(model, Bundle):
        predictor = BiGLPredictor(model, device=device, batch_size=batch_size, num_threads=num_threads)
    elif isinstance(model, (list, tuple)):
        predictor = open_predictor(list(model), engine="torch", device=device, batch_size=batch_size, num_threads=num_threads)
    else:
        predictor = BiGLPredictor.from_path(model, device=device, batch_size=batch_size, num_threads=num_threads)
    metadata = predictor.metadata
    modality = normalise_modality(modality or predictor.modality)
    predictor.check_modality(modality, source=" (the modality to evaluate)")
    selection = select_cases(data_dir, modality, cases)
    if selection.unlabelled:
        log(f"skipped {len(selection.unlabelled)} case(s) without labels: {', '.join(selection.unlabelled)}")
    if selection.missing_modality:
        log(f"skipped {len(selection.missing_modality)} case(s) without a {modality} image: "
            f"{', '.join(selection.missing_modality)}")

    out = Path(out_dir).expanduser() if out_dir is not None else None
    if out is not None:
        _check_outputs(out, selection.evaluable, modality, predictor, save_predictions=save_predictions,
                       figure=figure and figure_cases > 0)
    scratch = None
    if out is not None and save_predictions:
        prediction_dir = out / "predictions"
    elif out is not None and figure:
        scratch = tempfile.TemporaryDirectory(prefix="bigl-eval-")  # predictions kept only for the figure
        prediction_dir = Path(scratch.name)
    else:
        prediction_dir = None

    try:
        scores: dict[str, dict[str, dict[str, float]]] = {}
        confidence: dict[str, float | None] = {}
        contrast: dict[str, float] = {}
        prediction_files: dict[str, Path] = {}
        for case in _progress_bar(selection.evaluable, progress, f"evaluating {modality}"):
            image = case.load_image(modality)
            truth = case.load_labels()
            check_same_grid({f"{case.name} {modality}": image, f"{case.name} labels": truth})
            try:
                data = image.data if transform is None else _transformed(transform, image.data, case.name)
                prediction = predictor.predict(data, image.affine, name=image.name, progress=_quiet, modality=modality)
            except InputError as error:
                if case.name in error.message:
                    raise
                raise InputError(f"{case.name} ({image.path}): {error.message}", error.hint) from error
            for warning in prediction.warnings:
                log(f"warning: {warning}")
            scores[case.name] = score_case(prediction.labels, truth.data, truth.spacing)
            confidence[case.name] = prediction.confidence
            if prediction.contrast_gamma is not None:
                contrast[case.name] = prediction.contrast_gamma
            if prediction_dir is not None:
                prediction_files[case.name] = save_volume(prediction_dir / f"{case.name}_seg.nii.gz", prediction.labels,
                                                          image.affine, dtype=np.uint8, like=image.path, output=True)

        result = {
            "method": name or method_label(metadata, transform, members=len(getattr(predictor, "members", ()))),
            "model": str(predictor.model_path) if predictor.model_path is not None else None,
            "data": ", ".join(str(folder) for folder in data_folders(data_dir)),
            "modality": modality,
            "model_modality": predictor.modality,
            "source_modality": predictor.source_modality,
            "transform": getattr(transform, "name", repr(transform)) if transform is not None else None,
            "inference": predictor.inference_options(),
            "cases": scores,
            "confidence": confidence,
            "confidence_floor": predictor.confidence_floor,
            "contrast_gamma": contrast or None,
            "summary": summarise(scores),
            "n_cases": len(scores),
            "skipped": {"unlabelled": selection.unlabelled, "missing_modality": selection.missing_modality},
            "outputs": {},
        }
        if out is not None:
            outputs = result["outputs"]
            outputs["csv"] = str(write_cases_csv(out / "cases.csv", scores))
            if save_predictions:
                outputs["predictions"] = str(prediction_dir)
            if figure and figure_cases > 0:
                chosen = figure_case_names(scores, figure_cases)
                cases_by_name = {case.name: case for case in selection.evaluable}
                outputs["figure"] = str(save_evaluation_figure(
                    out / "cases.png", [cases_by_name[c] for c in chosen], modality, prediction_files, scores,
                    title=f"{result['method']} on {modality.upper()}"))
            outputs["markdown"] = str(out / "summary.md")
            outputs["json"] = str(out / "summary.json")
            result["seconds"] = round(time.perf_counter() - started, 3)
            atomic_write_text(out / "summary.md", format_report_markdown(result))
            atomic_write_text(out / "summary.json", json.dumps(result, indent=1) + "\n")
        result["seconds"] = round(time.perf_counter() - started, 3)
        return result
    finally:
        if scratch is not None:
            scratch.cleanup()


#: The files of ``out_dir`` (besides ``predictions/``), by what they are.
OUTPUT_FILES = {"case table": "cases.csv", "summary": "summary.md", "JSON summary": "summary.json", "figure": "cases.png"}


def _check_outputs(out: Path, cases: list, modality: str, predictor, *, save_predictions: bool, figure: bool) -> None:
    """The output folder takes files, and no output is a file the evaluation reads
    (:func:`bigl.files.check_outputs`); checked before the first case is segmented."""
    from bigl.files import check_outputs, check_writable_folder
    from bigl.prediction import model_paths

    outputs = {what: out / name for what, name in OUTPUT_FILES.items() if figure or name != "cases.png"}
    if save_predictions:
        outputs.update({f"prediction of {case.name}": out / "predictions" / f"{case.name}_seg.nii.gz" for case in cases})
    read = [path for case in cases for path in (case.images[modality], case.labels)]
    check_outputs(outputs, [*read, *model_paths(predictor)], case_folders={case.folder for case in cases},
                  hint="choose an --out folder of its own, outside the case folders")
    check_writable_folder(out)


def _transformed(transform: Transform, data: np.ndarray, case: str) -> np.ndarray:
    out = np.asarray(transform(data))
    if out.shape != data.shape:
        raise InputError(f"the input transform changed the shape of {case} from {data.shape} to {out.shape}",
                         "use a transform that maps a volume to a volume of the same shape")
    return out


def _quiet(done: int, total: int) -> None:
    """Per-slice progress is not shown during evaluation (there is one bar over the cases)."""


def _progress_bar(items: list, enabled: bool, description: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="case", leave=False, disable=None, file=sys.stderr)


def mean_dice(region_scores: dict[str, dict[str, float]]) -> float:
    """Mean Dice over the regions of one case."""
    return float(np.mean([scores["dice"] for scores in region_scores.values()]))


def figure_case_names(scores: dict[str, dict[str, dict[str, float]]], count: int) -> list[str]:
    """Up to ``count`` cases spread over the range of mean Dice, best first (best, median, worst for 3)."""
    ranked = sorted(scores, key=lambda case: (-mean_dice(scores[case]), case))
    if count >= len(ranked):
        return ranked
    if count == 1:
        return [ranked[len(ranked) // 2]]
    positions = np.linspace(0, len(ranked) - 1, count).round().astype(int)
    return [ranked[i] for i in dict.fromkeys(positions.tolist())]


def dice_note(region_scores: dict[str, dict[str, float]]) -> str:
    """Short Dice line for figure titles: ``"Dice % WT 81 TC 64 ET 40"``."""
    return "Dice % " + " ".join(f"{region} {100 * values['dice']:.0f}" for region, values in region_scores.items())


def save_evaluation_figure(path: Path, cases: list, modality: str, prediction_files: dict[str, Path],
                           scores: dict[str, dict[str, dict[str, float]]], *, title: str | None = None) -> Path:
    """``cases.png``: for each case three planes through the tumour; input, prediction, ground truth."""
    from bigl.data.io import load_volume
    from bigl.figures import FigureCase, save_case_figure

    figure_cases = []
    for case in cases:
        image = case.load_image(modality)
        truth = case.load_labels().data
        prediction = load_volume(prediction_files[case.name], kind="labels").data
        figure_cases.append(FigureCase(
            name=case.name, image=image.data, affine=image.affine, image_title=f"input ({modality.upper()})",
            label_maps={"prediction": prediction, "ground truth": truth}, centre_labels=truth,
            notes={"prediction": dice_note(scores[case.name])}))
    return save_case_figure(path, figure_cases, title=title)


def format_report_markdown(result: dict) -> str:
    """``summary.md``: Tables 1-2 layout (Dice, HD95) for the method, then the per-case table."""
    from bigl.metrics import format_case_table, format_comparison_markdown

    summaries = {result["method"]: result["summary"]}
    lines = [
        f"# Evaluation: {result['method']} on {result['modality'].upper()}",
        "",
        f"Model: `{result['model']}`  ",
        f"Data: `{result['data']}` ({result['n_cases']} labelled case(s) evaluated)",
        "",
        "Mean ± standard deviation over cases; Average is the mean over the three regions.",
        "",
        format_comparison_markdown(summaries, "dice"),
        "",
        format_comparison_markdown(summaries, "hd95"),
        "",
        "## Cases",
        "",
        format_case_table(result["cases"]),
        "",
    ]
    floor = result.get("confidence_floor")
    unsure = {case: value for case, value in result.get("confidence", {}).items()
              if floor is not None and value is not None and value < floor}
    if unsure:
        lines += [f"The model was unsure of (tumour confidence below its floor of {floor:.2f}): "
                  + ", ".join(f"{case} ({value:.2f})" for case, value in unsure.items()), ""]
    other_views = {case: gamma for case, gamma in (result.get("contrast_gamma") or {}).items() if gamma != 1.0}
    if other_views:
        lines += ["Segmented at another contrast by the contrast search (brain intensities to the power gamma): "
                  + ", ".join(f"{case} (gamma {gamma:g})" for case, gamma in other_views.items()), ""]
    skipped = result["skipped"]
    if skipped["unlabelled"]:
        lines += [f"Skipped (no labels): {', '.join(skipped['unlabelled'])}", ""]
    if skipped["missing_modality"]:
        lines += [f"Skipped (no {result['modality']} image): {', '.join(skipped['missing_modality'])}", ""]
    return "\n".join(lines)


def format_summary_text(result: dict) -> str:
    """The two summary tables printed by ``bigl evaluate``."""
    from bigl.metrics import format_comparison_markdown

    summaries = {result["method"]: result["summary"]}
    return "\n\n".join([
        format_comparison_markdown(summaries, "dice"),
        format_comparison_markdown(summaries, "hd95"),
    ])
