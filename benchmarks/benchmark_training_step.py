#!/usr/bin/env python3
"""Seconds per forward + backward + Adam step of a stage-2 segmenter batch, float32 against
bfloat16 autocast on the CPU (what ``run.cpu_bf16`` switches).

    python benchmarks/benchmark_training_step.py [--size 96] [--base 16] [--batch 16] [--threads 2]

The default batch is the four-domain stage-2 batch of the reference config (4 x 4 slices, 96 px,
U-Net base 16). Prints the best of ``--repeats`` timed steps after two warm-up steps, and whether
this CPU computes bfloat16 natively (only then does training use it).
"""

from __future__ import annotations

import argparse
import time

import torch

from bigl.losses import segmentation_loss
from bigl.models import DualAttentionUNet, SegmenterConfig
from bigl.training.loop import cpu_supports_bf16


def step_seconds(size: int, base: int, batch: int, bf16: bool, repeats: int) -> float:
    torch.manual_seed(0)
    net = DualAttentionUNet(SegmenterConfig(base_channels=base, depth=3, norm="instance"))
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 1, size, size), torch.randint(0, 4, (batch, size, size))
    times = []
    for _ in range(repeats + 2):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = segmentation_loss(net(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        times.append(time.perf_counter() - started)
    return min(times[2:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--base", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"native bfloat16 on this CPU: {cpu_supports_bf16()} (run.cpu_bf16 uses it only then)")
    fp32 = step_seconds(args.size, args.base, args.batch, False, args.repeats)
    bf16 = step_seconds(args.size, args.base, args.batch, True, args.repeats)
    print(f"{args.batch} slices of {args.size} px, U-Net base {args.base}, {args.threads} threads: "
          f"float32 {fp32:.3f} s/step, bfloat16 autocast {bf16:.3f} s/step ({fp32 / bf16:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
