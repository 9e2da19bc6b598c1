"""Student vs teacher, side by side in one run: held-out accuracy and forward speed.

HoVer-UNet's claims: the distilled student's PQ within a few points of its teacher's, and a
forward pass several times faster. This prints both models' mean metrics on a held-out
split (through the same slide segmentation path as `nucleiflow evaluate`), the PQ gap, and
the forward time of a (B, 3, P, P) batch with the ratio. Asserts nothing.

    python benchmarks/student_vs_teacher.py --student student --teacher golo \
        --data ../shared/data/monuseg --split test
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nucleiflow.models.checkpoint import load_checkpoint
from nucleiflow.pipeline.train.evaluation import evaluate
from nucleiflow.pipeline.infer.device import pick_device
from nucleiflow.pipeline.infer.predictor import Predictor


def forward_seconds(model: torch.nn.Module, device: torch.device, batch: int, patch: int, repeats: int) -> float:
    """Median seconds of one forward pass (inference_mode, AMP on CUDA) after one warm-up."""
    model = model.to(device).eval()
    x = torch.rand(batch, 3, patch, patch, device=device)
    times = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="student")
    ap.add_argument("--teacher", default="golo")
    ap.add_argument("--data", default="../shared/data/monuseg")
    ap.add_argument("--split", default="test")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    device = pick_device(args.device)
    rows = {}
    for role, name in (("teacher", args.teacher), ("student", args.student)):
        model, card = load_checkpoint(name)
        params = sum(p.numel() for p in model.parameters())
        fwd = forward_seconds(model, device, args.batch, args.patch, args.repeats)
        res = evaluate(Predictor(model, card, device=args.device), args.data, split=args.split)
        rows[role] = {"name": name, "arch": card["arch"], "params": params, "forward_s": fwd, **res["mean"]}
    t, s = rows["teacher"], rows["student"]
    print(f"device: {device}; forward batch {args.batch}x3x{args.patch}x{args.patch}; "
          f"held-out: {args.data} split {args.split}\n")
    keys = ("params", "forward_s", "dice", "aji", "pq", "dq", "sq", "f1")
    print(f"{'':<10}" + "".join(f"{k:>11}" for k in keys))
    for role in ("teacher", "student"):
        r = rows[role]
        cells = [f"{r['params']:>11,}", f"{r['forward_s']:>11.3f}"] + [f"{r[k]:>11.4f}" for k in keys[2:]]
        print(f"{role:<10}" + "".join(cells))
    speedup = t["forward_s"] / s["forward_s"]
    gap = t["pq"] - s["pq"]
    print(f"\nforward speed-up student vs teacher: {speedup:.2f}x (HoVer-UNet target >= 3x)")
    print(f"PQ teacher - student: {gap:+.4f} (target: within 0.03)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "speedup": speedup, "pq_gap": gap, "device": str(device)}, f, indent=2)


if __name__ == "__main__":
    main()
