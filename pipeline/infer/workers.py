"""What runs inside reader and post-processing worker processes: read a tile's window;
watershed its maps, decide ownership, cut spills and build its nuclei table.

Kept free of torch (and of everything else the model side needs), so each worker process
imports only numpy, scipy, scikit-image, shapely, pydantic and OpenSlide: about 300 MB less
per worker than importing the inference module would cost (tests/infer/test_workers.py).
"""
from __future__ import annotations

import time

import numpy as np

from nucleiflow.pipeline.lifeline import worker_init
from nucleiflow.pipeline.slide.reader import SlideReader
from nucleiflow.pipeline.slide.stain import StainReference, normalise
from nucleiflow.pipeline.tiles.plan import Tile, TilePlan
from nucleiflow.pipeline.config import PostprocessConfig
from nucleiflow.pipeline.postprocess.morphometry import empty_table, nuclei_table
from nucleiflow.pipeline.postprocess.watershed import postprocess as run_postprocess
from nucleiflow.pipeline.tiles.ownership import TileNuclei, own_tile, touches_border

def empty_tile_table(classes: bool = False) -> dict:
    """A no-row table with exactly the columns ``process_tile`` gives (for a slide with no
    tiles: its file must have the batch's schema, or readers of the batch drop columns)."""
    return empty_table(classes=classes, border=True)


def process_tile(tile: Tile, maps: dict[str, np.ndarray], plan: TilePlan, post: PostprocessConfig) -> TileNuclei:
    """Watershed the model maps of one window, then ownership, spills and the polygon table
    (tile-local ids 1..n; the stitcher numbers them in the slide)."""
    t0 = time.perf_counter()
    labels = run_postprocess(maps, post.method, **post.params())
    res = own_tile(tile, labels, maps["prob"], plan)
    window = res.extra.pop("window_labels")
    res.table = nuclei_table(
        window, maps["prob"], mpp0=plan.mpp / plan.scale, offset=(tile.read.x0, tile.read.y0),
        scale=plan.scale, ids=1, type_prob=maps.get("type_prob"),
        border_labels=touches_border(window),
    )
    res.seconds = time.perf_counter() - t0
    return res


# -- reader side (runs in reader processes) -------------------------------------------
_READER: SlideReader | None = None
_STAIN: StainReference | None = None


def _init_reader(reader: SlideReader, stain: dict | None) -> None:
    global _READER, _STAIN
    worker_init()  # Ctrl-C is the owner's to handle; end with the owner (pipeline.lifeline)
    _READER = reader
    _STAIN = StainReference.from_dict(stain) if stain else None


def _read_window(args: tuple[Tile, float, int, float]) -> tuple[Tile, np.ndarray, float]:
    """`read_window` with this reader process's slide handle."""
    assert _READER is not None
    return read_window(_READER, _STAIN, args)


def read_window(
    reader: SlideReader, stain: StainReference | None, args: tuple[Tile, float, int, float]
) -> tuple[Tile, np.ndarray, float]:
    """Read a tile's fixed-size window (core origin - halo, tile_size + 2 halo) at the model mpp."""
    tile, scale, window, mpp = args
    t0 = time.perf_counter()
    x0, y0 = tile.read.x0, tile.read.y0
    # Exact (float) level-0 origin, not rounded: model px k must sample level-0 k * scale in
    # every tile that sees it, or neighbours see the same nucleus up to half a level-0 px
    # apart (seams) and polygons (placed at x0 * scale) drift from the pixels they outline.
    rgb = reader.read(x0 * scale, y0 * scale, window, window, mpp)
    if stain is not None:
        rgb = normalise(rgb, stain)
    return tile, rgb, time.perf_counter() - t0


# -- post-processing side (runs in worker processes) -----------------------------------
_PLAN: TilePlan | None = None
_POST: PostprocessConfig | None = None


def _init_post(plan: TilePlan, post: PostprocessConfig) -> None:
    global _PLAN, _POST
    worker_init()
    _PLAN, _POST = plan, post


def _process(args: tuple[Tile, dict[str, np.ndarray]]) -> TileNuclei:
    assert _PLAN is not None and _POST is not None
    return _process_with(_PLAN, _POST, args)


def _process_with(plan: TilePlan, post: PostprocessConfig, args: tuple[Tile, dict[str, np.ndarray]]) -> TileNuclei:
    tile, maps = args
    return process_tile(tile, maps, plan, post)
