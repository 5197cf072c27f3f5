"""Names in a training run folder, checkpoint file names, and the choice lists users pick from.

Standard library only (no numpy or torch), so the command line and the Slicer modules can use
these before BiGL's heavier dependencies are installed or imported. A run folder::

    config.json          the resolved config (defaults filled in)
    events.jsonl         the event log
    console.log          what the trainer printed (written by the Slicer module)
    checkpoints/         <stage>_<step>.safetensors, the newest run.keep_checkpoints per stage
    samples/             <stage>_<step>.png sample grids
    translator.safetensors   stage 1 result (both generators, their discriminators)
    model.safetensors    the final bundle (segmenter + translators + metadata)
    model.onnx, model.translator.onnx   its ONNX export (bigl.export), for inference without PyTorch
    losses.png           loss curves of both stages
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "config.json"
EVENTS_FILE = "events.jsonl"
CONSOLE_LOG = "console.log"
CHECKPOINT_DIR = "checkpoints"
SAMPLES_DIR = "samples"
TRANSLATOR_FILE = "translator.safetensors"
BUNDLE_FILE = "model.safetensors"
LOSS_FIGURE = "losses.png"

#: Training stages, in the order a run goes through them.
STAGES = ("translator", "adapt")
#: What ``bigl train --stage`` accepts.
RUN_STAGES = (*STAGES, "all")
#: Devices a user names; ``cuda:N`` picks one GPU where a device is given in a config.
DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: Inference engines of ``bigl segment``.
ENGINE_CHOICES = ("auto", "torch", "onnx")
#: ``translator_training.mode``: paired (pix2pix-style, co-registered scans) or unpaired (CycleGAN).
TRANSLATOR_MODES = ("auto", "paired", "unpaired")
#: ``adapt.method``.
METHODS = ("bigl", "source-only", "target-only")
#: ``adapt.dice``: the Dice terms of :func:`bigl.losses.segmentation_loss`.
DICE_LOSSES = ("generalised", "mean", "regions")

_CHECKPOINT = re.compile(r"^(?P<stage>[a-z]+)_(?P<step>\d+)\.safetensors$")


def is_device(name: str) -> bool:
    """True for auto, cpu, cuda and cuda:N (any case)."""
    text = str(name).lower()
    return text in DEVICE_CHOICES or (text.startswith("cuda:") and text[5:].isdigit())


def checkpoint_name(stage: str, step: int) -> str:
    """``adapt_00000200.safetensors`` (zero-padded, so names sort by step)."""
    return f"{stage}_{int(step):08d}.safetensors"


def parse_checkpoint_name(name: str) -> tuple[str, int] | None:
    """(stage, step) of a checkpoint file name, None for any other name."""
    match = _CHECKPOINT.match(name)
    return (match["stage"], int(match["step"])) if match else None


def latest_checkpoint_name(folder: str | Path) -> tuple[str, int] | None:
    """(stage, step) of the furthest checkpoint in a run folder (later stages first), None when there is none."""
    found = [parsed for path in (Path(folder) / CHECKPOINT_DIR).glob("*.safetensors") if (parsed := parse_checkpoint_name(path.name))]
    order = {stage: index for index, stage in enumerate(STAGES)}
    return max(found, key=lambda item: (order.get(item[0], -1), item[1]), default=None)
