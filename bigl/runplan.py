"""What a training run will do and roughly cost, read from a resolved config.

Standard library only, like ``bigl.runfolder``: ``bigl train`` prints the plan when its data are
loaded, and the Slicer training module shows it in its dataset check before any heavy package is
imported. The estimate is an order of magnitude; the ETA of a running stage is measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

#: Seconds per training sample of each stage at the reference size: 96 px slices and the networks
#: of the reference config (translator and segmenter base_channels 16), measured with that config
#: on two cores (an AMD EPYC in float32: 0.045 and 0.10-0.15; a CPU with bfloat16: 0.042 and 0.11).
#: Other sizes scale with image area x network width: at these widths the time follows the size
#: of the activations more than the multiply-adds (width squared would make the cpu preset 4 x
#: slower than it is, relative to the reference).
CPU_SECONDS_PER_SAMPLE = {"translator": 0.045, "adapt": 0.12}
REFERENCE_IMAGE_SIZE = 96
REFERENCE_WIDTH = {"translator": 16, "adapt": 16}
#: How much faster one recent GPU is assumed to be than that CPU reference. An assumption, not a
#: measurement.
GPU_SPEEDUP = 200.0


def config_value(config: Mapping[str, Any] | None, dotted: str, default: Any = None) -> Any:
    """``config_value(cfg, "adapt.iterations")`` -> ``cfg["adapt"]["iterations"]``, or ``default``."""
    node: Any = config or {}
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def iterations_for(section: Mapping[str, Any], dataset_slices: int) -> int:
    """``iterations``, or ``ceil(epochs * slices / batch_size)`` when epochs is given."""
    if section.get("epochs") is None:
        return int(section.get("iterations", 0))
    return max(1, math.ceil(section["epochs"] * max(1, dataset_slices) / section["batch_size"]))


def self_training_steps(adapt: Mapping[str, Any]) -> int:
    """Self-training iterations that run: ``adapt.self_training_iterations`` for method bigl; none
    for the baselines, which have no unlabelled scans to pseudo-label (so a config that self-trains,
    as the reference config does, trains them too)."""
    return int(adapt.get("self_training_iterations", 0)) if adapt.get("method", "bigl") == "bigl" else 0


def format_duration(seconds: float | None) -> str:
    """``3725`` -> ``"1h02m"``, ``584`` -> ``"9m44s"``, ``7.2`` -> ``"7s"``; ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def device_kind(device: str | None) -> str:
    """"gpu" or "cpu" for a device name; "auto" asks torch when it is installed."""
    device = (device or "auto").lower()
    if device.startswith(("cuda", "gpu", "mps")):
        return "gpu"
    if device == "auto":
        try:
            import torch

            return "gpu" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"
    return "cpu"


def seconds_per_sample(config: Mapping[str, Any] | None, stage: str) -> float:
    """CPU seconds one training sample of ``stage`` takes with ``config`` (scaled from the reference)."""
    image_size = float(config_value(config, "preprocessing.image_size", REFERENCE_IMAGE_SIZE))
    width_key = "translator.base_channels" if stage == "translator" else "segmenter.base_channels"
    width = float(config_value(config, width_key, REFERENCE_WIDTH[stage]))
    work = (image_size / REFERENCE_IMAGE_SIZE) ** 2 * (width / REFERENCE_WIDTH[stage])
    return CPU_SECONDS_PER_SAMPLE[stage] * work


@dataclass
class RunEstimate:
    """Size of the run and a rough duration. ``adapt_steps`` counts the self-training steps too."""

    translator_steps: int
    adapt_steps: int
    translator_batch: int
    adapt_batch: int
    image_size: int
    source_slices: int
    target_slices: int
    device_kind: str
    translator_seconds: float
    adapt_seconds: float
    self_training_steps: int = 0

    @property
    def seconds(self) -> float:
        return self.translator_seconds + self.adapt_seconds

    @property
    def source_epochs(self) -> float:
        """Passes over the source slices during adaptation."""
        return self.adapt_steps * self.adapt_batch / self.source_slices if self.source_slices else math.nan

    def summary(self) -> str:
        self_training = f", the last {self.self_training_steps} of them self-training" if self.self_training_steps else ""
        return (
            f"run: translator {self.translator_steps} steps x batch {self.translator_batch}, adaptation "
            f"{self.adapt_steps} steps x batch {self.adapt_batch}{self_training} at {self.image_size} px "
            f"(about {self.source_epochs:.2g} passes over the source slices); rough time on "
            f"{self.device_kind.upper()}: {format_duration(self.seconds)} "
            f"(translator {format_duration(self.translator_seconds)}, adaptation {format_duration(self.adapt_seconds)})"
        )


def estimate_run(
    config: Mapping[str, Any] | None,
    source_slices: int,
    target_slices: int,
    *,
    device: str | None = None,
    gpus: int = 1,
) -> RunEstimate:
    """Steps, batch sizes and a rough duration of a run with ``config`` (a resolved training config)."""
    adapt = config_value(config, "adapt", {}) or {}
    translator_runs = adapt.get("method", "bigl") == "bigl"
    labelled_slices = source_slices or target_slices  # target-only runs train on the target
    translator = config_value(config, "translator_training", {}) or {}
    translator_steps = iterations_for(translator, labelled_slices) if translator_runs and translator else 0
    self_steps = self_training_steps(adapt)
    adapt_steps = (iterations_for(adapt, labelled_slices) if adapt else 0) + self_steps
    kind = device_kind(device or config_value(config, "run.device", "auto"))
    speedup = GPU_SPEEDUP * max(1, int(gpus)) if kind == "gpu" else 1.0
    translator_batch = int(translator.get("batch_size", 1))
    adapt_batch = int(adapt.get("batch_size", 1))

    def seconds(stage: str, steps: int, batch: int) -> float:
        return steps * batch * seconds_per_sample(config, stage) / speedup

    return RunEstimate(
        translator_steps=translator_steps,
        adapt_steps=adapt_steps,
        translator_batch=translator_batch,
        adapt_batch=adapt_batch,
        image_size=int(config_value(config, "preprocessing.image_size", 128)),
        source_slices=source_slices,
        target_slices=target_slices,
        device_kind=kind,
        translator_seconds=seconds("translator", translator_steps, translator_batch),
        adapt_seconds=seconds("adapt", adapt_steps, adapt_batch),
        self_training_steps=self_steps,
    )
