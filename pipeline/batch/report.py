"""The morning after: the batch table, a summary CSV and an area plot over a batch folder.

``<out>/summary.csv``                    one row per finished slide in ``<out>``: nuclei,
                                         tissue mm2, nuclei per mm2, area quantiles
``<out>/summary.png``                    the nucleus area distribution of each slide

Drawn with PIL (no plotting dependency), written atomically; missing nuclei overlays
(`outputs.overlays`) are drawn here too.
"""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from nucleiflow.pipeline.slide.reader import SlideError
from nucleiflow.pipeline.outputs.atomic import atomic_write
from nucleiflow.pipeline.outputs.layout import slide_paths
from nucleiflow.pipeline.outputs.overlays import OVERLAY_NAME, save_png, slide_overlay

STATUSES = ("done", "skipped", "busy", "failed")  # a slide's status in a batch report
SUMMARY_COLUMNS = ("slide_id", "nuclei", "tissue_mm2", "nuclei_per_mm2",
                   "median_area_um2", "p10_area_um2", "p90_area_um2")
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


# -- batch table ----------------------------------------------------------------------------
def format_report(report: dict) -> list[str]:
    """The batch table: slide, status, nuclei, tissue mm2, time, reason (a line per slide),
    then the counts and the report's path."""
    lines = [f"{'slide':<32} {'status':<8} {'nuclei':>8} {'tissue mm2':>10} {'time s':>8}  reason"]
    for r in report["slides"]:
        nuclei = "-" if r.get("nuclei") is None else str(r["nuclei"])
        tissue = "-" if r.get("tissue_mm2") is None else f"{r['tissue_mm2']:.2f}"
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        lines.append(f"{r['slide_id']:<32} {r['status']:<8} {nuclei:>8} {tissue:>10} {secs:>8}  {r.get('reason') or ''}")
    lines.append(", ".join(f"{report[s]} {s}" for s in STATUSES) + f"; report: {report.get('report') or 'NOT WRITTEN'}")
    return lines


# -- batch summary --------------------------------------------------------------------------
def done_records(out: str | os.PathLike, log: Callable[[str], None] | None = None) -> list[dict]:
    """run.json of every finished slide in ``out``, by slide id. An unreadable run.json is
    reported through ``log`` (else a warning): its slide is missing from the summary."""
    recs = []
    for p in sorted(Path(out).glob("*/run.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            msg = f"{p}: unreadable run.json ({e}); {p.parent.name} left out of summary.csv"
            log(msg) if log is not None else warnings.warn(msg, stacklevel=2)
            continue
        if rec.get("status") == "done" and rec.get("slide_id") == p.parent.name:
            recs.append(rec)
    return recs


def read_areas(parquet: str | os.PathLike) -> np.ndarray:
    """The ``area_um2`` column, float64 (one column of one slide: 8 bytes a nucleus)."""
    f = pq.ParquetFile(parquet)
    parts = [b.column(0).to_numpy(zero_copy_only=False) for b in f.iter_batches(columns=["area_um2"])]
    return np.concatenate(parts).astype(np.float64) if parts else np.empty(0)


def slide_row(slide_id: str, nuclei: int, tissue_mm2: float | None, areas: np.ndarray) -> dict:
    """One summary row: density per mm2 of tissue (None without tissue) and area quantiles
    (None without nuclei)."""
    q = np.quantile(areas, [0.5, 0.1, 0.9]) if len(areas) else [None] * 3
    density = nuclei / tissue_mm2 if tissue_mm2 else None
    return {"slide_id": slide_id, "nuclei": int(nuclei), "tissue_mm2": tissue_mm2, "nuclei_per_mm2": density,
            "median_area_um2": q[0], "p10_area_um2": q[1], "p90_area_um2": q[2]}


def write_summary(out: str | os.PathLike, overlays: bool = True, log=None) -> tuple[Path, Path]:
    """``<out>/summary.csv`` and ``<out>/summary.png`` over every finished slide in ``out``;
    with ``overlays``, first draws the nuclei overlays that are missing or older than their
    run.json (a run killed between the two). Returns (csv path, png path)."""
    out = Path(out)
    rows, areas = [], {}
    for rec in done_records(out, log):
        sid = rec["slide_id"]
        paths = slide_paths(out, sid)
        if not paths["parquet"].is_file():
            continue
        if overlays:
            png = paths["run_json"].parent / OVERLAY_NAME
            if not png.is_file() or png.stat().st_mtime < paths["run_json"].stat().st_mtime:
                try:
                    slide_overlay(out, sid)
                except (SlideError, OSError, ValueError) as e:
                    if log:
                        log(f"{sid}: nuclei overlay not written: {e}")
        a = read_areas(paths["parquet"])
        areas[sid] = a
        rows.append(slide_row(sid, rec.get("nuclei", len(a)), rec.get("tissue_mm2"), a))
    csv_path = out / "summary.csv"
    with atomic_write(csv_path, durable=False) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(v) for k, v in r.items()})
    png_path = save_png(area_plot(areas), out / "summary.png")
    return csv_path, png_path


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float | np.floating):
        return f"{float(v):.6g}"
    return str(v)


# -- area plot ------------------------------------------------------------------------------
def area_bins(areas: dict[str, np.ndarray], n: int = 40) -> np.ndarray:
    """Shared bin edges (um2) from 0 to the largest slide's 99th percentile, ``n`` bins."""
    tops = [float(np.quantile(a, 0.99)) for a in areas.values() if len(a)]
    top = max(tops) if tops else 100.0
    return np.linspace(0.0, _nice(top), n + 1)


def _nice(x: float) -> float:
    """Smallest 1, 2, 2.5 or 5 x 10^k >= x: a round axis end."""
    if x <= 0:
        return 1.0
    k = 10.0 ** math.floor(math.log10(x))
    return next(m * k for m in (1, 2, 2.5, 5, 10) if m * k >= x)


DEBRIS_UM2 = 5.0  # objects smaller than this are debris or fragments, not nuclei (~2.5 um across)
CLIP_QUANTILE = 0.99  # the x axis ends at the largest slide's 99th percentile (and says so)


def debris_share(a: np.ndarray) -> float:
    """Share of a slide's objects under DEBRIS_UM2."""
    return float((a < DEBRIS_UM2).mean()) if len(a) else 0.0


def x_label(areas: np.ndarray, end: float) -> str:
    """The area axis' label; says what share of the objects lie past its end, if any."""
    past = float((areas > end).mean()) if len(areas) else 0.0
    clipped = f"; axis ends at {end:g} um2: {past:.1%} of nuclei are larger, not shown" if past else ""
    return "nucleus area (um2)" + clipped


def area_plot(areas: dict[str, np.ndarray], size: tuple[int, int] = (900, 520)) -> Image.Image:
    """Line plot of each slide's nucleus area distribution (fraction of its nuclei per bin),
    titled; the debris band (< DEBRIS_UM2) shaded and its share per slide in the legend;
    the x axis label says how many nuclei lie past its end. The legend column is as wide
    as its longest entry, so nothing is cut."""
    font, bold = ImageFont.load_default(size=13), ImageFont.load_default(size=17)
    labels = [f"{sid} ({len(a):,}; {debris_share(a):.1%} < {DEBRIS_UM2:g} um2)" for sid, a in areas.items()]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_w = int(max([probe.textlength(t, font=font) for t in labels] + [0])) + 60
    w, h = size[0] + legend_w, size[1]
    left, right, top, bottom = 70, legend_w + 10, 56, 60
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    edges = area_bins(areas)
    fracs = {sid: np.histogram(a, edges)[0] / max(len(a), 1) for sid, a in areas.items()}
    ymax = _nice(max([float(f.max()) for f in fracs.values() if f.size] + [0.01]))
    px = lambda v: left + (v - edges[0]) / (edges[-1] - edges[0]) * (w - left - right)
    py = lambda v: h - bottom - v / ymax * (h - top - bottom)
    draw.rectangle([left, top, px(min(DEBRIS_UM2, edges[-1])), h - bottom], fill=(228, 228, 228))
    draw.text((left + 3, top + 4), "debris", fill=(90, 90, 90), font=font, anchor="lt")
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in np.linspace(edges[0], edges[-1], 6):
        draw.line([px(t), h - bottom, px(t), h - bottom + 4], fill="black")
        draw.text((px(t), h - bottom + 8), f"{t:g}", fill="black", font=font, anchor="mt")
    for t in np.linspace(0, ymax, 5):
        draw.line([left - 4, py(t), left, py(t)], fill="black")
        draw.text((left - 8, py(t)), f"{t:.2g}", fill="black", font=font, anchor="rm")
    every = np.concatenate(list(areas.values())) if areas else np.empty(0)
    draw.text(((left + w - right) / 2, h - 18), x_label(every, edges[-1]), fill="black", font=font, anchor="mm")
    draw.text((left, 18), f"Nucleus area per slide: {len(areas)} slide{'s' * (len(areas) != 1)}, {len(every):,} objects",
              fill="black", font=bold, anchor="lm")
    draw.text((left, 40), "fraction of a slide's nuclei per bin", fill="black", font=font, anchor="lm")
    centres = (edges[:-1] + edges[1:]) / 2
    for i, ((sid, f), label) in enumerate(zip(fracs.items(), labels)):
        colour = PALETTE[i % len(PALETTE)]
        if f.size and len(areas[sid]):
            draw.line([(px(x), py(y)) for x, y in zip(centres, f)], fill=colour, width=2)
        ly = top + 8 + 18 * i
        draw.line([w - right + 12, ly, w - right + 32, ly], fill=colour, width=3)
        draw.text((w - right + 38, ly), label, fill="black", font=font, anchor="lm")
    if not areas:
        draw.text(((left + w - right) / 2, h / 2), "no finished slides", fill="black", font=font, anchor="mm")
    return img
