"""Branching a run at the end of its adversarial phase (``bigl train --branch-from RUN``).

Self-training (``adapt.self_training_iterations`` > 0) starts from the network the adversarial
steps made. A run with self-training keeps the checkpoint of that step whatever
``run.keep_checkpoints`` says, so other self-training settings (pseudo-label views, threshold,
rounds, edge refinement) can start from the same adapted network instead of training it again:
the comparison is then paired, and costs the self-training steps alone. A branch that changes
nothing reproduces its parent exactly (sampling and seeds depend on the step only).

A branch may change the ``adapt.self_training_*`` and ``adapt.pseudo_*`` settings and the run
controls; everything before the branch point must be the parent's. It trains stage 2 only, with
the parent's translator.
"""

from __future__ import annotations

import json
from pathlib import Path

from bigl import tensorfile
from bigl.errors import ConfigError
from bigl.files import atomic_write_bytes
from bigl.runfolder import CHECKPOINT_DIR, CONFIG_FILE, TRANSLATOR_FILE
from bigl.training.checkpoint import METADATA_KEY, checkpoint_path, list_checkpoints, read_checkpoint
from bigl.training.config import config_differences
from bigl.training.sections import TrainingConfig

#: Setting prefixes a branch may change: what acts only after the branch point.
BRANCH_PREFIXES = ("adapt.self_training_", "adapt.pseudo_")
#: Run settings that change the result, so a branch keeps them (the other run.* are run controls).
_FIXED_RUN_KEYS = ("run.seed",)


def parent_config(parent: Path) -> TrainingConfig:
    """The config of the run folder ``parent``; ConfigError when it holds no run."""
    path = parent / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"--branch-from {parent}: no {CONFIG_FILE} there, so it is not a BiGL run folder",
                          "give the folder of a finished or interrupted run with self-training")
    try:
        return TrainingConfig.of(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", "restore the file, or branch from another run") from None


def branch_config(parent: Path, old: TrainingConfig, config: TrainingConfig) -> TrainingConfig:
    """``config`` checked against ``old``, the config of the run in ``parent``, with the parent's
    translator: ConfigError naming every setting that a branch cannot change."""
    if old.adapt.method != "bigl" or not old.adapt.self_training_steps:
        raise ConfigError(f"--branch-from {parent}: that run has no self-training, so it has no branch point",
                          "branch from a run of method bigl with adapt.self_training_iterations > 0")
    if not config.adapt.self_training_steps:
        raise ConfigError("a branch trains self-training steps only, and this config has none",
                          "set adapt.self_training_iterations > 0")
    translator = Path(old.adapt.translator_bundle).expanduser() if old.adapt.translator_bundle else parent / TRANSLATOR_FILE
    new = config.to_dict()
    if new["adapt"]["translator_bundle"] is None:
        new["adapt"]["translator_bundle"] = old.adapt.translator_bundle
    fixed = [key for key in config_differences(old.to_dict(), new)
             if not key.startswith(BRANCH_PREFIXES) and (not key.startswith("run.") or key in _FIXED_RUN_KEYS)]
    if fixed:
        raise ConfigError(
            f"--branch-from {parent}: a branch may change only adapt.self_training_* and adapt.pseudo_* "
            f"(and run controls), but this config also changes {', '.join(fixed[:6])}",
            "use the parent's values for those, or start a new run",
        )
    if not translator.is_file():
        raise ConfigError(f"--branch-from {parent}: its translator {translator} is missing",
                          "restore it, or branch from another run")
    new["adapt"]["translator_bundle"] = str(translator.resolve())
    return TrainingConfig.of(new)


def branch_checkpoint(parent: Path, old: TrainingConfig, config: TrainingConfig, out_dir: Path) -> int:
    """Copy the checkpoint at the end of the adversarial phase of the run in ``parent`` (config
    ``old``) into ``out_dir``, set to the branch's length; returns its step."""
    folder = parent / CHECKPOINT_DIR
    for path in list_checkpoints(folder, "adapt"):
        checkpoint = read_checkpoint(path)
        total = int(checkpoint.meta["extra"].get("total", -1))
        step = total - old.adapt.self_training_steps
        if checkpoint.step == step:
            break
    else:
        raise ConfigError(
            f"--branch-from {parent}: no checkpoint of the end of its adversarial phase in {folder}",
            "runs of earlier BiGL versions, and runs stopped before that step, do not have one; "
            "train the parent (again) with this version",
        )
    meta = dict(checkpoint.meta)
    meta["extra"] = {**meta["extra"], "total": step + config.adapt.self_training_steps,
                     "branched_from": {"run": str(parent), "step": step}}
    target = checkpoint_path(out_dir / CHECKPOINT_DIR, "adapt", step)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, tensorfile.encode(checkpoint.tensors, {METADATA_KEY: json.dumps(meta)}))
    return step
