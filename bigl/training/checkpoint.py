"""Training checkpoints: one safetensors file per checkpoint, written atomically, never unpickled.

A checkpoint holds every tensor a stage needs to continue exactly where it stopped: the weights
of its networks (``model.<name>.``), the optimiser states (``optim.<name>.state.<i>.<key>``), extra
tensors such as the image pool (``extra.``) and the random generator states as uint8 tensors
(``rng.torch``, ``rng.cuda.<i>``). Everything that is not a tensor (step, optimiser hyper-parameters,
numpy and Python generator states, the config) is a JSON document in the safetensors header, so
a checkpoint is one file: it is written to a temporary file, fsynced and renamed over its final
name, and a crash while saving leaves the previous checkpoints intact. The header also holds the
SHA-256 of the tensor data (:mod:`bigl.tensorfile`): a checkpoint damaged later does not verify,
and resuming uses the newest one that does (:func:`resume_checkpoint`).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bigl import tensorfile
from bigl.errors import ConfigError
from bigl.files import atomic_write_bytes
from bigl.runfolder import checkpoint_name, parse_checkpoint_name

FORMAT = "bigl-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "bigl_checkpoint"


@dataclass
class Checkpoint:
    path: Path
    stage: str
    step: int
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def checkpoint_path(folder: Path, stage: str, step: int) -> Path:
    return folder / checkpoint_name(stage, step)


def _optimizer_parts(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.state.{index}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = state
    return tensors


def _numpy_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def save_checkpoint(
    path: Path,
    *,
    stage: str,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically; returns its path."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"model.{name}.{key}"] = value.detach().to("cpu").contiguous().clone()
    optimizer_meta = {}
    for name, optimizer in optimizers.items():
        parts, meta = _optimizer_parts(name, optimizer)
        tensors.update(parts)
        optimizer_meta[name] = meta
    for key, value in (extra_tensors or {}).items():
        tensors[f"extra.{key}"] = value.detach().to("cpu").contiguous().clone()
    tensors.update(_rng_tensors())
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "step": int(step),
        "optimizers": optimizer_meta,
        "rng_numpy": _numpy_rng_state(),
        "rng_python": json.loads(json.dumps(random.getstate())),
        "extra": extra or {},
    }
    atomic_write_bytes(Path(path), tensorfile.encode(tensors, {METADATA_KEY: json.dumps(meta)}))
    return Path(path)


def read_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint (tensors on the CPU), verified; ConfigError when the file is not a valid one."""
    path = Path(path)
    try:
        metadata, tensors = tensorfile.read_tensors(path)
        raw = metadata.get(METADATA_KEY)
        meta = json.loads(raw) if raw else None
    except tensorfile.DamagedFile as exc:
        raise ConfigError(f"checkpoint {path} is damaged: {exc}", "delete it; --resume then uses the previous one") from None
    except Exception as exc:  # malformed, truncated, unreadable, or safetensors' own errors
        raise ConfigError(f"checkpoint {path} cannot be read ({exc})", "delete it; --resume then uses the previous one") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a BiGL training checkpoint", "remove foreign files from the checkpoints folder")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(f"{path} was written by a newer BiGL", "resume with the BiGL version that wrote it")
    return Checkpoint(path=path, stage=meta["stage"], step=int(meta["step"]), meta=meta, tensors=tensors)


def list_checkpoints(folder: Path, stage: str) -> list[Path]:
    """Checkpoint files of a stage, newest (highest step) first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        parsed = parse_checkpoint_name(path.name)
        if parsed and parsed[0] == stage:
            found.append((parsed[1], path))
    return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(folder: Path, stage: str) -> Checkpoint | None:
    """The newest checkpoint of a stage that reads back and verifies; the others are skipped."""
    return resume_checkpoint(folder, stage)[0]


def resume_checkpoint(folder: Path, stage: str) -> tuple[Checkpoint | None, list[ConfigError]]:
    """(the newest checkpoint of a stage that reads back and verifies, the errors of the newer
    ones that did not), so that a resume can say which checkpoint it used and why."""
    skipped: list[ConfigError] = []
    for path in list_checkpoints(folder, stage):
        try:
            return read_checkpoint(path), skipped
        except ConfigError as exc:
            skipped.append(exc)
    return None, skipped


def announce_resume(log, stage: str, found: tuple[Checkpoint | None, list[ConfigError]], *, root: Path,
                    echo: bool = True) -> Checkpoint | None:
    """Say which checkpoint a resume uses, and which newer ones it skipped and why: a ``resume``
    event in the log and, when ``echo``, lines on stderr. Returns the checkpoint (None: none)."""
    checkpoint, skipped = found
    if checkpoint is None and not skipped:
        return None  # the stage never wrote a checkpoint: nothing to say

    def relative(path: Path) -> str:
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            return str(path)

    log.write("resume", stage=stage, step=checkpoint.step if checkpoint else 0,
              checkpoint=relative(checkpoint.path) if checkpoint else None,
              skipped=[{"message": exc.message} for exc in skipped])
    if echo:
        for exc in skipped:
            print(f"bigl train: warning: skipped {exc.message}", file=sys.stderr, flush=True)
        if checkpoint is not None:
            print(f"bigl train: resuming stage {stage} at step {checkpoint.step} from {relative(checkpoint.path)}",
                  file=sys.stderr, flush=True)
        else:
            print(f"bigl train: warning: no {stage} checkpoint reads back intact; stage {stage} starts again at step 0",
                  file=sys.stderr, flush=True)
    return checkpoint


def prune_checkpoints(folder: Path, stage: str, keep: int, protect: tuple[int, ...] = ()) -> None:
    """Delete all but the ``keep`` newest checkpoints of a stage, and those of the steps in ``protect``."""
    for path in list_checkpoints(folder, stage)[keep:]:
        parsed = parse_checkpoint_name(path.name)
        if parsed is None or parsed[1] not in protect:
            path.unlink(missing_ok=True)


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix``, with the prefix removed."""
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def restore_checkpoint(
    checkpoint: Checkpoint,
    *,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    restore_rng: bool = True,
) -> dict[str, torch.Tensor]:
    """Load weights, optimiser states and random generator states; returns the extra tensors."""
    tensors = checkpoint.tensors
    for name, module in modules.items():
        state = prefixed(tensors, f"model.{name}.")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(
                f"checkpoint {checkpoint.path} does not fit the {name} network of this config ({str(exc).splitlines()[0]})",
                "resume with the config the run was started with (config.json in the run folder)",
            ) from None
    for name, optimizer in optimizers.items():
        meta = checkpoint.meta["optimizers"].get(name)
        if meta is None:
            raise ConfigError(f"checkpoint {checkpoint.path} has no state for the {name} optimiser", "resume with the original config")
        state: dict[int, dict[str, Any]] = {}
        for key, value in prefixed(tensors, f"optim.{name}.state.").items():
            index, _, entry = key.partition(".")
            state.setdefault(int(index), {})[entry] = value
        for index, entries in meta["state"].items():
            state.setdefault(int(index), {}).update(entries)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
        numpy_state = checkpoint.meta["rng_numpy"]
        np.random.set_state(
            (numpy_state["kind"], np.asarray(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
             numpy_state["has_gauss"], numpy_state["cached"])
        )
        version, internal, gauss = checkpoint.meta["rng_python"]
        random.setstate((version, tuple(internal), gauss))
    return prefixed(tensors, "extra.")
