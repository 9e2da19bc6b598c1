"""Tile -> stitch on synthetic and ground-truth inputs: the stitched rasters equal the input.

* An identity "model" (prob = red channel / 255) through the real reader -> model ->
  post-process stream and LabelStitcher gives back the red channel exactly, for slide sizes
  the tile size does not divide, inline and with reader / post-processing process pools.
* Tiled reads at a model mpp that is not the slide's equal one read of the whole slide.
* MoNuSeg ground-truth labels, cut into the pipeline's tile windows and passed through
  ownership (`own_tile`) and the stitcher as if they were post-processed labels, come back
  as the same instances (up to a relabelling), numbered in tile order, also with holes in
  the plan (spills painted into unplanned chunks) and halos larger than a tile.
* Nuclei end at the slide's edge; two inline streams in one process do not mix.
"""
from __future__ import annotations

import numpy as np
import pytest
import shapely
import torch
from PIL import Image

from nucleiflow.pipeline.config import DistancePostprocess
from nucleiflow.pipeline.infer.predictor import Predictor
from nucleiflow.pipeline.infer.stream import stream_tiles
from nucleiflow.pipeline.slide.reader import ArraySlide
from nucleiflow.pipeline.tiles.stitch import LabelStitcher, MemoryMerger
from nucleiflow.pipeline.tiles.plan import Box, TilePlan, plan_tiles
from nucleiflow.pipeline.tiles.ownership import own_tile

MPP = 0.5
DISTANCE = DistancePostprocess(method="distance")
GT_NAME = "TCGA-2Z-A9J9-01A-01-TS1"  # MoNuSeg test image; largest nucleus 46 px across


class RedLogit(torch.nn.Module):
    """Identity "model": the nucleus probability is the red channel (sigmoid(logit(r)) = r)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mask": torch.logit(x[:, :1].double()).float()}


def predictor(**post) -> Predictor:
    card = {"mpp": MPP, "postprocess": {"method": "distance", **post}}
    return Predictor(RedLogit(), card, device="cpu")


def stitch(reader, plan, pred, **kw):
    """Run the real stream + stitcher into memory; returns (store, tile results)."""
    store = MemoryMerger(plan.height, plan.width)
    stitcher = LabelStitcher(plan, store)
    results = []
    for tn in stream_tiles(reader, plan, pred, pred.card.postprocess, batch_size=3, **kw):
        stitcher.add(tn)
        results.append(tn)
    return store, results


@pytest.fixture(scope="module")
def he_crop(shared_data) -> np.ndarray:
    """A 530 x 700 crop of a real H&E image with the red channel inverted (nuclei bright)."""
    rgb = np.array(Image.open(shared_data / "monuseg" / "images" / f"{GT_NAME}.png").convert("RGB"))
    crop = rgb[100:630, 150:850].copy()
    crop[..., 0] = 255 - crop[..., 0]
    return crop


@pytest.fixture(scope="module")
def gt_labels(shared_data) -> np.ndarray:
    return np.array(Image.open(shared_data / "monuseg" / "labels" / f"{GT_NAME}.png")).astype(np.int32)


@pytest.mark.parametrize(
    "shape, tile, halo, origin",
    [((530, 700), 128, 16, (0, 0)), ((257, 333), 100, 7, (13, 71)), ((64, 65), 64, 30, (0, 0)),
     ((100, 150), 32, 0, (0, 0))],
)
def test_identity_model_returns_the_red_channel_exactly(shape, tile, halo, origin):
    img = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    img[:5, :5, 0] = [0, 255, 1, 254, 128]  # the extremes survive logit/sigmoid and rounding
    plan = plan_tiles(shape[1], shape[0], MPP, MPP, tile_size=tile, halo=halo, origin=origin)
    assert shape[1] % tile, "the tile size does not divide the slide"
    store, results = stitch(ArraySlide(img, MPP), plan, predictor(prob_threshold=2.0), readers=0, workers=0)
    np.testing.assert_array_equal(store.prob, img[..., 0])
    assert [r.tile.index for r in results] == list(range(len(plan)))
    assert not store.labels.any()  # threshold 2: no foreground, so no nuclei


def test_process_pools_give_the_inline_result(he_crop):
    # Real nucleus-like blobs, so labels, spills and tables are not trivial.
    plan = plan_tiles(700, 530, MPP, MPP, tile_size=128, halo=16)
    reader = ArraySlide(he_crop, MPP)
    pred = predictor(prob_threshold=0.6, min_size=10)
    inline, tiles0 = stitch(reader, plan, pred, readers=0, workers=0)
    pooled, tiles1 = stitch(reader, plan, pred, readers=1, workers=1)
    np.testing.assert_array_equal(inline.prob, he_crop[..., 0])
    np.testing.assert_array_equal(pooled.prob, inline.prob)
    assert inline.labels.max() > 50, "the blobs give many nuclei"
    np.testing.assert_array_equal(pooled.labels, inline.labels)
    for a, b in zip(tiles0, tiles1, strict=True):
        assert a.n == b.n and len(a.spills) == len(b.spills)
        np.testing.assert_array_equal(a.table["nucleus_id"], b.table["nucleus_id"])
        np.testing.assert_array_equal(a.table["centroid_x"], b.table["centroid_x"])


@pytest.mark.parametrize(
    "scale", [1.3717, 2.0, 0.7, 0.9983]
)
def test_tiles_read_like_one_whole_read_at_any_scale(he_crop, scale):
    # The stitched prob raster of tiled reads equals one read of the whole slide at the model
    # mpp: every tile samples the same level-0 positions, whatever its offset (with origins
    # rounded to whole level-0 px, 1.3717 differed by up to 67 grey levels). The scales avoid
    # k * scale = m + 1/2 for the k here: there PIL's BOX filter has a level-0 pixel exactly on
    # the edge of two output pixels, and float rounding of the window offset picks the side.
    img = np.ascontiguousarray(he_crop[:300, :400])
    reader = ArraySlide(img, MPP / scale)
    plan = plan_tiles(400, 300, MPP / scale, MPP, tile_size=64, halo=8)
    store, _ = stitch(reader, plan, predictor(prob_threshold=2.0), readers=0, workers=0)
    whole = reader.read(0, 0, plan.width, plan.height, plan.mpp)[..., 0]
    # The outer ring differs by design: one read stops at the slide edge, tiles see white past it.
    # PIL resamples in two uint8 passes: up to 1 grey level of rounding each.
    diff = np.abs(store.prob.astype(int) - whole.astype(int))[1:-1, 1:-1]
    assert diff.max() <= 2, f"tiles and a whole read differ by up to {diff.max()} grey levels"
    assert diff.mean() < 0.2


# -- ground-truth labels through ownership and the stitcher ------------------------------
def windows(labels: np.ndarray, plan: TilePlan):
    """Each tile's window as the pipeline reads it: (W, W) from the read box origin, 0 outside."""
    w = plan.tile_size + 2 * plan.halo
    pad = w + plan.tile_size
    padded = np.pad(labels, pad)
    for t in plan:
        y0, x0 = t.read.y0 + pad, t.read.x0 + pad
        yield t, padded[y0 : y0 + w, x0 : x0 + w]


def centroids(labels: np.ndarray) -> dict[int, tuple[float, float]]:
    """{label: (x, y)} mean pixel centres."""
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    n = np.bincount(lab)
    cx, cy = np.bincount(lab, xs + 0.5) / np.maximum(n, 1), np.bincount(lab, ys + 0.5) / np.maximum(n, 1)
    return {int(i): (cx[i], cy[i]) for i in np.flatnonzero(n)}


def assert_same_instances(a: np.ndarray, b: np.ndarray) -> None:
    """``a`` and ``b`` have the same background and a one-to-one map between their ids."""
    np.testing.assert_array_equal(a > 0, b > 0)
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1], "an id of the first maps to several of the second"
    assert len(np.unique(pairs[1])) == pairs.shape[1], "an id of the second maps to several of the first"


class CountingChunks(MemoryMerger):
    """MemoryMerger that records which cells were read back (read-modify-write of spills)."""

    def __init__(self, plan: TilePlan) -> None:
        super().__init__(plan.height, plan.width)
        self.plan, self.reread = plan, []

    def read_labels(self, box: Box):
        self.reread.append(box)
        return super().read_labels(box)


def stitch_labels(gt: np.ndarray, plan: TilePlan, order=None):
    store = CountingChunks(plan)
    stitcher = LabelStitcher(plan, store)
    tiles = list(windows(gt, plan))
    offsets = {}
    for i in order if order is not None else range(len(tiles)):
        tile, win = tiles[i]
        prob = (win > 0).astype(np.float32)
        tn = own_tile(tile, win, prob, plan)
        offsets[tile.index] = (stitcher.add(tn), tn.n)
        assert tn.n_halo_edge == 0, "the halo is larger than any nucleus"
        c = tile.core
        np.testing.assert_array_equal(store.prob[c.y0 : c.y1, c.x0 : c.x1], np.where(gt[c.y0 : c.y1, c.x0 : c.x1] > 0, 255, 0))
    return store, offsets


@pytest.mark.parametrize(
    "tile, halo, origin, shuffle",
    [(128, 48, (0, 0), False), (96, 50, (0, 0), False), (200, 64, (37, 81), False), (64, 47, (5, 60), False),
     (48, 60, (11, 29), False), (128, 48, (0, 0), True)],
)
def test_ground_truth_labels_stitch_back_to_themselves(gt_labels, tile, halo, origin, shuffle):
    gt = gt_labels[150:680, 100:800]  # 530 x 700: no tile size here divides it
    plan = plan_tiles(700, 530, MPP, MPP, tile_size=tile, halo=halo, origin=origin)
    order = np.random.default_rng(0).permutation(len(plan)) if shuffle else None
    store, offsets = stitch_labels(gt, plan, order)
    assert_same_instances(store.labels, gt)
    n = len(np.unique(gt[gt > 0]))
    np.testing.assert_array_equal(np.unique(store.labels[store.labels > 0]), np.arange(1, n + 1))
    # Ids follow the order tiles were processed: each tile's nuclei are offset + 1..n, and
    # the tile owning an id is the one whose core holds the nucleus' centroid.
    for lab, (x, y) in centroids(store.labels).items():
        owner = plan.owner(x, y)
        off, count = offsets[owner.index]
        assert off < lab <= off + count
    assert store.reread, "some spills went into chunks written before"


def test_spills_paint_written_and_unplanned_chunks(gt_labels):
    gt = gt_labels[150:680, 100:800]
    tissue = np.ones((6, 8), bool)  # one mask px = one 96 px cell (tissue_mpp = 96 * MPP)
    tissue[1, 2] = tissue[3, 4] = tissue[4, 0] = tissue[0, 5] = False
    plan = plan_tiles(700, 530, MPP, MPP, tile_size=96, halo=50, tissue=tissue, tissue_mpp=96 * MPP)
    holes = [(1, 2), (3, 4), (4, 0), (0, 5)]
    assert not any(plan.is_planned(*c) for c in holes) and len(plan) == 6 * 8 - 4
    store, _ = stitch_labels(gt, plan)
    # Expected: exactly the nuclei whose centroid lies in a planned core, whole.
    kept = np.zeros(gt.max() + 1, bool)
    for lab, (x, y) in centroids(gt).items():
        kept[lab] = plan.owner(x, y) is not None
    expected = np.where(kept[gt], gt, 0)
    assert_same_instances(store.labels, expected)
    for r, c in holes:
        b = plan.cell_box(r, c)
        spilt = store.labels[b.y0 : b.y1, b.x0 : b.x1]
        assert spilt.any(), f"neighbours' nuclei spill into unplanned cell {(r, c)}"
        assert not store.prob[b.y0 : b.y1, b.x0 : b.x1].any()
    reread = {(b.y0 // 96, b.x0 // 96) for b in store.reread}
    assert set(holes) <= reread, "unplanned cells are painted by read-modify-write"
    assert reread - set(holes), "and so are planned cells written before"


def test_spills_reach_every_cell_the_window_covers():
    # A halo larger than the tile: an owned nucleus may reach two cells away.
    plan = plan_tiles(60, 20, MPP, MPP, tile_size=10, halo=15)
    tile = next(t for t in plan if (t.row, t.col) == (0, 2))
    w = plan.tile_size + 2 * plan.halo
    win = np.zeros((w, w), np.int32)
    win[15:25, 2:38] = 1  # window x 2..38 -> slide x 7..43: cells 0 to 4; centroid 25 in cell 2
    owned = own_tile(tile, win, np.ones((w, w), np.float32), plan)
    assert owned.n == 1 and owned.n_halo_edge == 0
    got = {s.cell: s.box for s in owned.spills}
    # Spill boxes are cell & window (model px); the window is [5, 45) x [-15, 25).
    assert got == {(0, 0): Box(5, 0, 10, 10), (0, 1): Box(10, 0, 20, 10), (0, 3): Box(30, 0, 40, 10),
                   (0, 4): Box(40, 0, 45, 10)}
    store = MemoryMerger(plan.height, plan.width)
    stitcher = LabelStitcher(plan, store)
    for t in plan:
        if t.index == tile.index:
            stitcher.add(owned)
        else:
            stitcher.add(own_tile(t, np.zeros((w, w), np.int32), np.zeros((w, w), np.float32), plan))
    expected = np.zeros((20, 60), np.int32)
    expected[0:10, 7:43] = 1
    np.testing.assert_array_equal(store.labels, expected)


def test_spills_of_a_small_core_reach_past_its_read_box():
    # Shifted grid: cell 0 is [0, 3) wide, so its window [-4, 14) reaches past its read box
    # [-4, 7). An owned nucleus with a long tail is counted whole in the table: the raster
    # must hold it whole too (it does not touch the window border, so nothing warns).
    plan = plan_tiles(30, 10, MPP, MPP, tile_size=10, halo=4, origin=(3, 0))
    nucleus = np.zeros((10, 30), np.int32)
    nucleus[0:10, 0:3] = 1
    nucleus[0, 3:11] = 1  # centroid x = (30 * 1.5 + 8 * 7) / 38 = 2.66 < 3: owned by cell 0
    store = MemoryMerger(plan.height, plan.width)
    stitcher = LabelStitcher(plan, store)
    for tile, win in windows(nucleus, plan):
        tn = own_tile(tile, win, (win > 0).astype(np.float32), plan)
        assert tn.n == (tile.col == 0) and tn.n_halo_edge == 0
        stitcher.add(tn)
    np.testing.assert_array_equal(store.labels, nucleus)


def test_two_inline_streams_in_one_process_stay_apart():
    # Interleaved, as two slides in threads of one process would be: neither may read the
    # other's slide or use the other's plan.
    rng = np.random.default_rng(5)
    imgs = [rng.integers(0, 256, (150, 170, 3), dtype=np.uint8), rng.integers(0, 256, (90, 210, 3), dtype=np.uint8)]
    plans = [plan_tiles(170, 150, MPP, MPP, tile_size=64, halo=8), plan_tiles(210, 90, MPP, MPP, tile_size=48, halo=5)]
    pred = predictor(prob_threshold=2.0)
    stores = [MemoryMerger(p.height, p.width) for p in plans]
    stitchers = [LabelStitcher(p, s) for p, s in zip(plans, stores)]
    streams = [iter(stream_tiles(ArraySlide(im, MPP), p, pred, pred.card.postprocess, batch_size=1,
                                 readers=0, workers=0)) for im, p in zip(imgs, plans)]
    live = [0, 1]
    while live:
        for k in list(live):
            tn = next(streams[k], None)
            if tn is None:
                live.remove(k)
            else:
                stitchers[k].add(tn)
    for im, store in zip(imgs, stores):
        np.testing.assert_array_equal(store.prob, im[..., 0])


def test_nuclei_end_at_the_slide_edge_in_table_and_raster():
    # A blob the model paints across the slide's right edge (onto the reader's white glass):
    # its row and polygon describe only the pixels inside the slide, which the raster holds.
    from skimage.draw import disk

    from nucleiflow.pipeline.infer.workers import process_tile

    plan = plan_tiles(100, 60, MPP, MPP, tile_size=64, halo=16)
    tile = next(t for t in plan if (t.row, t.col) == (0, 1))  # core [64, 100), window x [48, 144)
    w = plan.tile_size + 2 * plan.halo
    prob = np.zeros((w, w), np.float32)
    prob[disk((16 + 30, 95 - 48), 10, shape=prob.shape)] = 1.0  # centre (95, 30), reaches x = 105
    tn = process_tile(tile, {"prob": prob}, plan, DISTANCE)
    assert tn.n == 1
    inside = np.zeros((60, 100), np.int32)
    inside[disk((30, 95), 10, shape=inside.shape)] = 1
    assert tn.table["area_px"][0] == inside.sum()
    assert shapely.bounds(tn.table["geometry"][0])[2] <= 100
    store = MemoryMerger(plan.height, plan.width)
    stitcher = LabelStitcher(plan, store)
    for t in plan:
        stitcher.add(tn if t.index == tile.index else
                     process_tile(t, {"prob": np.zeros((w, w), np.float32)}, plan, DISTANCE))
    np.testing.assert_array_equal(store.labels, inside)


def test_own_tile_with_the_callers_moments_is_the_same():
    from nucleiflow.pipeline.postprocess.morphometry import moments

    plan = plan_tiles(60, 20, MPP, MPP, tile_size=10, halo=15)
    tile = next(t for t in plan if (t.row, t.col) == (0, 2))
    w = plan.tile_size + 2 * plan.halo
    win = np.zeros((w, w), np.int32)
    win[15:25, 2:38], win[16:20, 18:22], win[3:6, 30:33] = 1, 2, 3  # 3 is past the slide's top edge
    prob = np.linspace(0, 1, w * w, dtype=np.float32).reshape(w, w)
    plain = own_tile(tile, win, prob, plan)
    from nucleiflow.pipeline.tiles.ownership import inside_slide

    inside = inside_slide(win, tile, plan)
    given = own_tile(tile, inside, prob, plan, sums=moments(inside))
    assert plain.n == given.n == 2
    np.testing.assert_array_equal(plain.core_labels, given.core_labels)
    np.testing.assert_array_equal(plain.areas, given.areas)
    assert [(s.cell, s.box) for s in plain.spills] == [(s.cell, s.box) for s in given.spills]
    # With the object pixels too: the same window, and its own pixels and owned labels.
    fg = np.flatnonzero(inside)
    sums = moments(inside)
    pixeled = own_tile(tile, inside, prob, plan, sums=sums, pixels=(fg, inside.ravel()[fg]))
    window = pixeled.extra["window_labels"]
    np.testing.assert_array_equal(window, plain.extra["window_labels"])
    wfg, wlab = pixeled.extra["window_pixels"]
    np.testing.assert_array_equal(wfg, np.flatnonzero(window))
    np.testing.assert_array_equal(wlab, window.ravel()[wfg])
    np.testing.assert_array_equal(sums[0][pixeled.extra["owned"]], [1, 2])


def test_inside_slide_pixels_keeps_the_object_pixels_inside():
    from nucleiflow.pipeline.tiles.ownership import inside_slide, inside_slide_pixels

    plan = plan_tiles(60, 20, MPP, MPP, tile_size=10, halo=15)
    w = plan.tile_size + 2 * plan.halo
    rng = np.random.default_rng(0)
    win = (rng.integers(0, 5, (w, w)) * (rng.random((w, w)) < 0.4)).astype(np.int32)
    for tile in plan:  # edge tiles are clipped on one or two sides, inner ones not at all
        fg = np.flatnonzero(win)
        labels, got_fg, got_lab = inside_slide_pixels(win.copy(), fg, win.ravel()[fg], tile, plan)
        want = inside_slide(win, tile, plan)
        np.testing.assert_array_equal(labels, want)
        np.testing.assert_array_equal(got_fg, np.flatnonzero(want))
        np.testing.assert_array_equal(got_lab, want.ravel()[got_fg])


def test_own_tile_prob_is_the_rounded_clipped_uint8_core():
    """The core's probability as uint8: rint(prob * 255) clipped to 0..255, out-of-range and
    half-way values included, for float32 and float64 maps."""
    plan = plan_tiles(64, 64, MPP, MPP, tile_size=32, halo=8)
    tile = next(iter(plan))
    rng = np.random.default_rng(8)
    for dtype in (np.float32, np.float64):
        prob = rng.uniform(-0.2, 1.2, (48, 48)).astype(dtype)
        prob[10, 10], prob[11, 11] = 0.5 / 255, 2.5 / 255  # ties round to even
        got = own_tile(tile, np.zeros((48, 48), np.int32), prob, plan).prob
        core = prob[8:40, 8:40]
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, np.clip(np.rint(core * 255), 0, 255).astype(np.uint8))
