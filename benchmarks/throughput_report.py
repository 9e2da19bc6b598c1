"""The tables and ratios `benchmarks/throughput.py` prints from its per-slide results."""
from __future__ import annotations

import math


def derive(r: dict) -> dict:
    """Rates and shares of one slide's measurements."""
    t, w = r["timings_s"], r["wall_s"]
    stream = t.get("stream") or float("nan")
    model, read, post = t.get("tiles_model", 0.0), t.get("tiles_read", 0.0), t.get("tiles_postprocess", 0.0)
    writes = sum(r["main_writes_s"].values())
    readers, workers = max(r["readers"], 1), max(r["workers"], 1)
    # The longest pole of the stream: each pool's summed seconds spread over its processes.
    poles = {"model": model, "read": read / readers, "postprocess": post / workers, "main writes": writes}
    return {
        "level0_mpx": r["width"] * r["height"] / 1e6,
        "planned_mpx": r["planned_model_px"] / 1e6,
        "planned_mpx_s": r["planned_model_px"] / 1e6 / w,
        "level0_mpx_s": r["width"] * r["height"] / 1e6 / w,
        # Seconds per mm2 of slide, and of tissue (run.json's tissue_mm2: the mosaic's islands).
        "s_per_mm2": w / (r["width"] * r["height"] * (r.get("slide_mpp", 0.25) * 1e-3) ** 2),
        "s_per_tissue_mm2": w / r["tissue_mm2"] if r.get("tissue_mm2") else float("nan"),
        "nuclei_s": r["nuclei"] / w,
        "model_busy": model / stream,
        "main_other_s": stream - model - writes,
        "post_per_worker_s": post / workers,
        "post_hidden": post / workers <= model,
        "stream_bound_by": max(poles, key=poles.get),
    }


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table(results: list[dict]) -> str:
    """Plain-text table: one column per slide, one row per figure."""
    stages = []
    for r in results:
        stages += [k for k in r["timings_s"] if k not in stages]
    rows: list[tuple[str, list]] = [
        ("level-0 px", [f"{r['width']}x{r['height']}" for r in results]),
        ("level-0 Mpx", [r["d"]["level0_mpx"] for r in results]),
        ("model px (whole slide) Mpx", [r["model_px"] / 1e6 for r in results]),
        ("tissue fraction", [r["tissue_fraction"] for r in results]),
        ("tissue mm2", [r.get("tissue_mm2") for r in results]),
        ("planned (tissue) model Mpx", [r["d"]["planned_mpx"] for r in results]),
        ("tiles", [r["tiles"] for r in results]),
        ("nuclei", [r["nuclei"] for r in results]),
        ("halo-edge nuclei", [r["halo_edge_nuclei"] for r in results]),
        ("wall s (segment_slide)", [r["wall_s"] for r in results]),
        ("planned model Mpx/s", [r["d"]["planned_mpx_s"] for r in results]),
        ("level-0 Mpx/s", [r["d"]["level0_mpx_s"] for r in results]),
        ("nuclei/s", [r["d"]["nuclei_s"] for r in results]),
        ("s / mm2 slide", [r["d"]["s_per_mm2"] for r in results]),
        ("s / mm2 tissue", [r["d"]["s_per_tissue_mm2"] for r in results]),
    ]
    if any(r.get("gpu_busy") is not None for r in results):  # CUDA runs with NVML
        rows += [
            ("GPU busy (NVML, share of wall)", [r.get("gpu_busy") for r in results]),
            ("GPU memory used peak MB (NVML)", [r.get("gpu_mem_peak_mb") for r in results]),
            ("torch max allocated MB", [r.get("cuda_max_allocated_mb") for r in results]),
        ]
    rows += [(f"  {k} s", [r["timings_s"].get(k, float("nan")) for r in results]) for k in stages]
    rows += [(f"  {k} s (main, instr.)", [r["main_writes_s"][k] for r in results])
             for k in results[0]["main_writes_s"]]
    rows += [
        ("  Zarr label chunk writes / tile", [r["main_write_calls"]["main_zarr_labels_write"] / max(r["tiles"], 1)
                                        for r in results]),
        ("  stream - model - writes s", [r["d"]["main_other_s"] for r in results]),
        ("model busy (model/stream)", [r["d"]["model_busy"] for r in results]),
        ("post-process s / worker", [r["d"]["post_per_worker_s"] for r in results]),
        ("post-process hidden", [r["d"]["post_hidden"] for r in results]),
        ("stream bound by", [r["d"]["stream_bound_by"] for r in results]),
        ("self CPU s", [r["self_cpu_s"] for r in results]),
        ("children CPU s", [r["children_cpu_s"] for r in results]),
        ("peak RSS self MB", [r["self_maxrss_mb"] for r in results]),
        ("peak RSS children MB (max 1)", [r["children_maxrss_mb"] for r in results]),
        ("peak RSS tree MB (sampled)", [r["tree_peak_mb"] for r in results]),
        ("  descendants' peaks MB", [" ".join(f"{v:.0f}" for v in r["descendant_peaks_mb"]) for r in results]),
    ]
    cells = [[name] + [fmt(v) for v in vals] for name, vals in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)) for row in cells
    )


def ratios(hi: dict, lo: dict) -> list[tuple[str, float, str]]:
    """(name, hi / lo, note) for area, memory and throughput of two slides."""

    def q(key, get=lambda r, k: r[k]) -> float:
        a, b = get(hi, key), get(lo, key)
        return a / b if b else float("nan")

    d = lambda r, k: r["d"][k]  # noqa: E731
    return [
        ("level-0 area", q("level0_mpx", d), ""),
        ("planned model area", q("planned_mpx", d), ""),
        ("peak RSS self", q("self_maxrss_mb"), "target < 1.5x while area grows >= 30x"),
        ("peak RSS children (largest one)", q("children_maxrss_mb"), "see caveat in --help"),
        ("peak RSS tree (sampled)", q("tree_peak_mb"), "target < 1.5x"),
        ("planned model Mpx/s", q("planned_mpx_s", d), "~1 = throughput flat in slide size"),
        ("wall s", q("wall_s"), ""),
    ]


def comparisons(results: list[dict]) -> dict[str, list[tuple[str, float, str]]]:
    """Largest / smallest slide, and largest / second largest: the smallest slide may be a
    single batch, below the pipeline's steady state, so growth shows best between the two
    largest (flat memory -> ~1x whatever their area ratio)."""
    by_area = sorted(results, key=lambda r: r["d"]["level0_mpx"])
    out = {"largest / smallest slide": ratios(by_area[-1], by_area[0])}
    if len(by_area) > 2:
        out["largest / second largest slide"] = ratios(by_area[-1], by_area[-2])
    return out
