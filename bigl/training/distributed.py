"""Single-process and multi-process (torchrun + DistributedDataParallel) training context.

``torchrun --nproc_per_node N -m bigl train ...`` (or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) starts one process per GPU;
each joins the process group (nccl on CUDA, gloo on CPU), takes its shard of every step's batch,
and only rank 0 logs, writes checkpoints, samples and bundles. Without those variables training
runs in the current process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bigl.bundle import resolve_device
from bigl.errors import ConfigError


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, batch_size: int) -> slice:
        """The part of a global batch of ``batch_size`` samples this rank trains on."""
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` inside DistributedDataParallel when running on several processes."""
        if not self.enabled or not any(p.requires_grad for p in module.parameters()):
            return module
        if self.device.type == "cuda":
            return DistributedDataParallel(module, device_ids=[self.device.index], output_device=self.device.index)
        return DistributedDataParallel(module)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not a whole number", "launch with torchrun, which sets it") from None


def init_distributed(device_setting: str) -> DistributedContext:
    """The context of this process: device, rank and world size (joins the group when needed)."""
    world_size = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local_rank = env_int("LOCAL_RANK", 0)
    device = resolve_device(device_setting)
    if world_size <= 1:
        return DistributedContext(device=device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} has no GPU (this machine has {torch.cuda.device_count()})",
                "start at most one process per GPU (torchrun --nproc_per_node <number of GPUs>)",
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = False
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ConfigError(f"WORLD_SIZE is {world_size} but {name} is not set", "launch multi-process training with torchrun")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        owns_group = True
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, owns_group=owns_group)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module
