"""``bigl demo``: the whole method on synthetic data, in a few minutes on a laptop CPU.

1. Phantom cohort (:func:`bigl.data.phantoms.write_cohort`): training cases with T1 (the labelled
   source modality) and T2 (the unlabelled target), and separate test cases, drawn from another
   seed and never seen in training, whose T2 images and labels are used only for scoring.
2. Training with a small config (``cpu``; ``smoke`` with ``quick``): a source-only model (T1 labels
   only), a BiGL model (T1 labels + unlabelled T2) and a target-only model (the training phantoms'
   T2 labels: the supervised level BiGL is measured against, as in the real-data tables), all
   through :func:`bigl.training.run_training` and with :data:`RECIPE_OVERRIDES`, BiGL also with
   :data:`BIGL_OVERRIDES`.
3. Evaluation on the T2 test cases (:func:`bigl.evaluate.evaluate_bundle`) of the source-only
   model, of the source-only model behind the no-learning ``invert-histmatch`` translation
   (:mod:`bigl.baselines`, reference histogram from the T1 training images), of BiGL and of
   target-only.
4. A method x region table of mean Dice (and HD95), and a figure comparing the methods on a few
   test cases.

Everything goes under one output folder: ``data/{train,test}``, ``runs/<method>`` (training runs),
``eval/<method>`` (evaluation tables, figures, predictions), ``results.json``, ``results.md`` and
``comparison.png``. A rerun replaces those subfolders, so the demo only works in a folder that is
new, holds none of them, or is marked as a demo folder (:data:`MARKER`, written on the first run).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from bigl.errors import ConfigError, InputError
from bigl.files import atomic_write_text, make_folder

SOURCE_MODALITY = "t1"
TARGET_MODALITY = "t2"
DEFAULT_OUT = Path("bigl-demo")
#: Methods in table order: key in JSON -> display name.
METHODS: dict[str, str] = {
    "source-only": "Source only",
    "invert-histmatch": "Source only + invert-histmatch",
    "bigl": "BiGL",
    "target-only": "Target only (T2 labels, upper bound)",
}
#: Methods that are trained, in training order (invert-histmatch reuses the source-only model).
TRAINED = ("source-only", "bigl", "target-only")
#: Seed of the test cohort, far from the training seed so no case is shared.
TEST_SEED_OFFSET = 1000
#: File that marks a folder as the demo's own: its subfolders below are the demo's to replace.
MARKER = ".bigl-demo"
REPLACED = ("data", "runs", "eval")
#: Beyond the paper, for both trained models, as in the ``reference`` config: the Dice term scores the
#: BraTS regions (WT, TC, ET) as the table does (``adapt.dice``; with the paper's generalised Dice the
#: small models of the demo find no tumour core) and the weights are averaged (``adapt.ema_decay``).
RECIPE_OVERRIDES = ("adapt.dice=regions", "adapt.ema_decay=0.99")
#: Beyond the paper, for the BiGL model only, as in the ``reference`` config: two rounds of
#: self-training on its own confident labels of the unlabelled T2 images (docs/training.md), as many
#: steps in all as the adaptation (``adapt.self_training_iterations``, set by
#: :func:`training_overrides`). The source-only model stays without it, so that the invert +
#: histogram-match baseline remains the no-learning inversion.
BIGL_OVERRIDES = ("adapt.self_training_rounds=2", "adapt.pseudo_views=target")
#: What each trained method adds to RECIPE_OVERRIDES; only target-only reads the T2 labels.
METHOD_OVERRIDES = {"bigl": BIGL_OVERRIDES, "target-only": ("data.target_labels=true",)}


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of a demo run."""

    config: str = "cpu"  # ready training config
    train_cases: int = 24  # phantoms cost seconds and training time does not grow with their number
    test_cases: int = 8
    size: int = 64  # phantom field of view in voxels
    seed: int = 0

    @classmethod
    def for_mode(cls, quick: bool, train_cases: int | None = None, test_cases: int | None = None,
                 seed: int = 0) -> "DemoSettings":
        base = cls(config="smoke", train_cases=3, test_cases=2, size=48, seed=seed) if quick else cls(seed=seed)
        changes = {}
        if train_cases is not None:
            changes["train_cases"] = train_cases
        if test_cases is not None:
            changes["test_cases"] = test_cases
        settings = DemoSettings(**{**asdict(base), **changes})
        for count, what, option in ((settings.train_cases, "training case", "--cases"),
                                    (settings.test_cases, "test case", "--test-cases")):
            if count < 1:
                raise ConfigError(f"the demo needs at least one {what}, got {option} {count}", f"use e.g. {option} 4")
        return settings


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_data(out: Path, settings: DemoSettings) -> tuple[Path, Path]:
    """Write the training and test phantom cohorts (fresh folders); returns their paths."""
    from bigl.data.phantoms import write_cohort

    train, test = out / "data" / "train", out / "data" / "test"
    for folder in (train, test):
        if folder.exists():
            shutil.rmtree(folder)
    modalities = (SOURCE_MODALITY, TARGET_MODALITY)
    write_cohort(train, cases=settings.train_cases, size=settings.size, seed=settings.seed,
                 modalities=modalities, prefix="PhantomTrain")
    write_cohort(test, cases=settings.test_cases, size=settings.size, seed=settings.seed + TEST_SEED_OFFSET,
                 modalities=modalities, prefix="PhantomTest")
    return train, test


def training_overrides(method: str, train: Path, device: str, seed: int, threads: int | None = None,
                       config: str = "cpu") -> list[str]:
    """Config overrides of a demo training run with the ready ``config``: T1 labelled source, T2
    target (its labels read by target-only alone), the same training cases for both."""
    from bigl.training import load_config

    overrides = [
        f"data.source_dir={train}",
        f"data.source_modality={SOURCE_MODALITY}",
        f"data.target_dir={train}",
        f"data.target_modality={TARGET_MODALITY}",
        f"adapt.method={method}",
        f"run.device={device}",
        f"run.seed={seed}",
        *RECIPE_OVERRIDES,
        *METHOD_OVERRIDES.get(method, ()),
    ]
    if method == "bigl":
        overrides.append(f"adapt.self_training_iterations={load_config(config)['adapt']['iterations']}")
    if threads is not None:
        overrides.append(f"run.threads={threads}")
    return overrides


def train_model(method: str, train: Path, run_dir: Path, settings: DemoSettings, device: str,
                progress: bool, threads: int | None = None) -> Path:
    """Train one method with the demo's config into a fresh ``run_dir``; returns the bundle."""
    from bigl.training import load_config, run_training

    config = load_config(settings.config, training_overrides(method, train, device, settings.seed, threads, settings.config))
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return Path(run_training(config, run_dir, stage="all", resume=False, progress=progress))


def results_table(evaluations: dict[str, dict], metric: str = "dice") -> dict[str, dict[str, float]]:
    """``{method: {region: mean}}`` of one metric (Dice as a fraction 0-1, HD95 in mm)."""
    return {
        method: {region: round(float(values[metric]), 4) for region, values in result["summary"]["mean"].items()}
        for method, result in evaluations.items()
    }


def format_results(evaluations: dict[str, dict]) -> str:
    """The demo's table: methods x regions, Dice (%) then HD95 (mm), mean ± std over test cases."""
    from bigl.metrics import format_comparison_markdown

    summaries = {METHODS.get(method, method): result["summary"] for method, result in evaluations.items()}
    return "\n\n".join(format_comparison_markdown(summaries, metric) for metric in ("dice", "hd95"))


def save_comparison_figure(path: Path, test: Path, evaluations: dict[str, dict], cases: int = 2) -> Path:
    """A few test cases in three planes: T2 input, each method's prediction, ground truth."""
    from bigl.data.brats import find_cases
    from bigl.data.io import load_volume
    from bigl.evaluate import dice_note, figure_case_names
    from bigl.figures import FigureCase, save_case_figure

    reference = evaluations.get("bigl") or next(iter(evaluations.values()))
    chosen = figure_case_names(reference["cases"], cases)
    by_name = {case.name: case for case in find_cases(test)}
    figure_cases = []
    for name in chosen:
        case = by_name[name]
        image = case.load_image(TARGET_MODALITY)
        truth = case.load_labels().data
        maps = {
            METHODS.get(method, method): load_volume(Path(result["outputs"]["predictions"]) / f"{name}_seg.nii.gz",
                                                     kind="labels").data
            for method, result in evaluations.items()
        }
        maps["ground truth"] = truth
        notes = {METHODS.get(method, method): dice_note(result["cases"][name]) for method, result in evaluations.items()}
        figure_cases.append(FigureCase(name=name, image=image.data, affine=image.affine, label_maps=maps,
                                       centre_labels=truth, image_title=f"input ({TARGET_MODALITY.upper()})",
                                       notes=notes))
    return save_case_figure(path, figure_cases, title=f"{SOURCE_MODALITY.upper()} -> {TARGET_MODALITY.upper()} on test phantoms")


def run_demo(
    out_dir: str | Path = DEFAULT_OUT,
    *,
    quick: bool = False,
    train_cases: int | None = None,
    test_cases: int | None = None,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = _stderr,
) -> dict:
    """Run the demo (see the module docstring); returns ``results.json``'s content.

    ``{"settings", "dice": {method: {region: mean}}, "hd95": {...}, "evaluations": {method: evaluate
    result}, "seconds": {"data", "train_<method>", "evaluate", "total"}, "outputs": {...}}``.
    ``threads``: CPU threads for PyTorch (default: PyTorch's choice, one per core).
    """
    from bigl.baselines import make_baseline, reference_from_folder
    from bigl.evaluate import evaluate_bundle
    from bigl.inference import BiGLPredictor

    settings = DemoSettings.for_mode(quick, train_cases, test_cases, seed)
    out = claim_folder(Path(out_dir).expanduser())
    seconds: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 2)
        clock = now

    steps = len(TRAINED) + 2
    log(f"[1/{steps}] phantoms: {settings.train_cases} training and {settings.test_cases} test cases "
        f"({settings.size}^3, {SOURCE_MODALITY.upper()} labelled source, {TARGET_MODALITY.upper()} target) in {out / 'data'}")
    train, test = make_data(out, settings)
    lap("data")

    bundles = {}
    for step, method in enumerate(TRAINED, start=2):
        log(f"[{step}/{steps}] training {METHODS[method]} with the '{settings.config}' config in {out / 'runs' / method}")
        bundles[method] = train_model(method, train, out / "runs" / method, settings, device, progress, threads)
        lap(f"train_{method}")

    log(f"[{steps}/{steps}] evaluating on the {settings.test_cases} {TARGET_MODALITY.upper()} test cases")
    source_only = BiGLPredictor.from_path(bundles["source-only"], device=device, num_threads=threads)
    baseline = make_baseline("invert-histmatch", reference_from_folder(train, SOURCE_MODALITY))
    runs = {
        "source-only": (source_only, None),
        "invert-histmatch": (source_only, baseline),
        "bigl": (BiGLPredictor.from_path(bundles["bigl"], device=device, num_threads=threads), None),
        "target-only": (BiGLPredictor.from_path(bundles["target-only"], device=device, num_threads=threads), None),
    }
    evaluations = {}
    for method, (predictor, transform) in runs.items():
        eval_dir = out / "eval" / method
        if eval_dir.exists():
            shutil.rmtree(eval_dir)
        evaluations[method] = evaluate_bundle(predictor, test, TARGET_MODALITY, eval_dir, transform=transform,
                                              name=METHODS[method], progress=progress, log=log)
    figure = save_comparison_figure(out / "comparison.png", test, evaluations)
    lap("evaluate")
    seconds["total"] = round(time.perf_counter() - started, 2)

    results = {
        "settings": {**asdict(settings), "source_modality": SOURCE_MODALITY, "target_modality": TARGET_MODALITY},
        "dice": results_table(evaluations, "dice"),
        "hd95": results_table(evaluations, "hd95"),
        "evaluations": evaluations,
        "seconds": seconds,
        "outputs": {
            "results_json": str(out / "results.json"),
            "results_markdown": str(out / "results.md"),
            "comparison_figure": str(figure),
            "bundles": {method: str(path) for method, path in bundles.items()},
        },
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(
        out / "results.md",
        f"# BiGL demo: {SOURCE_MODALITY.upper()} -> {TARGET_MODALITY.upper()} on phantoms\n\n"
        f"{settings.test_cases} test case(s); mean ± std over cases.\n\n{format_results(evaluations)}\n")
    return results


def claim_folder(out: Path) -> Path:
    """Make ``out`` the demo's folder; InputError when it holds a data/, runs/ or eval/ folder the
    demo did not write (a rerun replaces those: the user's own must never be)."""
    if out.is_dir() and not (out / MARKER).exists() and not (out / "results.json").exists():
        foreign = [name for name in REPLACED if (out / name).exists()]
        if foreign:
            raise InputError(
                f"--out {out} holds {', '.join(f'{name}/' for name in foreign)} that a BiGL demo did not write; "
                "the demo replaces its data/, runs/ and eval/ subfolders, so it does not run there",
                "choose a new or empty folder for the demo (the default is ./bigl-demo)",
            )
    make_folder(out)
    if not (out / MARKER).exists():
        atomic_write_text(out / MARKER, "Written by `bigl demo`: its data/, runs/ and eval/ are replaced by a rerun.\n")
    return out


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool = True):
    """Send anything printed to stdout to stderr (keeps stdout for the JSON result)."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield
