"""Support for tests: the core suite, the Slicer modules' suites and their self-tests inside Slicer."""

from __future__ import annotations

from pathlib import Path


def load_script(path: str | Path):
    """Import a stand-alone script (a benchmark or resource maker, not part of the package) as a module."""
    import importlib.util

    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_test_bundle(path: str | Path, *, image_size: int = 32, seed: int = 0, sharpen: float = 1.0,
                     attention_sharpen: float = 1.0, intensity: str = "percentile", in_channels: int = 1) -> Path:
    """Write a tiny untrained bundle (segmenter and both translators) that runs in seconds on a CPU.

    Its segmentations are meaningless; tests use it to exercise the whole flow in seconds, without
    the shipped model. ``sharpen`` scales the segmenter's last convolution so that the untrained
    class scores differ from voxel to voxel (a fresh network predicts nearly uniform scores, so
    every voxel would get the same label). ``attention_sharpen`` scales the query and key
    convolutions of position attention likewise, so that its attention map is not nearly uniform
    (whose per-volume min-max scaling would magnify rounding). ``intensity``: the bundle's intensity
    normalisation (``PreprocessConfig.intensity``). ``in_channels``: adjacent slices per input (2.5D
    when above 1). Needs torch (imported here, not at module import).
    """
    import torch

    from bigl.bundle import make_metadata, save_bundle
    from bigl.data.preprocess import PreprocessConfig
    from bigl.models import DualAttentionUNet, ResnetGenerator, SegmenterConfig, TranslatorConfig

    torch.manual_seed(seed)
    segmenter_config = SegmenterConfig(base_channels=4, depth=3, in_channels=in_channels)
    translator_config = TranslatorConfig(base_channels=4, n_downsample=2, n_blocks=1)
    segmenter = DualAttentionUNet(segmenter_config)
    if sharpen != 1.0:
        last = [module for module in segmenter.modules() if isinstance(module, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            last.weight.mul_(sharpen)
            if last.bias is not None:
                last.bias.zero_()
    if attention_sharpen != 1.0:
        with torch.no_grad():
            segmenter.attention.position.query.weight.mul_(attention_sharpen)
            segmenter.attention.position.key.weight.mul_(attention_sharpen)
    return save_bundle(
        Path(path),
        segmenter=segmenter,
        translator_s2t=ResnetGenerator(translator_config),
        translator_t2s=ResnetGenerator(translator_config),
        metadata=make_metadata(
            method="bigl",
            modality="t2",
            source_modality="t1",
            segmenter_config=segmenter_config,
            translator_config=translator_config,
            preprocessing=PreprocessConfig(image_size=image_size, margin=2, intensity=intensity),
            description="untrained test bundle (meaningless segmentations)",
        ),
    )
