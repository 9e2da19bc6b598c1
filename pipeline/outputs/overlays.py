"""Pictures of a slide's outputs, all written atomically (`atomic.atomic_write`).

``<out>/<slide_id>/overlay.png``         thumbnail: tissue tinted, planned tile cores outlined
``<out>/<slide_id>/nuclei_overlay.png``  the whole slide with every nucleus filled (drawn from
                                         the GeoParquet table, streamed by row group) beside
                                         a 1024 px zoom of its densest tissue; title with the
                                         nucleus count, legend, a scale bar on each view
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
import shapely
from PIL import Image, ImageDraw

from nucleiflow.pipeline.outputs.atomic import atomic_write
from nucleiflow.pipeline.outputs.drawing import NUCLEUS, ZOOM_BOX, fill_rings, font, legend, scale_bar
from nucleiflow.pipeline.outputs.layout import slide_paths
from nucleiflow.pipeline.slide.reader import SlideReader, open_slide

if TYPE_CHECKING:
    from nucleiflow.pipeline.slide.tissue import TissueMask
    from nucleiflow.pipeline.tiles.plan import TilePlan

OVERLAY_NAME = "nuclei_overlay.png"
OUTLINE = NUCLEUS  # `draw_outlines`' default; see `drawing` for the colour choice


def overlay_png(reader: SlideReader, tissue: TissueMask, plan: TilePlan | None,
                path: str | Path, mpp: float | None = None) -> Path:
    """Write a thumbnail PNG with tissue tinted green and planned tile cores outlined blue.

    ``mpp`` is the PNG's um/px (default: the mask's); ``plan`` cores are in model px, and
    ``plan.scale`` level-0 px per model px. Returns the path written.
    """
    mpp = mpp or tissue.mpp
    rgb = reader.thumbnail(mpp)
    h, w = rgb.shape[:2]
    mask = np.array(Image.fromarray(tissue.mask).resize((w, h), Image.Resampling.NEAREST))
    tinted = rgb.astype(np.float32)
    tinted[mask] = 0.6 * tinted[mask] + 0.4 * np.array([0, 200, 0], np.float32)
    img = Image.fromarray(tinted.round().astype(np.uint8))
    if plan is not None:
        f = plan.scale * reader.info.mpp_x / mpp  # PNG px per model px
        draw = ImageDraw.Draw(img)
        for t in plan:
            c = t.core
            draw.rectangle([math.floor(c.x0 * f), math.floor(c.y0 * f),
                            math.ceil(c.x1 * f) - 1, math.ceil(c.y1 * f) - 1], outline=(0, 60, 255))
    return save_png(img, Path(path))


def overlay_mpp(width_um: float, height_um: float, max_px: int = 2048, min_mpp: float = 0.5) -> float:
    """um/px of an overlay: ``min_mpp`` (outlines of 5-10 um nuclei clear) unless the
    longest side would exceed ``max_px``. Sizes in um."""
    return max(min_mpp, max(width_um, height_um) / max_px)


def draw_outlines(img: Image.Image, rings: Iterable[np.ndarray], colour=OUTLINE) -> int:
    """Draw closed outlines on ``img`` in place; each ring is (n, 2) float (x, y) in image
    px. A ring smaller than a pixel becomes one pixel. Returns the number drawn."""
    draw = ImageDraw.Draw(img)
    n = 0
    for ring in rings:
        xy = np.rint(ring).astype(np.int64)
        if len(xy) and (np.ptp(xy[:, 0]) == 0 and np.ptp(xy[:, 1]) == 0):
            draw.point(tuple(xy[0]), fill=colour)
        elif len(xy) >= 2:
            draw.line([tuple(p) for p in xy] + [tuple(xy[0])], fill=colour, width=1)
        n += 1
    return n


def parquet_rings(parquet: str | os.PathLike, scale: float, batch_rows: int = 50_000) -> Iterator[np.ndarray]:
    """Exterior rings of the table's polygons, level-0 px times ``scale``, one (n, 2)
    array per nucleus; streamed ``batch_rows`` at a time (memory flat in slide size)."""
    f = pq.ParquetFile(parquet)
    for batch in f.iter_batches(batch_size=batch_rows, columns=["geometry"]):
        geoms = shapely.from_wkb(batch.column(0).to_numpy(zero_copy_only=False))
        coords, index = shapely.get_coordinates(shapely.get_exterior_ring(geoms), return_index=True)
        if not len(index):
            continue
        cuts = np.flatnonzero(np.diff(index)) + 1
        yield from np.split(coords * scale, cuts)


def densest_window(parquet: str | os.PathLike, width: int, height: int, size: float) -> tuple[int, int]:
    """Top-left level-0 px of the ``size`` x ``size`` level-0 px window holding the most
    nucleus centroids (a slide of ``width`` x ``height``); streamed, quarter-window bins."""
    step = max(size / 4, 1.0)
    nx, ny = max(1, math.ceil(width / step)), max(1, math.ceil(height / step))
    counts = np.zeros((ny, nx), np.int64)
    for batch in pq.ParquetFile(parquet).iter_batches(columns=["centroid_x", "centroid_y"]):
        x = np.clip((batch.column(0).to_numpy() / step).astype(np.int64), 0, nx - 1)
        y = np.clip((batch.column(1).to_numpy() / step).astype(np.int64), 0, ny - 1)
        np.add.at(counts, (y, x), 1)
    k = min(4, nx), min(4, ny)  # the window in bins (a small slide: all of it)
    c = np.pad(counts.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = c[k[1]:, k[0]:] - c[:-k[1], k[0]:] - c[k[1]:, :-k[0]] + c[:-k[1], :-k[0]]
    iy, ix = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return (int(min(ix * step, max(width - size, 0))), int(min(iy * step, max(height - size, 0))))


def nuclei_overlay(reader: SlideReader, parquet: str | os.PathLike, path: str | os.PathLike,
                   *, max_px: int = 2048, min_mpp: float = 0.5, zoom_px: int = 1024,
                   zoom_mpp: float = 0.25, title: str | None = None) -> Path:
    """The slide with each nucleus of ``parquet`` filled, beside a ``zoom_px`` crop of its
    densest tissue at ``zoom_mpp`` um/px (or the slide's own, if coarser) -> PNG at ``path``.

    The whole view is at ``overlay_mpp`` um/px; level-0 px (the table's coordinates) map
    to its px by ``mpp_x / mpp``.
    """
    info = reader.info
    mpp = overlay_mpp(info.width * info.mpp_x, info.height * info.mpp_y, max_px, min_mpp)
    whole = Image.fromarray(reader.thumbnail(mpp))
    zmpp = max(zoom_mpp, info.mpp_x)
    f = zmpp / info.mpp_x  # level-0 px per zoom px
    zw, zh = min(zoom_px, math.ceil(info.width / f)), min(zoom_px, math.ceil(info.height / f))
    x0, y0 = densest_window(parquet, info.width, info.height, zoom_px * f)
    zoom = Image.fromarray(reader.read(x0, y0, zw, zh, zmpp))
    n = fill_rings(whole, parquet_rings(parquet, info.mpp_x / mpp))
    fill_rings(zoom, (r - (x0 / f, y0 / f) for r in parquet_rings(parquet, 1 / f)
                      if r[:, 0].max() >= x0 / f and r[:, 0].min() < x0 / f + zw
                      and r[:, 1].max() >= y0 / f and r[:, 1].min() < y0 / f + zh), alpha=45, outline=True)
    ImageDraw.Draw(whole).rectangle([x0 * info.mpp_x / mpp, y0 * info.mpp_y / mpp,
                                     (x0 + zw * f) * info.mpp_x / mpp, (y0 + zh * f) * info.mpp_y / mpp],
                                    outline=ZOOM_BOX, width=2)
    scale_bar(whole, mpp)
    scale_bar(zoom, zmpp)
    head = f"{title or Path(parquet).parent.name.removeprefix('slide_id=')}: {n:,} nuclei"
    return save_png(_compose(whole, zoom, head, zmpp), Path(path))


def _compose(whole: Image.Image, zoom: Image.Image, head: str, zmpp: float) -> Image.Image:
    """Whole view | zoom side by side under a title line and a legend line."""
    gap, top = 16, 70
    canvas = Image.new("RGB", (whole.width + gap + zoom.width, top + max(whole.height, zoom.height)), "white")
    canvas.paste(whole, (0, top))
    canvas.paste(zoom, (whole.width + gap, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 18), head, fill="black", font=font(22), anchor="lm")
    legend(draw, 8, 50, [("fill", NUCLEUS, "nucleus (segmented)"),
                         ("box", ZOOM_BOX, f"zoomed area (right, {zmpp:g} um/px)")])
    return canvas


def slide_overlay(out: str | os.PathLike, slide_id: str, **kw) -> Path:
    """Overlay of a finished slide in ``out``, reopening it as its run.json says."""
    paths = slide_paths(out, slide_id)
    rec = json.loads(paths["run_json"].read_text())
    slide = rec.get("slide") or {}
    mpp = slide.get("mpp_x") if slide.get("mpp_source") == "override" else None
    with open_slide(rec["path"], mpp=mpp) as reader:
        return nuclei_overlay(reader, paths["parquet"], paths["run_json"].parent / OVERLAY_NAME, **kw)


def save_png(img: Image.Image, path: Path) -> Path:
    with atomic_write(path, durable=False) as tmp:
        img.save(tmp, format="PNG")
    return path
