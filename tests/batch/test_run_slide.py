"""Whole slides end to end: `segment_slide` on real files, outputs read back by users' tools.

Models:

* ``ci_model``: the bundled student, at tile 256: it drives the batch read-back tests. (A
  student trained here for one short epoch did until its window-sized blobs were dropped
  as not nuclei.)
* the ``Decode`` oracle (tests/oracles.py): label/table agreement needs nuclei that look
  like nuclei, so there the "model" decodes ground-truth maps the slide encodes. The seam
  tests with both oracles are in tests/tiles/test_seams.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import duckdb
import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import zarr
from oracles import ORACLE_IMAGE, Decode, encode_maps, read_png
from polygons import max_overlap
from slidefiles import write_tiff

from nucleiflow.models.checkpoint import model_hash, resolve
from nucleiflow.pipeline.train import metrics
from nucleiflow.pipeline.config import SegmentConfig
from nucleiflow.pipeline.outputs.geoparquet import GeoParquetWriter
from nucleiflow.pipeline.infer.predictor import Predictor, load_predictor
from nucleiflow.pipeline.batch.manifest import SlideJob
from nucleiflow.pipeline.outputs.omezarr import OmeZarrWriter
from nucleiflow.pipeline.batch import run_slide
from nucleiflow.pipeline.batch.run_slide import segment_slide

RUN_KEYS = {"slide_id", "status", "slide_fingerprint", "model_hash", "config_key", "nuclei", "tiles",
            "halo_edge_nuclei", "timings_s", "versions", "model_mpp", "slide", "tissue_mm2", "outputs"}


# -- models ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ci_model() -> tuple[Predictor, str, Path]:
    """(predictor, model hash, checkpoint folder) of the bundled student. (A student trained
    here for one short epoch drove these tests until its window-sized blobs, one per tile,
    were rightly dropped as not nuclei: `postprocess.plausible`.)"""
    folder = resolve("student")
    return load_predictor(folder, device="cpu"), model_hash(folder), folder


# -- slides ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slides(tmp_path_factory, shared_data, mosaic_tool, cmu_slide) -> dict[str, SlideJob]:
    """Real CMU region (mpp overridden to 0.25: 1/4 of the pixels at the model's 0.5 um/px),
    a 2 x 2 MoNuSeg mosaic, and blank glass."""
    d = tmp_path_factory.mktemp("slides")
    subprocess.run([sys.executable, str(mosaic_tool),
                    str(shared_data / "monuseg"), "--split", "test", "--cols", "2", "--rows", "2",
                    "--no-labels", "--out", str(d / "mosaic")], check=True, capture_output=True)
    glass = np.random.default_rng(0).normal(0, 1.5, (768, 1024, 3)) + [243, 242, 240]
    write_tiff(d / "blank.tiff", np.clip(glass, 0, 255).astype(np.uint8), 0.5)
    return {
        "blank": SlideJob(str(d / "blank.tiff"), "blank"),  # sorts first: its file sets a batch's schema
        "cmu": SlideJob(str(cmu_slide), "cmu", mpp=0.25),
        "mosaic": SlideJob(str(d / "mosaic.tiff"), "mosaic"),
    }


def ci_config(ci_model, **kw) -> SegmentConfig:
    return SegmentConfig(**{"model": str(ci_model[2]), "tile_size": 256, "halo": 32, "device": "cpu",
                            "readers": 0, "workers": 0, **kw})


@pytest.fixture(scope="module")
def batch(tmp_path_factory, slides, ci_model) -> tuple[Path, dict[str, dict]]:
    """The three slides segmented into one output folder; the mosaic through process pools."""
    out = tmp_path_factory.mktemp("batch")
    pred, mhash, _ = ci_model
    records = {}
    for sid, job in slides.items():
        pools = {"readers": 1, "workers": 1} if sid == "mosaic" else {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records[sid] = segment_slide(job, out, ci_config(ci_model, **pools), pred, mhash, log=None)
        records[sid]["_warnings"] = [str(w.message) for w in caught]
    return out, records


def test_run_records(batch):
    out, records = batch
    for sid, rec in records.items():
        on_disk = json.loads((out / sid / "run.json").read_text())
        assert RUN_KEYS <= set(on_disk), RUN_KEYS - set(on_disk)
        assert on_disk["status"] == "done" and on_disk["slide_id"] == sid
        assert on_disk["nuclei"] == rec["nuclei"] and on_disk["config_key"] == rec["config_key"]
        assert {"stream", "total", "tiles_model"} <= set(on_disk["timings_s"])
        assert {"nucleiflow", "python", "torch", "zarr", "numpy"} <= set(on_disk["versions"])
    assert records["blank"]["nuclei"] == records["blank"]["tiles"] == 0
    assert records["cmu"]["nuclei"] > 0 and records["mosaic"]["nuclei"] > 0
    assert records["cmu"]["slide"]["mpp_source"] == "override"
    for rec in records.values():  # nuclei cut by the halo's edge are counted, recorded and warned about
        warned = any("touch the halo edge" in w for w in rec["_warnings"])
        assert warned == (rec["halo_edge_nuclei"] > 0)


def test_inspect_plans_the_tiles_segment_runs(batch, slides, ci_model):
    # One plan function for both: inspect's tile_count is what segment ran. (Before, inspect
    # planned on the raw tissue mask: 18 tiles here against segment's 20.)
    out, records = batch
    exe = Path(sys.executable).with_name("nucleiflow")
    res = subprocess.run([str(exe), "inspect", slides["cmu"].path, "--json", "--mpp", "0.25", "--model", str(ci_model[2]),
                          "--tile-size", "256", "--halo", "32"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    run = json.loads((out / "cmu" / "run.json").read_text())
    assert json.loads(res.stdout)["tile_count"] == run["tiles"] == records["cmu"]["tiles"] > 0


def test_batch_loads_in_one_geopandas_call(batch):
    out, records = batch
    g = gpd.read_parquet(out / "nuclei")
    assert g.crs is None
    counts = g.groupby("slide_id", observed=True).size().to_dict()
    assert counts == {s: r["nuclei"] for s, r in records.items() if r["nuclei"]}
    # The blank slide's file comes first; its (empty) schema must not drop any column.
    assert {"touches_halo_edge", "area_um2", "perimeter_um", "equivalent_diameter_um", "eccentricity",
            "solidity", "major_axis_um", "minor_axis_um", "orientation", "mean_prob"} <= set(g.columns)
    assert shapely.is_valid(g.geometry.values).all()
    for sid, part in g.groupby("slide_id", observed=True):
        rec = records[sid]
        np.testing.assert_array_equal(np.sort(part["nucleus_id"]), np.arange(1, rec["nuclei"] + 1))
        # Level-0 px inside the slide (to the model-px grid's last edge), even though the CI
        # model paints blobs over the white glass that readers return past the edges.
        scale = rec["model_mpp"] / rec["slide"]["mpp_x"]
        x0, y0, x1, y1 = part.total_bounds
        assert x0 >= 0 and y0 >= 0
        assert x1 <= math.ceil(rec["slide"]["width"] / scale) * scale
        assert y1 <= math.ceil(rec["slide"]["height"] / scale) * scale


def test_batch_in_duckdb_with_slide_id_from_the_path(batch):
    out, records = batch
    rel = duckdb.sql(f"SELECT * FROM read_parquet('{out}/nuclei/*/*.parquet', hive_partitioning=true)")
    assert "touches_halo_edge" in rel.columns and "bbox" in rel.columns
    got = dict(duckdb.sql(
        f"SELECT slide_id, count(*) FROM read_parquet('{out}/nuclei/*/*.parquet', hive_partitioning=true) "
        "WHERE bbox.xmin <= bbox.xmax GROUP BY slide_id").fetchall())
    assert got == {s: r["nuclei"] for s, r in records.items() if r["nuclei"]}


def test_geoparquet_metadata_in_pyarrow(batch):
    out, records = batch
    for sid, rec in records.items():
        path = out / "nuclei" / f"slide_id={sid}" / "part-0.parquet"
        meta = pq.read_metadata(path)
        geo = json.loads(meta.metadata[b"geo"])
        col = geo["columns"]["geometry"]
        assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
        assert col["encoding"] == "WKB" and "crs" in col and col["crs"] is None
        assert col["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
        info = json.loads(meta.metadata[b"nucleiflow"])
        assert info["slide_id"] == sid and info["model_hash"] == rec["model_hash"]
        assert meta.num_rows == rec["nuclei"]
        if meta.num_rows:
            assert meta.row_group(0).column(0).compression == "ZSTD"
            assert all(meta.row_group(i).num_rows <= 150_000 for i in range(meta.num_row_groups))


def test_masks_read_with_zarr_and_ome_zarr(batch):
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    out, records = batch
    tables = gpd.read_parquet(out / "nuclei")
    for sid, rec in records.items():
        path = out / sid / "masks.ome.zarr"
        root = zarr.open(str(path), mode="r")
        scale = rec["model_mpp"] / rec["slide"]["mpp_x"]
        shape = (math.ceil(rec["slide"]["height"] / scale), math.ceil(rec["slide"]["width"] / scale))
        labels = root["labels/nuclei/0"]
        assert labels.shape == shape and labels.dtype == np.int32 and labels.chunks == (256, 256)
        assert root["0"].shape == shape and root["0"].dtype == np.uint8
        lab = labels[...]
        ids = np.unique(lab[lab > 0])
        table_ids = np.sort(tables.loc[tables.slide_id == sid, "nucleus_id"].to_numpy())
        np.testing.assert_array_equal(ids, table_ids)  # every row is drawn, nothing else is
        nodes = list(Reader(parse_url(str(path), fmt=FormatV04()))())
        assert len(nodes[0].data) == len(root.attrs["multiscales"][0]["datasets"])
        assert nodes[0].data[0].shape == shape


# -- realistic nuclei through the file path -------------------------------------------
@pytest.fixture(scope="module")
def oracle_slide(tmp_path_factory, shared_data) -> tuple[SlideJob, np.ndarray]:
    """The oracle maps of a MoNuSeg image as a lossless TIFF slide (0.25 um/px) + its labels."""
    gt = read_png(shared_data / "monuseg" / "labels" / f"{ORACLE_IMAGE}.png").astype(np.int32)
    path = write_tiff(tmp_path_factory.mktemp("oracle") / "oracle.tiff", encode_maps(gt), 0.25)
    return SlideJob(str(path), "oracle"), gt


def oracle_predictor(mpp: float = 0.5) -> Predictor:
    return Predictor(Decode(), {"mpp": mpp, "postprocess": {"method": "hv", "ksize": 11}}, device="cpu")


def oracle_config(**kw) -> SegmentConfig:
    return SegmentConfig(**{"model": "oracle", "tile_size": 128, "halo": 48, "device": "cpu",
                            "readers": 0, "workers": 0, **kw})


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory, oracle_slide) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("oracle-out")
    # Its pixels are maps, not stain: dense nuclei (red 0, green = blue) look like teal ink on
    # the thumbnail, so no tissue region for it (objects off the region would be dropped).
    detect = run_slide.detect_tissue
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_slide, "detect_tissue", lambda *a, **k: dataclasses.replace(detect(*a, **k), region=None))
        return out, segment_slide(oracle_slide[0], out, oracle_config(), oracle_predictor(), "oracle-v1", log=None)


def load_slide(out: Path, sid: str) -> tuple[gpd.GeoDataFrame, np.ndarray]:
    table = gpd.read_parquet(out / "nuclei" / f"slide_id={sid}" / "part-0.parquet")
    labels = zarr.open(str(out / sid / "masks.ome.zarr"), mode="r")["labels/nuclei/0"][...]
    return table.sort_values("nucleus_id", ignore_index=True), labels


def test_oracle_nuclei_are_the_ground_truth(oracle_run, oracle_slide):
    out, rec = oracle_run
    gt = oracle_slide[1]
    table, labels = load_slide(out, "oracle")
    assert rec["halo_edge_nuclei"] == 0 and rec["tiles"] == 16
    assert rec["nuclei"] == len(table) and abs(len(table) - gt.max()) <= 0.05 * gt.max()
    # Model px (0.5 um/px) labels back on the 0.25 um/px ground truth grid.
    up = np.kron(labels, np.ones((2, 2), labels.dtype))[: gt.shape[0], : gt.shape[1]]
    assert metrics.aji(gt, up) > 0.8, metrics.aji(gt, up)


def test_nucleus_id_is_the_label_under_each_polygon(oracle_run):
    out, rec = oracle_run
    table, labels = load_slide(out, "oracle")
    geoms = table.geometry.values
    assert shapely.is_valid(geoms).all() and (shapely.get_type_id(geoms) == 3).all()
    scale = rec["model_mpp"] / rec["slide"]["mpp_x"]  # level-0 px per model px
    assert scale == pytest.approx(2.0)
    pts = shapely.get_coordinates(shapely.point_on_surface(geoms)) / scale
    under = labels[np.floor(pts[:, 1]).astype(int), np.floor(pts[:, 0]).astype(int)]
    assert (under == table["nucleus_id"].to_numpy()).mean() >= 0.99
    # Centroid columns are level-0 px too: the labels' own centroids, scaled.
    ys, xs = np.nonzero(labels)
    n = np.bincount(labels[ys, xs])
    cx = (np.bincount(labels[ys, xs], xs + 0.5) / np.maximum(n, 1))[table["nucleus_id"]] * scale
    assert np.median(np.abs(cx - table["centroid_x"])) < 0.5
    assert max_overlap(geoms) <= 0.1


# -- resume and failures ----------------------------------------------------------------
def test_resume_skips_done_slides_and_redoes_identically(oracle_slide, tmp_path):
    job = oracle_slide[0]
    pred = oracle_predictor()
    first = segment_slide(job, tmp_path, oracle_config(), pred, "oracle-v1", log=None)
    table1, labels1 = load_slide(tmp_path, "oracle")
    again = segment_slide(job, tmp_path, oracle_config(readers=1), pred, "oracle-v1", log=None)
    assert again["status"] == "skipped", "speed-only settings do not change what 'done' means"
    (tmp_path / "oracle" / "run.json").unlink()
    redo = segment_slide(job, tmp_path, oracle_config(), pred, "oracle-v1", log=None)
    assert redo["status"] == "done" and redo["nuclei"] == first["nuclei"]
    table2, labels2 = load_slide(tmp_path, "oracle")
    np.testing.assert_array_equal(labels1, labels2)
    assert table1.drop(columns="geometry").equals(table2.drop(columns="geometry"))
    assert shapely.equals_exact(table1.geometry.values, table2.geometry.values, 0).all()
    other = segment_slide(job, tmp_path, oracle_config(halo=40), pred, "oracle-v1", log=None)
    assert other["status"] == "done", "another config is another result"
    assert segment_slide(job, tmp_path, oracle_config(), pred, "oracle-v2", log=None)["status"] == "done"


def assert_nothing_final(out: Path, sid: str) -> None:
    assert not (out / sid / "run.json").exists()
    assert not (out / "nuclei" / f"slide_id={sid}" / "part-0.parquet").exists()
    assert not (out / sid / "masks.ome.zarr").exists()
    leftovers = [p.name for d in (out / sid, out / "nuclei" / f"slide_id={sid}") if d.exists()
                 for p in d.iterdir() if ".tmp" in p.name]
    assert not leftovers


@pytest.mark.parametrize("where", ["tile", "close"])
def test_a_run_aborted_mid_way_leaves_nothing_that_looks_finished(oracle_slide, tmp_path, monkeypatch, where):
    job = oracle_slide[0]
    pred = oracle_predictor()
    done = segment_slide(job, tmp_path, oracle_config(), pred, "oracle-v1", log=None)
    assert done["status"] == "done"
    calls = {"n": 0}

    def write_then_fail(self, table):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return original_write(self, table)

    def fail_close(self, meta=None):
        raise RuntimeError("disk on fire")

    original_write = GeoParquetWriter.write
    if where == "tile":
        monkeypatch.setattr(GeoParquetWriter, "write", write_then_fail)
    else:  # the table is already renamed to its final name when the masks fail to close
        monkeypatch.setattr(OmeZarrWriter, "close", fail_close)
    with pytest.raises(RuntimeError, match="disk on fire"):
        segment_slide(job, tmp_path, oracle_config(halo=40), pred, "oracle-v1", log=None)
    assert_nothing_final(tmp_path, "oracle")
    monkeypatch.undo()
    assert segment_slide(job, tmp_path, oracle_config(halo=40), pred, "oracle-v1", log=None)["status"] == "done"


def test_blank_glass_is_done_with_no_nuclei_and_readable_outputs(batch):
    out, records = batch
    rec = records["blank"]
    assert rec["status"] == "done" and rec["tiles"] == 0 and rec["nuclei"] == 0 and rec["tissue_mm2"] == 0
    table = gpd.read_parquet(out / "nuclei" / "slide_id=blank" / "part-0.parquet")
    assert len(table) == 0 and "touches_halo_edge" in table.columns
    root = zarr.open(str(out / "blank" / "masks.ome.zarr"), mode="r")
    assert not root["labels/nuclei/0"][...].any() and not root["0"][...].any()
    assert not root["labels/tissue/0"][...].any()
