"""Multi-process training (DistributedDataParallel) on the CPU with the gloo backend."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from bigl.errors import ConfigError
from bigl.training import load_config
from bigl.training.distributed import DistributedContext
from bigl.training.events import read_events
from bigl.training.runner import TrainingRun


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, data: str, out: str, overrides: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    config = load_config("smoke", [f"data.source_dir={data}", f"data.target_dir={data}", *overrides])
    run = TrainingRun(config, out, progress=False)
    run.execute()
    weights = {f"segmenter.{k}": v for k, v in run.trainers["adapt"].segmenter.state_dict().items()}
    weights.update({f"generators.{k}": v for k, v in run.trainers["translator"].generators.state_dict().items()})
    weights.update({f"discriminators.{k}": v for k, v in run.trainers["adapt"].bank.state_dict().items()})
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(Path(out) / f"rank{rank}.safetensors"))


@pytest.mark.slow
def test_two_process_gloo_run_keeps_the_ranks_in_step(phantom_cohort, tmp_path):
    out = tmp_path / "ddp"
    overrides = ["translator_training.iterations=3", "adapt.iterations=3", "run.checkpoint_every=3", "run.sample_every=0"]
    mp.spawn(_worker, args=(2, _free_port(), str(phantom_cohort), str(out), overrides), nprocs=2, join=True)

    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0 if "running_" not in k and "num_batches" not in k)
    events = read_events(out / "events.jsonl")
    assert [e["stage"] for e in events if e["event"] == "start"] == ["translator", "adapt"], "only rank 0 logs"
    assert all(e["world_size"] == 2 for e in events if e["event"] == "start")
    assert events[-1]["event"] == "done"
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["adapt_00000003.safetensors", "translator_00000003.safetensors"]


def test_each_rank_takes_its_own_shard_of_the_batch():
    shards = [DistributedContext(rank=r, world_size=4).shard(8) for r in range(4)]
    assert shards == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert DistributedContext().shard(8) == slice(0, 8)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(phantom_cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))

    def no_group(*args, **kwargs):
        raise AssertionError("the batch check must come before joining the process group")

    monkeypatch.setattr(torch.distributed, "init_process_group", no_group)
    config = load_config("smoke", [f"data.source_dir={phantom_cohort}", f"data.target_dir={phantom_cohort}"])
    with pytest.raises(ConfigError, match="cannot be split over 3 processes"):
        TrainingRun(config, tmp_path / "run", progress=False).prepare()
