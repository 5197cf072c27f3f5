"""Image translator (CycleGAN/pix2pix-style ResNet generator) and its PatchGAN discriminator.

The generator maps a 1-channel slice in [-1, 1] of one modality to the other modality, also in
[-1, 1]: reflect pad + 7x7 conv, ``n_downsample`` stride-2 3x3 convs (width doubling),
``n_blocks`` residual blocks, the mirror-image decoder (transposed convs, or nearest upsampling +
3x3 conv when ``upsample='resize'``, which avoids checkerboard artefacts), reflect pad + 7x7 conv
and tanh. Instance normalisation throughout, as in CycleGAN. A slice that holds no brain (all
background) translates to all background: instance norm would otherwise amplify the constant input
into noise.
"""

from __future__ import annotations

import torch
from torch import nn

from bigl.data.preprocess import BACKGROUND, EMPTY_SLICE_MAX
from bigl.errors import ConfigError
from bigl.modelconfig import TranslatorConfig
from bigl.models.common import check_image_batch, upsample_to_min_size


def _instance_norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResidualBlock(nn.Module):
    """x + (reflect pad, 3x3 conv, norm, ReLU, reflect pad, 3x3 conv, norm)(x)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            _instance_norm(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            _instance_norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """[B, channels, H, W] in [-1, 1] -> same shape in [-1, 1]; H, W multiples of 2**n_downsample."""

    def __init__(self, config: TranslatorConfig | None = None):
        super().__init__()
        config = config or TranslatorConfig()
        if not isinstance(config, TranslatorConfig):
            raise ConfigError(
                f"ResnetGenerator needs a TranslatorConfig, got {type(config).__name__}",
                "build it with TranslatorConfig.from_dict(...)",
            )
        self.config = config
        width = config.base_channels
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(config.channels, width, 7),
            _instance_norm(width),
            nn.ReLU(inplace=True),
        ]
        for _ in range(config.n_downsample):
            layers += [
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                _instance_norm(2 * width),
                nn.ReLU(inplace=True),
            ]
            width *= 2
        layers += [ResidualBlock(width) for _ in range(config.n_blocks)]
        for _ in range(config.n_downsample):
            if config.upsample == "transpose":
                layers.append(nn.ConvTranspose2d(width, width // 2, 3, stride=2, padding=1, output_padding=1))
            else:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width // 2, 3, padding=1)]
            layers += [_instance_norm(width // 2), nn.ReLU(inplace=True)]
            width //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, config.channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    @property
    def min_size(self) -> int:
        # the 7x7 reflect padding needs > 3 px and the residual blocks' instance norm needs 2x2 maps
        return max(4, 2 * self.config.size_multiple)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, "ResnetGenerator", self.config.channels, self.config.size_multiple, self.min_size)
        empty = x.flatten(1).amax(1) <= EMPTY_SLICE_MAX
        y = self.model(x)
        return torch.where(empty[:, None, None, None], torch.full_like(y, BACKGROUND), y)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix 70x70 for n_layers=3): each output logit judges one patch.

    4x4 convs: ``n_layers`` with stride 2 (the first without norm), one with stride 1, then a stride-1
    conv to one channel; widths ``base_channels * min(2**i, 8)``; LeakyReLU 0.2; instance norm. For a
    conditional (pix2pix) discriminator pass the source and the candidate stacked: ``in_channels=2``.
    Inputs smaller than ``min_size`` (3 * 2**n_layers) are bilinearly enlarged to it first.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 64, n_layers: int = 3):
        super().__init__()
        if in_channels < 1 or base_channels < 1 or n_layers < 1:
            raise ValueError("PatchDiscriminator needs in_channels, base_channels and n_layers >= 1")
        self.in_channels = in_channels
        self.min_size = 3 * 2**n_layers
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        width = base_channels
        for i in range(1, n_layers + 1):
            out = base_channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1), _instance_norm(out), nn.LeakyReLU(0.2, True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, "PatchDiscriminator", self.in_channels)
        return self.model(upsample_to_min_size(x, self.min_size))
