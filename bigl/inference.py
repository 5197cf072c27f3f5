"""Inference with PyTorch: :class:`BiGLPredictor` runs a model bundle's networks on whole volumes.

What every engine shares (preparing the volume, slice batches, restoring maps onto the input
grid, the attention summaries, the optional outputs, progress, the files) is in
:mod:`bigl.prediction`, which imports no torch; its names are re-exported here. The ONNX Runtime
engine is :class:`bigl.onnxengine.OnnxPredictor`; :func:`bigl.prediction.open_predictor` picks one.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from bigl.bundle import Bundle, BundleError, load_bundle, resolve_device  # noqa: F401 (BundleError: API)
from bigl.prediction import (  # noqa: F401 (re-exported: the API of this module before the split)
    BACKGROUND,
    Prediction,
    Predictor,
    ProgressCallback,
    check_num_threads,
    check_targets,
    min_max as _min_max,
    out_of_memory_error,
    output_targets,
    segment_file,
)


class BiGLPredictor(Predictor):
    """Runs a bundle on whole volumes with PyTorch.

    ``device``: "auto" (CUDA when available), "cpu" or "cuda". ``batch_size``: slices per forward
    pass. ``num_threads``: CPU threads for PyTorch (process-wide, as ``torch.set_num_threads``).
    The bundle's networks are moved to the chosen device (in place).
    """

    engine = "torch"

    def __init__(self, bundle: Bundle, device: str | torch.device = "auto", batch_size: int = 16,
                 num_threads: int | None = None, *, flip: bool | None = None, postprocess: bool | None = None):
        self._setup(bundle.metadata, bundle.path, batch_size, flip, postprocess)
        if check_num_threads(num_threads) is not None:
            torch.set_num_threads(num_threads)
        self.device = resolve_device(device)
        self.bundle = bundle.to(self.device)
        for network in bundle.networks().values():
            network.eval()

    @classmethod
    def from_path(cls, path: str | os.PathLike | None = None, device: str | torch.device = "auto",
                  batch_size: int = 16, num_threads: int | None = None, *, flip: bool | None = None,
                  postprocess: bool | None = None) -> BiGLPredictor:
        """Load a bundle file (``None``: the shipped default model) and wrap it. ``flip`` and
        ``postprocess`` left at None take the bundle's ``inference`` metadata (default off)."""
        from bigl.bundle import default_bundle_path

        target = resolve_device(device)
        bundle = load_bundle(default_bundle_path() if path is None else path, device=target)
        return cls(bundle, device=target, batch_size=batch_size, num_threads=num_threads, flip=flip, postprocess=postprocess)

    @property
    def has_translator(self) -> bool:
        return self.bundle.translator_t2s is not None

    # ----------------------------------------------------------------------------------------

    def _resize(self, stack: np.ndarray, size: int) -> np.ndarray:
        # torch does the bilinear resize multi-threaded: several times faster on whole volumes
        resized = F.interpolate(torch.from_numpy(stack), size=(size, size), mode="bilinear", align_corners=False)
        return resized.numpy()

    def _padded_batches(self, slices: np.ndarray, multiple: int):
        """Yield (start, batch tensor on the device) with height and width padded to ``multiple``."""
        size = slices.shape[-1]
        padded = -(-size // multiple) * multiple
        for start in range(0, len(slices), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(slices[start:start + self.batch_size], dtype=np.float32))
            batch = batch[:, None]
            if padded != size:
                batch = F.pad(batch, (0, padded - size, 0, padded - size), value=BACKGROUND)
            yield start, batch.to(self.device)

    @torch.inference_mode()
    def _segment_slices(self, slices: np.ndarray, attention: bool, report: ProgressCallback,
                        flip_axis: int = 0) -> dict[str, np.ndarray]:
        """Softmax maps [n, K, S, S] and, when asked, raw attention summaries [n, S, S]; with a
        ``flip_axis`` (-2 or -1) the softmax maps average each slice and its mirror image."""
        segmenter = self.bundle.segmenter
        config = self.bundle.segmenter_config
        count, size = len(slices), slices.shape[-1]
        out = {"probabilities": np.empty((count, config.num_classes, size, size), dtype=np.float32)}
        if attention:
            out["position"] = np.empty((count, size, size), dtype=np.float32)
            out["channel"] = np.empty((count, size, size), dtype=np.float32)
        for start, batch in self._padded_batches(slices, 2**config.depth):
            stop = start + len(batch)
            result = segmenter(batch, return_aux=attention)
            logits = result.logits if attention else result
            probabilities = torch.softmax(logits.float(), dim=1)
            if flip_axis:
                mirrored = segmenter(batch.flip(flip_axis))
                probabilities = 0.5 * (probabilities + torch.softmax(mirrored.float(), dim=1).flip(flip_axis))
            out["probabilities"][start:stop] = _crop(probabilities, size)
            if attention:
                grid = result.features.shape[-2:]
                padded = batch.shape[-2:]
                out["position"][start:stop] = _crop(_to_slice(_position_summary(result, grid), padded), size)[:, 0]
                out["channel"][start:stop] = _crop(_to_slice(_channel_summary(result), padded), size)[:, 0]
            report(len(batch))
        return out

    @torch.inference_mode()
    def _translate_slices(self, slices: np.ndarray, report: ProgressCallback) -> np.ndarray:
        translator = self.bundle.translator_t2s
        config = self.bundle.translator_config
        count, size = len(slices), slices.shape[-1]
        out = np.empty((count, size, size), dtype=np.float32)
        for start, batch in self._padded_batches(slices, 2**config.n_downsample):
            out[start:start + len(batch)] = _crop(translator(batch).float(), size)[:, 0]
            report(len(batch))
        return out


def restore_on_grid(maps: np.ndarray, geometry, *, fill: float = 0.0) -> np.ndarray:
    """:func:`bigl.prediction.restore_on_grid` with the in-plane resize done by PyTorch."""
    from bigl import prediction

    def resize(stack: np.ndarray, size: int) -> np.ndarray:
        return F.interpolate(torch.from_numpy(stack), size=(size, size), mode="bilinear", align_corners=False).numpy()

    return prediction.restore_on_grid(maps, geometry, fill=fill, resize=resize)


# --------------------------------------------------------------------------------------------
# attention summaries (the numpy versions in bigl.prediction are the ONNX engine's)


def _position_summary(result, grid: tuple[int, int]) -> torch.Tensor:
    """[B, 1, h, w]: column mean of the N x N position attention (attention each position receives)."""
    received = result.position_attention.float().mean(dim=1)  # rows sum to 1; mean over the queries
    return received.reshape(-1, 1, *grid)


def _channel_summary(result) -> torch.Tensor:
    """[B, 1, h, w]: bottleneck feature magnitude, channels weighted by the channel attention they receive."""
    weights = result.channel_attention.float().mean(dim=1)  # [B, C]
    return torch.einsum("bc,bchw->bhw", weights, result.features.float().abs())[:, None]


def _to_slice(summary: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return F.interpolate(summary, size=tuple(size), mode="bilinear", align_corners=False)


def _crop(batch: torch.Tensor, size: int) -> np.ndarray:
    return batch[..., :size, :size].cpu().numpy()
