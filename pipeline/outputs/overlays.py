"""Pictures of a slide's outputs, all written atomically (`atomic.atomic_write`).

``<out>/<slide_id>/overlay.png``         thumbnail: tissue tinted, planned tile cores outlined
``<out>/<slide_id>/nuclei_overlay.png``  thumbnail with every nucleus outline, drawn from the
                                         GeoParquet table, streamed by row group
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
from nucleiflow.pipeline.outputs.layout import slide_paths
from nucleiflow.pipeline.slide.reader import SlideReader, open_slide

if TYPE_CHECKING:
    from nucleiflow.pipeline.slide.tissue import TissueMask
    from nucleiflow.pipeline.tiles.plan import TilePlan

OVERLAY_NAME = "nuclei_overlay.png"
OUTLINE = (0, 230, 0)  # green: stands out on haematoxylin purple and eosin pink alike


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


def nuclei_overlay(reader: SlideReader, parquet: str | os.PathLike, path: str | os.PathLike,
                   *, max_px: int = 2048, min_mpp: float = 0.5) -> Path:
    """Thumbnail of the slide with each nucleus of ``parquet`` outlined -> PNG at ``path``.

    The PNG is at ``overlay_mpp`` um/px; level-0 px (the table's coordinates) map to PNG
    px by ``mpp_x / png_mpp``.
    """
    info = reader.info
    mpp = overlay_mpp(info.width * info.mpp_x, info.height * info.mpp_y, max_px, min_mpp)
    img = Image.fromarray(reader.thumbnail(mpp))
    draw_outlines(img, parquet_rings(parquet, info.mpp_x / mpp))
    return save_png(img, Path(path))


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
