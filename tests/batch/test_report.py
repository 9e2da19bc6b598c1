"""Batch manifests and the morning-after summary pieces (overlay drawing, summary.csv
numbers, the area plot), on tiny hand-made inputs."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from slidefiles import write_tiff

from nucleiflow.pipeline.batch.manifest import expand_slides, read_manifest
from nucleiflow.pipeline.postprocess.morphometry import nuclei_table
from nucleiflow.pipeline.slide.reader import ArraySlide
from nucleiflow.pipeline.batch.report import area_bins, area_plot, debris_share, slide_row, write_summary, x_label
from nucleiflow.pipeline.outputs.drawing import NUCLEUS, ZOOM_BOX, fill_rings, nice_length, scale_bar
from nucleiflow.pipeline.outputs.overlays import (densest_window, draw_outlines, nuclei_overlay, overlay_mpp,
                                                  parquet_rings)
from nucleiflow.pipeline.outputs.atomic import write_json_atomic
from nucleiflow.pipeline.outputs.geoparquet import GeoParquetWriter
from nucleiflow.pipeline.outputs.layout import slide_paths


# -- manifests -----------------------------------------------------------------------------
def test_manifest_header_bom_blank_lines_and_mpp(tmp_path):
    m = tmp_path / "batch.csv"
    m.write_text("\ufeffPath , MPP,slide_id\n a.svs ,0.25,\n\nsub/b.tiff,,bee\n", encoding="utf-8")
    jobs = read_manifest(m)
    assert [(Path(j.path).relative_to(tmp_path).as_posix(), j.slide_id, j.mpp) for j in jobs] == [
        ("a.svs", "a", 0.25), ("sub/b.tiff", "bee", None)]
    # --mpp fills in only where the manifest has none
    assert [j.mpp for j in expand_slides([str(m)], mpp=0.5)] == [0.25, 0.5]
    m.write_text("path,mpp\na.svs,-1\n")
    with pytest.raises(ValueError, match="batch.csv:2: mpp must be positive"):
        read_manifest(m)


# -- summary pieces --------------------------------------------------------------------------
def square_ring(x0, y0, x1, y1) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], float)


def test_draw_outlines_draws_the_ring_and_leaves_the_inside():
    img = Image.new("RGB", (12, 10), (255, 255, 255))
    assert draw_outlines(img, [square_ring(2, 2, 8, 6), square_ring(10.2, 8.1, 10.4, 8.3)], colour=(255, 0, 0)) == 2
    a = np.array(img)
    red = (a == [255, 0, 0]).all(-1)
    expected = np.zeros((10, 12), bool)
    expected[2, 2:9] = expected[6, 2:9] = expected[2:7, 2] = expected[2:7, 8] = True
    expected[8, 10] = True  # a sub-pixel nucleus is one pixel
    np.testing.assert_array_equal(red, expected)


def tiny_slide_table(tmp_path: Path, sid: str, mpp0: float = 0.5):
    """Two nuclei: 10x10 and 10x20 model px at scale 1 (level-0 = model px)."""
    labels = np.zeros((40, 60), np.int32)
    labels[5:15, 5:15] = 1
    labels[20:30, 30:50] = 2
    table = nuclei_table(labels, np.full(labels.shape, 0.9, np.float32), mpp0=mpp0, scale=1.0, ids=1)
    paths = slide_paths(tmp_path, sid)
    w = GeoParquetWriter(paths["parquet"], {"slide_id": sid})
    w.write(table)
    w.close()
    return paths


def test_parquet_rings_stream_level0_polygons_scaled(tmp_path):
    paths = tiny_slide_table(tmp_path, "s")
    rings = list(parquet_rings(paths["parquet"], 0.5, batch_rows=1))
    assert len(rings) == 2
    lo, hi = rings[1].min(0), rings[1].max(0)
    np.testing.assert_allclose([lo, hi], [[15, 10], [25, 15]], atol=0.6)  # (30..50, 20..30) / 2


def spread_slide_table(tmp_path: Path, sid: str = "s"):
    """A 300 x 400 px slide at 1 um/px: two lone nuclei and a cluster of nine at top right."""
    labels = np.zeros((300, 400), np.int32)
    labels[200:212, 40:52] = 1
    labels[240:252, 100:120] = 2
    for i in range(9):
        y, x = 20 + 14 * (i // 3), 320 + 14 * (i % 3)
        labels[y:y + 10, x:x + 10] = 3 + i
    table = nuclei_table(labels, np.full(labels.shape, 0.9, np.float32), mpp0=1.0, scale=1.0, ids=1)
    paths = slide_paths(tmp_path, sid)
    w = GeoParquetWriter(paths["parquet"], {"slide_id": sid})
    w.write(table)
    w.close()
    return paths


def test_densest_window_finds_the_cluster(tmp_path):
    paths = spread_slide_table(tmp_path)
    x0, y0 = densest_window(paths["parquet"], 400, 300, 100)
    assert x0 <= 320 and x0 + 100 >= 358 and y0 <= 20 and y0 + 100 >= 58  # all nine inside
    assert densest_window(paths["parquet"], 400, 300, 1000) == (0, 0)  # window larger than the slide


def test_fill_rings_is_translucent_with_an_optional_edge():
    img = Image.new("RGB", (20, 20), (120, 40, 140))  # haematoxylin-ish purple
    assert fill_rings(img, [square_ring(4, 4, 14, 14)], alpha=110) == 1
    inside, glass = np.array(img)[9, 9], np.array(img)[1, 1]
    assert (glass == (120, 40, 140)).all()
    assert inside[1] > 40 and inside[2] < 140 and not (inside == NUCLEUS).all()  # tinted, stain still shows
    edged = Image.new("RGB", (20, 20), (120, 40, 140))
    fill_rings(edged, [square_ring(4, 4, 14, 14)], outline=True)
    assert (np.array(edged)[4, 9] == NUCLEUS).all()


def test_scale_bar_length_is_round():
    assert nice_length(57) == 50 and nice_length(0.3) == 0.2 and nice_length(1000) == 1000
    img = Image.new("RGB", (500, 100), "white")
    assert scale_bar(img, 2.0) == 200  # a fifth of 1000 um
    black = np.flatnonzero((np.array(img) == 0).all(-1).any(0))
    assert 95 <= black.max() - black.min() + 1 <= 110  # 100 px bar (label text may widen it a little)


def test_nuclei_overlay_fills_nuclei_and_zooms_on_the_densest_tissue(tmp_path):
    paths = spread_slide_table(tmp_path)
    reader = ArraySlide(np.full((300, 400, 3), 200, np.uint8), mpp=1.0)
    png = nuclei_overlay(reader, paths["parquet"], tmp_path / "s" / "nuclei_overlay.png", min_mpp=1.0,
                         zoom_px=100, zoom_mpp=0.5)
    a = np.array(Image.open(png))
    top, gap = 70, 16
    assert a.shape == (top + 300, 400 + gap + 100, 3)  # title + legend band; whole | zoom
    whole, zoom = a[top:, :400], a[top:top + 100, 400 + gap:]
    assert (whole[205, 45] != 200).any() and whole[205, 45, 2] < whole[205, 45, 0]  # nucleus 1 tinted yellow
    assert (whole[150, 200] == 200).all()  # glass
    boxed = (whole == ZOOM_BOX).all(-1)
    ys, xs = np.nonzero(boxed)
    assert xs.min() >= 250 and ys.max() <= 110  # the zoom box sits on the cluster, not the lone two
    # The zoom (50 um at 0.5 um/px) shows the cluster's nuclei 20 px wide, with yellow edges
    # (about 76 px each): at least four of them.
    assert (zoom == NUCLEUS).all(-1).sum() > 4 * 60
    assert overlay_mpp(100_000, 50_000, max_px=2000) == 50.0 and overlay_mpp(500, 800, min_mpp=1.0) == 1.0


def test_slide_row_density_and_area_quantiles():
    areas = np.arange(1.0, 101.0)
    r = slide_row("s", 100, 2.0, areas)
    assert r["nuclei_per_mm2"] == 50.0 and r["median_area_um2"] == 50.5
    assert r["p10_area_um2"] == pytest.approx(10.9) and r["p90_area_um2"] == pytest.approx(90.1)
    empty = slide_row("blank", 0, 0.0, np.empty(0))
    assert empty["nuclei_per_mm2"] is None and empty["median_area_um2"] is None


def test_write_summary_reads_every_done_slide_and_draws_missing_overlays(tmp_path):
    for sid, tissue in (("a", 0.5), ("b", 0.25)):
        paths = tiny_slide_table(tmp_path, sid)
        slide = tmp_path / f"{sid}.tiff"
        write_tiff(slide, np.full((40, 60, 3), 220, np.uint8), mpp=None)
        write_json_atomic(paths["run_json"], {"slide_id": sid, "status": "done", "nuclei": 2, "tissue_mm2": tissue,
                                              "path": str(slide), "slide": {"mpp_x": 0.5, "mpp_source": "override"}})
    write_json_atomic(tmp_path / "c" / "run.json", {"slide_id": "c", "status": "failed"})
    csv_path, png_path = write_summary(tmp_path, log=pytest.fail)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["slide_id"] for r in rows] == ["a", "b"]
    areas = pq.read_table(slide_paths(tmp_path, "a")["parquet"], columns=["area_um2"])["area_um2"].to_numpy()
    assert float(rows[0]["nuclei_per_mm2"]) == 4.0 and float(rows[1]["nuclei_per_mm2"]) == 8.0
    assert float(rows[0]["median_area_um2"]) == pytest.approx(np.median(areas), rel=1e-5)
    assert Image.open(png_path).size[1] == 520 and Image.open(png_path).size[0] > 900  # + the legend column
    assert (tmp_path / "a" / "nuclei_overlay.png").is_file() and (tmp_path / "b" / "nuclei_overlay.png").is_file()


def test_a_corrupt_run_json_is_reported_not_silently_dropped(tmp_path):
    tiny_slide_table(tmp_path, "a")
    (tmp_path / "a").mkdir(exist_ok=True)
    (tmp_path / "a" / "run.json").write_text('{"slide_id": "a", "status": "do')  # cut short
    said = []
    csv_path, _ = write_summary(tmp_path, overlays=False, log=said.append)
    assert list(csv.DictReader(csv_path.open())) == []
    assert len(said) == 1 and "a/run.json" in said[0] and "left out of summary.csv" in said[0]


def test_area_plot_draws_one_coloured_line_per_slide():
    rng = np.random.default_rng(0)
    img = np.array(area_plot({"a": rng.normal(40, 5, 500), "b": rng.normal(80, 5, 500)}))
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (img == colour).all(-1).sum() > 100


def test_area_plot_legend_fits_debris_is_shaded_and_counted():
    rng = np.random.default_rng(0)
    long_name = "TCGA-AA-1234-01Z-00-DX1.a-very-long-slide-name"
    areas = {long_name: np.concatenate([rng.uniform(1, 4.9, 80), rng.normal(40, 5, 920)])}
    assert debris_share(areas[long_name]) == pytest.approx(0.08)
    img = np.array(area_plot(areas))
    assert (img[:, -12:] == 255).all()  # a white margin right of the longest legend entry: nothing cut
    assert ((img == 228).all(-1)).sum() > 1000  # the grey debris band under 5 um2


def test_area_plot_says_what_its_axis_clips():
    rng = np.random.default_rng(1)
    body = rng.normal(40, 5, 995)
    tail = np.concatenate([body, np.full(5, 900.0)])  # 0.5%: past the 99th percentile the axis ends at
    end = area_bins({"s": tail})[-1]
    assert end == 100
    assert x_label(tail, end) == "nucleus area (um2); axis ends at 100 um2: 0.5% of nuclei are larger, not shown"
    assert x_label(body, end) == "nucleus area (um2)"
