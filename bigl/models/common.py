"""Pieces shared by the networks: config (de)serialisation, input checks, small layer builders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bigl.modelconfig import ModelConfig, require_choice, require_int  # noqa: F401 (their home before)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (all of them, or only those with requires_grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def check_image_batch(x: object, owner: str, channels: int, multiple: int = 1, min_size: int = 1) -> None:
    """ValueError with a readable message unless ``x`` is a float tensor [B, channels, H, W] whose
    H and W are multiples of ``multiple`` and at least ``min_size``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{owner} expects a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(
            f"{owner} expects a 4D batch [B, {channels}, H, W], got shape {tuple(x.shape)} "
            f"({x.ndim}D); add the batch/channel axes with x[None] or x.unsqueeze(1)"
        )
    if x.shape[1] != channels:
        raise ValueError(f"{owner} expects {channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{owner} expects a floating-point tensor, got {x.dtype}")
    height, width = x.shape[-2:]
    if height % multiple or width % multiple or min(height, width) < min_size:
        raise ValueError(
            f"{owner} needs height and width that are multiples of {multiple} and at least {max(min_size, multiple)}, "
            f"got {height}x{width}; pad or resize the slices (bigl.inference pads them)"
        )


def upsample_to_min_size(x: torch.Tensor, min_size: int) -> torch.Tensor:
    """Bilinearly enlarge a [B, C, H, W] map whose H or W is below ``min_size``.

    Discriminators use this so that maps smaller than their stride stack (small slices, small attention
    matrices) still give at least a 1x1 logit map. Interpolation keeps probability maps valid
    (convex combinations), unlike zero padding.
    """
    height, width = x.shape[-2:]
    if height >= min_size and width >= min_size:
        return x
    size = (max(height, min_size), max(width, min_size))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def make_norm(kind: str, channels: int) -> nn.Module:
    """'batch' -> BatchNorm2d; 'instance' -> InstanceNorm2d with learnable affine; 'none' -> Identity."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {kind!r}; use 'batch', 'instance' or 'none'")


def conv_norm_relu(in_channels: int, out_channels: int, norm: str, kernel_size: int = 3) -> nn.Sequential:
    """kxk conv ('same' zero padding) -> norm -> ReLU; the conv has no bias when a norm follows."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm == "none"),
        make_norm(norm, out_channels),
        nn.ReLU(inplace=True),
    )
