"""Discriminators of the global-to-local adaptation (paper section 3.4).

- :class:`FeatureDiscriminator` judges bottleneck features after the dual-attention block (Eq. 8-9).
- :class:`AttentionDiscriminator` judges a position [B, N, N] or channel [B, C, C] attention matrix,
  seen as a one-channel image (Eq. 6-7).
- :class:`OutputDiscriminator` judges softmax segmentation maps (AdaptSegNet output-space alignment).

All return raw patch logits [B, 1, h, w] for :func:`bigl.losses.adversarial_loss`. None uses
normalisation layers (as in AdaptSegNet), so they work with any batch size and tiny maps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bigl.models.common import check_image_batch, upsample_to_min_size


def _strided_stack(in_channels: int, base_channels: int, n_layers: int) -> tuple[nn.Sequential, int]:
    """``n_layers`` 4x4 stride-2 convs with widths base * 2**i (capped at 8 * base), LeakyReLU 0.2."""
    layers: list[nn.Module] = []
    width = in_channels
    for i in range(n_layers):
        out = base_channels * min(2**i, 8)
        layers += [nn.Conv2d(width, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        width = out
    return nn.Sequential(*layers), width


def _check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


class FeatureDiscriminator(nn.Module):
    """3x3 stride-1 convs (widths base, 2*base, ..., LeakyReLU 0.2) then a 3x3 conv to one channel.

    Bottleneck maps are small (8x8 for 128 px slices and depth 4), so the resolution is kept: one
    logit per bottleneck position, for any h x w down to 1x1.
    """

    def __init__(self, in_channels: int, base_channels: int = 64, n_layers: int = 2):
        super().__init__()
        _check_positive("FeatureDiscriminator", in_channels=in_channels, base_channels=base_channels, n_layers=n_layers)
        self.in_channels = in_channels
        layers: list[nn.Module] = []
        width = in_channels
        for i in range(n_layers):
            out = base_channels * min(2**i, 8)
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, "FeatureDiscriminator", self.in_channels)
        return self.model(x)


class AttentionDiscriminator(nn.Module):
    """Judges an attention matrix [B, M, M] (or [B, 1, M, M]) as a one-channel image.

    ``size`` is the expected M (N = h*w for position attention, C for channel attention). The
    matrix is multiplied by M, so a uniform attention row has value 1 whatever M is, then brought to
    a working size ``min(size, max_size)``: adaptive average pooling when larger, bilinear
    interpolation when smaller (so any M is accepted). Strided 4x4 convs (LeakyReLU 0.2) reduce it to
    a map of about 4x4 (fewer layers for small matrices), and a 3x3 conv gives the logits.
    """

    def __init__(self, size: int, base_channels: int = 32, max_size: int = 64, max_layers: int = 4):
        super().__init__()
        _check_positive(
            "AttentionDiscriminator", size=size, base_channels=base_channels, max_size=max_size, max_layers=max_layers
        )
        self.size = size
        self.working_size = max(2, min(size, max_size))
        n_layers = min(max_layers, max(1, int(math.log2(self.working_size)) - 2))
        self.features, width = _strided_stack(1, base_channels, n_layers)
        self.classifier = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, attention: torch.Tensor) -> torch.Tensor:
        if not isinstance(attention, torch.Tensor):
            raise ValueError(f"AttentionDiscriminator expects a torch.Tensor, got {type(attention).__name__}")
        if attention.ndim == 3:
            attention = attention.unsqueeze(1)
        if attention.ndim != 4 or attention.shape[1] != 1 or attention.shape[-1] != attention.shape[-2]:
            raise ValueError(
                "AttentionDiscriminator expects square attention matrices [B, M, M] or [B, 1, M, M], "
                f"got shape {tuple(attention.shape)}"
            )
        if not attention.is_floating_point():
            raise ValueError(f"AttentionDiscriminator expects a floating-point tensor, got {attention.dtype}")
        matrix_size = attention.shape[-1]
        x = attention * matrix_size
        if matrix_size > self.working_size:
            x = F.adaptive_avg_pool2d(x, self.working_size)
        elif matrix_size < self.working_size:
            x = F.interpolate(x, size=(self.working_size,) * 2, mode="bilinear", align_corners=False)
        return self.classifier(self.features(x))


class OutputDiscriminator(nn.Module):
    """AdaptSegNet output-space discriminator on softmax maps [B, num_classes, H, W].

    ``n_layers`` 4x4 stride-2 convs in all, widths base, 2*base, 4*base, 8*base, then 1 (five convs
    64-128-256-512-1 with the defaults), LeakyReLU 0.2 between them. Maps smaller than 2**n_layers
    are bilinearly enlarged to that size first, giving at least one logit.
    """

    def __init__(self, num_classes: int, base_channels: int = 64, n_layers: int = 5):
        super().__init__()
        _check_positive("OutputDiscriminator", num_classes=num_classes, base_channels=base_channels, n_layers=n_layers)
        self.num_classes = num_classes
        self.min_size = 2**n_layers
        self.features, width = _strided_stack(num_classes, base_channels, n_layers - 1)
        self.classifier = nn.Conv2d(width, 1, 4, stride=2, padding=1)

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        check_image_batch(probabilities, "OutputDiscriminator", self.num_classes)
        return self.classifier(self.features(upsample_to_min_size(probabilities, self.min_size)))
