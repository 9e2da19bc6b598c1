"""Seams: two tile sizes and a shifted grid give the same nuclei, with oracle models (see
tests/oracles.py), also under test-time augmentation."""
from __future__ import annotations

import numpy as np
import pytest
from oracles import ORACLE_IMAGE, Dark, Decode, encode_maps, read_png
from polygons import match_rate, max_overlap

from nucleiflow.pipeline.infer.predictor import Predictor
from nucleiflow.pipeline.infer.segment_reader import segment_reader
from nucleiflow.pipeline.slide.reader import ArraySlide
from nucleiflow.pipeline.tiles.plan import plan_tiles
from nucleiflow.pipeline.tiles.stitch import MemoryMerger


# -- seams ----------------------------------------------------------------------------
def segment_memory(reader, predictor, tile, halo, origin=(0, 0)):
    """Polygons (level-0) and stats of one in-memory run with the given grid."""
    info = reader.info
    plan = plan_tiles(info.width, info.height, info.mpp_x, predictor.card.mpp, tile_size=tile, halo=halo,
                      origin=origin)
    polys = []
    stats = segment_reader(reader, plan, predictor, MemoryMerger(plan.height, plan.width),
                           on_tile=lambda tn, off: polys.extend(tn.table["geometry"]))
    return np.array(polys, dtype=object), stats


@pytest.mark.parametrize("oracle, model_mpp, tta", [("hv-maps", 0.25, 1), ("dark-conv", 0.25, 1), ("dark-conv", 0.3, 1),
                                                   ("dark-conv", 0.3, 8)])
def test_seams_two_tile_sizes_and_a_shifted_grid_give_the_same_nuclei(shared_data, oracle, model_mpp, tta):
    # model_mpp 0.3 on a 0.25 um/px slide: 1.2 level-0 px per model px, so tiles start between
    # level-0 pixels (with rounded read origins: 54-69% matched, duplicates). 1.2 is also
    # free of PIL BOX ties (k * 1.2 is never m + 1/2; see test_stitching).
    image = shared_data / "monuseg" / ("labels" if oracle == "hv-maps" else "images") / f"{ORACLE_IMAGE}.png"
    if oracle == "hv-maps":
        reader = ArraySlide(encode_maps(read_png(image).astype(np.int32)), 0.25)
        pred = Predictor(Decode(), {"mpp": model_mpp, "postprocess": {"method": "hv"}}, device="cpu")
    else:
        reader = ArraySlide(read_png(image), 0.25)
        # tta: flipped/rotated views of every tile, turned back and averaged (seams must hold)
        pred = Predictor(Dark(), {"mpp": model_mpp, "postprocess": {"method": "distance"}}, device="cpu", tta=tta)
    base, stats = segment_memory(reader, pred, 256, 64)
    assert stats.tiles == 16 and stats.halo_edge_nuclei == 0 and len(base) > 400
    assert max_overlap(base) <= 0.1, "no duplicates in one run"
    for tile, origin in ((384, (0, 0)), (256, (100, 37))):
        other, stats = segment_memory(reader, pred, tile, 64, origin)
        assert stats.halo_edge_nuclei == 0
        rates = match_rate(base, other), match_rate(other, base)
        assert min(rates) >= 0.99, f"tile {tile} origin {origin}: matched {rates}"
        assert max_overlap(other) <= 0.1
