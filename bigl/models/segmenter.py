"""The segmentation network: a 2D U-Net with DANet dual attention at the bottleneck (paper section 3.3).

The encoder halves the resolution ``depth`` times (max pooling) and doubles the width each time,
starting at ``base_channels``; the bottleneck therefore has ``C = base_channels * 2**depth`` channels
at ``H / 2**depth`` x ``W / 2**depth``. Between encoder and decoder sits the dual-attention block of
DANet (Fu et al., CVPR 2019): two 3x3 conv-norm-ReLU branches, one feeding a position attention
module (an N x N map over the N = h*w bottleneck positions) and one feeding a channel attention
module (a C x C map), whose outputs are summed. Both modules add their attended features to their
input through a learnable scale ``gamma`` that starts at 0, so an untrained block passes the branch
features through unchanged and attention is learnt gradually. Position attention costs O(N^2)
memory, which is why it is only applied at the bottleneck.

The decoder upsamples (transposed conv or bilinear + 1x1 conv), concatenates the encoder skip
connection and applies two conv-norm-ReLU layers per level; a 1x1 conv gives the class logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bigl.errors import ConfigError
from bigl.modelconfig import SegmenterConfig
from bigl.models.common import check_image_batch, conv_norm_relu


@dataclass
class SegmenterOutput:
    logits: torch.Tensor  # [B, K, H, W]
    features: torch.Tensor  # bottleneck features after attention [B, C, h, w]
    position_attention: torch.Tensor  # [B, N, N], N = h*w, rows sum to 1
    channel_attention: torch.Tensor  # [B, C, C], rows sum to 1


class PositionAttention(nn.Module):
    """DANet position attention: every position attends to all N = h*w positions.

    energy[i, j] = <query_i, key_j> (1x1 convs to C // reduction channels); A = softmax over j;
    out_i = gamma * sum_j A[i, j] value_j + x_i, with gamma initialised to 0.
    """

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        inner = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, channels, height, width = x.shape
        query = self.query(x).flatten(2)  # [B, c, N]
        key = self.key(x).flatten(2)  # [B, c, N]
        value = self.value(x).flatten(2)  # [B, C, N]
        attention = torch.softmax(torch.bmm(query.transpose(1, 2), key), dim=-1)  # [B, N, N]
        attended = torch.bmm(value, attention.transpose(1, 2)).view(batch, channels, height, width)
        return self.gamma * attended + x, attention


class ChannelAttention(nn.Module):
    """DANet channel attention (no convolutions): energy = X X^T over the C channel maps.

    DANet feeds ``max(energy) - energy`` to the softmax, i.e. A = softmax(-energy) computed in a
    numerically safe way: a channel attends most to the channels it is least correlated with, which
    spreads information across feature maps. out = gamma * A X + x, gamma initialised to 0.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(2)  # [B, C, N]
        energy = torch.bmm(flat, flat.transpose(1, 2))  # [B, C, C]
        energy = energy.amax(dim=-1, keepdim=True) - energy
        attention = torch.softmax(energy, dim=-1)
        attended = torch.bmm(attention, flat).view_as(x)
        return self.gamma * attended + x, attention


class DualAttention(nn.Module):
    """Two conv branches into position and channel attention, outputs summed (DANet head)."""

    def __init__(self, channels: int, reduction: int, norm: str, fuse_conv: bool = False):
        super().__init__()
        self.position_branch = conv_norm_relu(channels, channels, norm)
        self.channel_branch = conv_norm_relu(channels, channels, norm)
        self.position = PositionAttention(channels, reduction)
        self.channel = ChannelAttention()
        self.fuse = conv_norm_relu(channels, channels, norm) if fuse_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        by_position, position_attention = self.position(self.position_branch(x))
        by_channel, channel_attention = self.channel(self.channel_branch(x))
        return self.fuse(by_position + by_channel), position_attention, channel_attention


def _double_conv(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        conv_norm_relu(in_channels, out_channels, norm), conv_norm_relu(out_channels, out_channels, norm)
    )


class _UpLevel(nn.Module):
    """Upsample x2, halve the channels, concatenate the skip connection, two conv-norm-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, mode: str):
        super().__init__()
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, kernel_size=1),
            )
        self.conv = _double_conv(2 * out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class DualAttentionUNet(nn.Module):
    """U-Net with DANet dual attention between encoder and decoder; see the module docstring."""

    def __init__(self, config: SegmenterConfig | None = None):
        super().__init__()
        config = config or SegmenterConfig()
        if not isinstance(config, SegmenterConfig):
            raise ConfigError(
                f"DualAttentionUNet needs a SegmenterConfig, got {type(config).__name__}",
                "build it with SegmenterConfig.from_dict(...)",
            )
        self.config = config
        widths = [config.base_channels * 2**level for level in range(config.depth + 1)]
        self.encoder = nn.ModuleList([_double_conv(config.in_channels, widths[0], config.norm)])
        self.encoder.extend(_double_conv(widths[i - 1], widths[i], config.norm) for i in range(1, config.depth + 1))
        self.pool = nn.MaxPool2d(2)
        self.attention = DualAttention(widths[-1], config.attention_reduction, config.norm, config.fuse_conv)
        self.dropout = nn.Dropout2d(config.dropout) if config.dropout > 0 else nn.Identity()
        self.decoder = nn.ModuleList(
            _UpLevel(widths[i], widths[i - 1], config.norm, config.upsample) for i in range(config.depth, 0, -1)
        )
        self.head = nn.Conv2d(widths[0], config.num_classes, kernel_size=1)

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError unless x is [B, in_channels, H, W] with H, W multiples of 2**depth."""
        check_image_batch(x, "DualAttentionUNet", self.config.in_channels, self.config.size_multiple)
        bottleneck_pixels = (x.shape[-2] // self.config.size_multiple) * (x.shape[-1] // self.config.size_multiple)
        if self.training and self.config.norm == "instance" and bottleneck_pixels == 1:
            raise ValueError(
                f"DualAttentionUNet with instance norm cannot train on {x.shape[-2]}x{x.shape[-1]} inputs: the "
                f"bottleneck would be 1x1; use inputs of at least {2 * self.config.size_multiple} px or a smaller depth"
            )

    def forward(self, x: torch.Tensor, return_aux: bool = False) -> torch.Tensor | SegmenterOutput:
        self.check_input(x)
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        features, position_attention, channel_attention = self.attention(skips.pop())
        x = self.dropout(features)
        for up in self.decoder:
            x = up(x, skips.pop())
        logits = self.head(x)
        if not return_aux:
            return logits
        return SegmenterOutput(logits, features, position_attention, channel_attention)
