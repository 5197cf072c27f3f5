"""Preprocessing of 3D volumes into the 2D slices the networks see, and its exact inverse.

Per volume: brain mask -> bounding box of the brain plus a margin (clipped at the volume edges) ->
intensity normalisation inside the brain to [-1, 1] (background -1) -> every slice of the crop padded
to a square -> resized to ``image_size`` x ``image_size``.

Two normalisations (``PreprocessConfig.intensity``): ``percentile`` maps the brain's 0.5th-99.5th
percentiles to [-1, 1] (percentiles rather than the maximum because some BraTS scans saturate at
32767); ``zscore`` maps ``zscore_low``..``zscore_high`` standard deviations around the brain's mean
to [-1, 1]. MR intensities have no absolute scale, and where the bright tail sits (CSF, oedema) differs
from scanner to scanner, so the percentile scale puts normal tissue at different levels in different
scans; the z-score scale keeps normal tissue at one level (measured on the BraTS training cases:
docs/results.md, "Intensity normalisation"). :class:`SliceGeometry` records all of it, so
:func:`restore_maps` and :func:`restore_labels` put slice predictions back onto the original grid,
voxel for voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.transform import resize

from bigl.data.io import Volume
from bigl.errors import ConfigError, InputError
from bigl.labels import NUM_CLASSES, classes_to_labels, labels_to_classes
from bigl.modelconfig import ModelConfig

BACKGROUND = -1.0
#: A slice whose maximum is at most this holds no brain (all background, up to rounding).
EMPTY_SLICE_MAX = BACKGROUND + 1e-3
#: Brain voxels are brighter than this fraction of the robust (99th percentile) intensity range.
MASK_THRESHOLD_FRACTION = 0.05
#: The intensity normalisations (``PreprocessConfig.intensity``) and the settings each one reads.
INTENSITY_SETTINGS = {"percentile": ("lower_percentile", "upper_percentile"), "zscore": ("zscore_low", "zscore_high")}
INTENSITY_NORMALISATIONS = tuple(INTENSITY_SETTINGS)
#: The mask is cleaned up on a grid subsampled by 2 when every side has at least this many voxels.
_COARSE_MIN_SIDE = 96


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class PreprocessConfig(ModelConfig):
    """How volumes become network inputs; stored in every model bundle."""

    image_size: int = 128
    margin: int = 8
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    slice_axis: int = 2
    intensity: str = "percentile"
    zscore_low: float = -4.0
    zscore_high: float = 5.0

    def validate(self) -> None:
        if not _is_integer(self.image_size) or self.image_size < 8:
            raise ConfigError(f"image_size must be an integer >= 8, not {self.image_size!r}", "use e.g. 128")
        if not _is_integer(self.margin) or self.margin < 0:
            raise ConfigError(f"margin must be a non-negative integer, not {self.margin!r}", "use e.g. 8")
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ConfigError(
                "percentiles must satisfy 0 <= lower < upper <= 100 "
                f"(got {self.lower_percentile}, {self.upper_percentile})",
                "use e.g. lower_percentile 0.5, upper_percentile 99.5",
            )
        if self.intensity not in INTENSITY_NORMALISATIONS:
            raise ConfigError(
                f"intensity must be one of {', '.join(INTENSITY_NORMALISATIONS)}, not {self.intensity!r}",
                "use 'percentile' (brain percentiles to [-1, 1]) or 'zscore' (standard deviations around the brain's mean)",
            )
        numbers = (self.zscore_low, self.zscore_high)
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers) or not self.zscore_low < self.zscore_high:
            raise ConfigError(
                f"zscore_low must be a number below zscore_high (got {self.zscore_low!r}, {self.zscore_high!r})",
                "use e.g. zscore_low -4, zscore_high 5",
            )
        if self.slice_axis not in (0, 1, 2):
            raise ConfigError(f"slice_axis must be 0, 1 or 2, not {self.slice_axis!r}", "use 2 for axial BraTS slices")


@dataclass
class SliceGeometry:
    """Where the slices came from: enough to map slice predictions back to the original grid."""

    original_shape: tuple[int, int, int]
    bbox: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    slice_axis: int
    square: int
    pad: tuple[tuple[int, int], tuple[int, int]]
    image_size: int

    @property
    def n_slices(self) -> int:
        start, stop = self.bbox[self.slice_axis]
        return stop - start

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(stop - start for start, stop in self.bbox)  # type: ignore[return-value]

    def slice_spacing(self, spacing) -> tuple[float, float, float]:
        """Voxel size in mm of the prepared slices ``[n, S, S]`` of a scan with voxel size ``spacing``:
        the slice axis keeps its spacing, the in-plane axes are resized from ``square`` to ``image_size``."""
        scale = self.square / self.image_size
        rows, cols = (float(s) * scale for axis, s in enumerate(spacing) if axis != self.slice_axis)
        return float(spacing[self.slice_axis]), rows, cols

    def to_dict(self) -> dict:
        return {
            "original_shape": list(self.original_shape),
            "bbox": [list(b) for b in self.bbox],
            "slice_axis": self.slice_axis,
            "square": self.square,
            "pad": [list(p) for p in self.pad],
            "image_size": self.image_size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SliceGeometry:
        return cls(
            original_shape=tuple(int(s) for s in d["original_shape"]),
            bbox=tuple((int(a), int(b)) for a, b in d["bbox"]),
            slice_axis=int(d["slice_axis"]),
            square=int(d["square"]),
            pad=tuple((int(a), int(b)) for a, b in d["pad"]),
            image_size=int(d["image_size"]),
        )


@dataclass
class PreparedVolume:
    slices: np.ndarray  # float32 [n, image_size, image_size] in [-1, 1]
    geometry: SliceGeometry
    mask: np.ndarray  # bool, the brain on the volume's grid


def _check_volume(volume: np.ndarray) -> np.ndarray:
    data = np.asarray(volume.data if isinstance(volume, Volume) else volume)
    if data.ndim != 3:
        raise InputError(f"expected a 3D volume, got an array of shape {data.shape}", "give one 3D scan")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise InputError("the volume has NaN or infinite values", "replace them (e.g. numpy.nan_to_num) first")
    return data


def brain_mask(volume: np.ndarray) -> np.ndarray:
    """Boolean brain mask: voxels clearly above the background, largest connected part, holes filled.

    The threshold is a small fraction of a robust intensity (99th percentile above the background
    level), raised above the noise seen on the volume's outer faces, so skull-stripped scans (zero
    background) and scans with a noisy background both work.
    Noise specks are removed by a morphological opening; the clean-up runs on a grid subsampled by
    2 for large volumes, refined at full resolution at the brain's edge. An empty or constant
    volume gives an empty mask.
    """
    data = _check_volume(volume)
    step = max(1, round((data.size / 2e6) ** (1 / 3)))
    sample = data[::step, ::step, ::step]
    low = data.min()
    above = sample[sample > low]
    if above.size == 0:
        return np.zeros(data.shape, dtype=bool)
    low, high = float(low), float(np.percentile(above, 99))
    threshold = low + MASK_THRESHOLD_FRACTION * (high - low)
    # Above the noise of the background too (capped, in case the brain fills the field of view).
    threshold = max(threshold, min(_background_noise_level(data), low + 0.3 * (high - low)))
    foreground = data > threshold

    factor = 2 if min(data.shape) >= _COARSE_MIN_SIDE else 1
    coarse = foreground[::factor, ::factor, ::factor]
    coarse = ndi.binary_opening(coarse)
    components, count = ndi.label(coarse)
    if count == 0:
        return np.zeros(data.shape, dtype=bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    brain = ndi.binary_fill_holes(components == int(np.argmax(sizes)))
    if factor == 1:
        return brain
    # Full resolution: the fine threshold decides at the edge, the coarse interior fills holes.
    near = _upsample(ndi.binary_dilation(brain), factor, data.shape)
    inside = _upsample(ndi.binary_erosion(brain), factor, data.shape)
    return (foreground & near) | inside


def _background_noise_level(data: np.ndarray) -> float:
    """An intensity above nearly all background noise, estimated on the volume's outer faces
    (air or zeros in brain MR): median plus three times the 50-90 percentile spread. Zero for
    skull-stripped scans."""
    faces = np.concatenate([np.take(data, [0, -1], axis=axis).ravel() for axis in range(data.ndim)])
    median, p90 = np.percentile(faces, [50, 90])
    return float(median + 3.0 * (p90 - median))


def _upsample(mask: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    for axis in range(mask.ndim):
        mask = np.repeat(mask, factor, axis=axis)
    return mask[tuple(slice(0, s) for s in shape)]


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[tuple[int, int], ...]:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        start = max(int(present[0]) - margin, 0)
        stop = min(int(present[-1]) + 1 + margin, mask.shape[axis])
        box.append((start, stop))
    return tuple(box)


def _geometry(shape, bbox, slice_axis: int, image_size: int) -> SliceGeometry:
    in_plane = [bbox[a][1] - bbox[a][0] for a in range(3) if a != slice_axis]
    square = max(in_plane)
    pad = tuple(((square - side) // 2, square - side - (square - side) // 2) for side in in_plane)
    return SliceGeometry(
        original_shape=tuple(int(s) for s in shape),
        bbox=bbox,
        slice_axis=slice_axis,
        square=square,
        pad=pad,
        image_size=image_size,
    )


def _crop_index(geometry: SliceGeometry) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in geometry.bbox)


def _stack_slices(crop: np.ndarray, geometry: SliceGeometry, pad_value) -> np.ndarray:
    """A cropped volume as slices padded in-plane to the square: [n, square, square]."""
    stack = np.moveaxis(crop, geometry.slice_axis, 0)
    return np.pad(stack, ((0, 0), *geometry.pad), mode="constant", constant_values=pad_value)


def _from_slices(stack: np.ndarray, geometry: SliceGeometry, fill, dtype) -> np.ndarray:
    """Inverse of cropping and :func:`_stack_slices` for ``[..., n, square, square]`` -> ``[..., X, Y, Z]``."""
    (b0, a0), (b1, a1) = geometry.pad
    square = geometry.square
    crop = stack[..., b0 : square - a0, b1 : square - a1]
    lead = stack.ndim - 3
    crop = np.moveaxis(crop, lead, lead + geometry.slice_axis)
    out = np.full(stack.shape[:lead] + tuple(geometry.original_shape), fill, dtype=dtype)
    out[(Ellipsis, *_crop_index(geometry))] = crop
    return out


def place_slices(stack: np.ndarray, geometry: SliceGeometry, *, fill) -> np.ndarray:
    """Maps already at the crop's square size, ``[..., n, square, square]`` -> ``[..., X, Y, Z]`` of the
    same dtype, ``fill`` outside the crop."""
    return _from_slices(stack, geometry, fill, stack.dtype)


def _resize_planes(stack: np.ndarray, size: int, *, order: int, anti_aliasing: bool = False) -> np.ndarray:
    """Resize the last two axes of a stack to ``size`` x ``size`` (other axes untouched)."""
    if stack.shape[-1] == size and stack.shape[-2] == size:
        return stack
    shape = stack.shape[:-2] + (size, size)
    return resize(stack, shape, order=order, mode="edge", anti_aliasing=anti_aliasing, preserve_range=True)


def intensity_window(brain: np.ndarray, config: PreprocessConfig) -> tuple[np.float64, np.float64]:
    """The intensities of a scan that map to -1 and 1, from its brain voxels (see the module docstring).
    NumPy float64 scalars, so that the normalisation is computed in float64."""
    lowest, highest = float(brain.min()), float(brain.max())
    if not highest > lowest:
        raise InputError(
            f"the image has no contrast inside the brain (intensities {lowest:g} to {highest:g})",
            "check that the file is a brain MR scan, not a constant or binary image",
        )
    if config.intensity == "zscore":
        mean, std = brain.mean(dtype=np.float64), brain.std(dtype=np.float64)
        return mean + config.zscore_low * std, mean + config.zscore_high * std
    low, high = np.percentile(brain, [config.lower_percentile, config.upper_percentile])
    if not high > low:
        raise InputError(
            f"the image has almost no contrast inside the brain (its {config.lower_percentile:g}th and "
            f"{config.upper_percentile:g}th percentiles are both {low:g})",
            "check that the file is a brain MR scan, not a mostly constant or binary image",
        )
    return low, high


def normalise(values: np.ndarray, low, high) -> np.ndarray:
    """Intensities -> [-1, 1]: ``low`` to -1, ``high`` to 1, clipped (the window of :func:`intensity_window`)."""
    return np.clip((values - low) * np.float32(2.0 / (high - low)) - 1.0, -1.0, 1.0)


def prepare_volume(volume: np.ndarray, config: PreprocessConfig, mask: np.ndarray | None = None) -> PreparedVolume:
    """Turn a 3D scan into normalised square slices ``[n, image_size, image_size]`` in [-1, 1]."""
    data = _check_volume(volume)
    if mask is None:
        mask = brain_mask(data)
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape:
            raise InputError(
                f"the brain mask has shape {mask.shape} but the volume has shape {data.shape}",
                "give a mask on the same grid as the volume",
            )
    if not mask.any():
        raise InputError(
            "no brain found in the volume (it is empty or has no voxels above the background)",
            "check that the file is a brain MR scan with non-zero intensities",
        )
    geometry = _geometry(data.shape, _bounding_box(mask, config.margin), config.slice_axis, config.image_size)
    crop = data[_crop_index(geometry)].astype(np.float32)
    crop_mask = mask[_crop_index(geometry)]
    normalised = normalise(crop, *intensity_window(crop[crop_mask], config))
    normalised[~crop_mask] = BACKGROUND
    stack = _stack_slices(normalised, geometry, BACKGROUND)
    downsampling = geometry.square > config.image_size
    slices = _resize_planes(stack, config.image_size, order=1, anti_aliasing=downsampling)
    slices = np.clip(slices, -1.0, 1.0).astype(np.float32, copy=False)
    return PreparedVolume(slices=np.ascontiguousarray(slices), geometry=geometry, mask=mask)


def prepare_labels(labels: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """BraTS labels on the original grid -> class indices ``[n, S, S]`` (uint8, nearest neighbour)."""
    labels = np.asarray(labels.data if isinstance(labels, Volume) else labels)
    if tuple(labels.shape) != tuple(geometry.original_shape):
        raise InputError(
            f"the label map has shape {tuple(labels.shape)} but the image has shape {tuple(geometry.original_shape)}",
            "use the label map of the same case, on the image's grid",
        )
    classes = labels_to_classes(labels)[_crop_index(geometry)]
    stack = _stack_slices(classes, geometry, 0)
    return _resize_planes(stack, geometry.image_size, order=0).astype(np.uint8)


def _check_stack(array: np.ndarray, geometry: SliceGeometry, what: str) -> None:
    n, size = geometry.n_slices, geometry.image_size
    if array.ndim < 3 or array.shape[0] != n or array.shape[-2:] != (size, size):
        raise ValueError(
            f"{what} of shape {array.shape} do not match the geometry: expected [{n}, ..., {size}, {size}]"
        )


def restore_maps(maps: np.ndarray, geometry: SliceGeometry, *, fill: float = 0.0) -> np.ndarray:
    """Slice maps ``[n, S, S]`` or ``[n, C, S, S]`` -> float32 ``[X, Y, Z]`` or ``[C, X, Y, Z]`` on the
    original grid (linear interpolation), ``fill`` outside the crop."""
    maps = np.asarray(maps, dtype=np.float32)
    _check_stack(maps, geometry, "maps")
    if maps.ndim == 4:
        maps = np.moveaxis(maps, 1, 0)  # [C, n, S, S]
    elif maps.ndim != 3:
        raise ValueError(f"maps must be [n, S, S] or [n, C, S, S], not {maps.shape}")
    stack = _resize_planes(maps, geometry.square, order=1)
    return _from_slices(stack.astype(np.float32, copy=False), geometry, fill, np.float32)


def restore_labels(classes: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """Class indices ``[n, S, S]`` -> BraTS labels (uint8) on the original grid, 0 outside the crop."""
    classes = np.asarray(classes)
    _check_stack(classes, geometry, "class maps")
    if classes.ndim != 3:
        raise ValueError(f"class maps must be [n, S, S], not {classes.shape}")
    if classes.size and (classes.min() < 0 or classes.max() >= NUM_CLASSES):
        raise ValueError(f"class indices must be 0..{NUM_CLASSES - 1}, got {classes.min()}..{classes.max()}")
    stack = _resize_planes(classes.astype(np.uint8), geometry.square, order=0).astype(np.uint8)
    return _from_slices(classes_to_labels(stack), geometry, 0, np.uint8)


#: Smallest brain intensity of a mirrored or contrast-changed slice on the [0, 1] brain scale: it stays above the background.
MIRROR_FLOOR = 1e-3


def mirror_brain(slices):
    """Preprocessed slices (numpy array or torch tensor, background -1) with the brain intensities
    mirrored: u -> max(1 - u, MIRROR_FLOOR) on the [0, 1] brain scale, background left as it is.

    T1 and T2 order most brain tissues in opposite directions (CSF, oedema), so a mirrored T1 slice
    looks T2-like and a mirrored T2 slice T1-like, with the anatomy untouched: the inversion
    augmentation of training (``data.augment_invert``), the ``inverted`` pseudo-label view, and the
    inverted test-time view (``invert_view``). Written with operators both array types share, so
    training and inference mirror alike."""
    brain = slices > EMPTY_SLICE_MAX
    mirrored = (1.0 - (slices - BACKGROUND) / 2.0).clip(MIRROR_FLOOR, 1.0) * 2.0 + BACKGROUND
    return brain * mirrored + ~brain * slices


def gamma_brain(slices: np.ndarray, gamma: float) -> np.ndarray:
    """Preprocessed slices (background -1) with the brain intensities raised to ``gamma`` on the
    [0, 1] brain scale, background left as it is: gamma < 1 brightens the dark tissue, > 1 darkens
    it. The contrast views of the test-time contrast search (``contrast_search``)."""
    slices = np.asarray(slices, dtype=np.float32)
    brain = slices > EMPTY_SLICE_MAX
    scaled = np.power(((slices - BACKGROUND) / 2.0).clip(0.0, 1.0), np.float32(gamma)).clip(MIRROR_FLOOR, 1.0)
    return np.where(brain, scaled * 2.0 + BACKGROUND, slices).astype(np.float32)


def left_right_axis(affine: np.ndarray, slice_axis: int) -> int:
    """The axis of a slice (-2 or -1) along which the patient's left-right runs, 0 when it runs
    through the slices (sagittal slices): flips (training augmentation, test-time flips) mirror
    left and right only, the one symmetry of a brain."""
    import nibabel as nib

    codes = nib.aff2axcodes(affine)
    in_plane = [axis for axis in range(3) if axis != slice_axis]
    for position, axis in enumerate(in_plane):
        if codes[axis] in ("L", "R"):
            return position - 2
    return 0


def context_offsets(channels: int) -> np.ndarray:
    """Slice offsets of a segmenter input of ``channels`` adjacent slices (an odd number): the
    slice to segment in the middle, ``channels // 2`` neighbours on each side (2.5D input)."""
    if channels < 1 or channels % 2 == 0:
        raise ValueError(f"a slice context needs an odd number of slices, got {channels}")
    half = channels // 2
    return np.arange(-half, half + 1)


def context_stack(slices: np.ndarray, start: int, stop: int, channels: int) -> np.ndarray:
    """Slices ``start:stop`` of a prepared stack [n, S, S] with their neighbours as channels:
    float32 [stop - start, channels, S, S]. Neighbours beyond the stack are background, as the
    empty slices around a brain are."""
    count = len(slices)
    positions = np.arange(start, stop)[:, None] + context_offsets(channels)[None, :]
    inside = (positions >= 0) & (positions < count)
    out = np.asarray(slices[np.clip(positions, 0, count - 1)], dtype=np.float32)
    out[~inside] = BACKGROUND
    return out
