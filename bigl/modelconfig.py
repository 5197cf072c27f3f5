"""The architecture configs of the networks that go into bundles, without PyTorch.

:class:`SegmenterConfig` (the dual-attention U-Net) and :class:`TranslatorConfig` (the ResNet
generator) are JSON-friendly dataclasses with strict ``from_dict``; they also state the size rule of
their network (``size_multiple``: slice height and width must be multiples of it), which both
inference engines use to pad slices. The networks themselves are in :mod:`bigl.models` (which
re-exports these classes); this module imports no torch, so the ONNX Runtime engine can use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from bigl.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound="ModelConfig")


class ModelConfig:
    """Mixin for model config dataclasses: JSON-friendly ``to_dict`` / strict ``from_dict``.

    Subclasses implement ``validate()`` (raising :class:`ConfigError`), which runs on construction,
    so a config that exists can always build its model.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
        if not isinstance(data, dict):
            raise ConfigError(
                f"{cls.__name__} must be a JSON object (dict), got {type(data).__name__}",
                "pass the dictionary written by to_dict()",
            )
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} key(s): {', '.join(unknown)}",
                f"allowed keys are: {', '.join(sorted(known))}",
            )
        return cls(**data)


def require_int(config: object, name: str, minimum: int) -> None:
    """ConfigError unless ``config.<name>`` is an int (not a bool) >= minimum."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"{type(config).__name__}.{name} must be an integer >= {minimum}, got {value!r}",
            f"set {name} to a whole number of at least {minimum}",
        )


def require_choice(config: object, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(
            f"{type(config).__name__}.{name} must be one of {', '.join(choices)}, got {value!r}",
            f"set {name} to one of: {', '.join(choices)}",
        )



@dataclass
class SegmenterConfig(ModelConfig):
    """Size and options of :class:`DualAttentionUNet` (stored in model bundles as JSON).

    ``in_channels``: adjacent slices per input; BiGL segments the middle one, so training and
    bundles take an odd number (1: single slices, 3: 2.5D with a neighbour on each side).
    ``attention_reduction``: query/key width of position attention is ``C // attention_reduction``
    (DANet uses 8). ``norm``: 'batch' (default) or 'instance'. ``upsample``: 'transpose' or
    'bilinear'. ``fuse_conv``: add a 3x3 conv-norm-ReLU after summing the two attention outputs.
    ``dropout``: channel dropout on the attention output before the decoder.
    """

    in_channels: int = 1
    num_classes: int = 4
    base_channels: int = 16
    depth: int = 4
    attention_reduction: int = 8
    dropout: float = 0.0
    norm: str = "batch"
    upsample: str = "transpose"
    fuse_conv: bool = False

    def validate(self) -> None:
        require_int(self, "in_channels", 1)
        require_int(self, "num_classes", 2)
        require_int(self, "base_channels", 1)
        require_int(self, "depth", 1)
        require_int(self, "attention_reduction", 1)
        require_choice(self, "norm", ("batch", "instance"))
        require_choice(self, "upsample", ("transpose", "bilinear"))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(
                f"SegmenterConfig.dropout must be a number in [0, 1), got {self.dropout!r}",
                "use 0.0 for no dropout",
            )
        if not isinstance(self.fuse_conv, bool):
            raise ConfigError(
                f"SegmenterConfig.fuse_conv must be true or false, got {self.fuse_conv!r}", "use a boolean"
            )

    @property
    def bottleneck_channels(self) -> int:
        return self.base_channels * 2**self.depth

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2**self.depth



@dataclass
class TranslatorConfig(ModelConfig):
    """Size of :class:`ResnetGenerator` (stored in model bundles as JSON)."""

    channels: int = 1
    base_channels: int = 32
    n_downsample: int = 2
    n_blocks: int = 6
    upsample: str = "transpose"

    def validate(self) -> None:
        require_int(self, "channels", 1)
        require_int(self, "base_channels", 1)
        require_int(self, "n_downsample", 0)
        require_int(self, "n_blocks", 0)
        require_choice(self, "upsample", ("transpose", "resize"))

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2**self.n_downsample
