"""Tissue detection: synthetic thumbnails whose answer you can see, then real slides."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nucleiflow.pipeline.slide.reader import ArraySlide, open_slide
from nucleiflow.pipeline.tiles.plan import TilePlan, plan_tiles
from nucleiflow.pipeline.outputs.overlays import overlay_png
from nucleiflow.pipeline.slide.tissue import TissueMask, detect_tissue, tissue_mask

GLASS = (242, 240, 245)
PINK = (222, 140, 190)  # eosin-rich tissue
PURPLE = (150, 90, 170)  # hematoxylin-rich tissue
BLUE_INK = (40, 70, 170)
OVERLAYS = Path("/tmp/overlays")


def scene(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    """Glass with a little JPEG-like noise: (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float32)
    img[:] = GLASS
    img += rng.normal(0, 2.0, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def paint(img: np.ndarray, where: np.ndarray, colour, seed: int = 1, sd: float = 6.0) -> None:
    noise = np.random.default_rng(seed).normal(0, sd, (int(where.sum()), 3))
    img[where] = (np.array(colour) + noise).clip(0, 255).astype(np.uint8)


def disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# --- Synthetic ---------------------------------------------------------------------

def test_glass_only_gives_an_empty_mask():
    for seed in range(3):
        assert tissue_mask(scene(seed=seed), mpp=8.0).mean() < 0.01
    flat = np.full((50, 60, 3), 255, np.uint8)
    assert not tissue_mask(flat, mpp=8.0).any()


def test_pink_blob_on_glass_is_found():
    img = scene()
    blob = disk(120, 160, 60, 70, 30)
    paint(img, blob, PINK)
    paint(img, disk(120, 160, 60, 70, 12), PURPLE, seed=2)
    mask = tissue_mask(img, mpp=8.0)
    assert mask.dtype == bool and mask.shape == (120, 160)
    assert iou(mask, blob) > 0.9


def test_tissue_only_is_all_tissue():
    img = scene()
    paint(img, np.ones(img.shape[:2], bool), PINK)
    paint(img, disk(120, 160, 60, 80, 40), PURPLE, seed=2)  # Otsu would split pink from purple
    assert tissue_mask(img, mpp=8.0).mean() > 0.98


def test_black_border_and_blue_pen_are_not_tissue():
    img = scene()
    blob = disk(120, 160, 60, 90, 30)
    paint(img, blob, PINK)
    border = np.zeros((120, 160), bool)
    border[:, :12] = True
    # Near-black with a purple cast: saturation ~0.3 and a tissue hue, so only "dark" rules it out.
    paint(img, border, (26, 22, 32), seed=3, sd=1.0)
    pen = np.zeros((120, 160), bool)
    for x in range(20, 150):  # a 5-px wide diagonal stroke across glass and tissue
        y = int(10 + 0.6 * (x - 20))
        pen[y:y + 5, x] = True
    pen[20:110, 90:92] = True  # and a fine 16-um line through the tissue: closing bridges it
    paint(img, pen, BLUE_INK, seed=4)
    mask = tissue_mask(img, mpp=8.0)
    assert not mask[border].any()
    assert not mask[pen].any()
    assert iou(mask, blob & ~pen) > 0.85


def test_green_pen_on_glass_is_not_tissue():
    img = scene()
    paint(img, disk(120, 160, 40, 40, 20), (40, 150, 80))
    paint(img, disk(120, 160, 80, 110, 25), PINK, seed=2)
    mask = tissue_mask(img, mpp=8.0)
    assert not mask[disk(120, 160, 40, 40, 22)].any()
    assert mask[disk(120, 160, 80, 110, 20)].all()


def test_sizes_are_in_um():
    """A ~1300 um^2 speck is dust and a ~3200 um^2 glass hole in tissue is filled, at any mpp."""
    img = scene()
    speck = disk(120, 160, 20, 20, 2.5)  # ~20 px at 8 um/px
    paint(img, speck, PINK)
    tissue = disk(120, 160, 70, 100, 35)
    paint(img, tissue, PINK, seed=2)
    hole = disk(120, 160, 70, 100, 4)  # ~50 px
    img[hole] = GLASS
    for mpp, up in ((8.0, 1), (4.0, 2)):  # the same scene with 4x the pixels
        fine = img.repeat(up, 0).repeat(up, 1)
        mask = tissue_mask(fine, mpp=mpp)[::up, ::up]
        assert not mask[speck].any() and mask[hole].all(), mpp
        assert iou(mask, tissue) > 0.95
    kept = tissue_mask(img, mpp=8.0, min_object_um2=500, max_hole_um2=500)
    assert kept[speck].any() and not kept[70, 100]  # hole centre stays glass


# --- Real slides -------------------------------------------------------------------

def save_overlay(reader, tissue: TissueMask, name: str, mpp: float, png_mpp: float) -> TilePlan:
    """Plan 512-px tiles at ``mpp`` over the tissue; draw them on a PNG at ``png_mpp`` um/px."""
    i = reader.info
    plan = plan_tiles(i.width, i.height, i.mpp_x, mpp, tile_size=512, halo=32,
                      tissue=tissue.mask, tissue_mpp=tissue.mpp)
    out = overlay_png(reader, tissue, plan, OVERLAYS / f"{name}.png", mpp=png_mpp)
    img = np.asarray(Image.open(out))
    assert img.shape == reader.thumbnail(png_mpp).shape
    return plan


def skips_glass(plan: TilePlan) -> bool:
    return 0 < len(plan) < plan.grid_shape[0] * plan.grid_shape[1]


def test_cmu_tissue_fraction(cmu_slide):
    with open_slide(cmu_slide) as r:
        t = detect_tissue(r, mpp=8.0)
        assert t.mask.shape == r.thumbnail(8.0).shape[:2]
        assert 0.2 < t.fraction < 0.5, t.fraction  # about 2/3 of the region is glass
        assert skips_glass(save_overlay(r, t, "cmu", mpp=0.5, png_mpp=2.0))


def test_tcga_tissue_fraction(tcga_slide):
    with open_slide(tcga_slide, mpp=2.0) as r:
        t = detect_tissue(r, mpp=16.0)
        assert 0.4 < t.fraction < 0.7, t.fraction  # a whole section, ~41% glass around it
        assert skips_glass(save_overlay(r, t, "tcga", mpp=4.0, png_mpp=8.0))


@pytest.fixture(scope="session")
def mosaic(shared_data, mosaic_tool, tmp_path_factory) -> tuple[Path, dict]:
    """A 3x2-cell (3000x2000 px, 0.25 um/px) mosaic slide of MoNuSeg test tiles, ~1 s to build."""
    tool = mosaic_tool
    out = tmp_path_factory.mktemp("mosaic") / "m"
    subprocess.run([sys.executable, str(tool), str(shared_data / "monuseg"), "--split", "test",
                    "--cols", "3", "--rows", "2", "--tissue", "0.5", "--seed", "1", "--no-labels",
                    "--out", str(out)], check=True, capture_output=True, timeout=120)
    return out.with_suffix(".tiff"), json.loads(out.with_suffix(".json").read_text())


def test_mosaic_tissue_is_where_tiles_were_placed(mosaic):
    path, meta = mosaic
    placed = {(p["row"], p["col"]) for p in meta["placements"]}
    assert 0 < len(placed) < meta["rows"] * meta["cols"]  # both kinds of cells to check
    with open_slide(path) as r:
        t = detect_tissue(r, mpp=8.0)
        cell = meta["cell_px"] * r.info.mpp_x / t.mpp  # cell edge in mask px
        m = 2  # skip the pixels that straddle a cell border
        for row in range(meta["rows"]):
            for col in range(meta["cols"]):
                y0, x0 = math.ceil(row * cell) + m, math.ceil(col * cell) + m
                y1, x1 = math.floor((row + 1) * cell) - m, math.floor((col + 1) * cell) - m
                frac = t.mask[y0:y1, x0:x1].mean()
                if (row, col) in placed:
                    assert frac > 0.9, (row, col, frac)
                else:
                    assert frac < 0.02, (row, col, frac)
        save_overlay(r, t, "mosaic", mpp=0.5, png_mpp=2.0)


def test_detect_tissue_on_an_array_slide():
    img = scene(60, 80)
    paint(img, disk(60, 80, 30, 40, 15), PINK)
    big = np.asarray(Image.fromarray(img).resize((320, 240), Image.Resampling.NEAREST))
    t = detect_tissue(ArraySlide(big, mpp=2.0), mpp=8.0)  # thumbnail = 4x smaller = img
    assert t.mask.shape == (60, 80) and t.mpp == 8.0
    assert iou(t.mask, disk(60, 80, 30, 40, 15)) > 0.85
    assert math.isclose(t.fraction, t.mask.mean())
