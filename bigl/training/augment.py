"""Batch augmentation of labelled slices (beyond the paper; off in the paper's config).

Independent switches, each applied to a batch of slices in [-1, 1] with background -1:

- spatial (``data.augment_spatial``): per slice, with probability 1/2, a rotation of up to
  ``MAX_ROTATION_DEGREES`` and a scaling by a factor in ``SCALE_RANGE`` about the slice centre; the
  label map follows with nearest-neighbour sampling. Applied to source slices before translation,
  so x_s and x_s->t show the same warped anatomy.
- intensity (``data.augment_intensity``): per slice, each with probability 1/2, a gamma curve, a
  contrast scale, a brightness shift, a smooth multiplicative bias field and Gaussian noise, all
  inside the brain only (the background stays -1, as the preprocessing makes it for every scan).
  Applied to the x_s the segmenter sees and, drawn anew, to x_s->t (inside x_s's brain); the
  translator itself always gets the un-augmented x_s, as in stage 1: scans from other sites
  differ in exactly these ways.
- inversion (``data.augment_invert`` = a probability): per source slice the segmenter sees, the
  brain intensities are mirrored (u -> 1 - u on the [0, 1] brain scale). T1 and T2 order most
  brain tissues in opposite directions (the no-learning baseline of :mod:`bigl.baselines` rests on
  it), so an inverted T1 slice is a T2-like view with exactly the source anatomy and labels, which
  no translator error can blur. Applied before the intensity augmentation.
- tumour brightening (``data.augment_tumour_brightening`` = a probability): per translated source
  slice x_s->t the segmenter sees, the whole tumour of the source labels (its edge softened over a
  pixel) is made brighter by a shift drawn from ``TUMOUR_BRIGHTENING_RANGE`` on the [0, 1] brain
  scale, inside the brain. Why: a T1 scan barely shows the oedema, so the translator paints T2
  tumours much fainter than real T2 shows them (median tumour-minus-brain contrast 0.16-0.20 in
  x_s->t against 0.37 in the real T2 of the same training cases, docs/results.md, "How bright the
  translator paints the tumour"), and the segmenter learns the tumour's T2 look from x_s->t. Uses
  the source labels only. Applied before the intensity augmentation.

Parameters come from the sampler's generator for ``(seed, stage, step)``: a resumed run draws
the same augmentations. Written on whole tensors rather than with MONAI's per-sample dictionary transforms: one call
warps a [B, 1, S, S] batch and its labels with parameters from the caller's generator.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bigl.data.preprocess import BACKGROUND, mirror_brain

MAX_ROTATION_DEGREES = 15.0
SCALE_RANGE = (0.85, 1.15)
GAMMA_RANGE = (0.7, 1.5)
CONTRAST_RANGE = (0.85, 1.15)
SHIFT_RANGE = (-0.1, 0.1)  # on the [0, 1] brain intensity scale
BIAS_STRENGTH = 0.3  # log-amplitude of the bias field
BIAS_GRID = 4  # control points per side of the bias field
NOISE_STD_MAX = 0.04
#: Shift of the tumour's intensities on the [0, 1] brain scale: 0-0.25 is 0-0.5 on the network's [-1, 1]
#: scale, which takes x_s->t's tumour contrast (median 0.16-0.20 there) over most of the range real
#: T2 scans show (median 0.37).
TUMOUR_BRIGHTENING_RANGE = (0.0, 0.25)
PROBABILITY = 0.5
#: Pixels above this value are brain (background is exactly -1 after preprocessing).
_BRAIN = BACKGROUND + 1e-3


def _draw_rows(batch: int | None, n: int, rows: slice | None) -> tuple[int, slice]:
    """Parameters are drawn for the whole global batch and then sliced to this rank's rows, so
    that every slice of a distributed batch gets its own draw and results do not depend on the
    number of processes."""
    return (n if batch is None else int(batch)), (slice(0, n) if rows is None else rows)


def spatial(images: torch.Tensor, labels: torch.Tensor | None, rng: np.random.Generator, *,
            batch: int | None = None, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random rotation + scaling of each slice (probability 1/2 each slice); labels follow.

    ``batch`` / ``rows``: the global batch size and the rows of it that ``images`` holds (DDP)."""
    total, rows = _draw_rows(batch, images.shape[0], rows)
    active = (rng.random(total) < PROBABILITY)[rows]
    angles = np.radians(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES, total))[rows]
    scales = rng.uniform(*SCALE_RANGE, total)[rows]
    n = images.shape[0]
    if not active.any():
        return images, labels
    angles, scales = np.where(active, angles, 0.0), np.where(active, scales, 1.0)
    cos, sin = np.cos(angles) / scales, np.sin(angles) / scales
    theta = np.stack([np.stack([cos, -sin, np.zeros(n)], 1), np.stack([sin, cos, np.zeros(n)], 1)], 1)
    theta = torch.as_tensor(theta, dtype=torch.float32, device=images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # sample (x + 1) with zero padding so that what comes in from outside is background (-1)
    warped = F.grid_sample(images.float() - BACKGROUND, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + BACKGROUND
    warped = warped.to(images.dtype)
    if labels is not None:
        moved = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        labels = moved[:, 0].round().to(labels.dtype)
    return warped, labels


def brain_of(images: torch.Tensor) -> torch.Tensor:
    """Pixels that are brain in preprocessed slices (background is exactly -1)."""
    return images > _BRAIN


def intensity(images: torch.Tensor, rng: np.random.Generator, *, brain: torch.Tensor | None = None,
              batch: int | None = None, rows: slice | None = None) -> torch.Tensor:
    """Gamma, contrast, shift, bias field and noise inside the brain of each slice; outside it the
    result is background. ``brain`` (default :func:`brain_of` the images) gives the brain
    explicitly, e.g. the source slice's brain for its translation, whose background the translator
    only approximates. ``batch`` / ``rows`` as for :func:`spatial`."""
    n, _, height, width = images.shape
    total, rows = _draw_rows(batch, n, rows)
    x = images.float()
    brain = brain_of(x) if brain is None else brain.to(torch.bool)
    u = ((x - BACKGROUND) / 2.0).clamp(0.0, 1.0)  # brain intensities on [0, 1]

    def draw(low: float, high: float, neutral: float) -> torch.Tensor:
        values = np.where(rng.random(total) < PROBABILITY, rng.uniform(low, high, total), neutral)[rows]
        return torch.as_tensor(values, dtype=torch.float32, device=x.device).view(n, 1, 1, 1)

    gamma = draw(*GAMMA_RANGE, 1.0)
    contrast = draw(*CONTRAST_RANGE, 1.0)
    shift = draw(*SHIFT_RANGE, 0.0)
    noise = draw(0.0, NOISE_STD_MAX, 0.0)
    use_bias = rng.random(total) < PROBABILITY
    coarse = (rng.normal(0.0, BIAS_STRENGTH, (total, 1, BIAS_GRID, BIAS_GRID)) * use_bias[:, None, None, None])[rows]
    bias = torch.exp(F.interpolate(torch.as_tensor(coarse, dtype=torch.float32, device=x.device), size=(height, width),
                                   mode="bicubic", align_corners=True))
    generator = torch.Generator(device="cpu").manual_seed(int(rng.integers(0, 2**31 - 1)))
    gaussian = torch.randn((total, *x.shape[1:]), generator=generator)[rows].to(x.device)
    # a brain voxel of intensity 0 stays > 0 after the shift, so it is never mistaken for background
    u = u.clamp_min(1e-6).pow(gamma) * contrast * bias + shift + noise * gaussian
    u = u.clamp(1e-3, 1.0)
    out = torch.where(brain, 2.0 * u + BACKGROUND, torch.full_like(x, BACKGROUND))
    return out.to(images.dtype)


def invert(images: torch.Tensor, rng: np.random.Generator, probability: float, *,
           batch: int | None = None, rows: slice | None = None) -> torch.Tensor:
    """Mirror the brain intensities (:func:`bigl.data.preprocess.mirror_brain`) of each slice with
    ``probability``. ``batch`` / ``rows`` as for :func:`spatial`."""
    n = images.shape[0]
    total, rows = _draw_rows(batch, n, rows)
    active = torch.as_tensor((rng.random(total) < probability)[rows], device=images.device).view(n, 1, 1, 1)
    return torch.where(active, invert_all(images), images)


def tumour_brightening(images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator, probability: float, *,
                       batch: int | None = None, rows: slice | None = None) -> torch.Tensor:
    """Brighten the whole tumour (``labels`` [B, S, S] class indices > 0) of each slice with
    ``probability`` by a shift from ``TUMOUR_BRIGHTENING_RANGE`` (on the [0, 1] brain scale), the
    tumour mask softened by a 3 x 3 mean so no step edge is drawn; the background and the voxels
    outside the brain stay as they are, and nothing goes above the brain's top intensity.
    ``batch`` / ``rows`` as for :func:`spatial`."""
    n = images.shape[0]
    total, rows = _draw_rows(batch, n, rows)
    active = rng.random(total) < probability
    shift = np.where(active, rng.uniform(*TUMOUR_BRIGHTENING_RANGE, total), 0.0)[rows]
    tumour = (labels > 0).to(torch.float32).reshape(n, 1, *labels.shape[-2:])
    soft = F.avg_pool2d(tumour, 3, stride=1, padding=1, count_include_pad=False)
    x = images.float()
    brightened = (x + 2.0 * torch.as_tensor(shift, dtype=torch.float32, device=x.device).view(n, 1, 1, 1) * soft).clamp(max=1.0)
    return torch.where(x > _BRAIN, brightened, x).to(images.dtype)


def invert_all(images: torch.Tensor) -> torch.Tensor:
    """Every slice mirrored (:func:`bigl.data.preprocess.mirror_brain`): the inverted view of the pseudo-labels."""
    return mirror_brain(images.float()).to(images.dtype)


def describe() -> dict[str, object]:
    """The fixed augmentation ranges, for the bundle's training metadata."""
    return {
        "probability": PROBABILITY,
        "rotation_degrees": MAX_ROTATION_DEGREES,
        "scale": list(SCALE_RANGE),
        "gamma": list(GAMMA_RANGE),
        "contrast": list(CONTRAST_RANGE),
        "shift": list(SHIFT_RANGE),
        "bias_strength": BIAS_STRENGTH,
        "noise_std_max": NOISE_STD_MAX,
        "tumour_brightening": list(TUMOUR_BRIGHTENING_RANGE),
    }

