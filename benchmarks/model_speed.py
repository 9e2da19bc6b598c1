"""Parameter count and CPU forward time of every registered model at its default kwargs.

    python benchmarks/model_speed.py [--batch 8] [--size 256] [--repeats 3] [--arch golo ...]

Each model runs on a (batch, in_channels, size, size) uniform batch under
torch.inference_mode(): one warm-up forward, then the median of `repeats` timed forwards.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from nucleiflow.models.registry import MODELS, create_model


def time_forward(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of `repeats` forwards of `x`, after one warm-up forward."""
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="tile side in px")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arch", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"batch {args.batch} x C x {args.size} x {args.size}, median of {args.repeats}")
    print(f"{'arch':<12} {'params':>11} {'forward s':>10} {'ms/tile':>8}")
    for arch in args.arch:
        torch.manual_seed(0)
        model = create_model(arch).eval()
        n = sum(p.numel() for p in model.parameters())
        x = torch.rand(args.batch, model.in_channels, args.size, args.size)
        sec = time_forward(model, x, args.repeats)
        print(f"{arch:<12} {n:>11,} {sec:>10.3f} {1000 * sec / args.batch:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
