"""Accuracy at slide scale: a mosaic slide of MoNuSeg test tiles, segmented as a whole slide
with the bundled default model, scores like `evaluate` on the same tiles (within 0.02 AJI)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from nucleiflow.models.checkpoint import load_checkpoint
from nucleiflow.pipeline.config import SegmentConfig
from nucleiflow.pipeline.train.evaluation import evaluate
from nucleiflow.pipeline.infer.predictor import Predictor
from nucleiflow.pipeline.batch.manifest import SlideJob
from nucleiflow.pipeline.train.metrics import aji
from nucleiflow.pipeline.postprocess.labels import resample_nearest
from nucleiflow.pipeline.batch.run_slide import segment_slide


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory, shared_data, mosaic_tool) -> Path:
    out = tmp_path_factory.mktemp("mosaic") / "test-3x2"
    tool = mosaic_tool
    subprocess.run(
        [sys.executable, str(tool), str(shared_data / "monuseg"), "--split", "test", "--cols", "3", "--rows", "2",
         "--tissue", "0.7", "--seed", "3", "--quality", "95", "--out", str(out)],
        check=True, capture_output=True,
    )
    return out


def test_mosaic_matches_evaluate_on_the_same_tiles(mosaic: Path, shared_data: Path, tmp_path: Path):
    meta = json.loads(mosaic.with_suffix(".json").read_text())
    net, card = load_checkpoint("student")
    predictor = Predictor(net, card, device="cpu")
    cfg = SegmentConfig(tile_size=512, halo=64, readers=0, workers=0)
    rec = segment_slide(SlideJob(str(mosaic.with_suffix(".tiff")), "mosaic"), tmp_path, cfg, predictor, "h",
                        log=lambda m: None)
    labels = zarr.open_group(str(tmp_path / "mosaic" / "masks.ome.zarr"), mode="r")["labels/nuclei/0"][:]
    truth = tifffile.imread(str(mosaic) + ".labels.tiff")
    pred = resample_nearest(labels, truth.shape[0], truth.shape[1], card["mpp"] / rec["slide"]["mpp_x"])
    cell = meta["cell_px"]
    per_cell = {}
    for p in meta["placements"]:
        sl = np.s_[p["row"] * cell : (p["row"] + 1) * cell, p["col"] * cell : (p["col"] + 1) * cell]
        per_cell.setdefault(p["tile"], []).append(aji(truth[sl], pred[sl]))
    names = sorted(per_cell)
    ref = evaluate(predictor, shared_data / "monuseg", split="test", names=names)
    slide_aji = float(np.mean([np.mean(v) for v in per_cell.values()]))
    tile_aji = ref["mean"]["aji"]
    print(f"slide-scale AJI {slide_aji:.4f} vs evaluate {tile_aji:.4f} on {names}")
    assert rec["nuclei"] > 0.5 * meta["n_nuclei"]
    assert abs(slide_aji - tile_aji) <= 0.02
