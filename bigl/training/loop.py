"""What both training stages share: the run context, the discriminator bank, and the step loop
(per-step seeding, logging, progress bar, checkpoints, samples, resume)."""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bigl.errors import ConfigError
from bigl.losses import discriminator_loss
from bigl.training.checkpoint import (
    announce_resume,
    checkpoint_path,
    prune_checkpoints,
    restore_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from bigl.training.data import STAGE_CODES, StepSampler, TrainingData
from bigl.training.distributed import DistributedContext, unwrap
from bigl.runfolder import CHECKPOINT_DIR, EVENTS_FILE, LOSS_FIGURE, SAMPLES_DIR
from bigl.training.events import EventLog, plot_losses
from bigl.training.sections import TrainingConfig



@dataclass
class RunContext:
    """Everything a stage needs from the run: config, folder, device, process group, data, log."""

    config: TrainingConfig
    out_dir: Path
    dist: DistributedContext
    data: TrainingData
    sampler: StepSampler
    log: EventLog
    progress: bool

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def amp(self) -> bool:
        """float16 mixed precision with gradient scaling: asked for (``run.amp``) and on CUDA."""
        return bool(self.config.run.amp) and self.device.type == "cuda"

    @property
    def cpu_bf16(self) -> bool:
        """bfloat16 autocast on the CPU: asked for (``run.cpu_bf16``) and the CPU computes bfloat16
        natively (weights, optimiser state and losses stay float32; no gradient scaling is needed)."""
        return bool(self.config.run.cpu_bf16) and self.device.type == "cpu" and cpu_supports_bf16()

    @property
    def precision(self) -> str:
        """What the forward passes compute in: "float16", "bfloat16" or "float32"."""
        return "float16" if self.amp else "bfloat16" if self.cpu_bf16 else "float32"

    def autocast(self):
        if self.cpu_bf16:
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cuda", enabled=self.amp)


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True on CPUs with native bfloat16 arithmetic (x86 AVX512-BF16 or AMX, read from
    /proc/cpuinfo). Elsewhere bfloat16 would be emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    words = set(flags.split())
    return bool(words & {"avx512_bf16", "amx_bf16"})


def load_scaler_states(scalers: dict[str, torch.amp.GradScaler], states: dict[str, dict]) -> None:
    """Restore AMP gradient scalers; a state saved without AMP (empty) leaves a scaler as it is."""
    for name, scaler in scalers.items():
        if scaler.is_enabled() and states.get(name):
            scaler.load_state_dict(states[name])


def weight_average(module: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``module``'s weights (and buffers), updated by
    ``update_parameters(module)`` after each optimiser step.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after n updates, so the random
    initial weights are forgotten within the first few dozen steps instead of weighing
    ``decay ** steps`` in the result.
    """

    def average(averaged: torch.Tensor, current: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        n = int(updates)
        rate = min(decay, (1.0 + n) / (10.0 + n))
        return averaged + (current.detach() - averaged) * (1.0 - rate)

    return torch.optim.swa_utils.AveragedModel(module, avg_fn=average, use_buffers=True)


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(flag)


class DiscriminatorBank(nn.Module):
    """Named discriminators stepped together, as one module so that one DDP wrapper covers them.

    ``forward(pairs)`` takes ``{name: (real, fake)}`` and returns ``{name: (real logits, fake logits)}``
    (real and fake go through the discriminator as one batch).
    """

    def __init__(self, discriminators: dict[str, nn.Module]):
        super().__init__()
        self.nets = nn.ModuleDict(discriminators)

    def forward(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        outputs = {}
        for name, (real, fake) in pairs.items():
            logits = self.nets[name](torch.cat([real, fake]))
            outputs[name] = (logits[: len(real)], logits[len(real):])
        return outputs

    def judge(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Logits of one discriminator, outside the DDP wrapper (for the generator-side losses,
        computed while the discriminators are frozen)."""
        return self.nets[name](x)


def discriminator_losses(outputs: dict[str, tuple[torch.Tensor, torch.Tensor]], gan_mode: str) -> dict[str, torch.Tensor]:
    """:func:`bigl.losses.discriminator_loss` (Eq. 2, 7, 9) of each discriminator's (real, fake) logits."""
    return {name: discriminator_loss(real, fake, gan_mode) for name, (real, fake) in outputs.items()}


def step_seed(seed: int, stage: str, step: int, rank: int) -> int:
    """Seed of torch's generator for one step (dropout and other random layers)."""
    return int(np.random.SeedSequence([int(seed), STAGE_CODES[stage], int(step), int(rank), 7]).generate_state(1)[0])


def init_seed(seed: int, stage: str) -> int:
    """Seed of torch's generator while a stage builds its networks (same on every rank)."""
    return int(np.random.SeedSequence([int(seed), STAGE_CODES[stage], 11]).generate_state(1)[0])


class StageTrainer:
    """One training stage. Subclasses build networks and optimisers and define ``train_step``."""

    stage: str = ""

    def __init__(self, ctx: RunContext, total: int):
        self.ctx = ctx
        self.total = int(total)
        self.steps_done = 0
        #: precision of each stretch of the stage (more than one when a resume changed it)
        self.precisions = [ctx.precision]
        torch.manual_seed(init_seed(ctx.config.run.seed, self.stage))  # networks built next start alike

    #: Steps whose checkpoints are written and never pruned (AdaptTrainer: the branch point).
    kept_steps: tuple[int, ...] = ()

    # -- to be provided by subclasses ---------------------------------------------------------
    def checkpoint_modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def checkpoint_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        pass

    def learning_rates(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step (``step`` counts from 0); returns detached scalar losses."""
        raise NotImplementedError

    def slices_per_step(self) -> int:
        raise NotImplementedError

    def write_samples(self, path: Path) -> None:
        pass

    def finish(self) -> Path:
        """Write the stage's model file (rank 0); returns its path."""
        raise NotImplementedError

    def output_path(self) -> Path:
        raise NotImplementedError

    # -- the loop -----------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.ctx.out_dir / CHECKPOINT_DIR

    def save(self, step: int) -> Path:
        tensors, values = self.extra_state()
        path = save_checkpoint(
            checkpoint_path(self.checkpoint_dir, self.stage, step),
            stage=self.stage,
            step=step,
            modules={name: unwrap(m) for name, m in self.checkpoint_modules().items()},
            optimizers=self.checkpoint_optimizers(),
            extra_tensors=tensors,
            extra={**values, "total": self.total, "precisions": self.precisions},
        )
        prune_checkpoints(self.checkpoint_dir, self.stage, self.ctx.config.run.keep_checkpoints, protect=self.kept_steps)
        return path

    def resume(self) -> int:
        """Restore the newest checkpoint of the stage; returns the steps it had completed (0: none)."""
        checkpoint = announce_resume(self.ctx.log, self.stage, resume_checkpoint(self.checkpoint_dir, self.stage),
                                     root=self.ctx.out_dir, echo=self.ctx.dist.is_main)
        if checkpoint is None:
            return 0
        if checkpoint.meta["extra"].get("total") != self.total:
            raise ConfigError(
                f"the {self.stage} checkpoint {checkpoint.path.name} belongs to a run of {checkpoint.meta['extra'].get('total')} "
                f"steps, this config asks for {self.total}",
                "resume with the original config, or start a new run in another --out folder",
            )
        extra = restore_checkpoint(
            checkpoint,
            modules={name: unwrap(m) for name, m in self.checkpoint_modules().items()},
            optimizers=self.checkpoint_optimizers(),
        )
        self.load_extra_state(extra, checkpoint.meta["extra"])
        before = checkpoint.meta["extra"].get("precisions")  # absent in checkpoints of older versions
        if before and before[-1] != self.ctx.precision and checkpoint.step < self.total:
            self.precisions = [*before, self.ctx.precision]
            message = (f"the {self.stage} stage ran in {before[-1]} before the interruption and goes on in "
                       f"{self.ctx.precision} (run.cpu_bf16 / run.amp, or a CPU or GPU without {before[-1]}): "
                       "the result will differ a little from an uninterrupted run")
            self.ctx.log.write("warning", stage=self.stage, message=message)
            if self.ctx.dist.is_main:
                print(f"warning: {message}", file=sys.stderr, flush=True)
        elif before:
            self.precisions = list(before)
        return checkpoint.step

    @property
    def precision_record(self) -> str:
        """The precision the stage trained in, for the bundle's metadata ("bfloat16, then float32")."""
        return ", then ".join(self.precisions)

    def run(self, *, resume: bool) -> Path:
        ctx = self.ctx
        run_cfg = ctx.config.run
        start = self.resume() if resume else 0
        if start >= self.total:
            output = self.output_path()
            if ctx.dist.is_main and not output.exists():
                self.finish()
            ctx.dist.barrier()
            return output
        ctx.log.write("start", stage=self.stage, total=self.total, step=start, resumed=start > 0,
                      world_size=ctx.dist.world_size, device=str(ctx.device), precision=ctx.precision)
        bar = _progress_bar(ctx.progress and ctx.dist.is_main, self.total, start, self.stage)
        sums: dict[str, torch.Tensor] = {}
        count = 0
        started = time.perf_counter()
        last_log_time, last_log_step = started, start
        try:
            for step in range(start, self.total):
                torch.manual_seed(step_seed(run_cfg.seed, self.stage, step, ctx.dist.rank))
                losses = self.train_step(step)
                done = step + 1
                self.steps_done += 1
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float()
                count += 1
                bar.update(1)
                is_checkpoint = done % run_cfg.checkpoint_every == 0 or done == self.total or done in self.kept_steps
                if done % run_cfg.log_every == 0 or done == start + 1 or is_checkpoint:
                    means = {name: float(total) / count for name, total in sums.items()}
                    _check_finite(means, self.stage, done)
                    now = time.perf_counter()
                    sec_per_step = (now - last_log_time) / max(1, done - last_log_step)
                    ctx.log.write(
                        "step", stage=self.stage, step=done, total=self.total,
                        losses={k: round(v, 6) for k, v in means.items()},
                        lr=self.learning_rates(step), sec_per_step=round(sec_per_step, 4),
                        eta_s=round(sec_per_step * (self.total - done), 1),
                    )
                    bar.set_postfix({k: f"{v:.3g}" for k, v in list(means.items())[:4]}, refresh=False)
                    sums, count = {}, 0
                    last_log_time, last_log_step = now, done
                if is_checkpoint and ctx.dist.is_main:
                    path = self.save(done)
                    ctx.log.write("checkpoint", stage=self.stage, step=done, path=str(path.relative_to(ctx.out_dir)))
                sample_every = run_cfg.sample_every
                if sample_every and (done % sample_every == 0 or done == self.total) and ctx.dist.is_main:
                    self.write_samples(ctx.out_dir / SAMPLES_DIR / f"{self.stage}_{done:08d}.png")
                    plot_losses(ctx.out_dir / EVENTS_FILE, ctx.out_dir / LOSS_FIGURE)
        finally:
            bar.close()
        seconds = time.perf_counter() - started
        output = self.finish() if ctx.dist.is_main else self.output_path()
        ctx.dist.barrier()
        slices = self.steps_done * self.slices_per_step()
        ctx.log.write(
            "end", stage=self.stage, step=self.total, total=self.total, bundle=str(output.relative_to(ctx.out_dir))
            if output.is_relative_to(ctx.out_dir) else str(output),
            seconds=round(seconds, 2), steps=self.steps_done,
            slices_per_s=round(slices / seconds, 2) if seconds > 0 else None,
        )
        if ctx.dist.is_main:
            plot_losses(ctx.out_dir / EVENTS_FILE, ctx.out_dir / LOSS_FIGURE)
        return output


def _check_finite(losses: dict[str, float], stage: str, step: int) -> None:
    bad = [name for name, value in losses.items() if not math.isfinite(value)]
    if bad:
        raise ConfigError(
            f"training diverged: loss {', '.join(bad)} became NaN or infinite at {stage} step {step}",
            "lower the learning rate (or set run.amp=false); --resume restarts from the last checkpoint, "
            "which was written before the divergence",
        )


def _progress_bar(enabled: bool, total: int, initial: int, stage: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc={"translator": "stage 1 translator", "adapt": "stage 2 adaptation"}.get(stage, stage),
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
        leave=True,
    )
