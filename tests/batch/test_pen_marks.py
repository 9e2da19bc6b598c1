"""Pen marks and a black scanner border beside tissue give no nuclei, and cost no true ones.

The tissue mask chooses tiles, but everything in a chosen tile is segmented: the model
found blobs of 4-6x nuclear size on ink and on the black band. A mosaic of real MoNuSeg
tiles (shared/tools/mosaic_slide.py) is segmented twice through `segment_slide` with the
bundled `student` model, clean and with strokes of blue, green and black marker on the glass
between tissue cells and a black band along two edges.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from slidefiles import draw_pen_and_border, read_level0, write_tiff

from nucleiflow.models.checkpoint import resolve
from nucleiflow.pipeline.batch.manifest import SlideJob
from nucleiflow.pipeline.batch.run_slide import segment_slide
from nucleiflow.pipeline.config import SegmentConfig
from nucleiflow.pipeline.infer.predictor import load_predictor

MPP = 0.5  # the model's: no resampling, so slide px = model px
PAD = 112  # left and bottom: a 64 px (32 um) black band, then 48 px (24 um) of glass before the mosaic
BAND = 64


@pytest.fixture(scope="module")
def slides(tmp_path_factory, shared_data, mosaic_tool) -> tuple[Path, Path, np.ndarray]:
    """(clean slide, inked slide, (h, w) bool mask of the ink and the band)."""
    d = tmp_path_factory.mktemp("pen")
    subprocess.run([sys.executable, str(mosaic_tool), str(shared_data / "monuseg"), "--split", "test",
                    "--cols", "4", "--rows", "3", "--tissue", "0.5", "--seed", "3", "--mpp", str(MPP),
                    "--no-labels", "--out", str(d / "mosaic")], check=True, capture_output=True)
    meta = json.loads((d / "mosaic.json").read_text())
    cell = meta["cell_px"]
    rgb = read_level0(d / "mosaic.tiff")
    glass = np.broadcast_to(np.array([241, 239, 244], np.uint8), (rgb.shape[0] + PAD, rgb.shape[1] + PAD, 3)).copy()
    glass[: rgb.shape[0], PAD:] = rgb
    tissue = {(p["row"], p["col"]) for p in meta["placements"]}
    empty = [(r, c) for r in range(meta["rows"]) for c in range(meta["cols"]) if (r, c) not in tissue]
    assert len(empty) >= 3 and tissue, "the seed gives glass cells to draw on"
    strokes = []
    for k, (r, c) in enumerate(empty):
        x0, y0, m = PAD + c * cell, r * cell, 70  # 35 um from the cell's edges: ink on glass, near tissue
        wave = [(x0 + m + t * (cell - 2 * m) / 8, y0 + cell / 2 + (cell / 2 - m) * np.sin(t + k)) for t in range(9)]
        colour = ("blue", "green", "black")[k % 3]
        strokes.append((colour, [(round(x), round(y)) for x, y in wave], (28, 18, 12)[k % 3]))
    inked, drawn = draw_pen_and_border(glass, strokes, BAND)
    assert drawn.mean() > 0.03
    return write_tiff(d / "clean.tiff", glass, MPP), write_tiff(d / "inked.tiff", inked, MPP), drawn


def segment(path: Path, out: Path) -> tuple[pd.DataFrame, dict]:
    cfg = SegmentConfig(model="student", device="cpu", readers=0, workers=1)
    pred = load_predictor("student", device="cpu")
    rec = segment_slide(SlideJob(str(path), path.stem), out, cfg, pred, "student-test", log=None)
    table = pd.read_parquet(out / "nuclei" / f"slide_id={path.stem}" / "part-0.parquet")
    return table, rec


def test_no_nuclei_on_pen_marks_or_the_black_border_and_none_lost(slides, tmp_path):
    clean, inked, drawn = slides
    assert resolve("student")
    clean_table, _ = segment(clean, tmp_path / "out")
    table, rec = segment(inked, tmp_path / "out")
    near_ink = ndi.binary_dilation(drawn, iterations=4)  # a nucleus' centroid on ink or its soft edge
    cx, cy = table["centroid_x"].to_numpy().astype(int), table["centroid_y"].to_numpy().astype(int)
    on_ink = near_ink[cy, cx]
    print(f"clean {len(clean_table)} nuclei; inked {len(table)}, {on_ink.sum()} on ink/border; "
          f"dropped {rec.get('dropped')}; largest {table['area_um2'].max():.0f} um2")
    assert on_ink.sum() == 0, table[on_ink][["centroid_x", "centroid_y", "area_um2"]].head(10)
    assert abs(len(table) - len(clean_table)) <= 0.01 * len(clean_table)
    assert sum(rec["dropped"].values()) > 0 and set(rec["dropped"]) == {"off_tissue", "too_large", "ink_colour"}
