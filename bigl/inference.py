"""Inference: a 3D scan (numpy array + affine) -> BraTS labels, and optional explanation volumes.

The volume is prepared exactly as in training (:func:`bigl.data.preprocess.prepare_volume`: brain
crop, percentile normalisation, square slices of the bundle's image size), the slices go through
the segmenter in batches, and the softmax maps are restored onto the original voxel grid with
:func:`~bigl.data.preprocess.restore_maps` before the argmax, so the labels have the input's exact
shape and affine.

Slices whose size is not a multiple of a network's stride are padded with background (-1) at
the bottom and right for that network, and its outputs cropped back.

Optional outputs, all on the input grid:

* ``probabilities``: float32 ``[4, X, Y, Z]`` softmax maps, summing to 1 per voxel; outside the
  brain crop the background class has probability 1.
* ``attention["position"]``: for each slice, the mean attention each bottleneck position
  *receives* in the N x N position-attention matrix (its column mean: how much the other
  positions look at it), reshaped to the h x w bottleneck grid and upsampled bilinearly to the
  slice.
* ``attention["channel"]``: for each slice, the magnitude of the bottleneck features after the
  dual-attention block, each channel weighted by the mean attention it receives in the C x C
  channel-attention matrix (column mean), i.e. where the channels that channel attention
  emphasises are active; upsampled bilinearly to the slice.

  Both attention maps are scaled per volume to [0, 1] (min-max over all prepared slices) and
  are 0 outside the brain crop.
* ``translated``: the scan translated to the source modality by the bundle's G_t->s, in the
  normalised units [-1, 1] the networks use; -1 (background) outside the brain crop.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bigl.bundle import Bundle, BundleError, default_bundle_path, load_bundle, resolve_device
from bigl.data.naming import ATTENTION_KINDS, attention_paths, case_name, is_nifti_path, modality_from_name
from bigl.errors import ConfigError, InputError
from bigl.labels import classes_to_labels

ProgressCallback = Callable[[int, int], None]

#: Slices in the padded square background take this value (the normalised background).
_BACKGROUND = -1.0
#: Above this many batches a terminal progress bar is shown when no callback is given.
_BAR_MIN_BATCHES = 4
#: Messages of allocation failures: PyTorch's CUDA and CPU allocators, cuBLAS.
_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)


@dataclass
class Prediction:
    labels: np.ndarray  # uint8 BraTS labels {0,1,2,4}, input shape
    affine: np.ndarray
    probabilities: np.ndarray | None = None  # float32 [4, X, Y, Z]
    attention: dict[str, np.ndarray] | None = None  # "position", "channel": float32 [X, Y, Z]
    translated: np.ndarray | None = None  # float32 [X, Y, Z], source-modality image in [-1, 1]
    warnings: list[str] = field(default_factory=list)  # why the result may mean little (bigl.plausibility)


class BiGLPredictor:
    """Runs a bundle on whole volumes.

    ``device``: "auto" (CUDA when available), "cpu" or "cuda". ``batch_size``: slices per forward
    pass. ``num_threads``: CPU threads for PyTorch (process-wide, as ``torch.set_num_threads``).
    The bundle's networks are moved to the chosen device (in place).
    """

    def __init__(self, bundle: Bundle, device: str | torch.device = "auto", batch_size: int = 16,
                 num_threads: int | None = None, *, flip: bool | None = None, postprocess: bool | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch size must be a whole number >= 1, got {batch_size!r}", "use e.g. --batch-size 16")
        if num_threads is not None:
            if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
                raise ConfigError(f"thread count must be a whole number >= 1, got {num_threads!r}", "use e.g. --threads 4")
            torch.set_num_threads(num_threads)
        self.device = resolve_device(device)
        self.bundle = bundle.to(self.device)
        self.batch_size = batch_size
        defaults = bundle.metadata.get("inference") or {}
        #: Test-time flips: average the class probabilities of each slice and its left-right mirror.
        self.flip = bool(defaults.get("flip", False)) if flip is None else bool(flip)
        #: bigl.postprocess rules on the label map (the probabilities are left as predicted).
        self.postprocess = bool(defaults.get("postprocess", False)) if postprocess is None else bool(postprocess)
        for network in bundle.networks().values():
            network.eval()

    @classmethod
    def from_path(cls, path: str | os.PathLike | None = None, device: str | torch.device = "auto",
                  batch_size: int = 16, num_threads: int | None = None, *, flip: bool | None = None,
                  postprocess: bool | None = None) -> BiGLPredictor:
        """Load a bundle file (``None``: the shipped default model) and wrap it. ``flip`` and
        ``postprocess`` left at None take the bundle's ``inference`` metadata (default off)."""
        target = resolve_device(device)
        bundle = load_bundle(default_bundle_path() if path is None else path, device=target)
        return cls(bundle, device=target, batch_size=batch_size, num_threads=num_threads, flip=flip, postprocess=postprocess)

    # ----------------------------------------------------------------------------------------

    def check_modality(self, modality: str | None, *, source: str = "") -> None:
        """InputError when the scan's modality is known and differs from the one the model segments."""
        if modality is None:
            return
        from bigl.data.brats import normalise_modality

        given = normalise_modality(modality)
        expected = self.bundle.modality
        if given != expected:
            raise InputError(
                f"model expects {expected.upper()}, got {given.upper()}{source}",
                f"give a {expected.upper()} scan, or use a model trained for {given.upper()} "
                "(`bigl info MODEL` shows which modality a model segments)",
            )

    def predict(self, volume: np.ndarray, affine: np.ndarray | None = None, *, probabilities: bool = False,
                attention: bool = False, translated: bool = False, progress: ProgressCallback | None = None,
                modality: str | None = None, name: str | None = None) -> Prediction:
        """Segment a 3D volume; see the module docstring for the optional outputs.

        ``modality``: the scan's modality when known (checked against the model's; when None, the
        prediction carries a warning that it could not be checked). ``name``: used in messages.
        ``progress(done, total)`` is called after every batch, counting slices (twice the slice
        count when the translation is requested). ``Prediction.warnings`` lists what makes the
        result unlikely to mean anything (:mod:`bigl.plausibility`); it is computed anyway.
        """
        from bigl import plausibility
        from bigl.data.io import check_scan

        name = name or "the image"
        self.check_modality(modality)
        translator = self.bundle.translator_t2s
        if translated and translator is None:
            raise BundleError(
                f"the model{_bundle_label(self.bundle)} has no target-to-source translator, so it cannot "
                "produce a translated image",
                "leave out the translated output, or use a BiGL bundle (method 'bigl') that holds translators",
            )
        data = _as_scan(volume, name)
        check_scan(data, name=name)
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise InputError(f"the affine of {name} must be a 4x4 matrix, got shape {affine.shape}",
                             "pass the affine of the NIfTI file (nibabel image.affine)")

        warnings = plausibility.scan_warnings(data.shape, affine, name=name)
        unchecked = plausibility.modality_warning(modality, self.bundle.modality, name=name)
        warnings += [unchecked] if unchecked else []
        try:
            prediction = self._predict(data, affine, probabilities=probabilities, attention=attention,
                                       translated=translated, progress=progress)
        except (MemoryError, RuntimeError) as exc:
            error = out_of_memory_error(exc, name=name, batch_size=self.batch_size)
            if error is None:
                raise
            raise error from None
        too_large = plausibility.tumour_warning(prediction.labels, affine, name=name)
        prediction.warnings = warnings + ([too_large] if too_large else [])
        return prediction

    def _predict(self, data: np.ndarray, affine: np.ndarray, *, probabilities: bool, attention: bool,
                 translated: bool, progress: ProgressCallback | None) -> Prediction:
        from bigl.data.preprocess import left_right_axis, prepare_volume

        preprocessing = self.bundle.preprocessing
        prepared = prepare_volume(data, preprocessing)
        slices, geometry = prepared.slices, prepared.geometry
        passes = 2 if translated else 1
        batches = passes * _ceil_div(len(slices), self.batch_size)
        flip_axis = left_right_axis(affine, preprocessing.slice_axis) if self.flip else 0
        with _Progress(progress, total=passes * len(slices), batches=batches) as report:
            maps = self._segment_slices(slices, attention, report, flip_axis=flip_axis)
            source_image = self._translate_slices(slices, report) if translated else None

        class_maps = maps.pop("probabilities")
        restored = np.empty((class_maps.shape[1], *data.shape), dtype=np.float32)
        restored[:1] = restore_on_grid(class_maps[:, :1], geometry, fill=1.0)
        restored[1:] = restore_on_grid(class_maps[:, 1:], geometry, fill=0.0)
        del class_maps
        np.clip(restored, 0.0, 1.0, out=restored)
        restored /= restored.sum(axis=0, keepdims=True)
        labels = classes_to_labels(np.argmax(restored, axis=0)).astype(np.uint8)
        if self.postprocess:
            from bigl.postprocess import postprocess_labels

            labels = postprocess_labels(labels, np.linalg.norm(affine[:3, :3], axis=0))

        attention_maps = None
        if attention:
            attention_maps = {
                kind: np.clip(restore_on_grid(_min_max(maps[kind]), geometry, fill=0.0), 0.0, 1.0)
                for kind in ATTENTION_KINDS
            }
        translated_image = None
        if source_image is not None:
            translated_image = np.clip(restore_on_grid(source_image, geometry, fill=_BACKGROUND), -1.0, 1.0)
        return Prediction(
            labels=labels,
            affine=affine,
            probabilities=restored if probabilities else None,
            attention=attention_maps,
            translated=translated_image,
        )

    # ----------------------------------------------------------------------------------------

    def _padded_batches(self, slices: np.ndarray, multiple: int):
        """Yield (start, batch tensor on the device) with height and width padded to ``multiple``."""
        size = slices.shape[-1]
        padded = _ceil_div(size, multiple) * multiple
        for start in range(0, len(slices), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(slices[start:start + self.batch_size], dtype=np.float32))
            batch = batch[:, None]
            if padded != size:
                batch = F.pad(batch, (0, padded - size, 0, padded - size), value=_BACKGROUND)
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
    """:func:`bigl.data.preprocess.restore_maps`, with the in-plane resize done by PyTorch.

    Bilinear interpolation with half-pixel centres and edge clamping is what ``restore_maps``
    does too; torch does it multi-threaded in float32, which makes it several times faster on
    whole volumes. ``restore_maps`` then only un-pads and places the slices on the grid.
    """
    from bigl.data.preprocess import restore_maps

    stack = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    single = stack.ndim == 3
    if single:
        stack = stack[:, None]
    if geometry.square != geometry.image_size:
        stack = F.interpolate(stack, size=(geometry.square, geometry.square), mode="bilinear", align_corners=False)
    resized = stack.numpy()
    return restore_maps(resized[:, 0] if single else resized, replace(geometry, image_size=geometry.square), fill=fill)


# --------------------------------------------------------------------------------------------
# attention summaries


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


def _min_max(maps: np.ndarray) -> np.ndarray:
    low, high = float(maps.min()), float(maps.max())
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return np.zeros_like(maps)
    return (maps - low) / (high - low)


# --------------------------------------------------------------------------------------------
# helpers


def out_of_memory_error(exc: BaseException, *, name: str | None = None,
                        batch_size: int | None = None) -> ConfigError | None:
    """A ConfigError with a fix when ``exc`` is an allocation failure (GPU or main memory), else None.

    Recognises :class:`MemoryError`, ``torch.OutOfMemoryError`` (CUDA) and the RuntimeErrors of
    PyTorch's CPU allocator and cuBLAS. The message says "out of memory" and which memory.
    """
    text = str(exc)
    torch_out_of_memory = type(exc).__name__ == "OutOfMemoryError"  # torch.cuda.OutOfMemoryError
    allocation_failed = (isinstance(exc, MemoryError) or torch_out_of_memory
                         or (isinstance(exc, RuntimeError) and _OUT_OF_MEMORY.search(text) is not None))
    if not allocation_failed:
        return None
    on_gpu = re.search(r"cuda|cublas|gpu", text, re.IGNORECASE) is not None or (
        torch_out_of_memory and "cpu" not in text.lower())
    context = (f" while segmenting {name}" if name else "") + (f" (batch size {batch_size})" if batch_size else "")
    smaller_batch = (f"a smaller --batch-size (e.g. {max(1, batch_size // 4)})"
                     if batch_size and batch_size > 1 else None)
    if on_gpu:
        hint = "use --device cpu (slower, but uses the main memory)" + (f", or {smaller_batch}" if smaller_batch else "")
        return ConfigError(f"the GPU ran out of memory{context}", hint)
    fixes = [f"use {smaller_batch}"] if smaller_batch else []
    fixes += ["close other programs or crop the scan to the head", "on a machine with an NVIDIA GPU, use --device cuda"]
    return ConfigError(f"the computer ran out of memory (RAM){context}", "; ".join(fixes))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _bundle_label(bundle: Bundle) -> str:
    return f" {bundle.path.name}" if bundle.path is not None else ""


def _as_scan(volume, name: str) -> np.ndarray:
    """The volume as a finite float32 3D array, or an InputError saying what is wrong."""
    data = np.asarray(getattr(volume, "data", volume))
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{name} is a {data.ndim}D array of shape {data.shape}; BiGL segments 3D volumes",
                         "give one 3D scan (all slices of one modality)")
    if data.dtype.kind not in "biuf":
        raise InputError(f"{name} has voxel type {data.dtype}, not a grey-level image", "give a scalar MR volume")
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise InputError(f"{name} has NaN or infinite values", "replace them (e.g. numpy.nan_to_num) first")
    return data


class _Progress:
    """Counts slices and forwards to a callback, or shows a tqdm bar on a terminal for long runs."""

    def __init__(self, callback: ProgressCallback | None, total: int, batches: int):
        self.callback, self.total, self.done = callback, total, 0
        self.bar = None
        if callback is None and batches >= _BAR_MIN_BATCHES:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="slice", desc="segmenting", leave=False, disable=None)

    def __enter__(self) -> _Progress:
        return self

    def __call__(self, count: int) -> None:
        self.done += count
        if self.callback is not None:
            self.callback(self.done, self.total)
        if self.bar is not None:
            self.bar.update(count)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# files


def segment_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: str | os.PathLike | Bundle | BiGLPredictor | None = None,
    device: str = "auto",
    attention_out: str | os.PathLike | None = None,
    translated_out: str | os.PathLike | None = None,
    probabilities_out: str | os.PathLike | None = None,
    batch_size: int = 16,
    num_threads: int | None = None,
    modality: str | None = None,
    progress: ProgressCallback | None = None,
) -> Prediction:
    """Segment one NIfTI scan and write the label map (and the requested extra volumes).

    ``model``: a bundle path, a loaded :class:`Bundle` or :class:`BiGLPredictor` (reused across
    files), or None for the shipped default model. Outputs are written on the input's exact grid
    (its header, qform and sform are copied) and only after everything was computed, each through
    a temporary file, so a failure leaves no half-written output. The outputs follow
    :func:`bigl.files.check_outputs`: never the input or the model, and beside the input never a
    file BiGL did not write (a label map of the case survives); they are marked as BiGL outputs.
    ``modality`` defaults to the one a BraTS-style file name states (``..._t1.nii.gz``).
    """
    from bigl.data.io import load_volume

    source = Path(input).expanduser()
    targets = output_targets(source, output, attention_out=attention_out, translated_out=translated_out,
                             probabilities_out=probabilities_out)
    check_targets(source, targets, inputs=[_model_path(model)])

    scan = load_volume(source, kind="image")
    predictor = _predictor_for(model, device, batch_size, num_threads)
    from_name = ""
    if modality is None:
        modality = modality_from_name(source)
        from_name = " (from the file name)"
    try:
        predictor.check_modality(modality, source=f" for {source.name}{from_name}")
    except InputError as exc:
        if from_name:
            exc.hint += "; if the file name is misleading, state the modality (--modality)"
        raise
    prediction = predictor.predict(
        scan.data, scan.affine, probabilities=probabilities_out is not None, attention=attention_out is not None,
        translated=translated_out is not None, progress=progress, name=source.name, modality=modality,
    )
    volumes = {"labels": prediction.labels}
    if prediction.attention is not None:
        volumes.update({f"attention_{k}": v for k, v in prediction.attention.items()})
    if prediction.translated is not None:
        volumes["translated"] = prediction.translated
    if prediction.probabilities is not None:
        volumes["probabilities"] = np.moveaxis(prediction.probabilities, 0, -1)  # classes on NIfTI's 4th axis
    _write_on_grid_of(source, scan.affine, {targets[key]: volumes[key] for key in targets})
    return prediction


def _predictor_for(model, device, batch_size, num_threads) -> BiGLPredictor:
    if isinstance(model, BiGLPredictor):
        return model
    if isinstance(model, Bundle):
        return BiGLPredictor(model, device=device, batch_size=batch_size, num_threads=num_threads)
    return BiGLPredictor.from_path(model, device=device, batch_size=batch_size, num_threads=num_threads)


def output_targets(source: str | os.PathLike, output: str | os.PathLike, *, attention_out=None,
                   translated_out=None, probabilities_out=None) -> dict[str, Path]:
    """The files :func:`segment_file` writes for ``source``: ``{output kind: path}``."""
    case = case_name(source)
    targets: dict[str, Path] = {"labels": Path(output).expanduser()}
    if attention_out is not None:
        targets.update({f"attention_{k}": p for k, p in attention_paths(attention_out, case).items()})
    if translated_out is not None:
        targets["translated"] = Path(translated_out).expanduser()
    if probabilities_out is not None:
        targets["probabilities"] = Path(probabilities_out).expanduser()
    return targets


#: Output kinds as messages name them.
_OUTPUT_NAMES = {"labels": "label map", "translated": "translated image", "probabilities": "class probabilities",
                 "attention_position": "position attention map", "attention_channel": "channel attention map"}


def check_targets(source: Path, targets: dict[str, Path], *, inputs=(), case_folders=None) -> None:
    """InputError unless every target is a NIfTI name that :func:`bigl.files.check_outputs`
    allows; the source, ``inputs`` (the model) and, by default, the source's folder are protected."""
    from bigl.files import check_outputs

    for key, path in targets.items():
        if not is_nifti_path(path):
            raise InputError(f"cannot write the {key.replace('_', ' ')} to {path}: the name must end in .nii or .nii.gz",
                             "choose an output name like out.nii.gz")
    check_outputs({f"{_OUTPUT_NAMES.get(key, key)} of {source.name}": path for key, path in targets.items()},
                  [source, *inputs], case_folders=[source.parent] if case_folders is None else case_folders,
                  hint="choose another output name or folder, e.g. <case>_seg.nii.gz in a folder of its own")


def _model_path(model) -> Path | None:
    """The bundle file a ``model`` argument reads (None: a loaded model without a file, or the default)."""
    if isinstance(model, BiGLPredictor):
        model = model.bundle
    if isinstance(model, Bundle):
        return model.path
    if model is None:
        from bigl import bundle

        return bundle.DEFAULT_BUNDLE_PATH
    return Path(model).expanduser()


def _write_on_grid_of(reference: Path, affine: np.ndarray, volumes: dict[Path, np.ndarray]) -> None:
    """Write arrays with the reference file's header (same grid, qform and sform), all or nothing,
    marked as BiGL outputs: every volume goes to a temporary file beside its target, and only when
    all succeeded are they renamed into place (:func:`bigl.files.atomic_outputs`)."""
    from bigl.data.io import save_volume
    from bigl.files import atomic_outputs

    with atomic_outputs(list(volumes)) as temporaries:
        for tmp, data in zip(temporaries, volumes.values()):
            save_volume(tmp, data, affine, like=reference, output=True)
