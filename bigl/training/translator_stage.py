"""Stage 1: the bidirectional image translator G_s->t, G_t->s with one discriminator per modality.

Two objectives (``translator_training.mode``):

``paired`` (paper Eq. 1-2, pix2pix): for co-registered slices of the same subject, each
generator is trained with a conditional PatchGAN D(input, output) and ``lambda_l1`` (100, as
pix2pix) times the L1 distance to the real slice of the other modality.

``unpaired`` (CycleGAN): unconditional PatchGANs, cycle consistency ``lambda_cycle`` (10) and
identity ``lambda_identity`` (0.5, relative to the cycle weight), with an optional image pool of
earlier fakes for the discriminators (``pool_size``, 50 as CycleGAN; 0 disables it).

``auto`` picks paired when the source and target cases contain co-registered subjects, unpaired
otherwise. Adam (lr 2e-4, beta1 0.5), constant learning rate then linear decay to zero from
``decay_start`` of the run, LSGAN by default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bigl.bundle import read_translator_file, write_translator_file
from bigl.data.preprocess import PreprocessConfig
from bigl.errors import ConfigError
from bigl.losses import generator_adversarial_loss, translation_l1_loss
from bigl.runfolder import TRANSLATOR_FILE
from bigl.models import PatchDiscriminator, ResnetGenerator, TranslatorConfig
from bigl.training.checkpoint import prefixed
from bigl.training.data import to_tensors
from bigl.training.sections import TrainingConfig, TranslatorTrainingSection
from bigl.training.loop import (
    DiscriminatorBank,
    RunContext,
    StageTrainer,
    discriminator_losses,
    load_scaler_states,
    set_requires_grad,
)



def resolve_mode(config: TrainingConfig, pairs: int) -> str:
    """The translator objective for this data (``auto`` -> paired when co-registered pairs exist)."""
    mode = config.translator_training.mode
    if mode == "auto":
        return "paired" if pairs > 0 else "unpaired"
    if mode == "paired" and pairs == 0:
        raise ConfigError(
            "translator_training.mode is paired, but no case is present in both domains on one voxel grid",
            "paired training needs co-registered source and target scans of the same subjects "
            "(e.g. one BraTS folder for both); use mode unpaired (or auto) for disjoint data",
        )
    return mode


def per_slice(generator: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A one-channel generator applied to every channel of ``x`` [B, C, H, W] on its own: the
    translators work on single slices, a 2.5D segmenter input holds several."""
    if x.shape[1] == 1:
        return generator(x)
    return generator(x.reshape(-1, 1, *x.shape[2:])).reshape(x.shape)


class TranslatorPair(nn.Module):
    """G_s->t and G_t->s; ``forward`` computes everything a generator step needs in one call
    (the objective says what: the cycled images, the identity images)."""

    def __init__(self, config: TranslatorConfig):
        super().__init__()
        self.s2t = ResnetGenerator(config)
        self.t2s = ResnetGenerator(config)

    def forward(self, x_s: torch.Tensor, x_t: torch.Tensor, cycle: bool = False, identity: bool = False) -> dict[str, torch.Tensor]:
        n = len(x_s)
        out: dict[str, torch.Tensor] = {}
        if identity:
            # instance norm works per image, so one batch gives the same as two calls
            fake_t, out["identity_t"] = self.s2t(torch.cat([x_s, x_t])).split([n, len(x_t)])
            fake_s, out["identity_s"] = self.t2s(torch.cat([x_t, x_s])).split([len(x_t), n])
        else:
            fake_t, fake_s = self.s2t(x_s), self.t2s(x_t)
        out["fake_t"], out["fake_s"] = fake_t, fake_s
        if cycle:
            out["cycled_s"] = self.t2s(fake_t)
            out["cycled_t"] = self.s2t(fake_s)
        return out


class TranslatorObjective:
    """What stage 1 minimises for one kind of training data (``translator_training.mode``); the
    two kinds are :class:`PairedObjective` and :class:`UnpairedObjective`. ``batch`` holds
    ``x_s`` and ``x_t``; ``out`` is what :meth:`translate` returned; ``bank`` the discriminators."""

    mode = ""
    #: input channels of each image discriminator
    discriminator_channels = 1
    #: whether the discriminators see earlier fakes through an image pool
    image_pool = False

    def __init__(self, translator_training: TranslatorTrainingSection):
        self.tt = translator_training
        self.gan = translator_training.gan_mode

    def translate(self, generators: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One forward of both generators (``generators`` may be wrapped for DDP)."""
        raise NotImplementedError

    def judge_pairs(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{discriminator: (real input, fake input)}; fakes as given (detach them for the D step)."""
        raise NotImplementedError

    def generator_losses(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], bank: DiscriminatorBank) -> dict[str, torch.Tensor]:
        """Generator-side terms (the discriminators should be frozen); ``total`` is what is minimised."""
        raise NotImplementedError

    def discriminator_losses(self, batch: dict[str, torch.Tensor], fakes: dict[str, torch.Tensor], bank: nn.Module) -> dict[str, torch.Tensor]:
        """Eq. 2 for each image discriminator, on detached ``fakes``."""
        return discriminator_losses(bank(self.judge_pairs(batch, fakes)), self.gan)

    def _adversarial(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], bank: DiscriminatorBank) -> torch.Tensor:
        pairs = self.judge_pairs(batch, out)
        return generator_adversarial_loss((bank.judge(name, fake) for name, (_, fake) in pairs.items()), self.gan)


class PairedObjective(TranslatorObjective):
    """Paper Eq. 1-2 (pix2pix) for co-registered slices: conditional discriminators D(input,
    candidate) and ``lambda_l1`` x the L1 distance to the real slice of the other modality."""

    mode = "paired"
    discriminator_channels = 2

    def translate(self, generators, batch):
        return generators(batch["x_s"], batch["x_t"])

    def judge_pairs(self, batch, out):
        x_s, x_t = batch["x_s"], batch["x_t"]
        return {
            "image_t": (torch.cat([x_s, x_t], 1), torch.cat([x_s, out["fake_t"]], 1)),
            "image_s": (torch.cat([x_t, x_s], 1), torch.cat([x_t, out["fake_s"]], 1)),
        }

    def generator_losses(self, batch, out, bank):
        losses = {"g_adv": self._adversarial(batch, out, bank)}
        losses["g_l1"] = translation_l1_loss([(out["fake_t"], batch["x_t"]), (out["fake_s"], batch["x_s"])])
        losses["total"] = losses["g_adv"] + self.tt.lambda_l1 * losses["g_l1"]
        return losses


class UnpairedObjective(TranslatorObjective):
    """CycleGAN for scans of different subjects: unconditional discriminators (with the image
    pool), cycle consistency ``lambda_cycle`` and identity ``lambda_identity`` (relative to it)."""

    mode = "unpaired"
    image_pool = True

    def __init__(self, translator_training: TranslatorTrainingSection):
        super().__init__(translator_training)
        self.identity = translator_training.lambda_identity > 0

    def translate(self, generators, batch):
        return generators(batch["x_s"], batch["x_t"], cycle=True, identity=self.identity)

    def judge_pairs(self, batch, out):
        return {"image_t": (batch["x_t"], out["fake_t"]), "image_s": (batch["x_s"], out["fake_s"])}

    def generator_losses(self, batch, out, bank):
        x_s, x_t = batch["x_s"], batch["x_t"]
        losses = {"g_adv": self._adversarial(batch, out, bank)}
        losses["g_cycle"] = translation_l1_loss([(out["cycled_s"], x_s), (out["cycled_t"], x_t)])
        losses["total"] = losses["g_adv"] + self.tt.lambda_cycle * losses["g_cycle"]
        if "identity_t" in out:
            losses["g_identity"] = translation_l1_loss([(out["identity_t"], x_t), (out["identity_s"], x_s)])
            losses["total"] = losses["total"] + self.tt.lambda_cycle * self.tt.lambda_identity * losses["g_identity"]
        return losses


OBJECTIVES: dict[str, type[TranslatorObjective]] = {"paired": PairedObjective, "unpaired": UnpairedObjective}


def translator_objective(config: TrainingConfig, mode: str) -> TranslatorObjective:
    """The objective of a resolved mode (see :func:`resolve_mode`)."""
    return OBJECTIVES[mode](config.translator_training)


def translator_discriminators(config: TrainingConfig | dict, mode: str) -> dict[str, nn.Module]:
    """``image_s`` judges source-modality images, ``image_t`` target-modality ones; conditional
    (input and candidate stacked, 2 channels) in paired mode."""
    tt = TrainingConfig.of(config).translator_training
    channels = OBJECTIVES[mode].discriminator_channels
    return {
        name: PatchDiscriminator(channels, tt.discriminator_channels, tt.discriminator_layers)
        for name in ("image_s", "image_t")
    }


def translator_batch(ctx: RunContext, mode: str, stage: str, step: int, size: int, stream: int = 0) -> dict[str, torch.Tensor]:
    """This rank's shard of a step's translator batch: co-registered pairs (paired) or
    independent source and target slices (unpaired), as ``{"x_s", "x_t"}``."""
    sampler = ctx.sampler
    if mode == "paired":
        drawn = sampler.paired(stage, step, size, stream)
    else:
        drawn = sampler.unpaired(stage, step, size, stream, prefer_tumour=False)
    shard = ctx.dist.shard(size)
    x_s, _ = to_tensors(ctx.data.labelled, drawn.labelled[shard], drawn.flip_labelled[shard], ctx.device)
    x_t, _ = to_tensors(ctx.data.unlabelled, drawn.unlabelled[shard], drawn.flip_unlabelled[shard], ctx.device)
    return {"x_s": x_s, "x_t": x_t}


class ImagePool:
    """CycleGAN's history of generated images: once full, each new fake is swapped with a stored
    one half of the time, so the discriminator also sees older fakes. Random choices come from the
    step's generator, and the stored images are checkpointed, so resuming is exact."""

    def __init__(self, size: int):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, fakes: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if self.size == 0:
            return fakes
        chosen = []
        for fake in fakes.detach():
            fake = fake.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(fake.clone())
                chosen.append(fake)
            elif rng.random() < 0.5:
                index = int(rng.integers(0, self.size))
                chosen.append(self.images[index].clone())
                self.images[index] = fake.clone()
            else:
                chosen.append(fake)
        return torch.cat(chosen)

    def state(self) -> torch.Tensor | None:
        return torch.cat(self.images) if self.images else None

    def load(self, images: torch.Tensor | None, device: torch.device) -> None:
        self.images = [] if images is None else [image.unsqueeze(0).to(device) for image in images]


class TranslatorTrainer(StageTrainer):
    stage = "translator"

    def __init__(self, ctx: RunContext, total: int, mode: str):
        super().__init__(ctx, total)
        config = ctx.config
        self.mode = mode
        self.tt = config.translator_training
        self.translator_config = config.translator
        device = ctx.device
        self.generators = TranslatorPair(self.translator_config).to(device)
        self.bank = DiscriminatorBank(translator_discriminators(config, mode)).to(device)
        self.generators_ddp = ctx.dist.wrap(self.generators)
        self.bank_ddp = ctx.dist.wrap(self.bank)
        betas = (self.tt.beta1, self.tt.beta2)
        self.opt_g = torch.optim.Adam(self.generators.parameters(), lr=self.tt.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.bank.parameters(), lr=self.tt.lr, betas=betas)
        self.scaler_g, self.scaler_d = ctx.grad_scaler(), ctx.grad_scaler()
        self.pools = {"image_s": ImagePool(self.tt.pool_size), "image_t": ImagePool(self.tt.pool_size)}
        self.objective = translator_objective(config, mode)

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"generators": self.generators, "discriminators": self.bank}

    def checkpoint_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generators": self.opt_g, "discriminators": self.opt_d}

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        states = {f"pool.{name}": pool.state() for name, pool in self.pools.items()}
        tensors = {key: images for key, images in states.items() if images is not None}
        return tensors, {"mode": self.mode, "scalers": {"g": self.scaler_g.state_dict(), "d": self.scaler_d.state_dict()}}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        if values.get("mode") != self.mode:
            raise ConfigError(
                f"the translator checkpoint was trained in {values.get('mode')} mode, this run resolves to {self.mode}",
                "resume with the original data and translator_training.mode",
            )
        for name, pool in self.pools.items():
            pool.load(tensors.get(f"pool.{name}"), self.ctx.device)
        load_scaler_states({"g": self.scaler_g, "d": self.scaler_d}, values["scalers"])

    def lr_factor(self, step: int) -> float:
        """1 until ``decay_start`` of the run, then linear decay to 0 at the end (CycleGAN)."""
        start = self.tt.decay_start
        fraction = step / self.total
        if start >= 1.0 or fraction < start:
            return 1.0
        return max(0.0, (1.0 - fraction) / (1.0 - start))

    def learning_rates(self, step: int) -> dict[str, float]:
        lr = self.tt.lr * self.lr_factor(step)
        return {"generators": lr, "discriminators": lr}

    def slices_per_step(self) -> int:
        return 2 * self.tt.batch_size

    def generator_step(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Update both generators with the discriminators frozen; returns (losses, outputs)."""
        ctx = self.ctx
        set_requires_grad(self.bank, False)
        with ctx.autocast():
            out = self.objective.translate(self.generators_ddp, batch)
            losses = self.objective.generator_losses(batch, out, self.bank)
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler_g.scale(losses["total"]).backward()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        set_requires_grad(self.bank, True)
        return losses, out

    def discriminator_step(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """Update both discriminators on detached fakes (through the image pool when unpaired)."""
        ctx = self.ctx
        fakes = {key: value.detach() for key, value in out.items()}
        if self.objective.image_pool:
            rng = ctx.sampler.rng(self.stage, step, stream=1 + ctx.dist.rank)
            fakes["fake_t"] = self.pools["image_t"].query(fakes["fake_t"], rng)
            fakes["fake_s"] = self.pools["image_s"].query(fakes["fake_s"], rng)
        with ctx.autocast():
            d_losses = self.objective.discriminator_losses(batch, fakes, self.bank_ddp)
            d_total = sum(d_losses.values())
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler_d.scale(d_total).backward()
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()
        return d_total

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        lr = self.learning_rates(step)["generators"]
        for optimizer in (self.opt_g, self.opt_d):
            for group in optimizer.param_groups:
                group["lr"] = lr
        batch = translator_batch(self.ctx, self.mode, self.stage, step, self.tt.batch_size)
        losses, out = self.generator_step(batch)
        d_total = self.discriminator_step(batch, out, step)
        result = {name: value.detach() for name, value in losses.items() if name != "total"}
        result["g_total"] = losses["total"].detach()
        result["d"] = d_total.detach()
        return result

    def output_path(self) -> Path:
        return self.ctx.out_dir / TRANSLATOR_FILE

    def finish(self) -> Path:
        return save_translator(
            self.output_path(),
            self.generators,
            self.bank,
            config=self.ctx.config,
            mode=self.mode,
            iterations=self.total,
        )

    def write_samples(self, path: Path) -> None:
        from bigl.training.figures import sample_grid

        ctx = self.ctx
        rows = sample_rows(ctx, 4)
        generators = self.generators
        generators.eval()
        with torch.no_grad():
            x_s, _ = to_tensors(ctx.data.labelled, rows["labelled"], np.zeros(len(rows["labelled"]), bool), ctx.device)
            x_t, _ = to_tensors(ctx.data.unlabelled, rows["unlabelled"], np.zeros(len(rows["unlabelled"]), bool), ctx.device)
            fake_t, fake_s = generators.s2t(x_s), generators.t2s(x_t)
            images = {
                f"{ctx.data.labelled.modality} (real)": x_s,
                f"-> {ctx.data.unlabelled.modality}": fake_t,
                f"-> {ctx.data.labelled.modality} (cycled)": generators.t2s(fake_t),
                f"{ctx.data.unlabelled.modality} (real)": x_t,
                f"-> {ctx.data.labelled.modality}": fake_s,
                f"-> {ctx.data.unlabelled.modality} (cycled)": generators.s2t(fake_s),
            }
        generators.train()
        sample_grid(path, {name: t[:, 0].float().cpu().numpy() for name, t in images.items()},
                    title=f"stage 1 translator ({self.mode}), step {int(path.stem.rsplit('_', 1)[-1])}")


def sample_rows(ctx: RunContext, count: int) -> dict[str, np.ndarray]:
    """Fixed slices shown in the sample figures: tumour slices spread over the labelled set and,
    when paired data exist, their co-registered counterparts (so real and translated line up)."""
    data = ctx.data
    labelled = data.labelled
    candidates = labelled.tumour if len(labelled.tumour) else np.arange(len(labelled))
    chosen = candidates[np.linspace(0, len(candidates) - 1, min(count, len(candidates))).round().astype(int)]
    rows = {"labelled": chosen}
    if data.unlabelled is not None:
        lookup = {int(s): int(t) for s, t in data.pairs}
        fallback = np.linspace(0, len(data.unlabelled) - 1, len(chosen)).round().astype(int)
        rows["unlabelled"] = np.asarray([lookup.get(int(i), int(f)) for i, f in zip(chosen, fallback)], dtype=np.int64)
    return rows


def save_translator(
    path: Path, generators: TranslatorPair, discriminators: DiscriminatorBank, *, config: TrainingConfig | dict, mode: str,
    iterations: int,
) -> Path:
    """Write the translator file: both generators (``translator_s2t.``, ``translator_t2s.``) and
    their discriminators (``discriminator.image_s.`` ..., kept for fine-tuning), JSON in the header."""
    tensors = {}
    for prefix, module in (("translator_s2t", generators.s2t), ("translator_t2s", generators.t2s), ("discriminator", discriminators.nets)):
        for name, value in module.state_dict().items():
            tensors[f"{prefix}.{name}"] = value.detach().to("cpu").contiguous().clone()
    config = TrainingConfig.of(config)
    metadata = {
        **_translator_identity(config),
        "mode": mode,
        "iterations": iterations,
        "discriminator": {
            "channels": OBJECTIVES[mode].discriminator_channels,
            "base_channels": config.translator_training.discriminator_channels,
            "n_layers": config.translator_training.discriminator_layers,
        },
    }
    return write_translator_file(path, tensors, metadata)


def _translator_identity(config: TrainingConfig) -> dict[str, Any]:
    """What a translator file must share with the config that uses it: modalities, architecture, preprocessing."""
    return {
        "source_modality": config.data.source_modality,
        "target_modality": config.data.target_modality,
        "translator": config.translator.to_dict(),
        "preprocessing": config.section_dict("preprocessing"),
    }


def load_translator(path: Path, config: TrainingConfig | dict, device: torch.device) -> tuple[TranslatorPair, dict[str, nn.Module] | None, dict]:
    """Generators (and discriminators, when stored) from a translator file, checked against the
    config: the same modalities, preprocessing and architecture. ConfigError when they differ."""
    metadata, tensors = read_translator_file(path)
    config = TrainingConfig.of(config)
    expected = _translator_identity(config)
    stored = dict(metadata)
    for key, section in (("preprocessing", PreprocessConfig), ("translator", TranslatorConfig)):
        if isinstance(stored.get(key), dict):  # a file written before a key existed: the key has its default
            stored[key] = {**section().to_dict(), **stored[key]}
    differing = [key for key, value in expected.items() if stored.get(key) != value]
    if differing:
        raise ConfigError(
            f"the translator {path} does not fit this config: {', '.join(differing)} differ "
            + "; ".join(f"{key}: file {json.dumps(stored.get(key))} vs config {json.dumps(expected[key])}" for key in differing[:2]),
            "train a translator with this config, or use the config the translator was trained with",
        )
    pair = TranslatorPair(config.translator)
    pair.s2t.load_state_dict(prefixed(tensors, "translator_s2t."))
    pair.t2s.load_state_dict(prefixed(tensors, "translator_t2s."))
    discriminators = None
    stored = prefixed(tensors, "discriminator.")
    if stored:
        spec = metadata["discriminator"]
        discriminators = {
            name: PatchDiscriminator(spec["channels"], spec["base_channels"], spec["n_layers"]) for name in ("image_s", "image_t")
        }
        nn.ModuleDict(discriminators).load_state_dict(stored)
    pair.to(device)
    if discriminators:
        for module in discriminators.values():
            module.to(device)
    return pair, discriminators, metadata

