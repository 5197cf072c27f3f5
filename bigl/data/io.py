"""Reading and writing NIfTI volumes, with the checks a user needs when a file is wrong.

Volumes are kept as stored on disk (no reorientation); the affine maps voxel indices to RAS
millimetres (nibabel convention) and is carried along so that results are written back on the
input grid. Every problem with a file (missing, not NIfTI, 2D, a 4D series, NaN values, grids that
do not match, a label map given as an image) raises :class:`bigl.errors.InputError` naming the
file and the fix.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from bigl import __version__
from bigl.data.naming import NIFTI_SUFFIXES, is_nifti_path  # noqa: F401 (both part of this module's API)
from bigl.errors import InputError
from bigl.files import atomic_output

PathLike = Union[str, Path]
#: Values a label map may hold (BraTS 0/1/2/4, and 3 for enhancing tumour in BraTS 2023+ files).
LABEL_LIKE_VALUES = frozenset({0, 1, 2, 3, 4})

_READ_ERRORS = (ImageFileError, OSError, EOFError, ValueError, zlib.error)
#: Start of the NIfTI header description (``descrip``) of the results BiGL writes: how
#: :func:`is_bigl_output` tells an output of an earlier run (replaceable) from a user's file.
OUTPUT_DESCRIPTION = "BiGL output"



def affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the three array axes of a 4x4 voxel-to-world affine (its column lengths)."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))  # type: ignore[return-value]

@dataclass
class Volume:
    """A 3D image or label map with its voxel-to-RAS affine."""

    data: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes (lengths of the affine's columns)."""
        return affine_spacing(self.affine)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "volume"


def _open_nifti(path: PathLike) -> tuple[Path, nib.Nifti1Image]:
    """Open a NIfTI file lazily (header only) with the existence and format checks."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"file not found: {path}", "check the path (and that the folder is mounted / readable)")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an image file", "give a .nii or .nii.gz file inside it")
    if not is_nifti_path(path):
        raise InputError(
            f"{path.name} is not a NIfTI file (expected .nii or .nii.gz)",
            "convert it to NIfTI first, e.g. with 3D Slicer (Save as .nii.gz), dcm2niix for DICOM or "
            "SimpleITK.WriteImage(SimpleITK.ReadImage(file), 'out.nii.gz')",
        )
    try:
        image = nib.load(str(path))
    except _READ_ERRORS as exc:
        raise InputError(
            f"cannot read {path} as NIfTI: {exc}",
            "the file is not a valid NIfTI image (renamed from another format, or damaged); "
            "re-export it as .nii.gz",
        ) from exc
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path} is not a NIfTI image ({type(image).__name__})", "re-export it as .nii.gz")
    return path, image


def _squeezed_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The 3D shape of a file, refusing 2D images and real 4D series (singleton axes beyond 3 dropped)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) > 3:
        extra = shape[3:]
        if all(s == 1 for s in extra):
            shape = shape[:3]
        else:
            raise InputError(
                f"{path.name} is a {len(shape)}D image of shape {shape} (a series of {int(np.prod(extra))} volumes)",
                "give one 3D volume per file: split the series (e.g. fslsplit, or "
                "nibabel.four_to_three) and use the volume you want to segment",
            )
    if len(shape) < 3 or min(shape) < 2:
        raise InputError(
            f"{path.name} is a 2D image (shape {shape}); BiGL needs a 3D volume",
            "give the whole 3D scan (all slices in one NIfTI file), not a single slice",
        )
    return shape  # type: ignore[return-value]


def _checked_affine(path: Path, affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(
            f"{path.name} has an invalid voxel-to-world matrix (affine)",
            "fix the header (qform/sform), e.g. by re-saving the image in 3D Slicer",
        )
    return affine


def read_grid(path: PathLike) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of a NIfTI file, read from the header only (cheap), with the same checks."""
    path, image = _open_nifti(path)
    return _squeezed_shape(path, image.shape), _checked_affine(path, image.affine)


def load_volume(path: PathLike, *, kind: str = "image") -> Volume:
    """Load a 3D NIfTI image (``kind="image"``) or label map (``kind="labels"``).

    Images keep their on-disk dtype (float64 and scaled data become float32); label maps are
    returned as uint8 after checking they hold non-negative integers. A 4D file with a singleton
    fourth axis is squeezed; 2D images, 4D series and non-finite values are refused.
    """
    if kind not in ("image", "labels"):
        raise ValueError(f"kind must be 'image' or 'labels', not {kind!r}")
    path, image = _open_nifti(path)
    shape = _squeezed_shape(path, image.shape)
    affine = _checked_affine(path, image.affine)
    try:
        data = np.asanyarray(image.dataobj)
    except _READ_ERRORS as exc:
        raise InputError(
            f"cannot read the voxel data of {path}: {exc}",
            "the file is truncated or damaged; copy or export it again",
        ) from exc
    data = np.asarray(data).reshape(shape)
    if data.dtype.kind not in "iuf" and data.dtype != np.bool_:
        raise InputError(
            f"{path.name} has voxel type {data.dtype}, not a scalar image",
            "give a single-channel (grey-level) volume; convert RGB or complex images first",
        )
    if data.dtype.kind == "f":
        if data.dtype != np.float32:
            data = data.astype(np.float32)
        finite = np.isfinite(data)
        if not finite.all():
            bad = int(data.size - np.count_nonzero(finite))
            raise InputError(
                f"{path.name} has {bad} NaN or infinite voxel value(s)",
                "replace them (e.g. numpy.nan_to_num, or fslmaths in -nan out) and save the volume again",
            )
    if kind == "labels":
        data = _as_label_map(path, data)
    return Volume(data=data, affine=affine, path=path)


def _as_label_map(path: Path, data: np.ndarray) -> np.ndarray:
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
        raise InputError(
            f"{path.name} has non-integer values, so it is not a label map",
            "give the segmentation file (e.g. <case>_seg.nii.gz), not an image",
        )
    if data.size and (data.min() < 0 or data.max() > 255):
        raise InputError(
            f"{path.name} has values from {data.min():g} to {data.max():g}, not label values",
            "give the segmentation file with labels 0, 1, 2, 4 (BraTS), not an image",
        )
    return data.astype(np.uint8)


def save_volume(
    path: PathLike, data: np.ndarray, affine: np.ndarray, *, dtype=None, like: PathLike | None = None,
    output: bool = False,
) -> Path:
    """Write a 3D (or 4D) array as NIfTI (``.nii`` or ``.nii.gz``), creating the parent folder.

    The file is written atomically (:func:`bigl.files.atomic_output`: an existing file is replaced
    whole, never written through a link) with the umask's permissions; a failed write is an
    InputError. ``output``: mark the file as a BiGL result (:data:`OUTPUT_DESCRIPTION` in the
    header description), which later runs may replace beside the input scans.

    ``dtype`` defaults to the array's type, with bool stored as uint8, float64 as float32 and
    int64 as int32 (all NIfTI readers understand those). qform and sform are both set to the
    affine (scanner coordinates, code 1), as 3D Slicer and ITK expect.

    ``like``: a NIfTI file whose header is copied instead (NIfTI-1 or -2, units, qform and sform
    codes), so that an output of that scan lies on its grid exactly as every reader sees it. When
    ``affine`` is the reference's own, its qform and sform are kept as stored; otherwise both are
    set to ``affine`` with the reference's codes (code 1 where it has none). The reference's
    intensity scaling, display range, intent and description are cleared: they describe its data.
    """
    path = Path(path).expanduser()
    if not is_nifti_path(path):
        raise InputError(
            f"cannot write {path}: the name must end in .nii or .nii.gz", "choose an output name like out.nii.gz"
        )
    data = np.asarray(data)
    if dtype is None:
        dtype = {np.dtype(bool): np.uint8, np.dtype(np.float64): np.float32, np.dtype(np.int64): np.int32}.get(
            data.dtype, data.dtype
        )
    data = data.astype(dtype, copy=False)
    affine = np.asarray(affine, dtype=np.float64)
    if like is None:
        image = nib.Nifti1Image(data, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        image.header.set_xyzt_units("mm", "sec")
    else:
        image = _image_like(like, data, affine)
    if output:
        image.header["descrip"] = f"{OUTPUT_DESCRIPTION} (bigl {__version__})".encode("ascii")
    with atomic_output(path) as tmp:
        nib.save(image, str(tmp))
    return path


def is_bigl_output(path: PathLike) -> bool:
    """True when ``path`` is a NIfTI file BiGL wrote as a result (``save_volume(..., output=True)``)."""
    try:
        header = nib.load(str(Path(path).expanduser())).header
    except _READ_ERRORS:
        return False
    return np.asarray(header["descrip"]).tobytes().startswith(OUTPUT_DESCRIPTION.encode("ascii"))


def _image_like(reference: PathLike, data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """``data`` as a NIfTI image with the header of the ``reference`` file (see :func:`save_volume`)."""
    _, source = _open_nifti(reference)
    header = source.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(None, None)
    header["cal_min"] = header["cal_max"] = 0
    header.set_intent("none", (), name="")
    header["descrip"] = b""
    if not np.allclose(affine, source.affine, rtol=0.0, atol=1e-6):
        qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
        if not (qform_code or sform_code):
            qform_code = sform_code = 1
        header.set_qform(affine, code=qform_code)
        header.set_sform(affine, code=sform_code)
    return type(source)(data, None, header=header)


#: Largest difference (mm) between two affines that still counts as one voxel grid.
GRID_ATOL = 1e-3


def grid_difference(shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int], affine_b: np.ndarray) -> float | None:
    """How far apart two voxel grids are: None when the shapes differ, else the largest affine
    difference in mm (the one place grids are compared; two grids are one within :data:`GRID_ATOL`)."""
    if tuple(shape_a) != tuple(shape_b):
        return None
    return float(np.max(np.abs(np.asarray(affine_a, dtype=np.float64) - np.asarray(affine_b, dtype=np.float64))))


def same_grid(shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int], affine_b: np.ndarray, atol: float = GRID_ATOL) -> bool:
    """True when two grids have one shape and affines within ``atol`` mm."""
    difference = grid_difference(shape_a, affine_a, shape_b, affine_b)
    return difference is not None and difference <= atol


def files_share_grid(path_a: PathLike, path_b: PathLike, atol: float = GRID_ATOL) -> bool:
    """:func:`same_grid` from two files' headers (no voxel data read)."""
    return same_grid(*read_grid(path_a), *read_grid(path_b), atol=atol)


def check_same_grid(volumes: Mapping[str, Volume], atol: float = GRID_ATOL) -> None:
    """Check that all volumes share one voxel grid (shape and affine within ``atol`` mm).

    Raises :class:`InputError` naming the first volume that differs from the first one, and how
    (shape or position/orientation).
    """
    grids = {name: (volume.shape, volume.affine, volume.path) for name, volume in volumes.items()}
    compare_grids(grids, atol=atol)


def compare_grids(
    grids: Mapping[str, tuple[tuple[int, ...], np.ndarray, Path | None]], atol: float = GRID_ATOL
) -> None:
    """Grid check on ``name -> (shape, affine, path)``; the shared core of the grid checks."""
    items = list(grids.items())
    if len(items) < 2:
        return
    ref_name, (ref_shape, ref_affine, ref_path) = items[0]
    ref_label = _describe(ref_name, ref_path)
    for name, (shape, affine, path) in items[1:]:
        label = _describe(name, path)
        difference = grid_difference(shape, affine, ref_shape, ref_affine)
        if difference is None:
            raise InputError(
                f"{label} has shape {tuple(shape)} but {ref_label} has shape {tuple(ref_shape)}: "
                "they are not on the same voxel grid",
                "resample it onto the grid of the others (e.g. 3D Slicer 'Resample Image (BRAINS)' "
                "or SimpleITK.Resample with the reference image), or co-register the scans",
            )
        if difference > atol:
            raise InputError(
                f"{label} has the same shape as {ref_label} but a different position/orientation "
                f"(affine differs by up to {difference:.4g} mm)",
                "the scans must be co-registered and resampled onto one grid (e.g. 3D Slicer "
                "'General Registration (BRAINS)' then 'Resample Image (BRAINS)')",
            )


def _describe(name: str, path: Path | None) -> str:
    if path is not None and Path(path).name != name:
        return f"{name} ({Path(path).name})"
    return name


def check_scan(volume: Volume | np.ndarray, *, name: str | None = None) -> None:
    """Check that an image can be segmented: not empty/constant and not a label map.

    Used by inference before preprocessing; ``load_volume`` already checked format and finiteness.
    """
    if isinstance(volume, Volume):
        name = name or volume.name
        data = volume.data
    else:
        data = np.asarray(volume)
    name = name or "the image"
    if data.size == 0:
        raise InputError(f"{name} is empty (no voxels)", "give a 3D brain MR scan")
    low, high = data.min(), data.max()
    if low == high:
        raise InputError(
            f"{name} is constant (every voxel is {low:g}): there is nothing to segment",
            "check that the right file was chosen and that it was exported correctly",
        )
    if low >= 0 and high <= max(LABEL_LIKE_VALUES):
        values = np.unique(data)
        if np.array_equal(values, np.round(values)) and set(values.astype(int).tolist()) <= LABEL_LIKE_VALUES:
            raise InputError(
                f"{name} looks like a label map (only the values {values.astype(int).tolist()}), not an MR image",
                "give the MR scan (e.g. <case>_t2.nii.gz) as the input image; label maps are only used for scoring",
            )
