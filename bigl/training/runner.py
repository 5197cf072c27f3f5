"""``run_training``: checks, run folder, data, and the two stages in order.

Everything that can be wrong with a run is checked before the first step (config values, data
folders and modalities, labels, the translator a stage-2-only run needs, the device, disk space)
and reported as a :class:`ConfigError`; any failure also ends the event log with an ``error``
event. The run folder's files are listed in :mod:`bigl.runfolder`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bigl.bundle import resolve_device
from bigl.errors import BiGLError, ConfigError
from bigl.files import atomic_write_text, check_writable_folder
from bigl.runplan import config_value, estimate_run
from bigl.training.config import config_differences, validate_config
from bigl.training.data import StepSampler, find_training_cases, load_training_data
from bigl.training.distributed import DistributedContext, env_int, init_distributed
from bigl.runfolder import CONFIG_FILE, EVENTS_FILE, RUN_STAGES, TRANSLATOR_FILE
from bigl.training.events import EventLog
from bigl.training.loop import RunContext
from bigl.training.sections import TrainingConfig

#: Room for sample figures, the loss plot and the event log.
_DISK_MARGIN_BYTES = 64 * 2**20


def run_training(config: dict, out_dir: str | os.PathLike, *, stage: str = "all", resume: bool = False, progress: bool = True,
                 branch_from: str | os.PathLike | None = None) -> Path:
    """Train into ``out_dir`` and return the path of the stage's result (``model.safetensors``,
    or ``translator.safetensors`` for ``stage="translator"``)."""
    return TrainingRun(config, out_dir, stage=stage, resume=resume, progress=progress, branch_from=branch_from).execute()


def plan_stages(config: TrainingConfig, stage: str) -> list[str]:
    """The stages a run executes, in order."""
    if stage not in RUN_STAGES:
        raise ConfigError(f"unknown stage {stage!r}", f"use one of: {', '.join(RUN_STAGES)}")
    method = config.adapt.method
    if method != "bigl":
        if stage == "translator":
            raise ConfigError(f"method {method} trains no translator", "use --stage adapt or --stage all, or method bigl")
        return ["adapt"]
    return ["translator", "adapt"] if stage == "all" else [stage]


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


class TrainingRun:
    """One invocation of training. ``execute`` = ``prepare`` + the stages; tests use the parts."""

    def __init__(self, config: dict, out_dir: str | os.PathLike, *, stage: str = "all", resume: bool = False, progress: bool = True,
                 branch_from: str | os.PathLike | None = None):
        self.raw_config = config
        #: a run folder to branch off at the end of its adversarial phase (bigl.training.branch)
        self.branch_from = Path(branch_from).expanduser().resolve() if branch_from is not None else None
        self.out_dir = Path(out_dir).expanduser().resolve()
        self.stage = stage
        self.resume = resume
        self.progress = progress
        self.log = EventLog(self.out_dir / EVENTS_FILE, enabled=env_int("RANK", 0) == 0)
        self.dist: DistributedContext | None = None
        self.ctx: RunContext | None = None
        self.trainers: dict[str, Any] = {}
        self.stages: list[str] = []

    # -- checks -------------------------------------------------------------------------------
    def _check_folder(self, config: TrainingConfig) -> None:
        stored = self.out_dir / CONFIG_FILE
        if not stored.exists():
            return
        if not self.resume:
            raise ConfigError(
                f"{self.out_dir} already holds a training run",
                "continue it with --resume, or choose a new --out folder",
            )
        try:
            old = json.loads(stored.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {stored}: {exc}", "restore the file or start a new run in another folder") from None
        new = config.to_dict()
        changed = config_differences(old, new)
        if changed:
            details = "; ".join(f"{key}: {json.dumps(config_value(old, key))} -> {json.dumps(config_value(new, key))}" for key in changed[:4])
            raise ConfigError(
                f"the config differs from the one the run in {self.out_dir} was started with ({details})",
                "resume with the same config (only run.* settings such as device, logging and checkpoint "
                "intervals may change), or start a new run in another --out folder",
            )

    def _branch_config(self, config: TrainingConfig) -> tuple[TrainingConfig, TrainingConfig]:
        """(the branch's config: checked against the parent's, with its translator; the parent's
        config). A branch trains stage 2 only, in one process."""
        from bigl.training.branch import branch_config, parent_config

        if self.stage == "translator":
            raise ConfigError("--branch-from trains stage 2 only", "use --stage adapt (or all)")
        if env_int("WORLD_SIZE", 1) > 1:
            raise ConfigError("--branch-from runs in one process",
                              "start the branch in one process, stop it, and continue it with torchrun ... --resume")
        self.stage = "adapt"
        parent = parent_config(self.branch_from)
        return branch_config(self.branch_from, parent, config), parent

    def _start_branch(self, parent: TrainingConfig, config: TrainingConfig) -> None:
        """A new branch folder gets the parent's checkpoint of its branch point; the run resumes from it."""
        from bigl.training.branch import branch_checkpoint

        step = branch_checkpoint(self.branch_from, parent, config, self.out_dir)
        self.log.write("branch", parent=str(self.branch_from), step=step)
        self.resume = True

    def _translator_file(self, config: TrainingConfig) -> Path:
        given = config.adapt.translator_bundle
        return Path(given).expanduser() if given else self.out_dir / TRANSLATOR_FILE

    def _check_disk(self, config: TrainingConfig, stages: list[str], cases: dict[str, list]) -> None:
        check_writable_folder(self.out_dir)  # a read-only place is that, not "too little space"
        needed = estimate_disk_bytes(config, stages, _slice_count(config, cases.get("target", [])))
        folder = self.out_dir
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise ConfigError(
                f"not enough disk space in {folder}: the run needs about {needed / 2**20:.0f} MB "
                f"(checkpoints, bundles, samples), {free / 2**20:.0f} MB are free",
                "free some space, lower run.keep_checkpoints, or choose another --out folder",
            )

    # -- preparation --------------------------------------------------------------------------
    def prepare(self) -> RunContext:
        """Validate everything, join the process group and load the data (nothing is written but events)."""
        config = TrainingConfig.of(validate_config(self.raw_config))
        parent = None
        if self.branch_from is not None:
            config, parent = self._branch_config(config)
        stages = plan_stages(config, self.stage)
        self.stages = stages
        self._check_folder(config)
        if parent is not None and not (self.out_dir / CONFIG_FILE).exists():
            self._start_branch(parent, config)
        world_size = env_int("WORLD_SIZE", 1)
        for section in ("translator_training", "adapt"):
            batch_size = getattr(config, section).batch_size
            if batch_size % world_size:
                raise ConfigError(
                    f"{section}.batch_size {batch_size} cannot be split over {world_size} processes",
                    f"use a multiple of {world_size} (the batch size is global: each process takes an equal share)",
                )
        resolve_device(config.run.device)
        method = config.adapt.method
        if "adapt" in stages and method == "bigl" and "translator" not in stages:
            path = self._translator_file(config)
            if not path.is_file():
                raise ConfigError(
                    f"stage adapt needs the trained translator, but {path} does not exist",
                    "run stage 1 first (--stage translator or --stage all), or set adapt.translator_bundle to a translator.safetensors",
                )
        labelled_role = None
        if "adapt" in stages:
            labelled_role = "target" if method == "target-only" else "source"
        cases = find_training_cases(
            config,
            need_source=method in ("bigl", "source-only"),
            need_target=method in ("bigl", "target-only"),
            labelled_role=labelled_role,
        )
        self._check_disk(config, stages, cases)

        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        self.dist = dist = init_distributed(config.run.device)

        started = time.perf_counter()
        data = load_training_data(config, cases, labelled_role=labelled_role)
        self.log.write(
            "data",
            labelled=data.labelled.describe(),
            unlabelled=data.unlabelled.describe() if data.unlabelled is not None else None,
            pairs=int(len(data.pairs)),
            seconds=round(time.perf_counter() - started, 2),
        )
        self._log_plan(config, stages, data, world_size)
        sampler = StepSampler(data, seed=config.run.seed, tumour_fraction=config.data.tumour_fraction, flip=config.data.flip)
        self.config = config
        self.ctx = RunContext(
            config=config,
            out_dir=self.out_dir,
            dist=dist,
            data=data,
            sampler=sampler,
            log=self.log,
            progress=self.progress and config.run.progress,
        )
        return self.ctx

    def _log_plan(self, config: TrainingConfig, stages: list[str], data, world_size: int) -> None:
        """The steps and rough duration of this run (bigl.runplan), as a ``plan`` event and on stderr."""
        unlabelled = len(data.unlabelled) if data.unlabelled is not None else 0
        plan = estimate_run(config.to_dict(), len(data.labelled), unlabelled, gpus=world_size)
        if "translator" not in stages:
            plan.translator_steps, plan.translator_seconds = 0, 0.0
        if "adapt" not in stages:
            plan.adapt_steps, plan.adapt_seconds, plan.self_training_steps = 0, 0.0, 0
        summary = plan.summary()
        self.log.write("plan", summary=summary, translator_steps=plan.translator_steps, adapt_steps=plan.adapt_steps,
                       self_training_steps=plan.self_training_steps, estimated_seconds=round(plan.seconds))
        if self.log.enabled:
            print(f"bigl train: {summary}", file=sys.stderr, flush=True)

    # -- stages -------------------------------------------------------------------------------
    def translator_trainer(self):
        from bigl.training.translator_stage import TranslatorTrainer, resolve_mode

        ctx = self.ctx
        mode = resolve_mode(ctx.config, len(ctx.data.pairs))
        slices = len(ctx.data.pairs) if mode == "paired" else max(len(ctx.data.labelled), len(ctx.data.unlabelled))
        trainer = TranslatorTrainer(ctx, ctx.config.translator_training.steps(slices), mode)
        self.trainers["translator"] = trainer
        return trainer

    def adapt_trainer(self):
        from bigl.training.adapt_stage import AdaptTrainer
        from bigl.training.translator_stage import load_translator

        ctx = self.ctx
        config = ctx.config
        total = config.adapt.steps(len(ctx.data.labelled)) + config.adapt.self_training_steps
        kwargs: dict[str, Any] = {}
        if config.adapt.method == "bigl":
            translators, discriminators, metadata = load_translator(self._translator_file(config), config, ctx.device)
            kwargs = {
                "translators": translators,
                "image_discriminators": discriminators,
                "translator_mode": metadata["mode"],
                "translator_iterations": metadata.get("iterations"),
            }
        trainer = AdaptTrainer(ctx, total, **kwargs)
        self.trainers["adapt"] = trainer
        return trainer

    def execute(self) -> Path:
        try:
            self.prepare()
            result = None
            for stage in self.stages:
                trainer = self.translator_trainer() if stage == "translator" else self.adapt_trainer()
                self._record_config()
                result = trainer.run(resume=self.resume)
            if self.stages[-1] == "adapt":
                if self.dist.is_main:
                    self._export_onnx(result)
                self.dist.barrier()  # the other ranks wait: all leave the process group together
            self.log.write("done", bundle=_relative(result, self.out_dir))
            return result
        except BiGLError as exc:
            self._log_error(exc.message, exc.hint)
            raise
        except KeyboardInterrupt:
            self._log_error("training was interrupted", "run the same command with --resume to continue from the last checkpoint")
            raise
        except Exception as exc:
            self._log_error(
                f"training failed: {type(exc).__name__}: {exc}",
                "the terminal shows the traceback; --resume continues from the last checkpoint once the cause is fixed",
            )
            raise
        finally:
            if self.dist is not None:
                self.dist.close()

    def _export_onnx(self, bundle: Path) -> None:
        """model.onnx (and model.translator.onnx) beside the bundle, for inference without PyTorch.

        A failed export, whatever the error (the exporter of some torch versions raises its own
        types), does not fail the training: the bundle is the result, and the event log and the
        terminal say how to export it later."""
        try:
            from bigl.export import export_bundle

            files = export_bundle(bundle)
        except Exception as exc:  # noqa: BLE001 - a finished run must never fail here
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            hint = f"{getattr(exc, 'hint', None) or 'fix the cause'}, then run `bigl export {bundle}`"
            self.log.write("warning", message=f"the ONNX export failed: {message}", hint=hint)
            print(f"bigl train: warning: the ONNX export failed: {message}\n  fix: {hint}", flush=True)
            return
        self.log.write("onnx_export", files=[_relative(path, self.out_dir) for path in files])

    def _record_config(self) -> None:
        """Write config.json once the run is certain to start: from then on the folder holds a run."""
        path = self.out_dir / CONFIG_FILE
        if self.dist.is_main and not path.exists():
            atomic_write_text(path, json.dumps(self.config.to_dict(), indent=2) + "\n")

    def _log_error(self, message: str, hint: str | None) -> None:
        try:
            self.log.write("error", message=message, hint=hint)
        except (OSError, BiGLError):
            pass  # the folder itself is unusable; the CLI still prints the error


def _slice_count(config: TrainingConfig, cases: list) -> int:
    """Slices of the target images along the slice axis, read from their headers (no image data)."""
    if not config.adapt.self_training_steps:
        return 0
    from bigl.data.io import read_grid

    axis = config.preprocessing.slice_axis
    modality = config.data.target_modality
    total = 0
    for case in cases:
        try:
            total += read_grid(case.images[modality])[0][axis]
        except BiGLError:  # an unreadable file is reported, with its name, when the data are loaded
            total += 256
    return total


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def estimate_disk_bytes(config: TrainingConfig | dict, stages: list[str], target_slices: int = 0) -> int:
    """Upper estimate of what a run writes: the kept checkpoints of each stage (weights and
    optimiser moments, the weight average, the uint8 pseudo-labels of ``target_slices`` target
    slices in self-training; one more while a new one is written, and the branch point of a run with
    self-training), the translator file and the bundle."""
    from bigl.models import DualAttentionUNet
    from bigl.training.adapt_stage import level_discriminators
    from bigl.training.translator_stage import TranslatorPair, translator_discriminators

    config = TrainingConfig.of(config)
    keep = config.run.keep_checkpoints + 1
    pseudo_label_bytes = 0  # uint8, one per target voxel, in every kept checkpoint
    generators = _parameters(TranslatorPair(config.translator))
    image_discriminators = sum(_parameters(d) for d in translator_discriminators(config, "paired").values())
    total = 0
    if "translator" in stages:
        total += keep * 3 * (generators + image_discriminators) + (generators + image_discriminators)
    if "adapt" in stages:
        adapt = config.adapt
        segmenter = _parameters(DualAttentionUNet(config.segmenter))
        levels = sum(_parameters(d) for d in level_discriminators(config, adapt.levels).values())
        slots = 2 if adapt.optimizer == "sgd" else 3
        checkpoint = (slots + (1 if adapt.ema_decay > 0 else 0)) * segmenter + 3 * levels
        if adapt.finetune_translator:
            checkpoint += 3 * (generators + image_discriminators)
        branch_point = 1 if adapt.self_training_steps else 0  # kept besides the newest (AdaptTrainer.kept_steps)
        total += (keep + branch_point) * checkpoint + segmenter + (generators if adapt.method == "bigl" else 0)
        if adapt.self_training_steps:
            pseudo_label_bytes = keep * target_slices * config.preprocessing.image_size ** 2
    return 4 * total + pseudo_label_bytes + _DISK_MARGIN_BYTES

