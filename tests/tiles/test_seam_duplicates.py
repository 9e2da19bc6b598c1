"""No nucleus twice at a seam, with the real model: two tiles segment a seam nucleus in their
own windows, so both may own it (CMU-1-Small-Region, default options: a 191 px nucleus above
model row 1024 wholly contained a 146 px one below it, and the raster cut it in two).

Real slides through OpenSlide, the bundled `student` model, the production stitcher."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from polygons import overlaps

from nucleiflow.pipeline.config import DEFAULT_HALO, DEFAULT_TILE, TISSUE_MPP
from nucleiflow.pipeline.infer.predictor import load_predictor
from nucleiflow.pipeline.infer.segment_reader import segment_reader
from nucleiflow.pipeline.slide.reader import open_slide
from nucleiflow.pipeline.slide.tissue import detect_tissue
from nucleiflow.pipeline.tiles.plan import plan_slide, plan_tiles
from nucleiflow.pipeline.tiles.stitch import MemoryMerger


def student_mpp() -> float:
    """The bundled student's mpp (its card's): the grid the slide is planned on."""
    return load_predictor("student", device="cpu").card.mpp


def run(reader, plan) -> tuple[pd.DataFrame, np.ndarray]:
    merger = MemoryMerger(plan.height, plan.width)
    stats = segment_reader(reader, plan, load_predictor("student", device="cpu"), merger, readers=0, workers=0)
    table = merger.close()
    assert len(table) == stats.nuclei and (table["nucleus_id"].sort_values().to_numpy()
                                           == np.arange(1, stats.nuclei + 1)).all(), "ids stay 1..n"
    return table, merger.labels


def test_cmu_default_options_give_every_nucleus_once(cmu_slide):
    with open_slide(cmu_slide) as reader:
        plan = plan_slide(reader.info, detect_tissue(reader, mpp=TISSUE_MPP), student_mpp(), tile_size=DEFAULT_TILE,
                          halo=DEFAULT_HALO)
        table, _ = run(reader, plan)
    ov = overlaps(table.geometry.values)
    print(f"CMU-1: {len(table)} nuclei, largest overlap {ov.max():.3f} of the smaller")
    assert ov.max() <= 0.1


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory, shared_data, mosaic_tool) -> Path:
    out = tmp_path_factory.mktemp("mosaic") / "test-2x2"
    subprocess.run([sys.executable, str(mosaic_tool), str(shared_data / "monuseg"), "--split", "test",
                    "--cols", "2", "--rows", "2", "--tissue", "1", "--seed", "5", "--no-labels", "--out", str(out)],
                   check=True, capture_output=True)
    return out.with_suffix(".tiff")


@pytest.mark.parametrize("tile, origin", [(256, (0, 0)), (384, (0, 0)), (256, (100, 37))])
def test_mosaic_tiled_three_ways_has_no_nucleus_twice(mosaic, tile, origin):
    with open_slide(mosaic) as reader:
        info = reader.info
        plan = plan_tiles(info.width, info.height, info.mpp_x, student_mpp(), tile_size=tile, halo=DEFAULT_HALO, origin=origin)
        table, _ = run(reader, plan)
    ov = overlaps(table.geometry.values)
    print(f"mosaic tile {tile} origin {origin}: {len(plan)} tiles, {len(table)} nuclei, largest overlap {ov.max():.3f}")
    assert len(table) > 300 and ov.max() <= 0.1
