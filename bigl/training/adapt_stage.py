"""Stage 2: the dual-attention U-Net with global-to-local adaptation (paper sections 3.4-3.6).

Per iteration, for method ``bigl``: a source batch x_s with labels y_s and an unpaired target
batch x_t; x_s->t and x_t->s from the translator (frozen, eval mode, no gradients unless
``finetune_translator``); the shared segmenter runs once on the four batches concatenated.

Segmenter step (discriminators frozen)::

    L = L_seg(x_s, y_s) + synthetic_weight * L_seg(x_s->t, y_s)
      + lambda_out * L_out(Phi(x_t), Phi(x_t->s))                                   (Eq. 5)
      + lambda_gtl * sum_level level_weight * [ adv(D_s^level(m_t->s), real)
                                              + adv(D_t^level(m_t), real) ]        (Eq. 6, 8)
      [+ lambda_syn * L^G of the translator, when fine-tuning it]

with level in {feature, position, channel}: the bottleneck features after attention and the two
attention matrices. Discriminator step (on detached maps), one discriminator per domain and
level (Eq. 7, 9): D_s^level tells m_s (real) from m_t->s (fake), D_t^level tells m_s->t (real)
from m_t (fake). docs/training.md explains how the paper's weights map onto these.

Methods ``source-only`` and ``target-only`` train the same network on labelled slices alone
(source images, or target images with target labels): the lower and upper bounds.

Self-training (beyond the paper; ``adapt.self_training_iterations`` > 0, method bigl): after the
adaptation steps, the adapted segmenter pseudo-labels every unlabelled target slice (softmax of
Phi(x_t) and Phi(x_t->s) averaged, of Phi(x_t) alone with ``pseudo_views`` "target", or of Phi(x_t) and
Phi(x_t with mirrored brain intensities) with "inverted"; a voxel is kept when its confidence reaches
``min(pseudo_threshold, the (1 - pseudo_class_fraction) quantile of its class)``, so rare classes
keep their most confident share; the rest is ignored; with ``pseudo_refine_edges`` the whole tumour's
edge is then redrawn on each case's target scan by :func:`bigl.postprocess.refine_edges`, and the
voxels it moves are kept whatever their confidence), and the segmenter goes on with
L_seg(x_s) + synthetic_weight * L_seg(x_s->t) + L_seg(x_t, pseudo-labels) [+ lambda_out * L_out],
without the adversarial terms. With ``pseudo_augment_intensity`` each pseudo-labelled x_t is
altered by the intensity augmentation as the segmenter sees it (the translator gets it as it is,
so L_out compares Phi of the altered slice with Phi of the plain slice's translation): labels
made on the plain slice, learnt on a slice of other gamma, contrast, level, bias field and noise
(the weak/strong views of FixMatch-style self-training), so that the target scans' own spread of
intensities is covered with the target's anatomy. With ``self_training_rounds`` > 1 the pseudo-labels are made anew
at the start of each round. The pseudo-labels travel in the checkpoints, so resume is exact.

Augmentation (``data.augment_spatial``, ``data.augment_intensity``, ``data.augment_invert``,
``data.augment_tumour_brightening``; :mod:`bigl.training.augment`): spatial to x_s with y_s before
translation (and to the pseudo-labelled x_t in self-training), intensity to x_s and x_s->t as the
segmenter sees them (and, with ``adapt.pseudo_augment_intensity``, to the pseudo-labelled x_t),
inversion to x_s as the segmenter sees it (the translator gets x_s un-augmented), tumour
brightening to x_s->t (by y_s) before its intensity augmentation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from bigl.bundle import make_metadata, save_bundle
from bigl.losses import IGNORE_INDEX, generator_adversarial_loss, output_consistency_loss, segmentation_loss
from bigl.runfolder import BUNDLE_FILE
from bigl.training import augment
from bigl.models import AttentionDiscriminator, DualAttentionUNet, FeatureDiscriminator
from bigl.training.sections import TrainingConfig
from bigl.training.data import to_tensors
from bigl.training.loop import (
    DiscriminatorBank,
    RunContext,
    StageTrainer,
    discriminator_losses,
    load_scaler_states,
    set_requires_grad,
    weight_average,
)
from bigl.training.translator_stage import (
    TranslatorObjective,
    TranslatorPair,
    per_slice,
    sample_rows,
    translator_batch,
    translator_discriminators,
    translator_objective,
)

#: Resolution of the pseudo-labelling confidences (bins of 1/1024).
CONFIDENCE_BINS = 1024
#: Segmenter outputs aligned at each level.
LEVEL_OUTPUTS = {"feature": "features", "position": "position_attention", "channel": "channel_attention"}


class AdaptNetwork(nn.Module):
    """Segmenter (and translators) of one segmenter step in one ``forward``, for one DDP wrapper."""

    def __init__(
        self, segmenter: DualAttentionUNet, translators: TranslatorPair | None, *, finetune: bool, objective: TranslatorObjective
    ):
        super().__init__()
        self.segmenter = segmenter
        self.translators = translators
        self.finetune = finetune
        self.objective = objective
        if translators is not None and not finetune:
            set_requires_grad(translators, False)
            translators.eval()

    def train(self, mode: bool = True) -> AdaptNetwork:
        super().train(mode)
        if self.translators is not None and not self.finetune:
            self.translators.eval()  # a frozen translator always runs as in inference
        return self

    def forward(
        self,
        x_labelled: torch.Tensor,
        x_target: torch.Tensor | None = None,
        translator_batch: dict[str, torch.Tensor] | None = None,
        augment_labelled: Callable[[torch.Tensor], torch.Tensor] | None = None,
        augment_translated: Callable[[torch.Tensor], torch.Tensor] | None = None,
        augment_target: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The augmentations (intensity) apply to x_s, x_s->t and x_t as the segmenter sees them; the
        translators get x_s and x_t as they are."""
        seg_labelled = x_labelled if augment_labelled is None else augment_labelled(x_labelled)
        if self.translators is None:
            return {"logits": self.segmenter(seg_labelled)}
        out: dict[str, torch.Tensor] = {}
        if self.finetune:
            fake_t, fake_s = per_slice(self.translators.s2t, x_labelled), per_slice(self.translators.t2s, x_target)
            stage1 = self.objective.translate(self.translators, translator_batch)
            out.update({f"translator.{key}": value for key, value in stage1.items()})
        else:
            with torch.no_grad():
                fake_t, fake_s = per_slice(self.translators.s2t, x_labelled), per_slice(self.translators.t2s, x_target)
        if augment_translated is not None:
            fake_t = augment_translated(fake_t)
        seg_target = x_target if augment_target is None else augment_target(x_target)
        aux = self.segmenter(torch.cat([seg_labelled, fake_t, seg_target, fake_s]), return_aux=True)
        out.update(
            logits=aux.logits,
            features=aux.features,
            position_attention=aux.position_attention,
            channel_attention=aux.channel_attention,
            fake_t=fake_t,
            fake_s=fake_s,
        )
        return out


def level_discriminators(config: TrainingConfig | dict, levels: tuple[str, ...]) -> dict[str, nn.Module]:
    """``<level>_s`` and ``<level>_t`` for each active level, sized for the segmenter's bottleneck."""
    config = TrainingConfig.of(config)
    segmenter = config.segmenter
    channels = segmenter.bottleneck_channels
    positions = (config.preprocessing.image_size // segmenter.size_multiple) ** 2
    base = config.adapt.discriminator_channels
    builders = {
        "feature": lambda: FeatureDiscriminator(channels, base_channels=base),
        "position": lambda: AttentionDiscriminator(positions, base_channels=base),
        "channel": lambda: AttentionDiscriminator(channels, base_channels=base),
    }
    return {f"{level}_{domain}": builders[level]() for level in levels for domain in ("s", "t")}


class AdaptTrainer(StageTrainer):
    stage = "adapt"

    def __init__(
        self,
        ctx: RunContext,
        total: int,
        *,
        translators: TranslatorPair | None = None,
        image_discriminators: dict[str, nn.Module] | None = None,
        translator_mode: str = "paired",
        translator_iterations: int | None = None,
    ):
        super().__init__(ctx, total)
        config = ctx.config
        self.adapt = adapt = config.adapt
        self.method = adapt.method
        self.levels = adapt.levels
        self.finetune = bool(adapt.finetune_translator)
        self.self_steps = adapt.self_training_steps
        self.adapt_steps = self.total - self.self_steps
        # the end of the adversarial phase, where other self-training settings branch off (bigl.training.branch)
        self.kept_steps = (self.adapt_steps,) if self.self_steps and self.adapt_steps > 0 else ()
        self.branched_from: dict | None = None
        self.pseudo: np.ndarray | None = None  # uint8 [n, S, S] pseudo-labels of the unlabelled slices
        self.pseudo_round = -1
        self.translator_mode = translator_mode
        self.objective = translator_objective(config, translator_mode)
        self.translator_iterations = translator_iterations
        device = ctx.device
        self.segmenter = DualAttentionUNet(config.segmenter).to(device)
        if self.method == "bigl" and translators is None:
            raise ValueError("method bigl needs the trained translators")
        self.translators = translators.to(device) if self.method == "bigl" else None
        self.network = AdaptNetwork(
            self.segmenter,
            self.translators,
            finetune=self.finetune,
            objective=self.objective,
        )
        self.network_ddp = ctx.dist.wrap(self.network)
        #: exponential moving average of the segmenter's weights (adapt.ema_decay > 0): the
        #: network that is shipped and that makes the pseudo-labels
        self.ema = weight_average(self.segmenter, adapt.ema_decay) if adapt.ema_decay > 0 else None

        discriminators = level_discriminators(config, self.levels)
        if self.finetune:
            discriminators.update(image_discriminators or translator_discriminators(config, translator_mode))
        self.bank = DiscriminatorBank(discriminators).to(device) if discriminators else None
        self.bank_ddp = ctx.dist.wrap(self.bank) if self.bank is not None else None

        if adapt.optimizer == "sgd":
            self.opt_seg = torch.optim.SGD(
                self.segmenter.parameters(), lr=adapt.lr, momentum=adapt.momentum, weight_decay=adapt.weight_decay
            )
        else:
            self.opt_seg = torch.optim.Adam(self.segmenter.parameters(), lr=adapt.lr, betas=(0.9, 0.99), weight_decay=adapt.weight_decay)
        self.opt_d = (
            torch.optim.Adam(self.bank.parameters(), lr=adapt.discriminator_lr, betas=tuple(adapt.discriminator_betas))
            if self.bank is not None
            else None
        )
        self.opt_translators = (
            torch.optim.Adam(self.translators.parameters(), lr=adapt.translator_lr, betas=(0.5, 0.999)) if self.finetune else None
        )
        self.scaler_seg, self.scaler_d = ctx.grad_scaler(), ctx.grad_scaler()

    # -- checkpoint contents ------------------------------------------------------------------
    def checkpoint_modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"segmenter": self.segmenter}
        if self.ema is not None:
            modules["segmenter_ema"] = self.ema
        if self.bank is not None:
            modules["discriminators"] = self.bank
        if self.finetune:
            modules["translators"] = self.translators
        return modules

    def checkpoint_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        optimizers = {"segmenter": self.opt_seg}
        if self.opt_d is not None:
            optimizers["discriminators"] = self.opt_d
        if self.opt_translators is not None:
            optimizers["translators"] = self.opt_translators
        return optimizers

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {} if self.pseudo is None else {"pseudo_labels": torch.from_numpy(self.pseudo)}
        return tensors, {"method": self.method, "levels": list(self.levels), "pseudo_round": self.pseudo_round,
                         "scalers": {"seg": self.scaler_seg.state_dict(), "d": self.scaler_d.state_dict()},
                         **({"branched_from": self.branched_from} if self.branched_from else {})}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        load_scaler_states({"seg": self.scaler_seg, "d": self.scaler_d}, values["scalers"])
        self.branched_from = values.get("branched_from")
        if "pseudo_labels" in tensors:
            self.pseudo = tensors["pseudo_labels"].numpy().astype(np.uint8)
            self.pseudo_round = int(values.get("pseudo_round", 0))

    @property
    def final_segmenter(self) -> DualAttentionUNet:
        """The segmenter that is shipped: the weight average when there is one, else the live network."""
        return self.segmenter if self.ema is None else self.ema.module

    # -- schedule -----------------------------------------------------------------------------
    def self_training(self, step: int) -> bool:
        """Whether ``step`` belongs to the self-training phase."""
        return self.self_steps > 0 and step >= self.adapt_steps

    def segmenter_lr(self, step: int) -> float:
        """Poly decay: lr * (1 - step / steps) ** poly_power over the adaptation steps, and again from
        self_training_lr over the self-training steps."""
        power = self.adapt.poly_power
        if self.self_training(step):
            done = step - self.adapt_steps
            return self.adapt.self_training_lr * (1.0 - done / self.self_steps) ** power
        return self.adapt.lr * (1.0 - step / self.adapt_steps) ** power

    def learning_rates(self, step: int) -> dict[str, float]:
        rates = {"segmenter": self.segmenter_lr(step)}
        if self.opt_d is not None:
            rates["discriminators"] = self.adapt.discriminator_lr
        if self.opt_translators is not None:
            rates["translators"] = self.adapt.translator_lr
        return rates

    def slices_per_step(self) -> int:
        return self.adapt.batch_size * (2 if self.method == "bigl" else 1)

    # -- one iteration ------------------------------------------------------------------------
    def batch(self, step: int) -> dict[str, Any]:
        ctx = self.ctx
        data = ctx.config.data
        size = self.adapt.batch_size
        drawn = ctx.sampler.unpaired(self.stage, step, size)
        shard = ctx.dist.shard(size)
        channels = ctx.config.segmenter.in_channels
        x, y = to_tensors(ctx.data.labelled, drawn.labelled[shard], drawn.flip_labelled[shard], ctx.device, with_labels=True,
                          channels=channels)
        rng = ctx.sampler.rng(self.stage, step, stream=2)  # augmentation parameters (global batch)
        rows = {"batch": size, "rows": shard}
        if data.augment_spatial:
            x, y = augment.spatial(x, y, rng, **rows)
        batch: dict[str, Any] = {"x": x, "y": y}
        if data.augment_intensity:
            seeds = [int(value) for value in rng.integers(0, 2**63 - 1, 2)]
            batch["augment_labelled"] = lambda t: augment.intensity(t, np.random.default_rng(seeds[0]), **rows)
            brain = augment.brain_of(x)
            batch["augment_translated"] = lambda t: augment.intensity(t, np.random.default_rng(seeds[1]), brain=brain, **rows)
        if data.augment_invert > 0:
            invert_seed = int(rng.integers(0, 2**63 - 1))
            after = batch.get("augment_labelled", lambda t: t)
            batch["augment_labelled"] = lambda t: after(augment.invert(t, np.random.default_rng(invert_seed), data.augment_invert, **rows))
        if data.augment_tumour_brightening > 0:
            tumour_seed, then = int(rng.integers(0, 2**63 - 1)), batch.get("augment_translated", lambda t: t)
            batch["augment_translated"] = lambda t: then(augment.tumour_brightening(
                t, y, np.random.default_rng(tumour_seed), data.augment_tumour_brightening, **rows))
        if self.method == "bigl":
            if self.self_training(step):
                picked = self.pseudo_rows(step, size)
                batch["x_t"], batch["y_t"] = self.pseudo_batch(picked[shard], drawn.flip_unlabelled[shard])
                if data.augment_spatial:
                    batch["x_t"], batch["y_t"] = augment.spatial(batch["x_t"], batch["y_t"], rng, **rows)
                if self.adapt.pseudo_augment_intensity:  # labels of the plain slice, learnt on an altered one
                    target_seed = int(rng.integers(0, 2**63 - 1))
                    batch["augment_target"] = lambda t: augment.intensity(t, np.random.default_rng(target_seed), **rows)
            else:
                batch["x_t"], _ = to_tensors(ctx.data.unlabelled, drawn.unlabelled[shard], drawn.flip_unlabelled[shard], ctx.device,
                                             channels=channels)
        if self.finetune:
            batch["translator"] = translator_batch(ctx, self.translator_mode, self.stage, step, size, stream=1)
        return batch

    # -- self-training ------------------------------------------------------------------------
    def pseudo_rows(self, step: int, size: int) -> np.ndarray:
        """Unlabelled slices of one self-training batch: ``tumour_fraction`` of them hold pseudo-labelled tumour."""
        rng = self.ctx.sampler.rng(self.stage, step, stream=3)
        n = len(self.pseudo)
        tumour = self.pseudo_tumour
        n_tumour = int(round(self.ctx.config.data.tumour_fraction * size)) if len(tumour) else 0
        return rng.permutation(np.concatenate([rng.choice(tumour, n_tumour), rng.integers(0, n, size - n_tumour)]).astype(np.int64))

    def pseudo_batch(self, rows: np.ndarray, flips: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Target images and their pseudo-labels (``IGNORE_INDEX`` where unconfident), mirrored alike."""
        ctx = self.ctx
        return to_tensors(ctx.data.unlabelled, rows, flips, ctx.device, channels=ctx.config.segmenter.in_channels,
                          labels=self.pseudo)

    @property
    def pseudo_tumour(self) -> np.ndarray:
        if getattr(self, "_pseudo_tumour_for", None) is not self.pseudo:
            flat = self.pseudo.reshape(len(self.pseudo), -1)
            self._pseudo_tumour = np.flatnonzero(((flat > 0) & (flat != IGNORE_INDEX)).any(axis=1))
            self._pseudo_tumour_for = self.pseudo
        return self._pseudo_tumour

    @torch.no_grad()
    def make_pseudo_labels(self, round_index: int, chunk: int = 32) -> None:
        """Pseudo-label every unlabelled slice with the current segmenter (see the module docstring).

        Confidences are kept as bins of 1/CONFIDENCE_BINS (uint16), and each class's quantile is
        read from one histogram of (class, bin): about 4 bytes per target voxel in all (bins,
        classes, labels), whatever the number of classes.
        """
        import time

        ctx, adapt = self.ctx, self.adapt
        unlabelled = ctx.data.unlabelled
        started = time.perf_counter()
        teacher = self.final_segmenter
        teacher.eval()
        n, bins = len(unlabelled.images), CONFIDENCE_BINS
        confidence = np.empty(unlabelled.images.shape, dtype=np.uint16)
        predicted = np.empty(unlabelled.images.shape, dtype=np.uint8)
        for begin in range(0, n, chunk):
            rows = np.arange(begin, min(begin + chunk, n))
            x = torch.from_numpy(unlabelled.stack(rows, ctx.config.segmenter.in_channels)).to(ctx.device)
            with ctx.autocast():
                probabilities = torch.softmax(teacher(x).float(), 1)
                if adapt.pseudo_views == "both":
                    probabilities = 0.5 * (probabilities + torch.softmax(teacher(per_slice(self.translators.t2s, x)).float(), 1))
                elif adapt.pseudo_views == "inverted":
                    probabilities = 0.5 * (probabilities + torch.softmax(teacher(augment.invert_all(x)).float(), 1))
            best, classes = probabilities.max(1)
            confidence[begin:begin + chunk] = (best * bins).clamp(0, bins - 1).to(torch.int32).cpu().numpy()
            predicted[begin:begin + chunk] = classes.cpu().numpy()
        teacher.train()
        refined = _refine_pseudo_edges(unlabelled, predicted) if adapt.pseudo_refine_edges else predicted
        classes = int(predicted.max()) + 1
        histogram = np.zeros(classes * bins, dtype=np.int64)
        for begin in range(0, n, chunk):
            key = predicted[begin:begin + chunk].astype(np.int64) * bins + confidence[begin:begin + chunk]
            histogram += np.bincount(key.ravel(), minlength=classes * bins)
        histogram = histogram.reshape(classes, bins)
        at_least = np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1]  # [class, b]: voxels with bin >= b
        lowest = np.zeros(classes, dtype=np.int64)
        kept: dict[str, float] = {}
        for cls in range(classes):
            members = int(at_least[cls, 0])
            if not members:
                continue
            # the highest bin that still keeps the (pseudo_class_fraction) most confident share, or the threshold's
            share = np.flatnonzero(at_least[cls] >= adapt.pseudo_class_fraction * members)
            lowest[cls] = min(int(adapt.pseudo_threshold * bins), int(share[-1]))
            kept[str(cls)] = round(float(at_least[cls, lowest[cls]]) / members, 4)
        labels = np.empty(predicted.shape, dtype=np.uint8)
        for begin in range(0, n, chunk):
            part = predicted[begin:begin + chunk]
            labels[begin:begin + chunk] = np.where(confidence[begin:begin + chunk] >= lowest[part], part, IGNORE_INDEX)
        extra = {}
        if refined is not predicted:
            moved = refined != predicted
            labels[moved] = refined[moved]
            extra = {"edge_added": round(float((moved & (refined > 0)).mean()), 5),
                     "edge_removed": round(float((moved & (refined == 0)).mean()), 5)}
        del confidence, predicted, refined
        self.pseudo, self.pseudo_round = labels, round_index
        ctx.log.write("pseudo_labels", stage=self.stage, round=round_index, kept_per_class=kept,
                      ignored=round(float((labels == IGNORE_INDEX).mean()), 4), **extra,
                      seconds=round(time.perf_counter() - started, 2))

    def segmenter_losses(self, batch: dict[str, Any], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every term of the segmenter step (weighted sum in ``total``)."""
        adapt = self.adapt
        if self.method != "bigl":
            seg = segmentation_loss(out["logits"], batch["y"], dice=adapt.dice)
            return {"seg": seg, "total": seg}
        logits_s, logits_s2t, logits_t, logits_t2s = out["logits"].chunk(4)
        losses = {
            "seg": segmentation_loss(logits_s, batch["y"], dice=adapt.dice),
            "seg_syn": segmentation_loss(logits_s2t, batch["y"], dice=adapt.dice),
        }
        total = losses["seg"] + adapt.synthetic_weight * losses["seg_syn"]
        if adapt.output:
            losses["out"] = output_consistency_loss(logits_t, logits_t2s)
            total = total + adapt.lambda_out * losses["out"]
        if "y_t" in batch:  # self-training: pseudo-labelled target instead of adversarial alignment
            losses["seg_pseudo"] = segmentation_loss(logits_t, batch["y_t"], ignore_index=IGNORE_INDEX, dice=adapt.dice)
            losses["total"] = total + losses["seg_pseudo"]
            return losses
        for level in self.levels:
            _, _, m_t, m_t2s = out[LEVEL_OUTPUTS[level]].chunk(4)
            gan = adapt.gan_mode
            # Eq. 6 / 8: the maps of x_t->s should pass D_s as source, those of x_t pass D_t as x_s->t
            losses[f"adv_{level}"] = generator_adversarial_loss(
                [self.bank.judge(f"{level}_s", m_t2s), self.bank.judge(f"{level}_t", m_t)], gan
            )
            total = total + adapt.lambda_gtl * adapt.level_weights[level] * losses[f"adv_{level}"]
        if self.finetune:
            stage1 = {key.split(".", 1)[1]: value for key, value in out.items() if key.startswith("translator.")}
            translator = self.objective.generator_losses(batch["translator"], stage1, self.bank)
            losses["translator_g"] = translator["total"]
            total = total + adapt.lambda_syn * translator["total"]
        losses["total"] = total
        return losses

    def discriminator_pairs(self, batch: dict[str, Any], out: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{discriminator: (real, fake)} on detached maps: D_s: m_s vs m_t->s; D_t: m_s->t vs m_t."""
        pairs = {}
        for level in self.levels:
            m_s, m_s2t, m_t, m_t2s = out[LEVEL_OUTPUTS[level]].detach().chunk(4)
            pairs[f"{level}_s"] = (m_s, m_t2s)
            pairs[f"{level}_t"] = (m_s2t, m_t)
        if self.finetune:
            stage1 = {key.split(".", 1)[1]: value.detach() for key, value in out.items() if key.startswith("translator.")}
            pairs.update(self.objective.judge_pairs(batch["translator"], stage1))
        return pairs

    def segmenter_step(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Update the segmenter (and the translators when fine-tuning them) with the
        discriminators frozen; returns (losses, network outputs)."""
        ctx = self.ctx
        optimizers = [self.opt_seg] + ([self.opt_translators] if self.opt_translators is not None else [])
        if self.bank is not None:
            set_requires_grad(self.bank, False)
        with ctx.autocast():
            out = self.network_ddp(batch["x"], batch.get("x_t"), batch.get("translator"),
                                   batch.get("augment_labelled"), batch.get("augment_translated"), batch.get("augment_target"))
            losses = self.segmenter_losses(batch, out)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.scaler_seg.scale(losses["total"]).backward()
        for optimizer in optimizers:
            self.scaler_seg.step(optimizer)
        self.scaler_seg.update()
        if self.bank is not None:
            set_requires_grad(self.bank, True)
        return losses, out

    def discriminator_step(self, batch: dict[str, Any], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Update every discriminator on detached maps; returns the losses per level."""
        ctx = self.ctx
        with ctx.autocast():
            d_losses = discriminator_losses(self.bank_ddp(self.discriminator_pairs(batch, out)), self.adapt.gan_mode)
            d_total = sum(d_losses.values())
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler_d.scale(d_total).backward()
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()
        result = {f"d_{level}": (d_losses[f"{level}_s"] + d_losses[f"{level}_t"]).detach() for level in self.levels}
        if self.finetune:
            result["translator_d"] = (d_losses["image_s"] + d_losses["image_t"]).detach()
        return result

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        for group in self.opt_seg.param_groups:
            group["lr"] = self.segmenter_lr(step)
        if self.self_training(step):
            round_index = (step - self.adapt_steps) * int(self.adapt.self_training_rounds) // self.self_steps
            if round_index != self.pseudo_round:
                self.make_pseudo_labels(round_index)
        batch = self.batch(step)
        losses, out = self.segmenter_step(batch)
        if self.ema is not None:
            self.ema.update_parameters(self.segmenter)
        result = {name: value.detach() for name, value in losses.items()}
        if self.bank is not None and not self.self_training(step):
            result.update(self.discriminator_step(batch, out))
        return result

    # -- outputs ------------------------------------------------------------------------------
    def output_path(self) -> Path:
        return self.ctx.out_dir / BUNDLE_FILE

    def training_metadata(self) -> dict[str, Any]:
        data = self.ctx.data
        info: dict[str, Any] = {
            "config": self.ctx.config.to_dict(),
            "method": self.method,
            "iterations": {"adapt": self.adapt_steps},
            "labelled": data.labelled.describe(),
            "model_selection": ("last checkpoint (no target labels used)" if self.ema is None else
                                f"exponential moving average of the weights, decay {self.adapt.ema_decay} (no target labels used)"),
            "precision": self.precision_record,
        }
        data_cfg = self.ctx.config.data
        if (data_cfg.augment_spatial or data_cfg.augment_intensity or data_cfg.augment_invert
                or data_cfg.augment_tumour_brightening):
            info["augmentation"] = {"spatial": data_cfg.augment_spatial, "intensity": data_cfg.augment_intensity,
                                    "invert": data_cfg.augment_invert,
                                    "tumour_brightening_probability": data_cfg.augment_tumour_brightening,
                                    **augment.describe()}
        if self.self_steps:
            info["iterations"]["self_training"] = self.self_steps
            info["self_training"] = {key: getattr(self.adapt, key) for key in (
                "self_training_iterations", "self_training_rounds", "self_training_lr", "pseudo_threshold", "pseudo_class_fraction",
                "pseudo_views", "pseudo_refine_edges", "pseudo_augment_intensity")}
        if self.branched_from:
            info["branched_from"] = self.branched_from
        if data.unlabelled is not None:
            info["unlabelled"] = data.unlabelled.describe()
        if self.method == "bigl":
            info["iterations"]["translator"] = self.translator_iterations
            info["translator_mode"] = self.translator_mode
            info["levels"] = list(self.levels)
        return info

    def target_confidence(self, chunk: int = 32) -> dict[str, Any] | None:
        """Label-free: the shipped segmenter's tumour confidence (:func:`bigl.prediction.tumour_confidence`,
        one plain pass over each scan's slices) on every unlabelled target scan of the run, their mean,
        and the scans below :data:`bigl.plausibility.CONFIDENCE_FLOOR`; None without unlabelled scans.

        Why: over the six `reference` runs of the two development splits, a scan's confidence ranked
        the models' WT Dice on their own unlabelled training scans (Spearman 0.77 over 132 model x
        scan rows), and the run of three seeds with the highest mean was the best or second best on
        the held-out scans (docs/results.md, "Choosing a seed without labels"): a hint for which of
        several runs to keep, read off the run itself."""
        from bigl.plausibility import CONFIDENCE_FLOOR
        from bigl.prediction import tumour_confidence_sums

        ctx = self.ctx
        unlabelled = ctx.data.unlabelled
        if unlabelled is None or not len(unlabelled):
            return None
        sums, pixels = np.zeros(len(unlabelled.case_names)), np.zeros(len(unlabelled.case_names), dtype=np.int64)
        segmenter = self.final_segmenter
        segmenter.eval()
        with torch.no_grad():
            for begin in range(0, len(unlabelled), chunk):
                rows = np.arange(begin, min(begin + chunk, len(unlabelled)))
                x = torch.from_numpy(unlabelled.stack(rows, ctx.config.segmenter.in_channels)).to(ctx.device)
                with ctx.autocast():
                    probabilities = torch.softmax(segmenter(x).float(), 1).cpu().numpy()
                for row, case in enumerate(unlabelled.case_index[rows]):
                    part_sum, part_pixels = tumour_confidence_sums(probabilities[row:row + 1])
                    sums[case] += part_sum
                    pixels[case] += part_pixels
        segmenter.train()
        per_scan = {name: (round(float(sums[i] / pixels[i]), 4) if pixels[i] else None)
                    for i, name in enumerate(unlabelled.case_names)}
        found = [value for value in per_scan.values() if value is not None]
        ctx.log.write("target_confidence", stage=self.stage, per_scan=per_scan)
        return {
            "mean": round(float(np.mean(found)), 4) if found else None,
            "scans": len(per_scan),
            "floor": CONFIDENCE_FLOOR,
            "unsure": [name for name, value in per_scan.items() if value is None or value < CONFIDENCE_FLOOR],
        }

    def finish(self) -> Path:
        config = self.ctx.config
        data = config.data
        trained_on = data.target_modality if self.method == "target-only" else data.source_modality
        descriptions = {
            "bigl": f"BiGL: {data.source_modality} (labelled) -> {data.target_modality} (unlabelled) adaptation",
            "source-only": f"source-only baseline: trained on labelled {data.source_modality}, applied to {data.target_modality}",
            "target-only": f"target-only upper bound: trained on labelled {data.target_modality}",
        }
        training = self.training_metadata()
        if self.method == "bigl":
            training["target_confidence"] = self.target_confidence()
        metadata = make_metadata(
            method=self.method,
            modality=data.target_modality,
            source_modality=trained_on,
            segmenter_config=config.segmenter,
            translator_config=config.translator if self.method == "bigl" else None,
            preprocessing=config.section_dict("preprocessing"),
            training=training,
            description=descriptions[self.method],
        )
        translators = self.translators if self.method == "bigl" else None
        return save_bundle(
            self.output_path(),
            segmenter=self.final_segmenter,
            metadata=metadata,
            translator_s2t=translators.s2t if translators is not None else None,
            translator_t2s=translators.t2s if translators is not None else None,
        )

    def write_samples(self, path: Path) -> None:
        from bigl.training.figures import sample_grid

        ctx = self.ctx
        rows = sample_rows(ctx, 4)
        labelled, unlabelled = ctx.data.labelled, ctx.data.unlabelled
        segmenter = self.final_segmenter
        self.network.eval()
        segmenter.eval()
        with torch.no_grad():
            no_flip = np.zeros(len(rows["labelled"]), bool)
            channels = ctx.config.segmenter.in_channels
            x, y = to_tensors(labelled, rows["labelled"], no_flip, ctx.device, with_labels=True, channels=channels)
            images = {f"{labelled.modality} + labels": x, f"{labelled.modality} + prediction": x}
            overlays = {f"{labelled.modality} + labels": y, f"{labelled.modality} + prediction": segmenter(x).argmax(1)}
            if self.method == "bigl":
                x_t, _ = to_tensors(unlabelled, rows["unlabelled"], no_flip, ctx.device, channels=channels)
                x_t2s = per_slice(self.translators.t2s, x_t)
                images[f"{unlabelled.modality} + prediction"] = x_t
                overlays[f"{unlabelled.modality} + prediction"] = segmenter(x_t).argmax(1)
                images[f"{unlabelled.modality}->{labelled.modality} + prediction"] = x_t2s
                overlays[f"{unlabelled.modality}->{labelled.modality} + prediction"] = segmenter(x_t2s).argmax(1)
        self.network.train()
        segmenter.train()
        sample_grid(
            path,
            {name: t[:, t.shape[1] // 2].float().cpu().numpy() for name, t in images.items()},
            overlays={name: t.cpu().numpy() for name, t in overlays.items()},
            title=f"stage 2 {self.method}, step {int(path.stem.rsplit('_', 1)[-1])}",
        )


def _refine_pseudo_edges(slices, predicted: np.ndarray) -> np.ndarray:
    """``predicted`` (class indices of every slice of the SliceSet ``slices``) with each case's
    whole-tumour edge redrawn on its scan by :func:`bigl.postprocess.refine_edges`: the slices are
    stacked back into the case's prepared volume with its voxel size, so the refinement sees the
    tumour in 3D as at inference. Added voxels become oedema (class 2, BraTS label 2)."""
    from bigl.data.preprocess import BACKGROUND
    from bigl.postprocess import refine_edges

    refined = predicted.copy()
    size = predicted.shape[-1]
    for case, rows in enumerate(slices.case_rows()):
        if not len(rows) or not predicted[rows].any():
            continue
        positions = slices.slice_index[rows] - slices.slice_index[rows].min()
        labels = np.zeros((int(positions.max()) + 1, size, size), dtype=np.uint8)
        image = np.full(labels.shape, BACKGROUND, dtype=np.float32)
        labels[positions], image[positions] = predicted[rows], slices.images[rows]
        brain = image > BACKGROUND + 1e-3
        refined[rows] = refine_edges(labels, image, slices.case_spacing[case], brain=brain)[positions]
    return refined
