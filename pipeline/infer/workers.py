"""What runs inside reader and post-processing worker processes: read a tile's window;
watershed its maps, decide ownership, cut spills and build its nuclei table.

Kept free of torch (and of everything else the model side needs), so each worker process
imports only numpy, scipy, scikit-image, shapely, pydantic and OpenSlide: about 300 MB less
per worker than importing the inference module would cost (tests/infer/test_workers.py).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nucleiflow.pipeline.slide.reader import SlideReader
from nucleiflow.pipeline.slide.stain import StainReference, normalise
from nucleiflow.pipeline.tiles.plan import Box, Tile, TilePlan
from nucleiflow.pipeline.config import PostprocessConfig
from nucleiflow.pipeline.postprocess.labels import object_pixels
from nucleiflow.pipeline.postprocess.morphometry import empty_table, moments, nuclei_table, pixel_moments
from nucleiflow.pipeline.postprocess.watershed import mask_threshold, postprocess_pixels as run_postprocess
from nucleiflow.pipeline.postprocess.plausible import implausible
from nucleiflow.pipeline.tiles.ownership import (TileNuclei, centroid_in, inside_slide_pixels, own_tile, slide_box,
                                                 touches_border)


def empty_tile_table(classes: bool = False) -> dict:
    """A no-row table with exactly the columns ``process_tile`` gives (for a slide with no
    tiles: its file must have the batch's schema, or readers of the batch drop columns)."""
    return empty_table(classes=classes, border=True)


def process_tile(tile: Tile, maps: dict[str, np.ndarray], plan: TilePlan, post: PostprocessConfig) -> TileNuclei:
    """Watershed the model maps of one window, drop what cannot be a nucleus, then
    ownership, spills and the polygon table (tile-local ids 1..n; the stitcher numbers them
    in the slide). ``maps["rgb"]`` (W, W, 3) uint8, the window the model saw, if present,
    lets ink-coloured objects go too."""
    t0 = time.perf_counter()
    # The object pixels (from the watershed) and moments once, for the rules, the ownership
    # test, the owned window and its table (issue 13).
    labels, fg, lab = inside_slide_pixels(*run_postprocess(maps, post.method, **post.params()), tile, plan)
    pixels, sums = (fg, lab), pixel_moments(lab, fg, labels.shape[1], second=True)
    labels, dropped = drop_implausible(labels, tile, plan, maps.get("rgb"), sums=sums[:4])
    if any(dropped.values()):
        pixels, sums = _pixels_and_moments(labels)
    res = own_tile(tile, labels, maps["prob"], plan, sums=sums[:4], pixels=pixels)
    res.dropped = dropped
    window = res.extra.pop("window_labels")
    window_pixels, owned = res.extra.pop("window_pixels"), res.extra.pop("owned")
    # The owned window's labels are 1..k for sums' owned labels in order: the same sums.
    window_sums = (np.arange(1, int(owned.sum()) + 1, dtype=np.int64), *(v[owned] for v in sums[1:]))
    res.table = nuclei_table(
        window, maps["prob"], mpp0=plan.mpp / plan.scale, offset=(tile.read.x0, tile.read.y0),
        scale=plan.scale, ids=1, type_prob=maps.get("type_prob"),
        border_labels=touches_border(window), threshold=mask_threshold(post),
        box=slide_box(tile, plan, window.shape),
        # Every nucleus of the window, the neighbours' too: an outline stops half-way to a
        # nucleus another tile owns, as that tile's outline of it does (no overlap at seams).
        context=labels, pixels=window_pixels, sums=window_sums,
    )
    res.seconds = time.perf_counter() - t0
    return res


def _pixels_and_moments(labels: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]:
    """((raveled indices (n,) ascending, labels (n,)) of the object pixels of ``labels``
    (H, W) int, `morphometry.moments(labels, second=True)`)."""
    fg = object_pixels(labels)
    lab = labels.ravel()[fg]
    return (fg, lab), pixel_moments(lab, fg, labels.shape[1], second=True)


def drop_implausible(
    labels: np.ndarray, tile: Tile, plan: TilePlan, rgb: np.ndarray | None,
    sums: tuple[np.ndarray, ...] | None = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """``labels`` (W, W) of a tile's window without the objects this tile would own that
    `postprocess.plausible.implausible` rejects (off ``plan.region``, too large, ink or
    black), and how many went per reason: the one place objects are dropped. Judging only
    owned objects counts each once in the slide, and an object a neighbour owns is its
    neighbour's to judge (in its own window, where it is whole). ``sums``: `moments(labels)`
    when the caller has them."""
    core = Box(plan.halo, plan.halo, plan.halo + tile.core.width, plan.halo + tile.core.height)
    if sums is None:
        sums = moments(labels)  # once, for the ownership test and the rules
    owned = sums[0][centroid_in(*sums[1:], core)]
    drop = implausible(labels, plan.mpp, rgb=rgb, region=plan.region, offset=(tile.read.x0, tile.read.y0),
                       candidates=owned, sums=sums)
    ids = np.concatenate(list(drop.values()))
    if ids.size:
        labels = np.where(np.isin(labels, ids), 0, labels)
    return labels, {k: int(v.size) for k, v in drop.items()}


# -- what a job carries: the slide or the plan, by key --------------------------------
@dataclass(frozen=True)
class Keyed:
    """A pickled object (a slide reader + stain, or a plan + post-processing) with a key.

    Every job of a slide carries it; a process unpickles ``payload`` only when ``key`` is new
    to it, so one pool serves slide after slide. An `OpenSlideReader` pickles to its path,
    mpp and `SlideInfo` (a few kB; the fingerprint is in the key), so each reader process
    opens a slide's file once, at its first tile.
    """

    key: str
    payload: bytes

    @classmethod
    def of(cls, obj: object) -> Keyed:
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        return cls(hashlib.sha256(payload).hexdigest()[:32], payload)


class _Cache:
    """The last ``size`` objects unpickled from `Keyed` payloads, least recent evicted
    (readers closed) so a long batch does not pile up open slide handles."""

    def __init__(self, size: int, on_evict: Callable[[object], None] | None = None) -> None:
        self.size, self.on_evict, self.items = size, on_evict, OrderedDict()

    def get(self, ref: Keyed) -> object:
        if ref.key in self.items:
            self.items.move_to_end(ref.key)
            return self.items[ref.key]
        obj = self.items[ref.key] = pickle.loads(ref.payload)
        while len(self.items) > self.size:
            _, old = self.items.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(old)
        return obj


# -- reader side (runs in reader processes) -------------------------------------------
def _close_reader(entry: object) -> None:
    entry[0].close()  # type: ignore[index]


_READERS = _Cache(2, on_evict=_close_reader)


def _read_job(args: tuple[Keyed, Tile, float, int, float]) -> tuple[Tile, np.ndarray, float]:
    """`read_window` with this reader process's handle on the job's slide (opened at its
    first tile). The payload is ``(reader, stain card dict or None)``."""
    ref, *job = args
    reader, stain = _READERS.get(ref)  # type: ignore[misc]
    return read_window(reader, stain, tuple(job))  # type: ignore[arg-type]


def slide_ref(reader: SlideReader, stain: dict | None) -> Keyed:
    """The `Keyed` slide every read job of ``reader`` carries."""
    return Keyed.of((reader, StainReference.from_dict(stain) if stain else None))


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
_PLANS = _Cache(4)


def plan_ref(plan: TilePlan, post: PostprocessConfig) -> Keyed:
    """The `Keyed` plan every post-processing job of a slide carries."""
    return Keyed.of((plan, post))


def _post_job(args: tuple[Keyed, Tile, dict[str, np.ndarray]]) -> TileNuclei:
    ref, tile, maps = args
    plan, post = _PLANS.get(ref)  # type: ignore[misc]
    return process_tile(tile, maps, plan, post)


def _process_with(plan: TilePlan, post: PostprocessConfig, args: tuple[Tile, dict[str, np.ndarray]]) -> TileNuclei:
    tile, maps = args
    return process_tile(tile, maps, plan, post)


def warm_up(_: object = None) -> int:
    """A no-op job: a pool has started once it has answered one per process (this
    module, numpy, scipy, scikit-image, shapely and OpenSlide imported). Returns the pid."""
    return os.getpid()
