"""The few lines to read first after benchmarks/gpu/run.sh: throughput, sweep and training.

    python benchmarks/gpu/summary.py OUT_DIR [TRAIN_RESULT_JSON]

Reads what run.sh left in OUT_DIR (throughput-*.json, sweep.json, student-gpu/model.json)
and train_gpu.py's --result file; prints what is there and says what is missing. Printed
last by run.sh, so it sits in the device call's output tail.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def timeline(samples: list[int], parts: int = 10) -> str:
    """Mean NVML utilisation in each tenth of the run: flat, or bursts with idle gaps."""
    if not samples:
        return "-"
    n = len(samples)
    cuts = [round(i * n / parts) for i in range(parts + 1)]
    return " ".join(f"{sum(samples[a:b]) / max(b - a, 1):.0f}" for a, b in zip(cuts, cuts[1:]) if b > a)


def throughput(out: Path) -> None:
    files = sorted(out.glob("throughput-*.json"))
    if not files:
        print("throughput: no results")
        return
    print(f"{'model':<8} {'slide':>11} {'planned Mpx':>11} {'wall s':>7} {'plan Mpx/s':>10} {'L0 Mpx/s':>8} "
          f"{'s/mm2 tis':>9} {'GPU busy':>8} {'model busy':>10} {'bound by':>11} {'pools r/w':>9}")
    for f in files:
        r = json.loads(f.read_text())["slides"][-1]
        d = r["d"]
        print(f"{f.stem.split('-', 1)[1]:<8} {str(r['width']) + 'x' + str(r['height']):>11} {d['planned_mpx']:>11.1f} {r['wall_s']:>7.1f} "
              f"{d['planned_mpx_s']:>10.2f} {d['level0_mpx_s']:>8.2f} {d['s_per_tissue_mm2']:>9.3f} "
              f"{pct(r.get('gpu_busy')):>8} {pct(d['model_busy']):>10} {d['stream_bound_by']:>11} "
              f"{r['readers']:>4}/{r['workers']:<4}")
        if r.get("gpu_util_samples"):
            print(f"  GPU busy % by tenth of the run: {timeline(r['gpu_util_samples'])}")
        t = r["timings_s"]
        print(f"  per worker: post-process {d['post_per_worker_s']:.1f} s, read {t.get('tiles_read', 0) / max(r['readers'], 1):.1f} s;"
              f" model {t.get('tiles_model', 0):.1f} s; main writes {sum(r['main_writes_s'].values()):.1f} s "
              f"of stream {t.get('stream', 0):.1f} s; {r['nuclei']:,} nuclei")


def sweep(out: Path) -> None:
    f = out / "sweep.json"
    if not f.exists():
        print("sweep: no results")
        return
    rows = [r for r in json.loads(f.read_text())["rows"] if "mpx_s" in r]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        best = max(mine, key=lambda r: r["mpx_s"])
        line = f"sweep {model}: fastest {best['mode']} batch {best['batch']} {best['mpx_s']:.3g} Mpx/s"
        for mode in dict.fromkeys(r["mode"] for r in mine):
            top = max((r for r in mine if r["mode"] == mode), key=lambda r: r["mpx_s"])
            line += f"; {mode} {top['mpx_s']:.3g} (b{top['batch']})"
        print(line)


def training(out: Path, result: Path | None) -> None:
    card_path = out / "student-gpu" / "model.json"
    if not card_path.exists():
        print("train: no checkpoint")
        return
    card = json.loads(card_path.read_text())
    t, loop = card["training"], card["training"]["loop"]
    if card.get("name") != "student-gpu":  # train_gpu.py copied the bundled one there first
        print("train: the checkpoint in OUT is the copied bundled one (training did not finish)")
        return
    patches = t["epochs"] * loop["steps_per_epoch"] * loop["batch_size"]
    print(f"train: {t['epochs']} epochs x {loop['steps_per_epoch']} steps x {loop['batch_size']} patches "
          f"({patches:,} patches) in {t['seconds']:.0f} s on {t['hardware']}: {patches / t['seconds']:.1f} patches/s "
          f"(bundled round 7: 6,000 in 3,265 s on 1 CPU thread, 1.8/s); best val loss {t['best_val_loss']:.4f}")
    by_data = (card.get("metrics") or {}).get("by_data") or {}
    for name, m in by_data.items():
        mean = m.get("mean", m)
        print(f"  new {name}: " + " / ".join(f"{k} {mean[k]:.3f}" for k in ("dice", "aji", "pq") if k in mean))
    if result and result.exists():
        res = json.loads(result.read_text())
        if res.get("old_metrics"):
            old, new = res["old_metrics"], res["metrics"]
            print("  MoNuSeg test, bundled student -> new (same carried images): "
                  + ", ".join(f"{k} {old[k]:.3f} -> {new[k]:.3f}" for k in ("dice", "aji", "pq")))


def main() -> None:
    out = Path(sys.argv[1])
    result = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    throughput(out)
    sweep(out)
    training(out, result)


if __name__ == "__main__":
    main()
