"""Model forward alone on one device: batch size x precision x memory layout, per checkpoint.

    python benchmarks/gpu/forward_sweep.py [--models student golo] [--batches 1 2 4 8 16]
        [--modes predictor fp16-cl bf16-cl fp32-cl fp16-nchw] [--size 1152] [--device cuda]
        [--seconds 1.5] [--json FILE]

What `segment` runs per batch is the `predictor` mode (`infer.predictor.Predictor`: uint8
tiles copied in, fp16 autocast, channels_last, the maps and the dense post-processing maps,
copied back); the others time the model's forward alone on a device-resident batch, so the
gap between them is what the copies and maps cost. Modes: PRECISION-LAYOUT with PRECISION
fp32 (TF32 convolutions, torch's default), fp16 or bf16 (autocast) and LAYOUT cl
(channels_last) or nchw. --size 1152 = the default tile 1024 + 2 x 64 halo, in model px.

Each cell: one warm-up call (cudnn autotune at that shape), then calls repeated for about
--seconds, timed with CUDA events (host clock + synchronize on CPU); the median is printed as
ms per batch and model Mpx/s (batch x size^2 / time). Inputs are random, never zeros. A
batch that does not fit is printed as "oom" and the sweep goes on.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from nucleiflow.models.checkpoint import load_checkpoint
from nucleiflow.pipeline.infer.predictor import Predictor

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def timed(fn, device: torch.device, seconds: float) -> list[float]:
    """Seconds of each call of ``fn`` after one warm-up call, for about ``seconds`` in all."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def forward_fn(model: torch.nn.Module, card: dict, mode: str, batch: int, size: int, device: torch.device):
    """A no-argument call running ``mode`` on a random batch (see the module docstring)."""
    rng = np.random.default_rng(batch)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    if mode == "predictor":
        predictor = Predictor(model, card, device=str(device))
        return lambda: predictor(images)
    precision, layout = mode.split("-")
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    net = model.to(device, memory_format=fmt)
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255).contiguous(memory_format=fmt)
    dtype = DTYPES[precision]

    @torch.inference_mode()
    def run():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return net(x)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["student", "golo"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--modes", nargs="+", default=["predictor", "fp16-cl", "bf16-cl", "fp32-cl", "fp16-nchw"])
    p.add_argument("--size", type=int, default=1152, help="tile edge in model px (tile + 2 x halo)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seconds", type=float, default=1.5, help="timed calls per cell, about")
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the Predictor sets it
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"cudnn {torch.backends.cudnn.version()}")
    print(f"tile {a.size} px; median of ~{a.seconds} s of calls per cell")
    print(f"{'model':<10} {'mode':<10} {'batch':>5} {'ms/batch':>9} {'Mpx/s':>8} {'peak MB':>8}")
    rows = []
    for name in a.models:
        model, card = load_checkpoint(name)
        for mode in a.modes:
            for batch in a.batches:
                row = {"model": name, "mode": mode, "batch": batch, "size": a.size}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    times = timed(forward_fn(model, card, mode, batch, a.size, device), device, a.seconds)
                except torch.OutOfMemoryError:
                    row["oom"] = True
                    print(f"{name:<10} {mode:<10} {batch:>5} {'oom':>9}", flush=True)
                    rows.append(row)
                    continue
                sec = statistics.median(times)
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
                row.update(s=sec, calls=len(times), mpx_s=batch * a.size**2 / 1e6 / sec, peak_mb=peak,
                           spread=(max(times) - min(times)) / sec)
                rows.append(row)
                print(f"{name:<10} {mode:<10} {batch:>5} {1000 * sec:>9.2f} {row['mpx_s']:>8.1f} {peak:>8.0f}",
                      flush=True)
                if a.json:  # after every cell: a sweep cut short by its timeout keeps its rows
                    a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows},
                                                 indent=1))
        model.to("cpu")
    best = {}
    for r in rows:
        if "mpx_s" in r and r["mpx_s"] > best.get(r["model"], {}).get("mpx_s", 0):
            best[r["model"]] = r
    for name, r in best.items():
        print(f"fastest {name}: {r['mode']} batch {r['batch']}, {r['mpx_s']:.1f} Mpx/s")


if __name__ == "__main__":
    main()
