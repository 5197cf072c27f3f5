"""Synthetic brain-tumour MR phantoms with a real T1 <-> T2 domain gap.

Each phantom is a brain of random smooth shape with white matter, cortical and deep grey matter,
cerebrospinal fluid (lateral ventricles, interhemispheric fissure, sulci and a rim at the surface)
and a glioma-like tumour of random size, shape and position (periventricular, deep or cortical):
necrotic / non-enhancing core (BraTS label 1) inside an enhancing rim (label 4), surrounded by
oedema (label 2) that spreads through white matter and spares the cortex.

Images follow the usual MR contrasts, with tissue intensities varied a little per case:

=========  ======================================  ===========================================
sequence   normal tissue                           tumour
=========  ======================================  ===========================================
T1         WM > GM > CSF (dark)                    hypo-intense; oedema slightly hypo-intense
T1ce       as T1                                   enhancing rim bright, necrosis dark
T2         CSF brightest, GM > WM (dark)           oedema and necrosis bright
FLAIR      CSF suppressed (dark), GM > WM          oedema brightest
=========  ======================================  ===========================================

so the tumour is darker than white matter on T1 and brighter on T2: a segmenter trained on one
fails on the other. Within the tumour the sub-regions differ as in glioblastoma: on T1 the oedema is
darker than grey matter and the necrosis nearly as dark as CSF; on T2 the necrosis is fluid-bright
(just below CSF) and the enhancing rim a darker ring between it and the oedema (the T2-hypointense
rim), so the core shows on both sequences and not only on contrast-enhanced T1.

Images are blurred (partial volume), multiplied by a smooth bias field, get Rician noise and are
skull-stripped (zero background) and stored as int16 with an LPS-like affine, like BraTS. The same generator state always gives the same phantom.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from bigl.data.brats import MODALITIES, NAMINGS, SEPARATORS, case_file_name, normalise_modalities
from bigl.data.io import PathLike, save_volume
from bigl.files import make_folder
from bigl.errors import ConfigError

# Tissue codes of the phantom's anatomy map.
BACKGROUND, CSF, GM, WM, OEDEMA, NECROSIS, ENHANCING = range(7)
TISSUES = ("background", "csf", "gm", "wm", "oedema", "necrosis", "enhancing")
#: BraTS label of each tissue code.
TISSUE_LABELS = np.array([0, 0, 0, 0, 2, 1, 4], dtype=np.uint8)

#: Mean intensity of each tissue (order of TISSUES) relative to white matter on T1.
CONTRASTS: dict[str, tuple[float, ...]] = {
    #         bg   csf   gm    wm    oedema necrosis enhancing
    "t1":    (0.0, 0.25, 0.68, 1.00, 0.62, 0.34, 0.56),
    "t1ce":  (0.0, 0.25, 0.68, 1.00, 0.64, 0.34, 1.75),
    "t2":    (0.0, 1.55, 0.70, 0.45, 1.15, 1.45, 0.85),
    "flair": (0.0, 0.14, 0.72, 0.55, 1.40, 0.85, 1.00),
}  # fmt: skip
MIN_SIZE = 16
#: Largest phantom (voxels per side): generation holds about BYTES_PER_VOXEL bytes per voxel
#: (measured: images of four modalities, tissue maps, smooth fields), so this one needs ~1.1 GB.
MAX_SIZE = 256
BYTES_PER_VOXEL = 70
#: Tumours drawn (random site, size and shape) before a grid counts as too coarse for one.
_TUMOUR_DRAWS = 50
_DRAWS_BEFORE_GROWTH = 10


def phantom_shape(size: int, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[int, int, int]:
    """Grid of a phantom: a field of view of ``size`` times the finest spacing along every axis."""
    finest = min(spacing)
    return tuple(max(MIN_SIZE // 2, int(round(size * finest / s))) for s in spacing)  # type: ignore[return-value]


def phantom_affine(shape: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """BraTS-like LPS affine: axes 0 and 1 flipped (diag(-1, -1, 1) times the spacing), origin at the far corner."""
    sx, sy, sz = (float(s) for s in spacing)
    return np.array(
        [
            [-sx, 0.0, 0.0, (shape[0] - 1) * sx],
            [0.0, -sy, 0.0, (shape[1] - 1) * sy],
            [0.0, 0.0, sz, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cells: int) -> np.ndarray:
    """Smooth random field (zero mean, unit std) varying over about ``cells`` cells per axis.

    Random weights on a lattice of ``cells`` steps across the volume, spread by Gaussian bumps one
    lattice step wide (separable, so it costs a few small matrix products).
    """
    step = 2.0 / cells
    knots = np.linspace(-1.0 - step, 1.0 + step, cells + 3)
    bumps = [
        np.exp(-0.5 * ((np.linspace(-1.0, 1.0, n)[:, None] - knots[None, :]) / step) ** 2).astype(np.float32)
        for n in shape
    ]
    weights = rng.standard_normal((len(knots),) * 3).astype(np.float32)
    field = np.einsum("ia,jb,kc,abc->ijk", *bumps, weights, optimize=True)
    field -= field.mean()
    field /= field.std() + 1e-8
    return field.astype(np.float32)


def _ellipsoid_distance(coords, centre, radii) -> np.ndarray:
    """Normalised distance from ``centre`` (1 on the ellipsoid surface)."""
    return np.sqrt(sum(((c - c0) / r) ** 2 for c, c0, r in zip(coords, centre, radii)))


def _finest_step(shape: tuple[int, int, int], spacing: Sequence[float]) -> float:
    """The finest voxel size in the [-1, 1] coordinates of the phantom, over the three axes.

    Every axis spans the same field of view in mm, so one finest voxel (``min(spacing)`` mm) is
    about the same length along every axis; the largest of the three is returned.
    """
    finest = min(spacing)
    return max(2.0 * finest / ((n - 1) * s) for n, s in zip(shape, spacing))


def _anatomy(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Tissue map (codes above) of a healthy brain, before the tumour."""
    coords = np.meshgrid(*(np.linspace(-1.0, 1.0, s, dtype=np.float32) for s in shape), indexing="ij")
    x, y, z = coords
    radii = (rng.uniform(0.70, 0.80), rng.uniform(0.82, 0.92), rng.uniform(0.72, 0.84))
    centre = (rng.uniform(-0.03, 0.03), rng.uniform(-0.04, 0.04), rng.uniform(-0.06, 0.0))
    radius = _ellipsoid_distance(coords, centre, radii)
    # Flatter base, rounder vault, plus a random lumpy outline.
    radius = radius * (1.0 + 0.08 * np.clip(centre[2] - z, 0, None)) + 0.07 * _smooth_field(rng, shape, 4)
    brain = radius < 1.0
    depth = 1.0 - radius  # 0 at the surface, ~1 at the centre

    tissue = np.full(shape, BACKGROUND, dtype=np.uint8)
    tissue[brain] = WM
    cortex = depth < rng.uniform(0.13, 0.18) + 0.025 * _smooth_field(rng, shape, 6)
    tissue[brain & cortex] = GM
    # Deep grey matter (basal ganglia / thalami) on both sides of the midline.
    nucleus_radii = (rng.uniform(0.09, 0.12), rng.uniform(0.12, 0.16), rng.uniform(0.09, 0.12))
    for side in (-1.0, 1.0):
        nucleus_centre = (centre[0] + side * rng.uniform(0.17, 0.22), centre[1] + rng.uniform(-0.05, 0.05), centre[2])
        tissue[brain & (_ellipsoid_distance(coords, nucleus_centre, nucleus_radii) < 1.0)] = GM
    # Sulci: sheets where a smooth random field crosses zero, reaching into the cortex.
    gyri = _smooth_field(rng, shape, 9)
    sulci = (np.abs(gyri) < rng.uniform(0.2, 0.3)) & (depth < 0.17)
    surface_rim = depth < rng.uniform(0.025, 0.045)
    midline = centre[0] + 0.02 * _smooth_field(rng, shape, 3)
    above_callosum = z > centre[2] - 0.15 + 0.08 * _smooth_field(rng, shape, 3)
    fissure = (np.abs(x - midline) < 0.025) & above_callosum & (depth < 0.45)
    fissure_cortex = (np.abs(x - midline) < 0.08) & above_callosum & (depth < 0.5)
    tissue[brain & fissure_cortex] = GM
    tissue[brain & (sulci | surface_rim | fissure)] = CSF
    # Lateral ventricles: two curved, lumpy ellipsoids.
    shift = 0.06 * _smooth_field(rng, shape, 3)
    ventricle_radii = (rng.uniform(0.07, 0.1), rng.uniform(0.24, 0.34), rng.uniform(0.09, 0.13))
    ventricle_y = centre[1] + rng.uniform(-0.05, 0.05)
    ventricle_z = centre[2] + rng.uniform(0.05, 0.12)
    for side in (-1.0, 1.0):
        ventricle_centre = (centre[0] + side * rng.uniform(0.08, 0.12), ventricle_y, ventricle_z)
        bent = (x, y, z - 0.35 * (y - ventricle_y) ** 2)  # the ventricles arc down at both ends
        tissue[brain & (_ellipsoid_distance(bent, ventricle_centre, ventricle_radii) + shift < 1.0)] = CSF
    return tissue


def _tumour_sites(
    tissue: np.ndarray, spacing: Sequence[float]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Candidate tumour centres (next to a ventricle, deep white matter, under the cortex) and the
    relative depth of every voxel (distance in mm to the brain surface / largest distance)."""
    brain = tissue != BACKGROUND
    depth = ndi.distance_transform_edt(brain, sampling=spacing)
    depth /= max(depth.max(), 1.0)
    white = tissue == WM
    sites = {
        "periventricular": white & ndi.binary_dilation(tissue == CSF, iterations=2) & (depth > 0.35),
        "deep": white & (depth > 0.45),
        "cortical": white & (depth > 0.15) & (depth <= 0.3),
    }
    return {name: np.argwhere(mask) for name, mask in sites.items() if mask.any()}, depth


def _add_tumour(
    tissue: np.ndarray,
    sites: dict[str, np.ndarray],
    depth: np.ndarray,
    rng: np.random.Generator,
    min_voxels: int,
    spacing: Sequence[float],
    growth: float = 1.0,
) -> np.ndarray | None:
    """Tissue map with a tumour, or None when this draw left out a tumour part (caller redraws).

    ``growth`` scales the core radius up, for grids too coarse for the smaller tumours.
    """
    shape = tissue.shape
    coords = np.meshgrid(*(np.linspace(-1.0, 1.0, s, dtype=np.float32) for s in shape), indexing="ij")
    where = sites[rng.choice(sorted(sites))]
    centre_index = tuple(where[rng.integers(len(where))])
    centre = tuple(float(c[centre_index]) for c in coords)
    core_radius = rng.uniform(0.13, 0.27) * growth
    radii = tuple(core_radius * rng.uniform(0.8, 1.25) for _ in range(3))
    core_distance = _ellipsoid_distance(coords, centre, radii) + 0.12 * _smooth_field(rng, shape, 5)
    oedema_extent = rng.uniform(1.5, 2.4)
    oedema_distance = (
        _ellipsoid_distance(coords, centre, tuple(r * oedema_extent for r in radii))
        + 0.3 * _smooth_field(rng, shape, 8)
    )
    # The enhancing rim is at least about 2 of the finest voxels thick, so that the blur (the same
    # width in mm along every axis, see _render) does not wash it out. Measured in mm, not in voxels
    # of the coarsest axis: on a grid with few thick slices that would leave no room for necrosis.
    thinnest_rim = 2.0 * _finest_step(shape, spacing) / min(radii)
    necrotic_fraction = min(rng.uniform(0.5, 0.75), 1.0 - thinnest_rim)

    result = tissue.copy()
    # Oedema spreads through white matter and deep grey matter, sparing the cortex and the CSF.
    result[(oedema_distance < 1.0) & ((tissue == WM) | (tissue == GM) & (depth > 0.2))] = OEDEMA
    core = (tissue != BACKGROUND) & (core_distance < 1.0)
    result[core] = ENHANCING
    result[core & (core_distance < necrotic_fraction)] = NECROSIS
    counts = np.bincount(result.ravel(), minlength=len(TISSUES))
    if min(counts[OEDEMA], counts[NECROSIS], counts[ENHANCING]) < min_voxels:
        return None
    return result


def _tissue_intensities(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-case tissue intensities: the contrast table varied by a few percent."""
    return {
        modality: np.asarray(values, dtype=np.float32) * rng.uniform(0.93, 1.07, size=len(values)).astype(np.float32)
        for modality, values in CONTRASTS.items()
    }


def _render(
    tissue: np.ndarray,
    intensities: np.ndarray,
    rng: np.random.Generator,
    spacing: Sequence[float],
    skull_stripped: bool,
) -> np.ndarray:
    """One MR image of the tissue map: texture, blur, bias field, Rician noise, int16."""
    shape = tissue.shape
    image = intensities[tissue]
    texture = 1.0 + 0.04 * _smooth_field(rng, shape, 14)
    tumour = tissue >= OEDEMA
    texture[tumour] += 0.08 * _smooth_field(rng, shape, 10)[tumour]
    image = image * texture
    finest = min(spacing)
    sigma = rng.uniform(0.5, 0.8)
    image = ndi.gaussian_filter(image, [sigma * finest / s for s in spacing])
    image *= np.exp(0.08 * _smooth_field(rng, shape, 3))
    gain = rng.uniform(300.0, 900.0)
    noise = rng.uniform(0.015, 0.035)
    real = image + rng.normal(0.0, noise, shape).astype(np.float32)
    imaginary = rng.normal(0.0, noise, shape).astype(np.float32)
    image = np.sqrt(real * real + imaginary * imaginary) * gain
    if skull_stripped:
        image[~ndi.binary_dilation(tissue != BACKGROUND)] = 0.0
    return np.clip(np.round(image), 0, np.iinfo(np.int16).max).astype(np.int16)


@dataclass
class Phantom:
    """A phantom: int16 images per canonical modality, BraTS labels and the tissue map behind them."""

    images: dict[str, np.ndarray]
    labels: np.ndarray  # uint8 0/1/2/4
    tissue: np.ndarray  # uint8 tissue codes (BACKGROUND, CSF, GM, WM, OEDEMA, NECROSIS, ENHANCING)


def generate_phantom(
    size: int,
    rng: np.random.Generator,
    modalities: Sequence[str] = ("t1", "t2"),
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    skull_stripped: bool = True,
) -> Phantom:
    """One phantom with its tissue map (see :func:`make_phantom`)."""
    wanted = normalise_modalities(modalities)
    if not wanted:
        raise ConfigError("no modality asked for", f"choose some of {', '.join(MODALITIES)}")
    spacing = _check_spacing(spacing)
    shape = phantom_shape(_check_size(size), spacing)
    healthy = _anatomy(shape, rng)
    sites, depth = _tumour_sites(healthy, spacing)
    min_voxels = max(4, int(np.prod(shape) // 20000))
    for draw in range(_TUMOUR_DRAWS):
        # After a few misses (a grid with few thick slices may hold no voxel of a small necrotic
        # core), draw larger tumours; the draws before are those of a fine grid.
        growth = min(2.0, 1.0 + 0.05 * max(0, draw - _DRAWS_BEFORE_GROWTH))
        tissue = _add_tumour(healthy, sites, depth, rng, min_voxels, spacing, growth) if sites else None
        if tissue is not None:
            break
    else:
        raise ConfigError(
            f"cannot place a tumour with all three parts in a {shape[0]}x{shape[1]}x{shape[2]} phantom "
            f"(size {size}, spacing {'x'.join(f'{s:g}' for s in spacing)} mm): the grid is too coarse",
            "use a larger --size (e.g. 64) or a finer --spacing",
        )
    intensities = _tissue_intensities(rng)
    # One seed per modality, drawn for all of them: an image does not depend on which others are made.
    seeds = rng.integers(0, 2**63 - 1, size=len(MODALITIES))
    images = {
        modality: _render(tissue, intensities[modality], np.random.default_rng(seed), spacing, skull_stripped)
        for modality, seed in zip(MODALITIES, seeds)
        if modality in wanted
    }
    return Phantom(images={m: images[m] for m in wanted}, labels=TISSUE_LABELS[tissue], tissue=tissue)


def make_phantom(
    size: int,
    rng: np.random.Generator,
    modalities: Sequence[str] = ("t1", "t2"),
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    skull_stripped: bool = True,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One phantom: int16 images per canonical modality and the BraTS label map (uint8 0/1/2/4).

    The anatomy, tumour and each modality's image do not depend on which other modalities are
    asked for. ``spacing`` (mm) gives anisotropic grids over the same field of view;
    ``skull_stripped=False`` keeps the noisy background.
    """
    phantom = generate_phantom(size, rng, modalities, spacing=spacing, skull_stripped=skull_stripped)
    return phantom.images, phantom.labels


def _check_size(size: int) -> int:
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ConfigError(f"phantom size must be an integer >= {MIN_SIZE}, not {size!r}", "use e.g. 64")
    if size > MAX_SIZE:
        raise ConfigError(
            f"phantom size {size} is too large: a phantom of {size}^3 voxels needs about "
            f"{_memory_text(size)} of memory while it is generated; the limit is {MAX_SIZE} voxels per side "
            f"(about {_memory_text(MAX_SIZE)})",
            f"use a size up to {MAX_SIZE} (64 is the default; BraTS scans are 240 x 240 x 155)",
        )
    return int(size)


def _memory_text(size: int) -> str:
    gib = size**3 * BYTES_PER_VOXEL / 2**30
    return f"{gib:,.1f} GB" if gib < 1024 else f"{gib / 1024:,.0f} TB"


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(values)) or min(values) <= 0:
        raise ConfigError(f"spacing must be three positive numbers (mm), not {spacing!r}", "use e.g. 1,1,1 or 1,1,2")
    return values  # type: ignore[return-value]


def write_cohort(
    out: PathLike,
    cases: int,
    size: int = 64,
    seed: int = 0,
    modalities: Sequence[str] = ("t1", "t2"),
    naming: str = "brats2018",
    prefix: str = "Phantom",
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> list[Path]:
    """Write ``cases`` phantoms in the BraTS layout under ``out``; returns the case folders.

    Case ``i`` depends only on ``(seed, i)``, so a smaller cohort is a prefix of a larger one and the
    same call always writes the same files. BraTS 2023 naming stores enhancing tumour as label 3.
    """
    if not isinstance(cases, (int, np.integer)) or cases < 1:
        raise ConfigError(f"the number of cases must be a positive integer, not {cases!r}", "use e.g. --cases 8")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"the seed must be a non-negative integer, not {seed!r}", "use e.g. --seed 0")
    if naming not in NAMINGS:
        raise ConfigError(f"unknown naming {naming!r}", f"use one of {', '.join(NAMINGS)}")
    if not prefix or any(c in prefix for c in "/\\") or not prefix.isprintable():
        raise ConfigError(f"invalid case prefix {prefix!r}", "use a plain name without path separators, e.g. Phantom")
    wanted = normalise_modalities(modalities)
    spacing = _check_spacing(spacing)
    _check_size(size)
    out = make_folder(out)
    folders = []
    for index in range(int(cases)):
        images, labels = make_phantom(size, np.random.default_rng([int(seed), index]), wanted, spacing=spacing)
        affine = phantom_affine(labels.shape, spacing)
        name = f"{prefix}{SEPARATORS[naming]}{index + 1:03d}"
        folder = out / name
        for modality, image in images.items():
            save_volume(folder / case_file_name(name, modality, naming), image, affine, dtype=np.int16)
        if naming == "brats2023":
            labels = np.where(labels == 4, np.uint8(3), labels)
        save_volume(folder / case_file_name(name, "seg", naming), labels, affine, dtype=np.uint8)
        folders.append(folder)
    return folders
