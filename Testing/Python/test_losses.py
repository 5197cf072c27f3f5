"""Losses: values at known points, class weighting of the generalised Dice loss, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bigl.errors import ConfigError
from bigl.losses import IGNORE_INDEX, adversarial_loss, generalized_dice_loss, output_consistency_loss, segmentation_loss

CONFIDENT = 30.0  # logit margin giving softmax probabilities within 1e-13 of one-hot


def confident_logits(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits [B, K, H, W] that predict ``classes`` [B, H, W] with near certainty."""
    return CONFIDENT * F.one_hot(classes, num_classes).permute(0, 3, 1, 2).float()


@pytest.fixture
def target() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 4, (2, 16, 16), generator=generator)


def test_perfect_prediction_is_near_minimum_and_uniform_is_worse(target):
    perfect = confident_logits(target, 4)
    assert F.cross_entropy(perfect, target) < 1e-6
    assert generalized_dice_loss(perfect, target) < 1e-6
    assert segmentation_loss(perfect, target) < 1e-5

    uniform = torch.zeros_like(perfect)
    assert segmentation_loss(uniform, target, dice_weight=0) == pytest.approx(math.log(4), rel=1e-5)
    assert generalized_dice_loss(uniform, target) > 0.3
    wrong = confident_logits((target + 1) % 4, 4)
    assert generalized_dice_loss(wrong, target) == pytest.approx(1.0, abs=1e-5)


def test_segmentation_loss_is_weighted_sum_of_cross_entropy_and_dice(target):
    logits = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ce = F.cross_entropy(logits, target)
    dice = generalized_dice_loss(logits, target)
    torch.testing.assert_close(segmentation_loss(logits, target), ce + dice)
    torch.testing.assert_close(segmentation_loss(logits, target, ce_weight=0.5, dice_weight=2.0), 0.5 * ce + 2 * dice)
    weights = torch.tensor([0.1, 1.0, 2.0, 3.0])
    torch.testing.assert_close(
        segmentation_loss(logits, target, class_weights=weights),
        F.cross_entropy(logits, target, weight=weights) + dice,
    )


# Hand-computed example: 10 pixels, 8 of the frequent class 0 and 2 of the rare class 1.
# Mistake A: one rare pixel predicted as frequent; mistake B: one frequent pixel predicted as rare.
# With w_i = 1 / n_i^p: GDL = 1 - 2 (w0 I0 + w1 I1) / (w0 U0 + w1 U1), where
#   A: I0 = 8, U0 = 9 + 8 = 17, I1 = 1, U1 = 1 + 2 = 3;  B: I0 = 7, U0 = 7 + 8 = 15, I1 = 2, U1 = 3 + 2 = 5.
HAND_COMPUTED = {
    # p = 1 (paper): w = (1/8, 1/2)
    1: {"A": 1 - 2 * (8 / 8 + 1 / 2) / (17 / 8 + 3 / 2), "B": 1 - 2 * (7 / 8 + 2 / 2) / (15 / 8 + 5 / 2)},
    # p = 2 (Sudre et al.): w = (1/64, 1/4)
    2: {"A": 1 - 2 * (8 / 64 + 1 / 4) / (17 / 64 + 3 / 4), "B": 1 - 2 * (7 / 64 + 2 / 4) / (15 / 64 + 5 / 4)},
    # p = 0 (no weighting): plain Dice over all pixels, both mistakes cost 1 - 18/20
    0: {"A": 0.1, "B": 0.1},
}


@pytest.mark.parametrize("weight_power", [1, 2, 0])
def test_generalized_dice_class_weights_match_hand_computed_values(weight_power):
    target = torch.tensor([[[0] * 8 + [1] * 2]])  # [1, 1, 10]
    mistake_a, mistake_b = target.clone(), target.clone()
    mistake_a[0, 0, 9] = 0
    mistake_b[0, 0, 0] = 1
    loss_a = generalized_dice_loss(confident_logits(mistake_a, 2), target, eps=0.0, weight_power=weight_power)
    loss_b = generalized_dice_loss(confident_logits(mistake_b, 2), target, eps=0.0, weight_power=weight_power)
    assert loss_a.item() == pytest.approx(HAND_COMPUTED[weight_power]["A"], abs=1e-6)
    assert loss_b.item() == pytest.approx(HAND_COMPUTED[weight_power]["B"], abs=1e-6)
    if weight_power > 0:
        assert loss_a > loss_b  # a mistake on the rare class costs more


def test_generalized_dice_matches_monai():
    monai_losses = pytest.importorskip("monai.losses")
    generator = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(3, 4, 12, 12, generator=generator)
    target = torch.randint(0, 4, (3, 12, 12), generator=generator)
    target[1][target[1] == 3] = 2  # a class absent from one image
    for weight_power, w_type in [(1, "simple"), (2, "square"), (0, "uniform")]:
        for per_image in (False, True):
            reference = monai_losses.GeneralizedDiceLoss(
                softmax=True, to_onehot_y=True, w_type=w_type, batch=not per_image, smooth_nr=0.0, smooth_dr=0.0
            )(logits, target[:, None])
            ours = generalized_dice_loss(logits, target, eps=0.0, weight_power=weight_power, per_image=per_image)
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_absent_classes_and_extreme_logits_stay_finite():
    target = torch.zeros(2, 8, 8, dtype=torch.long)  # only background: three classes absent
    logits = (1000 * torch.randn(2, 4, 8, 8)).requires_grad_()
    for per_image in (False, True):
        loss = generalized_dice_loss(logits, target, per_image=per_image)
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss + segmentation_loss(logits, target), logits)
        assert torch.isfinite(grad).all()
    # predicting an absent class is still penalised by the Dice term
    background = confident_logits(target, 4)
    tumour = confident_logits(torch.ones_like(target), 4)
    assert generalized_dice_loss(background, target) < 1e-6 < 0.9 < generalized_dice_loss(tumour, target)


def test_segmentation_loss_gradient_lowers_the_loss(target):
    logits = torch.zeros(2, 4, 16, 16, requires_grad=True)
    loss = segmentation_loss(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all()
    assert segmentation_loss(logits.detach() - 10 * grad, target) < loss


def test_segmentation_inputs_are_checked(target):
    logits = torch.zeros(2, 4, 16, 16)
    with pytest.raises(ValueError, match="labels_to_classes"):
        segmentation_loss(logits, torch.full_like(target, 4))
    with pytest.raises(ValueError, match="integer class indices"):
        generalized_dice_loss(logits, target.float())
    with pytest.raises(ValueError, match="matching logits"):
        segmentation_loss(logits, target[:, :8])
    with pytest.raises(ValueError, match="one value per class"):
        segmentation_loss(logits, target, class_weights=torch.ones(3))
    # a [B, 1, H, W] target and uint8 indices are accepted
    as_bytes = target[:, None].to(torch.uint8)
    torch.testing.assert_close(segmentation_loss(logits, as_bytes), segmentation_loss(logits, target))


def test_lsgan_targets():
    ones, zeros = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    assert adversarial_loss(ones, is_real=True) == 0
    assert adversarial_loss(zeros, is_real=False) == 0
    assert adversarial_loss(ones, is_real=False) == 1
    assert adversarial_loss(zeros, is_real=True, mode="lsgan") == 1
    assert adversarial_loss(torch.full((3, 1, 2, 2), 0.25), is_real=True) == pytest.approx(0.75**2)


def test_bce_matches_torch():
    logits = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(3))
    for is_real, label in ((True, 1.0), (False, 0.0)):
        expected = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))
        torch.testing.assert_close(adversarial_loss(logits, is_real, mode="bce"), expected)
    assert adversarial_loss(torch.full((1, 1, 2, 2), 20.0), True, "bce") < 1e-8


def test_unknown_adversarial_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="wgan"):
        adversarial_loss(torch.zeros(1, 1, 2, 2), True, mode="wgan")


def test_output_consistency_properties():
    generator = torch.Generator().manual_seed(4)
    a = torch.randn(2, 4, 8, 8, generator=generator)
    b = torch.randn(2, 4, 8, 8, generator=generator)
    assert output_consistency_loss(a, a) == 0
    assert output_consistency_loss(a, b) > 0
    torch.testing.assert_close(output_consistency_loss(a, b), output_consistency_loss(b, a))
    shift = torch.randn(2, 1, 8, 8, generator=generator)  # one constant per pixel
    torch.testing.assert_close(output_consistency_loss(a + shift, b - 3 * shift), output_consistency_loss(a, b))
    # opposite certain predictions: squared distance (1-0)^2 + (0-1)^2 = 2 at every pixel
    one = torch.zeros(1, 2, 3, 3, dtype=torch.long)[:, 0]
    assert output_consistency_loss(confident_logits(one, 2), confident_logits(1 - one, 2)).item() == pytest.approx(2.0)
    # softmax (0.75, 0.25) against (0.25, 0.75): 0.5^2 + 0.5^2 = 0.5 (an L1 or unsquared distance would differ)
    log3 = math.log(3.0)
    a = torch.tensor([log3, 0.0]).view(1, 2, 1, 1).expand(2, 2, 3, 3)
    assert output_consistency_loss(a, a.flip(1)).item() == pytest.approx(0.5)


def test_output_consistency_gradients_and_shapes():
    a = torch.randn(1, 3, 4, 4, requires_grad=True)
    b = torch.randn(1, 3, 4, 4, requires_grad=True)
    grad_a, grad_b = torch.autograd.grad(output_consistency_loss(a, b), (a, b))
    assert grad_a.abs().sum() > 0 and grad_b.abs().sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        output_consistency_loss(a, b[:, :2])


def test_mean_dice_weighs_every_class_alike():
    from bigl.losses import mean_dice_loss, segmentation_loss

    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :2, :2] = 1  # a rare class: 4 of 64 pixels
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 20.0
    assert float(mean_dice_loss(perfect, target)) < 1e-3
    missed = perfect.clone()
    missed[:, :, :2, :2] = torch.tensor([20.0, 0.0])[:, None, None]  # the rare class predicted as background
    # a miss of the rare class costs about half the loss: one of two classes scores 0
    assert float(mean_dice_loss(missed, target)) == pytest.approx(0.5 * (1 - 120 / 124) + 0.5, abs=0.01)
    assert float(segmentation_loss(missed, target, dice="mean")) > float(mean_dice_loss(missed, target))
    with pytest.raises(ValueError, match="dice must be one of"):
        segmentation_loss(missed, target, dice="focal")


def test_region_dice_scores_the_brats_regions():
    from bigl.losses import region_dice_loss, segmentation_loss

    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :4, :4] = 2  # oedema
    target[0, :2, :2] = 1  # necrosis inside it; no enhancing tumour anywhere
    perfect = confident_logits(target, 4)
    assert float(region_dice_loss(perfect, target)) < 1e-3
    # necrosis called oedema: WT still perfect, TC scores 0, ET (absent, not predicted) 1
    as_oedema = confident_logits(torch.where(target == 1, 2, target), 4)
    assert float(region_dice_loss(as_oedema, target)) == pytest.approx(1 / 3, abs=1e-3)
    # necrosis called enhancing tumour: WT and TC perfect, ET 0 (predicted where there is none)
    as_enhancing = confident_logits(torch.where(target == 1, 3, target), 4)
    assert float(region_dice_loss(as_enhancing, target)) == pytest.approx(1 / 3, abs=1e-3)
    # no tumour at all: WT and TC 0, ET 1
    assert float(region_dice_loss(confident_logits(torch.zeros_like(target), 4), target)) == pytest.approx(2 / 3, abs=1e-3)
    # unconfident voxels take no part: ignoring the necrosis makes the oedema-only guess perfect
    ignored = torch.where(target == 1, IGNORE_INDEX, target)
    assert float(region_dice_loss(as_oedema, ignored, ignore_index=IGNORE_INDEX)) < 1e-3
    assert float(segmentation_loss(as_oedema, target, dice="regions")) > float(region_dice_loss(as_oedema, target))
    with pytest.raises(ValueError, match="4 BraTS classes"):
        region_dice_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long))
