"""What every inference engine shares: a 3D scan (numpy array + affine) -> BraTS labels, and optional
explanation volumes. No PyTorch here: the ONNX Runtime engine (:mod:`bigl.onnxengine`) runs on top
of this module without ever importing torch; the PyTorch engine is :mod:`bigl.inference`.

The volume is prepared exactly as in training (:func:`bigl.data.preprocess.prepare_volume`: brain
crop, percentile normalisation, square slices of the bundle's image size), the slices go through
the segmenter in batches, and the softmax maps are restored onto the original voxel grid with
:func:`restore_on_grid` before the argmax, so the labels have the input's exact shape and affine.

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

An engine subclasses :class:`Predictor` and implements ``_run_segmenter`` and ``_run_translator``
(one padded batch of slices in, numpy outputs back; and may replace ``_resize``); the slice loops,
padding, softmax, flips and attention summaries are the Predictor's. :func:`open_predictor` picks
an engine.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from bigl.bundle import INFERENCE_OPTIONS, Bundle, BundleError, ModelDescription
from bigl.data.io import affine_spacing
from bigl.data.naming import ATTENTION_KINDS, attention_paths, case_name, is_nifti_path, modality_from_name
from bigl.errors import ConfigError, InputError
from bigl.labels import classes_to_labels
from bigl.runfolder import ENGINE_CHOICES

ProgressCallback = Callable[[int, int], None]

#: The brain-intensity gammas the contrast search tries: the scan as it is and a brighter view.
#: Wider steps (0.5) took the scans too far from what the models learnt on; the darker view (1.4)
#: was less confident than the scan as it is on every scan searched on the development splits, so
#: it never won and only cost a pass (docs/results.md, "Contrast search").
CONTRAST_GAMMAS = (0.7, 1.0)
#: Slices in the padded square background take this value (the normalised background).
BACKGROUND = -1.0
#: Above this many batches a terminal progress bar is shown when no callback is given.
_BAR_MIN_BATCHES = 4
#: Messages of allocation failures: PyTorch's CUDA and CPU allocators, cuBLAS, ONNX Runtime.
_OUT_OF_MEMORY = re.compile(
    r"out of memory|can't allocate memory|CUBLAS_STATUS_ALLOC_FAILED|Failed to allocate memory|bad_alloc",
    re.IGNORECASE)


@dataclass
class Prediction:
    labels: np.ndarray  # uint8 BraTS labels {0,1,2,4}, input shape
    affine: np.ndarray
    probabilities: np.ndarray | None = None  # float32 [4, X, Y, Z]
    attention: dict[str, np.ndarray] | None = None  # "position", "channel": float32 [X, Y, Z]
    translated: np.ndarray | None = None  # float32 [X, Y, Z], source-modality image in [-1, 1]
    warnings: list[str] = field(default_factory=list)  # why the result may mean little (bigl.plausibility)
    confidence: float | None = None  # tumour_confidence of the network's slices (plain view); None: no tumour found
    contrast_gamma: float | None = None  # the view the contrast search kept, 1.0: the scan as it is (None: search off)


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a whole number >= 1, got {batch_size!r}", "use e.g. --batch-size 16")
    return batch_size


def check_num_threads(num_threads) -> int | None:
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ConfigError(f"thread count must be a whole number >= 1, got {num_threads!r}", "use e.g. --threads 4")
    return num_threads


class Predictor(ModelDescription):
    """Runs a model on whole volumes; the engine-independent part (see the module docstring).

    Subclasses set ``engine`` and call :meth:`_setup` (``metadata``: the bundle's JSON description,
    whose modality, configs and preprocessing :class:`~bigl.bundle.ModelDescription` reads); they
    implement :meth:`_run_segmenter` and :meth:`_run_translator`.
    """

    engine = "?"
    metadata: dict
    model_path: Path | None = None

    def _setup(self, metadata: dict, model_path: Path | None, batch_size: int, flip: bool | None,
               postprocess: bool | None, invert_view: bool | None = None, refine_edges: bool | None = None,
               contrast_search: bool | None = None) -> None:
        self.metadata = metadata
        self.model_path = model_path
        self.batch_size = check_batch_size(batch_size)
        defaults = metadata.get("inference") or {}
        #: Test-time flips: average the class probabilities of each slice and its left-right mirror.
        self.flip = bool(defaults.get("flip", False)) if flip is None else bool(flip)
        #: Inverted view: average them also with those of the slice with mirrored brain intensities
        #: (bigl.data.preprocess.mirror_brain), which looks like the source modality.
        self.invert_view = bool(defaults.get("invert_view", False)) if invert_view is None else bool(invert_view)
        #: bigl.postprocess rules on the label map (the probabilities are left as predicted).
        self.postprocess = bool(defaults.get("postprocess", False)) if postprocess is None else bool(postprocess)
        #: bigl.postprocess.refine_edges: the whole tumour's edge redrawn on the scan (before ``postprocess``).
        self.refine_edges = bool(defaults.get("refine_edges", False)) if refine_edges is None else bool(refine_edges)
        #: Contrast search: when the model is unsure of a scan, also try it at the other brain-intensity
        #: gammas of CONTRAST_GAMMAS and keep the view whose tumour confidence is highest (_search_contrast).
        self.contrast_search = (bool(defaults.get("contrast_search", False)) if contrast_search is None
                                else bool(contrast_search))
        #: Below this tumour confidence a prediction warns that the model is unsure (None: the model
        #: records no floor, so the confidence is reported without a warning).
        self.confidence_floor = metadata.get("confidence_floor")

    def inference_options(self) -> dict[str, bool]:
        """What this predictor does beyond the arg-max, by the names of a model's ``inference`` metadata."""
        return {name: bool(getattr(self, name)) for name in INFERENCE_OPTIONS}

    def _finish_labels(self, labels: np.ndarray, data: np.ndarray, affine: np.ndarray,
                       brain: np.ndarray | None = None) -> np.ndarray:
        """The label rules that are on (edge refinement, post-processing), applied to an arg-max label map
        of ``data`` (``brain``: its brain mask when already known)."""
        if not (self.refine_edges or self.postprocess):
            return labels
        from bigl.postprocess import finish_labels

        return finish_labels(labels, data, affine_spacing(affine), refine=self.refine_edges, postprocess=self.postprocess,
                             brain=brain)

    @property
    def _description_path(self) -> Path | None:
        return self.model_path

    @property
    def has_translator(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------

    def check_modality(self, modality: str | None, *, source: str = "") -> None:
        """InputError when the scan's modality is known and differs from the one the model segments."""
        if modality is None:
            return
        from bigl.data.brats import normalise_modality

        given = normalise_modality(modality)
        expected = self.modality
        if given != expected:
            raise InputError(
                f"model expects {expected.upper()}, got {given.upper()}{source}",
                f"give a {expected.upper()} scan, or use a model trained for {given.upper()} "
                "(`bigl info MODEL` shows which modality a model segments)",
            )

    def predict(self, volume: np.ndarray, affine: np.ndarray | None = None, *, probabilities: bool = False,
                attention: bool = False, translated: bool = False, progress: ProgressCallback | None = None,
                modality: str | None = None, name: str | None = None, contrast_gamma: float | None = None) -> Prediction:
        """Segment a 3D volume; see the module docstring for the optional outputs.

        ``modality``: the scan's modality when known (checked against the model's; when None, the
        prediction carries a warning that it could not be checked). ``name``: used in messages.
        ``progress(done, total)`` is called after every batch, counting slices (twice the slice
        count when the translation is requested). ``Prediction.warnings`` lists what makes the
        result unlikely to mean anything (:mod:`bigl.plausibility`); it is computed anyway.
        ``contrast_gamma``: segment this contrast view of the scan (:func:`bigl.data.preprocess.gamma_brain`)
        instead of the scan as it is, with no search (for studies of the views).
        """
        from bigl import plausibility
        from bigl.data.io import check_scan

        name = name or "the image"
        self.check_modality(modality)
        if contrast_gamma is not None and (isinstance(contrast_gamma, bool) or not isinstance(contrast_gamma, (int, float))
                                           or not 0 < contrast_gamma < np.inf):
            raise ConfigError(f"a contrast gamma must be a number above 0, got {contrast_gamma!r}",
                              f"use one of {', '.join(map(str, CONTRAST_GAMMAS))}, or None for the scan as it is")
        if translated and not self.has_translator:
            raise self.no_translator_error()
        data = _as_scan(volume, name)
        check_scan(data, name=name)
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise InputError(f"the affine of {name} must be a 4x4 matrix, got shape {affine.shape}",
                             "pass the affine of the NIfTI file (nibabel image.affine)")

        warnings = plausibility.scan_warnings(data.shape, affine, name=name)
        unchecked = plausibility.modality_warning(modality, self.modality, name=name)
        warnings += [unchecked] if unchecked else []
        if self.flip:
            from bigl.data.preprocess import left_right_axis

            if left_right_axis(affine, self.preprocessing.slice_axis) == 0:
                warnings.append(
                    f"test-time flips are on, but the left-right axis of {name} runs through the slices "
                    "(sagittal slices), so no slice was mirrored and the result is that of a run without flips; "
                    "check the image orientation (the affine), or leave flips off for this scan")
        try:
            prediction = self._predict(data, affine, probabilities=probabilities, attention=attention,
                                       translated=translated, progress=progress, contrast_gamma=contrast_gamma)
        except (MemoryError, RuntimeError) as exc:
            error = out_of_memory_error(exc, name=name, batch_size=self.batch_size)
            if error is None:
                raise
            raise error from None
        too_large = plausibility.tumour_warning(prediction.labels, affine, name=name)
        unsure = plausibility.confidence_warning(prediction.confidence, self.confidence_floor, name=name)
        prediction.warnings = warnings + [warning for warning in (too_large, unsure) if warning]
        return prediction

    def _predict(self, data: np.ndarray, affine: np.ndarray, *, probabilities: bool, attention: bool,
                 translated: bool, progress: ProgressCallback | None, contrast_gamma: float | None = None) -> Prediction:
        from bigl.data.preprocess import gamma_brain, left_right_axis, prepare_volume

        preprocessing = self.preprocessing
        prepared = prepare_volume(data, preprocessing)
        slices, geometry = prepared.slices, prepared.geometry
        passes = 2 if translated else 1
        batches = passes * ceil_div(len(slices), self.batch_size)
        flip_axis = left_right_axis(affine, preprocessing.slice_axis) if self.flip else 0
        gamma = contrast_gamma
        with Progress(progress, total=passes * len(slices), batches=batches) as report:
            view = slices if gamma is None else gamma_brain(slices, gamma)
            maps = self._segment_slices(view, attention, report, flip_axis=flip_axis)
            if self.contrast_search and gamma is None:
                gamma, maps = self._search_contrast(slices, maps, attention, report, flip_axis)
            source_image = self._translate_slices(slices, report) if translated else None

        class_maps = maps.pop("probabilities")
        tumour_sum, tumour_pixels = maps.pop("confidence")
        confidence = tumour_sum / tumour_pixels if tumour_pixels else None
        restored = None
        if probabilities:
            restored = np.empty((class_maps.shape[1], *data.shape), dtype=np.float32)
            restored[:1] = self._restore(class_maps[:, :1], geometry, fill=1.0)
            restored[1:] = self._restore(class_maps[:, 1:], geometry, fill=0.0)
            np.clip(restored, 0.0, 1.0, out=restored)
            restored /= restored.sum(axis=0, keepdims=True)
        labels = self._finish_labels(labels_on_grid(class_maps, geometry, resize=self._resize), data, affine,
                                     prepared.mask)
        del class_maps

        attention_maps = None
        if attention:
            attention_maps = {
                kind: np.clip(self._restore(min_max(maps[kind]), geometry, fill=0.0), 0.0, 1.0)
                for kind in ATTENTION_KINDS
            }
        translated_image = None
        if source_image is not None:
            translated_image = np.clip(self._restore(source_image, geometry, fill=BACKGROUND), -1.0, 1.0)
        return Prediction(
            labels=labels,
            affine=affine,
            probabilities=restored,
            attention=attention_maps,
            translated=translated_image,
            confidence=confidence,
            contrast_gamma=gamma,
        )

    def _search_contrast(self, slices: np.ndarray, maps: dict, attention: bool, report: Progress,
                         flip_axis: int) -> tuple[float, dict]:
        """(gamma, maps) of the contrast search, given the ``maps`` of the scan as it is.

        When the model is sure of the scan as it is (its plain-pass tumour confidence at or above
        the model's floor) that is the answer. Otherwise each other gamma of CONTRAST_GAMMAS gets one
        plain pass of its view (:func:`bigl.data.preprocess.gamma_brain`), and the view with the
        highest confidence wins (segmented again when flips or the inverted view are on); the scan
        as it is wins ties and when no view shows any tumour. A model that records no floor searches
        on every scan.

        Why: the failures left are whole scans, and they come with the scan's contrast: on the
        scans the shipped recipe was unsure of, the same model found more of the tumour in the
        contrast view it was most confident of, while on the scans it was sure of the views' small
        differences in confidence did not say which was better (docs/results.md, "Contrast search").
        """
        from bigl.data.preprocess import gamma_brain

        def confidence_of(sums: tuple[float, int]) -> float | None:
            return sums[0] / sums[1] if sums[1] else None

        confidences, candidates = {1.0: confidence_of(maps["confidence"])}, {1.0: maps}
        plain = confidences[1.0]
        if self.confidence_floor is not None and plain is not None and plain >= self.confidence_floor:
            return 1.0, maps
        others = [gamma for gamma in CONTRAST_GAMMAS if gamma != 1.0]
        report.extend(len(others) * len(slices))
        # Without flips or the inverted view a view's maps come from its plain pass alone: keep them.
        single_pass = not flip_axis and not self.invert_view
        for gamma in others:
            view = gamma_brain(slices, gamma)
            if single_pass:
                candidates[gamma] = self._segment_slices(view, attention, report)
                confidences[gamma] = confidence_of(candidates[gamma]["confidence"])
            else:
                confidences[gamma] = confidence_of(self._plain_confidence(view, report))
        best = most_confident_view(confidences)
        if best not in candidates:
            report.extend(len(slices))
            candidates[best] = self._segment_slices(gamma_brain(slices, best), attention, report, flip_axis=flip_axis)
        return best, candidates[best]

    def _plain_confidence(self, slices: np.ndarray, report: ProgressCallback) -> tuple[float, int]:
        """(sum, count) of :func:`tumour_confidence` over one plain pass of the segmenter."""
        config, size = self.segmenter_config, slices.shape[-1]
        total, pixels = 0.0, 0
        for _, batch in self._batches(slices, config.size_multiple, config.in_channels):
            logits = self._run_segmenter(batch, False)["logits"]
            part_sum, part_pixels = tumour_confidence_sums(softmax(logits, axis=1)[..., :size, :size])
            total, pixels = total + part_sum, pixels + part_pixels
            report(len(batch))
        return total, pixels

    def _restore(self, maps: np.ndarray, geometry, *, fill: float) -> np.ndarray:
        return restore_on_grid(maps, geometry, fill=fill, resize=self._resize)

    def _resize(self, stack: np.ndarray, size: int) -> np.ndarray:
        """[n, C, S, S] float32 -> [n, C, size, size], bilinear (half-pixel centres, edges clamped)."""
        return resize_square(stack, size)

    def no_translator_error(self) -> BundleError:
        """Why this model cannot produce a translated image, and the fix."""
        return BundleError(
            f"the model{_label(self.model_path)} has no target-to-source translator, so it cannot "
            "produce a translated image",
            "leave out the translated output, or use a BiGL bundle (method 'bigl') that holds translators",
        )

    # the engine's part: one padded batch in, numpy outputs back

    def _run_segmenter(self, batch: np.ndarray, attention: bool) -> dict[str, np.ndarray]:  # pragma: no cover
        """float32 [B, in_channels, P, P] -> ``"logits"`` [B, K, P, P] and, with ``attention``, ``"features"``
        [B, C, h, w], ``"position_attention"`` [B, N, N] and ``"channel_attention"`` [B, C, C]."""
        raise NotImplementedError

    def _run_translator(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - overridden
        """float32 [B, 1, P', P'] -> the translated slices, float32 [B, 1, P', P']."""
        raise NotImplementedError

    # the loops

    def _batches(self, slices: np.ndarray, multiple: int, channels: int = 1):
        """(start, float32 [B, channels, P, P] batch) with the slices padded to a multiple of
        ``multiple``; with ``channels`` > 1 each slice comes with its neighbours (2.5D input)."""
        from bigl.data.preprocess import context_stack

        padded = padded_size(slices.shape[-1], multiple)
        for start in range(0, len(slices), self.batch_size):
            stop = min(start + self.batch_size, len(slices))
            yield start, pad_batch(context_stack(slices, start, stop, channels), padded)

    def _segment_slices(self, slices: np.ndarray, attention: bool, report: ProgressCallback,
                        flip_axis: int = 0) -> dict[str, np.ndarray]:
        """Softmax maps [n, K, S, S] and, when asked, raw attention summaries [n, S, S]; with a
        ``flip_axis`` (-2 or -1) the softmax maps average each slice and its mirror image, with
        ``invert_view`` also the slice with mirrored brain intensities (two or three views).
        ``"confidence"``: (sum, count) of :func:`tumour_confidence` over the plain view alone, the
        one pass its floors were set on (averaged views agree less, and are less sure)."""
        from bigl.data.preprocess import mirror_brain

        config = self.segmenter_config
        count, size = len(slices), slices.shape[-1]
        out = {"probabilities": np.empty((count, config.num_classes, size, size), dtype=np.float32)}
        tumour_sum, tumour_pixels = 0.0, 0
        if attention:
            out["position"] = np.empty((count, size, size), dtype=np.float32)
            out["channel"] = np.empty((count, size, size), dtype=np.float32)
        for start, batch in self._batches(slices, config.size_multiple, config.in_channels):
            stop, padded = start + len(batch), batch.shape[-2:]
            results = self._run_segmenter(batch, attention)
            probabilities, views = softmax(results["logits"], axis=1), 1
            part_sum, part_pixels = tumour_confidence_sums(probabilities[..., :size, :size])
            tumour_sum, tumour_pixels = tumour_sum + part_sum, tumour_pixels + part_pixels
            if flip_axis:
                mirrored = self._run_segmenter(np.ascontiguousarray(np.flip(batch, flip_axis)), False)["logits"]
                probabilities, views = probabilities + np.flip(softmax(mirrored, axis=1), flip_axis), views + 1
            if self.invert_view:
                inverted = self._run_segmenter(mirror_brain(batch).astype(np.float32), False)["logits"]
                probabilities, views = probabilities + softmax(inverted, axis=1), views + 1
            if views > 1:
                probabilities = probabilities / views
            out["probabilities"][start:stop] = probabilities[..., :size, :size]
            if attention:
                position = position_summary(results["position_attention"], results["features"].shape[-2:])
                channel = channel_summary(results["features"], results["channel_attention"])
                out["position"][start:stop] = resize_bilinear(position, padded)[:, 0, :size, :size]
                out["channel"][start:stop] = resize_bilinear(channel, padded)[:, 0, :size, :size]
            report(len(batch))
        out["confidence"] = (tumour_sum, tumour_pixels)
        return out

    def _translate_slices(self, slices: np.ndarray, report: ProgressCallback) -> np.ndarray:
        """The translated slices [n, S, S]."""
        count, size = len(slices), slices.shape[-1]
        out = np.empty((count, size, size), dtype=np.float32)
        for start, batch in self._batches(slices, self.translator_config.size_multiple):
            out[start:start + len(batch)] = np.asarray(self._run_translator(batch), dtype=np.float32)[:, 0, :size, :size]
            report(len(batch))
        return out


# --------------------------------------------------------------------------------------------
# numpy pieces both engines can use


def padded_size(size: int, multiple: int) -> int:
    """The slice size a network with stride ``multiple`` gets: ``size`` rounded up to a multiple."""
    return ceil_div(size, multiple) * multiple


def pad_batch(batch: np.ndarray, padded: int) -> np.ndarray:
    """[B, C, S, S] slices -> float32 [B, C, padded, padded], background (-1) at the bottom and right."""
    size = batch.shape[-1]
    out = np.full((*batch.shape[:2], padded, padded), BACKGROUND, dtype=np.float32)
    out[..., :size, :size] = batch
    return out


def _bilinear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of 1D linear interpolation with half-pixel centres and clamped
    edges (``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)``)."""
    scale = in_size / out_size
    source = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.intp), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    weight = (source - low).astype(np.float32)
    return low, high, weight


def resize_bilinear(stack: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes of a float32 array (any leading axes), as PyTorch's
    ``interpolate(mode='bilinear', align_corners=False)`` does it; separable, in numpy."""
    stack = np.asarray(stack, dtype=np.float32)
    height, width = stack.shape[-2:]
    if (height, width) != tuple(size):
        if size[0] != height:
            low, high, weight = _bilinear_weights(height, size[0])
            weight = weight[:, None]
            top = stack[..., low, :]
            stack = top + (stack[..., high, :] - top) * weight
        if size[1] != width:
            low, high, weight = _bilinear_weights(width, size[1])
            left = stack[..., low]
            stack = left + (stack[..., high] - left) * weight
    return stack


def resize_square(stack: np.ndarray, size: int) -> np.ndarray:
    """:func:`resize_bilinear` to ``size`` x ``size``: the in-plane resize of the restoring functions."""
    return resize_bilinear(stack, (size, size))


def restore_on_grid(maps: np.ndarray, geometry, *, fill: float = 0.0,
                    resize: Callable[[np.ndarray, int], np.ndarray] | None = None) -> np.ndarray:
    """:func:`bigl.data.preprocess.restore_maps`, with a faster in-plane resize.

    ``maps``: [n, S, S] or [n, C, S, S]. Bilinear interpolation with half-pixel centres and edge
    clamping is what ``restore_maps`` does too; ``resize(stack [n, C, S, S], size)`` does it in
    float32 (default: :func:`resize_bilinear`; the PyTorch engine passes a multi-threaded one),
    and ``restore_maps`` then only un-pads and places the slices on the grid.
    """
    from bigl.data.preprocess import restore_maps

    stack = np.ascontiguousarray(maps, dtype=np.float32)
    single = stack.ndim == 3
    if single:
        stack = stack[:, None]
    if geometry.square != geometry.image_size:
        stack = (resize or resize_square)(stack, geometry.square)
    return restore_maps(stack[:, 0] if single else stack, replace(geometry, image_size=geometry.square), fill=fill)


#: Slices restored at a time by :func:`labels_on_grid`: a few MB of class maps, so they stay in cache.
LABEL_CHUNK_SLICES = 8


def labels_on_grid(class_maps: np.ndarray, geometry, *,
                   resize: Callable[[np.ndarray, int], np.ndarray] | None = None) -> np.ndarray:
    """uint8 BraTS labels on the scan's grid from softmax maps [n, K, S, S]: the arg-max of the maps
    restored bilinearly (as :func:`restore_on_grid` restores them), background outside the crop.

    Computed a few slices at a time on the crop's square, then placed on the grid as class indices,
    so no float volume of every class on the whole grid is made: on a 240 x 240 x 155 scan that
    volume is 143 MB and restoring it, normalising it and taking its arg-max cost about a second
    (docs/results.md, "Inference speed"). The arg-max of restored maps is that of the normalised
    probabilities, which only divide each voxel's classes by one positive sum."""
    from bigl.data.preprocess import place_slices

    maps = np.asarray(class_maps, dtype=np.float32)
    square = geometry.square
    resize = resize or resize_square
    classes = np.empty((len(maps), square, square), dtype=np.uint8)
    for start in range(0, len(maps), LABEL_CHUNK_SLICES):
        chunk = maps[start:start + LABEL_CHUNK_SLICES]
        if square != chunk.shape[-1]:
            chunk = resize(np.ascontiguousarray(chunk), square)
        classes[start:start + len(chunk)] = np.argmax(chunk, axis=1)
    return place_slices(classes_to_labels(classes), geometry, fill=0)


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """float32 softmax over ``axis``."""
    shifted = np.asarray(logits, dtype=np.float32) - np.max(logits, axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted


def most_confident_view(confidences: dict[float, float | None]) -> float:
    """The rule of the contrast search: of the views' tumour confidences (gamma -> confidence; None
    or nan: the view shows no tumour), the gamma of the highest; 1 (the scan as it is) on ties and
    when no view shows a tumour, then the gamma listed first."""
    best, best_confidence = 1.0, confidences.get(1.0)
    best_confidence = -1.0 if best_confidence is None or not np.isfinite(best_confidence) else best_confidence
    for gamma, confidence in confidences.items():
        if confidence is not None and np.isfinite(confidence) and confidence > best_confidence:
            best, best_confidence = gamma, confidence
    return best


def tumour_pixels(probabilities: np.ndarray) -> np.ndarray:
    """[n, K, S, S] class probabilities -> bool [n, S, S]: the pixels whose arg-max is a tumour class."""
    return np.argmax(probabilities, axis=1) > 0


def tumour_confidence_sums(probabilities: np.ndarray) -> tuple[float, int]:
    """(sum of the tumour probability 1 - background, count) over the :func:`tumour_pixels` of
    [n, K, S, S] class probabilities."""
    tumour = tumour_pixels(probabilities)
    return float((1.0 - np.asarray(probabilities[:, 0], dtype=np.float64))[tumour].sum()), int(tumour.sum())


def tumour_confidence(probabilities: np.ndarray) -> float | None:
    """How sure a segmentation is of its tumour: the mean tumour probability (1 - background) over
    the pixels whose arg-max is a tumour class, from [n, K, S, S] class probabilities of the
    network's slices (None when no pixel is tumour).

    Label-free: with the shipped model's recipe it was 0.89-0.94 on the development scans a model
    segmented well and 0.82-0.84 where it missed most of the tumour (docs/results.md, "Which scans a
    model fails on"); :func:`bigl.plausibility.confidence_warning` warns below a model's floor.
    """
    total, pixels = tumour_confidence_sums(probabilities)
    return total / pixels if pixels else None


def position_summary(position_attention: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[B, 1, h, w]: column mean of the N x N position attention (attention each position receives)."""
    received = np.asarray(position_attention, dtype=np.float32).mean(axis=1)  # rows sum to 1; mean over queries
    return received.reshape(-1, 1, *grid)


def channel_summary(features: np.ndarray, channel_attention: np.ndarray) -> np.ndarray:
    """[B, 1, h, w]: bottleneck feature magnitude, channels weighted by the channel attention they receive."""
    weights = np.asarray(channel_attention, dtype=np.float32).mean(axis=1)  # [B, C]
    return np.einsum("bc,bchw->bhw", weights, np.abs(np.asarray(features, dtype=np.float32)))[:, None]


#: A map whose range is below this share of its magnitude counts as flat (all 0 after scaling):
#: float32 rounding alone varies a near-uniform map by about 1e-7 to 1e-5 of its value (seen on
#: random weights), and scaling that noise to [0, 1] would show a pattern that is not there (and
#: one that differs between engines). Weak but real variation (an untrained test network's, about
#: 1e-4) is kept.
FLAT_RELATIVE_RANGE = 1e-5


def min_max(maps: np.ndarray) -> np.ndarray:
    """``maps`` scaled to [0, 1] over all its values; all zeros when it is flat (see
    :data:`FLAT_RELATIVE_RANGE`)."""
    low, high = float(maps.min()), float(maps.max())
    if high - low <= FLAT_RELATIVE_RANGE * max(abs(low), abs(high)):
        return np.zeros_like(maps)
    return (maps - low) / (high - low)


# --------------------------------------------------------------------------------------------
# helpers


def out_of_memory_error(exc: BaseException, *, name: str | None = None,
                        batch_size: int | None = None) -> ConfigError | None:
    """A ConfigError with a fix when ``exc`` is an allocation failure (GPU or main memory), else None.

    Recognises :class:`MemoryError`, ``torch.OutOfMemoryError`` (CUDA), the RuntimeErrors of
    PyTorch's CPU allocator and cuBLAS, and ONNX Runtime's failed allocations. The message says
    "out of memory" and which memory.
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


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _label(path: Path | None) -> str:
    return f" {path.name}" if path is not None else ""


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


class Progress:
    """Counts slices and forwards to a callback, or shows a tqdm bar on a terminal for long runs."""

    def __init__(self, callback: ProgressCallback | None, total: int, batches: int):
        self.callback, self.total, self.done = callback, total, 0
        self.bar = None
        if callback is None and batches >= _BAR_MIN_BATCHES:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="slice", desc="segmenting", leave=False, disable=None)

    def __enter__(self) -> Progress:
        return self

    def extend(self, count: int) -> None:
        """``count`` more slices to go than the total said (work that turned out to be needed)."""
        self.total += count
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

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
# choosing an engine


def module_installed(name: str) -> bool:
    """Whether a package can be imported, without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as none
        return False


def _torch_available() -> bool:
    return module_installed("torch")


def _torch_cuda_available() -> bool:
    """Whether PyTorch is installed and finds a CUDA GPU; imports torch only when it is installed."""
    if not _torch_available():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken install counts as none
        return False


def _gpu_needs_torch(device: str) -> bool:
    """True when ``device`` asks for (cuda) or allows (auto) a GPU that only PyTorch can use here:
    this onnxruntime has no CUDA execution provider, PyTorch is installed (and, for auto, finds a GPU)."""
    name = str(device).strip().lower()
    if name == "cpu" or not (name == "auto" or name.startswith("cuda")):
        return False
    from bigl import onnxengine

    if onnxengine.has_cuda_provider() or not _torch_available():
        return False
    return name.startswith("cuda") or _torch_cuda_available()


def choose_engine(model: str | os.PathLike | None, engine: str = "auto", device: str = "auto", *,
                  translated: bool = False) -> tuple[str, Path]:
    """(engine, model file) for a ``--model`` argument (None: the shipped default model).

    ``auto``: ONNX Runtime when the model is an ``.onnx`` file, or a bundle with an up-to-date
    ``.onnx`` export beside it (with its translator file when ``translated`` output is wanted), and
    onnxruntime is installed; PyTorch otherwise. PyTorch also when the device asks for a GPU
    (``cuda``, or ``auto`` with a GPU PyTorch can use) and this onnxruntime has no CUDA provider.
    Without PyTorch, auto uses the export anyway or says why it cannot. ``onnx`` and ``torch``
    insist (ConfigError/BundleError with the fix when they cannot run this model).
    """
    from bigl import bundle as bundles
    from bigl import onnxengine

    if engine not in ENGINE_CHOICES:
        raise ConfigError(f"unknown engine {engine!r}", "use --engine auto, torch or onnx")
    path = bundles.default_bundle_path() if model is None else Path(model).expanduser()
    if onnxengine.is_onnx_path(path):
        if engine == "torch":
            raise ConfigError(f"the torch engine runs .safetensors bundles, and {path.name} is an ONNX file",
                              "use --engine onnx (or auto), or give the .safetensors bundle it was exported from")
        return "onnx", path
    if engine == "torch":
        return "torch", path
    export = onnxengine.export_path(path)
    if engine == "onnx":
        onnxengine.require_onnxruntime()
        onnxengine.check_export_matches(export, path, translated=translated)
        return "onnx", export
    # auto
    if onnxengine.onnxruntime_available() and onnxengine.export_is_current(export, path, translated=translated):
        if not _gpu_needs_torch(device):
            return "onnx", export
    if not _torch_available():
        if not onnxengine.onnxruntime_available():
            onnxengine.require_onnxruntime()  # the install that needs no torch
        onnxengine.check_export_matches(export, path, translated=translated)  # says why the export cannot be used
        return "onnx", export  # pragma: no cover - check_export_matches raised
    return "torch", path


def open_predictor(model: str | os.PathLike | list | None = None, *, engine: str = "auto", device: str = "auto",
                   batch_size: int = 16, num_threads: int | None = None, flip: bool | None = None,
                   postprocess: bool | None = None, translated: bool = False, invert_view: bool | None = None,
                   refine_edges: bool | None = None, contrast_search: bool | None = None) -> Predictor:
    """The predictor for a model file (None: the shipped default), on the engine :func:`choose_engine`
    picks; ``translated``: the translated image will be asked for (BundleError now when it cannot be).
    A list of two or more model files gives a :class:`bigl.ensemble.EnsemblePredictor` of them (each
    on the engine chosen for it); a list of one is that model."""
    check_batch_size(batch_size)
    check_num_threads(num_threads)
    if isinstance(model, (list, tuple)):
        options = {"engine": engine, "device": device, "batch_size": batch_size, "num_threads": num_threads,
                   "flip": flip, "postprocess": postprocess, "invert_view": invert_view, "refine_edges": refine_edges,
                   "contrast_search": contrast_search}
        if len(model) == 1:
            return open_predictor(model[0], translated=translated, **options)
        from bigl.ensemble import EnsemblePredictor

        members = [open_predictor(path, translated=translated and index == 0, **options) for index, path in enumerate(model)]
        return EnsemblePredictor(members, postprocess=postprocess, refine_edges=refine_edges)
    chosen, path = choose_engine(model, engine, device, translated=translated)
    if chosen == "onnx":
        from bigl import onnxengine

        from bigl.bundle import default_bundle_path

        given = default_bundle_path() if model is None else Path(model).expanduser()
        bundle = None if onnxengine.is_onnx_path(given) else given  # its export: the bundle's metadata is current
        predictor = onnxengine.OnnxPredictor.from_path(path, device=device, batch_size=batch_size,
                                                       num_threads=num_threads, flip=flip, postprocess=postprocess,
                                                       invert_view=invert_view, refine_edges=refine_edges,
                                                       contrast_search=contrast_search, bundle=bundle)
    else:
        if not _torch_available():
            raise ConfigError("PyTorch is not installed, and the torch engine needs it",
                              "pip install 'bigl[train]' for PyTorch, or use an ONNX export of the model "
                              "(`bigl export MODEL.safetensors` on a machine with PyTorch) with --engine onnx")
        from bigl.inference import BiGLPredictor

        predictor = BiGLPredictor.from_path(path, device=device, batch_size=batch_size, num_threads=num_threads,
                                            flip=flip, postprocess=postprocess, invert_view=invert_view,
                                            refine_edges=refine_edges, contrast_search=contrast_search)
    if translated and not predictor.has_translator:
        raise predictor.no_translator_error()
    return predictor


# --------------------------------------------------------------------------------------------
# files


def segment_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: str | os.PathLike | Bundle | Predictor | None = None,
    device: str = "auto",
    attention_out: str | os.PathLike | None = None,
    translated_out: str | os.PathLike | None = None,
    probabilities_out: str | os.PathLike | None = None,
    batch_size: int = 16,
    num_threads: int | None = None,
    modality: str | None = None,
    progress: ProgressCallback | None = None,
    engine: str = "auto",
) -> Prediction:
    """Segment one NIfTI scan and write the label map (and the requested extra volumes).

    ``model``: a model path (bundle or ONNX export), a loaded :class:`Bundle` or a
    :class:`Predictor` (reused across files), or None for the shipped default model; ``engine``
    as :func:`open_predictor` takes it. Outputs are written on the input's exact grid (its
    header, qform and sform are copied) and only after everything was computed, each through a
    temporary file, so a failure leaves no half-written output. The outputs follow
    :func:`bigl.files.check_outputs`: never the input or the model, and beside the input never a
    file BiGL did not write (a label map of the case survives); they are marked as BiGL outputs.
    ``modality`` defaults to the one a BraTS-style file name states (``..._t1.nii.gz``).
    """
    from bigl.data.io import load_volume

    source = Path(input).expanduser()
    targets = output_targets(source, output, attention_out=attention_out, translated_out=translated_out,
                             probabilities_out=probabilities_out)
    check_targets(source, targets, inputs=model_paths(model))

    scan = load_volume(source, kind="image")
    predictor = _predictor_for(model, device, batch_size, num_threads, engine, translated_out is not None)
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


def _predictor_for(model, device, batch_size, num_threads, engine="auto", translated=False) -> Predictor:
    if isinstance(model, Predictor):
        return model
    if isinstance(model, Bundle):
        from bigl.inference import BiGLPredictor

        return BiGLPredictor(model, device=device, batch_size=batch_size, num_threads=num_threads)
    return open_predictor(model, engine=engine, device=device, batch_size=batch_size, num_threads=num_threads,
                          translated=translated)


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
                  [source, *[path for path in inputs if path is not None]],
                  case_folders=[source.parent] if case_folders is None else case_folders,
                  hint="choose another output name or folder, e.g. <case>_seg.nii.gz in a folder of its own")


def model_paths(model) -> list[Path]:
    """The model files a ``model`` argument reads (protected from being overwritten): the bundle
    and its ONNX export(s) beside it; none for a loaded model without a file."""
    from bigl import onnxengine

    if isinstance(model, (list, tuple)):
        return [path for member in model for path in model_paths(member)]
    if isinstance(getattr(model, "members", None), list):  # an ensemble: every member's files
        return model_paths(model.members)
    if isinstance(model, Predictor):
        model = model.model_path
    elif isinstance(model, Bundle):
        model = model.path
    elif model is None:
        from bigl import bundle

        model = bundle.DEFAULT_BUNDLE_PATH
    if model is None:
        return []
    return onnxengine.related_model_files(Path(model).expanduser())


def _write_on_grid_of(reference: Path, affine: np.ndarray, volumes: dict[Path, np.ndarray]) -> None:
    """Write arrays with the reference file's header (same grid, qform and sform), all or nothing,
    marked as BiGL outputs: every volume goes to a temporary file beside its target, and only when
    all succeeded are they renamed into place (:func:`bigl.files.atomic_outputs`)."""
    from bigl.data.io import save_volume
    from bigl.files import atomic_outputs

    with atomic_outputs(list(volumes)) as temporaries:
        for tmp, data in zip(temporaries, volumes.values()):
            save_volume(tmp, data, affine, like=reference, output=True)
