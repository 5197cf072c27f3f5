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
    channel_summary,
    check_num_threads,
    check_targets,
    min_max as _min_max,
    out_of_memory_error,
    output_targets,
    position_summary,
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
                 num_threads: int | None = None, *, flip: bool | None = None, postprocess: bool | None = None,
                 invert_view: bool | None = None, refine_edges: bool | None = None,
                 contrast_search: bool | None = None):
        self._setup(bundle.metadata, bundle.path, batch_size, flip, postprocess, invert_view, refine_edges,
                    contrast_search)
        if check_num_threads(num_threads) is not None:
            torch.set_num_threads(num_threads)
        self.device = resolve_device(device)
        self.bundle = bundle.to(self.device)
        for network in bundle.networks().values():
            network.eval()

    @classmethod
    def from_path(cls, path: str | os.PathLike | None = None, device: str | torch.device = "auto",
                  batch_size: int = 16, num_threads: int | None = None, *, flip: bool | None = None,
                  postprocess: bool | None = None, invert_view: bool | None = None,
                  refine_edges: bool | None = None, contrast_search: bool | None = None) -> BiGLPredictor:
        """Load a bundle file (``None``: the shipped default model) and wrap it. ``flip``,
        ``postprocess``, ``invert_view``, ``refine_edges`` and ``contrast_search`` left at None take the
        bundle's ``inference`` metadata (default off)."""
        from bigl.bundle import default_bundle_path

        target = resolve_device(device)
        bundle = load_bundle(default_bundle_path() if path is None else path, device=target)
        return cls(bundle, device=target, batch_size=batch_size, num_threads=num_threads, flip=flip, postprocess=postprocess,
                   invert_view=invert_view, refine_edges=refine_edges, contrast_search=contrast_search)

    @property
    def has_translator(self) -> bool:
        return self.bundle.translator_t2s is not None

    # ----------------------------------------------------------------------------------------

    def _resize(self, stack: np.ndarray, size: int) -> np.ndarray:
        return _torch_resize(stack, size)

    def _tensor(self, batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(batch).to(self.device)

    @torch.inference_mode()
    def _run_segmenter(self, batch: np.ndarray, attention: bool) -> dict[str, np.ndarray]:
        result = self.bundle.segmenter(self._tensor(batch), return_aux=attention)
        if not attention:
            return {"logits": _numpy(result)}
        return {"logits": _numpy(result.logits), "features": _numpy(result.features),
                "position_attention": _numpy(result.position_attention),
                "channel_attention": _numpy(result.channel_attention)}

    @torch.inference_mode()
    def _run_translator(self, batch: np.ndarray) -> np.ndarray:
        return _numpy(self.bundle.translator_t2s(self._tensor(batch)))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().cpu().numpy()


def _torch_resize(stack: np.ndarray, size: int) -> np.ndarray:
    """[n, C, S, S] float32 -> [n, C, size, size], bilinear as :func:`bigl.prediction.resize_bilinear`,
    but multi-threaded by PyTorch: several times faster on whole volumes."""
    return F.interpolate(torch.from_numpy(stack), size=(size, size), mode="bilinear", align_corners=False).numpy()


def restore_on_grid(maps: np.ndarray, geometry, *, fill: float = 0.0) -> np.ndarray:
    """:func:`bigl.prediction.restore_on_grid` with the in-plane resize done by PyTorch."""
    from bigl import prediction

    return prediction.restore_on_grid(maps, geometry, fill=fill, resize=_torch_resize)
