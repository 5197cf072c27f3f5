"""Networks of BiGL: the dual-attention U-Net segmenter, the image translator and the discriminators.

Models that go into bundles (:class:`DualAttentionUNet`, :class:`ResnetGenerator`) keep the config
dataclass they were built from in ``model.config``; ``Config.from_dict(metadata)`` rebuilds them.
"""

from __future__ import annotations

from bigl.models.common import count_parameters
from bigl.models.discriminators import AttentionDiscriminator, FeatureDiscriminator, OutputDiscriminator
from bigl.models.segmenter import DualAttentionUNet, SegmenterConfig, SegmenterOutput
from bigl.models.translator import PatchDiscriminator, ResnetGenerator, TranslatorConfig

__all__ = [
    "AttentionDiscriminator",
    "DualAttentionUNet",
    "FeatureDiscriminator",
    "OutputDiscriminator",
    "PatchDiscriminator",
    "ResnetGenerator",
    "SegmenterConfig",
    "SegmenterOutput",
    "TranslatorConfig",
    "count_parameters",
]
