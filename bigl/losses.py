"""Losses of BiGL (paper section 3.4), one named function per term.

Equation index (paper -> function; who calls it):

- Eq. 1, generator of the translator (pix2pix): ``generator_adversarial_loss`` on D(x_s, x_s->t)
  + ``lambda_l1`` x ``translation_l1_loss`` to the co-registered slice (both directions);
  ``bigl.training.translator_stage.PairedObjective.generator_losses``. Unpaired data use the
  CycleGAN objective instead: the same adversarial term on unconditional discriminators,
  ``translation_l1_loss`` of the cycled and identity images (``UnpairedObjective``).
- Eq. 2, the translator's discriminators: ``discriminator_loss``; ``TranslatorObjective.discriminator_losses``.
- Eq. 3, position and channel attention: not a loss (``bigl.models.segmenter``).
- Eq. 4, segmentation: ``segmentation_loss`` (cross-entropy + generalised Dice; the mean-class and
  BraTS-region Dice are switches beyond the paper); ``AdaptTrainer.segmenter_losses``.
- Eq. 5, output consistency: ``output_consistency_loss``; ``AdaptTrainer.segmenter_losses``.
- Eq. 6 and 8, attention and feature consistency (the segmenter fools D_s with the maps of
  x_t->s and D_t with those of x_t): ``generator_adversarial_loss``; ``AdaptTrainer.segmenter_losses``.
- Eq. 7 and 9, the attention and feature discriminators (D_s: maps of x_s real, x_t->s fake; D_t:
  x_s->t real, x_t fake): ``discriminator_loss``; ``AdaptTrainer.discriminator_pairs`` pairs them.
- Eq. 10, the weighted sum: ``AdaptTrainer.segmenter_losses`` (lambda_out, lambda_gtl, lambda_syn).

Segmentation (Eq. 4): cross-entropy + generalised Dice. The paper gives the Dice class weight as
``w_i = 1 / num(class i)``; Sudre et al. (2017), who introduced the generalised Dice loss, use
``1 / num^2``. Both are available through ``weight_power`` (1, the paper, by default; 2, Sudre; 0,
all classes equal). The paper's formula is typeset as a weighted sum of per-class Dice ratios; we
use Sudre's ratio of weighted sums, which stays in [0, 1] for any weights.

Output consistency (Eq. 5) is printed as ``-E[||Phi(x_t) - Phi(x_t->s)||_2]``; minimised as written
it would push the two predictions apart, contrary to its stated purpose. We minimise the mean
squared L2 distance between the two softmax maps instead (zero when the predictions agree).

Adversarial losses come in the two usual flavours: least squares (LSGAN, used by CycleGAN) and
binary cross-entropy on logits (the log-likelihood form of Eq. 1-2 and 6-9).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from bigl.errors import ConfigError
from bigl.runfolder import DICE_LOSSES

ADVERSARIAL_MODES = ("lsgan", "bce")


#: Class index of voxels that take no part in a segmentation loss (unconfident pseudo-labels).
IGNORE_INDEX = 255


def _check_segmentation_inputs(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """ValueError unless logits [B, K, H, W] and target [B, H, W] class indices agree; returns a long target.
    ``ignore_index`` is accepted besides the class indices."""
    if logits.ndim != 4:
        raise ValueError(f"logits must be [B, K, H, W], got shape {tuple(logits.shape)}")
    if target.ndim == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target must be class indices [B, H, W] matching logits {tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    target = target.long()
    num_classes = logits.shape[1]
    checked = target if ignore_index is None else target[target != ignore_index]
    if checked.numel() and (int(checked.min()) < 0 or int(checked.max()) >= num_classes):
        raise ValueError(
            f"target class indices must be in 0..{num_classes - 1}, got {int(checked.min())}..{int(checked.max())}"
            " (BraTS labels 0/1/2/4 must first be mapped with bigl.labels.labels_to_classes)"
        )
    return target


def generalized_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    eps: float = 1e-5,
    weight_power: float = 1.0,
    per_image: bool = False,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Generalised Dice loss on softmax probabilities p and one-hot targets g.

    loss = 1 - (2 * sum_i w_i sum_x p_ix g_ix + eps) / (sum_i w_i sum_x (p_ix + g_ix) + eps),
    w_i = 1 / num_i ** weight_power with num_i the number of voxels of class i in the target.
    Weights are normalised to sum to 1 (the ratio does not change; ``eps`` then has the same effect
    for every ``weight_power``). A class absent from the target gets the largest weight of the
    present classes, so predicting it is still penalised (as MONAI does) and nothing is infinite.

    Voxel counts are taken over the whole mini-batch (``per_image=False``, steadier for 2D slices
    where a tumour class may cover a handful of pixels) or per image, averaging the per-image losses.
    Voxels labelled ``ignore_index`` count for neither the prediction nor the target.
    """
    probabilities, one_hot = _batch_soft_overlap(logits, target, ignore_index)
    dims = (2, 3) if per_image else (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dims)  # [B, K] or [K]
    total = (probabilities + one_hot).sum(dims)
    counts = one_hot.sum(dims)
    present = counts > 0
    weights = torch.where(present, counts.clamp_min(1.0).pow(-float(weight_power)), torch.zeros_like(counts))
    largest = weights.amax(dim=-1, keepdim=True)
    weights = torch.where(present, weights, largest)
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    numerator = 2 * (weights * intersection).sum(-1) + eps
    denominator = (weights * total).sum(-1) + eps
    return (1 - numerator / denominator).mean()


def _batch_soft_overlap(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and one-hot targets [B, K, H, W], with ``ignore_index`` voxels zeroed in both."""
    target = _check_segmentation_inputs(logits, target, ignore_index)
    probabilities = torch.softmax(logits.float(), dim=1)
    if ignore_index is not None:
        keep = (target != ignore_index).unsqueeze(1).to(probabilities.dtype)
        target = torch.where(target == ignore_index, torch.zeros_like(target), target)
        probabilities = probabilities * keep
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probabilities.dtype)
    if ignore_index is not None:
        one_hot = one_hot * keep
    return probabilities, one_hot


def _soft_dice(probabilities: torch.Tensor, one_hot: torch.Tensor, eps: float) -> torch.Tensor:
    """Soft Dice (2 sum p g + eps) / (sum p + sum g + eps) per channel, counts over the whole mini-batch."""
    intersection = (probabilities * one_hot).sum((0, 2, 3))
    total = (probabilities + one_hot).sum((0, 2, 3))
    return (2 * intersection + eps) / (total + eps)


def mean_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5, ignore_index: int | None = None) -> torch.Tensor:
    """1 - the mean over classes of the soft Dice (2 sum p g + eps) / (sum p + sum g + eps), counts
    over the whole mini-batch (as MONAI's DiceLoss with batch=True). Every class weighs the same
    whatever its size, so a rare class (enhancing tumour) pulls as hard as the background; a class
    absent from the batch scores about 0 unless it is not predicted either."""
    probabilities, one_hot = _batch_soft_overlap(logits, target, ignore_index)
    return 1 - _soft_dice(probabilities, one_hot, eps).mean()


def _region_matrix(num_classes: int, device: torch.device) -> torch.Tensor:
    """[R, K] 0/1 matrix: which class indices make up each BraTS region (WT, TC, ET)."""
    from bigl.labels import LABELS, REGIONS

    if num_classes != len(LABELS):
        raise ValueError(f"region Dice needs the {len(LABELS)} BraTS classes, got {num_classes}")
    rows = [[1.0 if label in members else 0.0 for label in LABELS] for members in REGIONS.values()]
    return torch.tensor(rows, device=device)


def region_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5, ignore_index: int | None = None) -> torch.Tensor:
    """1 - the mean soft Dice of the three BraTS evaluation regions (WT, TC, ET), each region's
    probability being the sum of its classes' softmax probabilities; counts over the whole mini-batch.

    The loss is the score BraTS reports: whole tumour is one large region, so a model cannot lower the
    loss by dropping the tumour when a small class (necrosis) is hard, and necrosis and enhancing
    tumour pull together as the tumour core. The background takes part only through the regions'
    false positives. A region absent from the batch scores about 1 when it is not predicted."""
    probabilities, one_hot = _batch_soft_overlap(logits, target, ignore_index)
    regions = _region_matrix(logits.shape[1], logits.device)
    region_probabilities = torch.einsum("rk,bkhw->brhw", regions, probabilities)
    region_targets = torch.einsum("rk,bkhw->brhw", regions, one_hot)
    return 1 - _soft_dice(region_probabilities, region_targets, eps).mean()


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    class_weights: torch.Tensor | None = None,
    weight_power: float = 1.0,
    eps: float = 1e-5,
    ignore_index: int | None = None,
    dice: str = "generalised",
) -> torch.Tensor:
    """L_seg = ce_weight * cross-entropy (optionally class-weighted) + dice_weight * Dice term
    (``dice``: "generalised", :func:`generalized_dice_loss`; "mean", :func:`mean_dice_loss`; or
    "regions", :func:`region_dice_loss`);
    voxels labelled ``ignore_index`` (e.g. :data:`IGNORE_INDEX`) take no part in either term."""
    target = _check_segmentation_inputs(logits, target, ignore_index)
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
        if class_weights.shape != (logits.shape[1],):
            raise ValueError(
                f"class_weights must have one value per class ({logits.shape[1]}), got {tuple(class_weights.shape)}"
            )
    if ignore_index is not None and not bool((target != ignore_index).any()):
        return logits.sum() * 0.0  # nothing confident to learn from in this batch
    cross_entropy = F.cross_entropy(logits.float(), target, weight=class_weights, ignore_index=-100 if ignore_index is None else ignore_index)
    if dice == "mean":
        overlap = mean_dice_loss(logits, target, eps=eps, ignore_index=ignore_index)
    elif dice == "regions":
        overlap = region_dice_loss(logits, target, eps=eps, ignore_index=ignore_index)
    elif dice == "generalised":
        overlap = generalized_dice_loss(logits, target, eps=eps, weight_power=weight_power, ignore_index=ignore_index)
    else:
        raise ValueError(f"dice must be one of {', '.join(DICE_LOSSES)}, got {dice!r}")
    return ce_weight * cross_entropy + dice_weight * overlap


def adversarial_loss(logits: torch.Tensor, is_real: bool, mode: str = "lsgan") -> torch.Tensor:
    """Discriminator logits against the all-real (1) or all-fake (0) target.

    'lsgan': mean squared error to 1 / 0; 'bce': binary cross-entropy with logits.
    The generator side uses ``is_real=True`` on fakes, the discriminator side both.
    """
    target = torch.full_like(logits, 1.0 if is_real else 0.0)
    if mode == "lsgan":
        return F.mse_loss(logits, target)
    if mode == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    raise ConfigError(f"unknown adversarial loss mode {mode!r}", f"use one of: {', '.join(ADVERSARIAL_MODES)}")


def generator_adversarial_loss(fake_logits: Iterable[torch.Tensor], mode: str = "lsgan") -> torch.Tensor:
    """Generator side of adversarial learning (Eq. 1's first term; Eq. 6 and 8): the sum over
    discriminators of their logits on the fakes against "real". The discriminators should be frozen."""
    return sum(adversarial_loss(logits, True, mode) for logits in fake_logits)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, mode: str = "lsgan") -> torch.Tensor:
    """One discriminator's loss (Eq. 2, 7, 9): (real as real + fake as fake) / 2, on detached fakes."""
    return 0.5 * (adversarial_loss(real_logits, True, mode) + adversarial_loss(fake_logits, False, mode))


def translation_l1_loss(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Sum of the mean absolute differences of (image, reference) pairs: Eq. 1's L1 term (the
    translations against the co-registered slices) and CycleGAN's cycle and identity terms."""
    return sum(F.l1_loss(image, reference) for image, reference in pairs)


def output_consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Eq. 5 as a distance to minimise: mean over pixels of ||softmax(a) - softmax(b)||^2 (sum over classes).

    Zero for identical predictions, symmetric, and unchanged by adding a constant to all logits of a
    pixel. Gradients flow into both arguments.
    """
    if logits_a.shape != logits_b.shape or logits_a.ndim < 2:
        raise ValueError(
            f"output consistency needs two logit maps of the same shape [B, K, ...], got {tuple(logits_a.shape)} "
            f"and {tuple(logits_b.shape)}"
        )
    difference = torch.softmax(logits_a.float(), dim=1) - torch.softmax(logits_b.float(), dim=1)  # float32 under autocast too
    return difference.pow(2).sum(dim=1).mean()
