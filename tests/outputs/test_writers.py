"""Mergers: a synthetic tiled slide through MemoryMerger and SlideOutputs (GeoParquet + OME-Zarr), read back."""
from __future__ import annotations

import json

import duckdb
import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import zarr
from skimage import draw

from nucleiflow.pipeline.postprocess import morphometry as P
from nucleiflow.pipeline.tiles import ownership as O
from nucleiflow.pipeline.outputs import layout as W
from nucleiflow.pipeline.outputs.geoparquet import GeoParquetWriter, hilbert_index, spatial_key
from nucleiflow.pipeline.outputs.chunk_pyramid import mean2
from nucleiflow.pipeline.outputs.omezarr import OmeZarrWriter
from nucleiflow.pipeline.tiles.plan import Box, plan_tiles
from nucleiflow.pipeline.tiles.stitch import MemoryMerger
from nucleiflow.pipeline.outputs.atomic import write_json_atomic

MPP0, MPP, TILE = 0.25, 0.5, 32
ID0 = 1000  # nucleus_id = label + ID0, so table and raster ids differ from the labels


@pytest.fixture(scope="module")
def slide():
    """A 100 x 75 model-px "slide" (2 x 2 level-0 px each) of disjoint disks, and its NP map."""
    rng = np.random.default_rng(1)
    lab = np.zeros((75, 100), np.int32)
    n = 0
    for _ in range(80):
        rr, cc = draw.disk((rng.integers(3, 72), rng.integers(3, 97)), rng.integers(2, 5), shape=lab.shape)
        if not lab[rr, cc].any():
            n += 1
            lab[rr, cc] = n
    prob = np.where(lab > 0, 0.9, 0.1).astype(np.float32)
    plan = plan_tiles(200, 150, MPP0, MPP, tile_size=TILE, halo=8)  # 4 x 3 tiles, partial at the edges
    return lab, prob, plan


def run_slide(merger, lab, prob, plan, meta=None):
    """Tile -> own -> table -> merger, as the stitcher does; ids are global (label + ID0)."""
    lut = np.arange(lab.max() + 1, dtype=np.int32) + ID0
    lut[0] = 0
    for t in plan:
        r = t.read
        x0, y0, x1, y1 = max(r.x0, 0), max(r.y0, 0), min(r.x1, plan.width), min(r.y1, plan.height)
        labels, p = lab[y0:y1, x0:x1], prob[y0:y1, x0:x1]
        kept = O.ownership(labels, (t.core.x0 - x0, t.core.y0 - y0, t.core.x1 - x0, t.core.y1 - y0))
        ids = {int(k): int(lut[k]) for k in kept}
        table = P.nuclei_table(labels, p, mpp0=MPP0, scale=plan.scale, offset=(x0, y0), ids=ids, keep=kept)
        core = np.s_[t.core.y0 : t.core.y1, t.core.x0 : t.core.x1]
        prob_core = p[core[0].start - y0 : core[0].stop - y0, core[1].start - x0 : core[1].stop - x0]
        merger.write_labels(t.core, lut[lab[core]])
        merger.write_prob(t.core, np.clip(np.rint(prob_core * 255), 0, 255).astype(np.uint8))
        merger.write_table(table)
    return merger.close(meta or {"model": "test-model"})


def expected_ids(lab):
    return set((np.unique(lab[lab > 0]) + ID0).tolist())


def raster_at_centroids(labels, table, scale):
    """Label raster value under each row's centroid (level-0 px -> model px)."""
    cx = np.floor(np.asarray(table["centroid_x"]) / scale).astype(int)
    cy = np.floor(np.asarray(table["centroid_y"]) / scale).astype(int)
    return np.asarray(labels[cy, cx]) if isinstance(labels, np.ndarray) else labels.vindex[cy, cx]


def test_memory_merger_roundtrip(slide):
    lab, prob, plan = slide
    w = MemoryMerger(plan.height, plan.width)
    table = run_slide(w, lab, prob, plan)
    assert w.closed and w.meta == {"model": "test-model"}
    assert sorted(table["nucleus_id"]) == sorted(expected_ids(lab))  # each nucleus once
    np.testing.assert_array_equal(w.labels, np.where(lab > 0, lab + ID0, 0))
    np.testing.assert_array_equal(w.prob, np.round(prob * 255).astype(np.uint8))
    np.testing.assert_array_equal(raster_at_centroids(w.labels, table, plan.scale), table["nucleus_id"])
    assert shapely.is_valid(table["geometry"].to_numpy()).all()


def test_memory_merger_rejects_duplicate_ids():
    w = MemoryMerger(4, 4)
    t = P.nuclei_table(np.pad(np.ones((2, 2), np.int32), 1), mpp0=1.0)
    w.write_table(t)
    w.write_table(t)
    with pytest.raises(ValueError, match="unique"):
        w.close()


def write_batch(out, slide, slides=("s1", "s2"), row_group_rows=7):
    lab, prob, plan = slide
    for sid in slides:
        writers = W.SlideOutputs(
            out, sid, shape=(plan.height, plan.width), mpp=plan.mpp, scale=plan.scale, chunk=TILE,
            metadata={"model": "test-model", "model_hash": "abc", "config_hash": "def"},
            tissue=np.ones((10, 13), bool), tissue_mpp=4.0, row_group_rows=row_group_rows,
        )
        run_slide(writers, lab, prob, plan, meta={"status": "ok"})


@pytest.fixture(scope="module")
def batch(tmp_path_factory, slide):
    out = tmp_path_factory.mktemp("out")
    write_batch(out, slide)
    return out


def test_geoparquet_file_layout_and_metadata(batch, slide):
    lab = slide[0]
    f = pq.ParquetFile(W.slide_paths(batch, "s1")["parquet"])
    sizes = [f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups)]
    assert f.metadata.num_rows == len(expected_ids(lab)) and len(sizes) > 2
    assert all(s == 7 for s in sizes[:-1]) and 0 < sizes[-1] <= 7
    assert f.metadata.row_group(0).column(0).compression == "ZSTD"
    assert "slide_id" not in f.schema_arrow.names  # it is the hive partition key
    geo = json.loads(f.schema_arrow.metadata[b"geo"])
    col = geo["columns"]["geometry"]
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    assert col["encoding"] == "WKB" and col["geometry_types"] == ["Polygon"]
    assert "crs" in col and col["crs"] is None
    assert col["covering"] == {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}
    table = f.read()
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    assert col["bbox"] == pytest.approx(list(shapely.total_bounds(geoms)))
    info = json.loads(f.schema_arrow.metadata[b"nucleiflow"])
    assert info["slide_id"] == "s1" and info["model"] == "test-model" and info["config_hash"] == "def"
    assert info["status"] == "ok" and info["rows"] == f.metadata.num_rows


def test_geoparquet_rows_are_hilbert_sorted_within_row_groups(batch):
    f = pq.ParquetFile(W.slide_paths(batch, "s2")["parquet"])
    for i in range(f.metadata.num_row_groups):
        g = f.read_row_group(i, columns=["centroid_x", "centroid_y"])
        key = spatial_key(g["centroid_x"].to_numpy(), g["centroid_y"].to_numpy(), (200, 150))
        assert (np.diff(key) >= 0).all()


def test_batch_loads_in_geopandas_with_bbox_filter(batch, slide):
    lab = slide[0]
    gdf = gpd.read_parquet(batch / "nuclei")
    assert sorted(gdf["slide_id"].astype(str).unique()) == ["s1", "s2"]
    for sid in ("s1", "s2"):
        assert set(gdf.loc[gdf["slide_id"] == sid, "nucleus_id"]) == expected_ids(lab)
    assert gdf.crs is None and gdf.geometry.is_valid.all()
    query = (0, 0, 80, 60)  # level-0 px
    sub = gpd.read_parquet(batch / "nuclei", bbox=query)
    want = gdf.geometry.intersects(shapely.box(*query))
    assert 0 < len(sub) < len(gdf)
    assert set(zip(sub["slide_id"].astype(str), sub["nucleus_id"])) >= set(zip(gdf["slide_id"][want].astype(str), gdf["nucleus_id"][want]))


def test_batch_loads_in_duckdb_with_hive_slide_id(batch, slide):
    n = len(expected_ids(slide[0]))
    glob = f"{batch}/nuclei/*/*.parquet"
    rows = duckdb.sql(
        f"select slide_id, count(*), count(distinct nucleus_id) from read_parquet('{glob}', hive_partitioning=true) group by 1 order by 1"
    ).fetchall()
    assert rows == [("s1", n, n), ("s2", n, n)]
    [(inside,)] = duckdb.sql(f"select count(*) from read_parquet('{glob}', hive_partitioning=true) where bbox.xmax < 80").fetchall()
    assert 0 < inside < 2 * n


def test_omezarr_levels_and_ids_match_the_table(batch, slide):
    lab, prob, plan = slide
    root = W.slide_paths(batch, "s1")["zarr"]
    labels = zarr.open_array(root / "labels" / "nuclei" / "0", mode="r")
    assert labels.dtype == np.int32 and labels.chunks == (TILE, TILE) and labels.shape == (75, 100)
    np.testing.assert_array_equal(labels[:], np.where(lab > 0, lab + ID0, 0))
    assert (root / "labels" / "nuclei" / "0" / "2" / "3").is_file()  # "/" chunk keys, edge chunk
    meta = json.loads((root / "0" / ".zarray").read_text())
    assert meta["compressor"]["id"] == "blosc" and meta["dimension_separator"] == "/"
    prob0 = zarr.open_array(root / "0", mode="r")
    np.testing.assert_array_equal(prob0[:], np.round(prob * 255).astype(np.uint8))
    # Pyramid: halve until one chunk holds the level; nearest for labels, mean for prob.
    lv1, lv2 = (zarr.open_array(root / "labels" / "nuclei" / str(k), mode="r") for k in (1, 2))
    assert lv1.shape == (38, 50) and lv2.shape == (19, 25) and not (root / "labels" / "nuclei" / "3").exists()
    np.testing.assert_array_equal(lv1[:], labels[:][::2, ::2])
    np.testing.assert_array_equal(zarr.open_array(root / "1", mode="r")[:], mean2(prob0[:]))
    attrs = json.loads((root / ".zattrs").read_text())
    ds = attrs["multiscales"][0]["datasets"]
    assert [d["coordinateTransformations"][0]["scale"] for d in ds] == [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0]]
    assert attrs["multiscales"][0]["axes"][0] == {"name": "y", "type": "space", "unit": "micrometer"}
    assert attrs["nucleiflow"]["slide_id"] == "s1" and attrs["nucleiflow"]["scale"] == plan.scale
    gdf = gpd.read_parquet(W.slide_paths(batch, "s1")["parquet"])
    np.testing.assert_array_equal(raster_at_centroids(labels, gdf, plan.scale), gdf["nucleus_id"])


def test_omezarr_reads_with_ome_zarr(batch):
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(str(W.slide_paths(batch, "s2")["zarr"]), fmt=FormatV04()))())
    image = nodes[0]
    assert [d.shape for d in image.data] == [(75, 100), (38, 50), (19, 25)]
    labels = {n.zarr.path.rstrip("/").rsplit("/", 1)[-1]: n for n in nodes if any(isinstance(s, Label) for s in n.specs)}
    assert set(labels) == {"nuclei", "tissue"}
    assert labels["nuclei"].data[0].dtype == np.int32 and int(labels["nuclei"].data[0].max()) > ID0
    # NGFF 0.4: a label has the image's levels (MUST) and dimensions (SHOULD), scale for scale.
    for name in ("nuclei", "tissue"):
        assert [d.shape for d in labels[name].data] == [d.shape for d in image.data], name
        assert labels[name].metadata["coordinateTransformations"] == image.metadata["coordinateTransformations"]
    assert all(int(np.asarray(d).min()) == 1 for d in labels["tissue"].data)  # the fixture's mask is all tissue


def test_tissue_label_is_upsampled_nearest_to_every_level(tmp_path):
    tissue = np.array([[1, 0, 0], [0, 1, 1]], bool)  # 3 x 2 cells of 8 um
    w = OmeZarrWriter(tmp_path / "m.ome.zarr", (32, 48), mpp=0.5, chunk=16, tissue=tissue, tissue_mpp=8.0)
    w.close()
    lv = [zarr.open_array(tmp_path / "m.ome.zarr" / "labels" / "tissue" / str(k), mode="r") for k in range(3)]
    assert [a.shape for a in lv] == [(32, 48), (16, 24), (8, 12)] and lv[0].chunks == (16, 16)
    np.testing.assert_array_equal(lv[0][:], np.kron(tissue, np.ones((16, 16), np.uint8)))  # 16 px per 8 um cell
    np.testing.assert_array_equal(lv[2][:], np.kron(tissue, np.ones((4, 4), np.uint8)))
    assert not (tmp_path / "m.ome.zarr" / "labels" / "tissue" / "0" / "0" / "1").exists()  # no tissue: not stored


def test_core_must_be_chunk_aligned(tmp_path):
    w = OmeZarrWriter(tmp_path / "m.ome.zarr", (70, 100), mpp=0.5, chunk=32)
    with pytest.raises(ValueError, match="chunk-aligned"):
        w.write_tile(Box(16, 0, 48, 32), np.zeros((32, 32), np.int32), None)
    with pytest.raises(ValueError, match="does not fit"):
        w.write_tile(Box(0, 0, 32, 32), np.zeros((30, 32), np.int32), None)
    w.write_tile(Box(96, 64, 100, 70), np.ones((6, 4), np.int32), None)  # edge chunk: partial is fine
    w.close()
    assert zarr.open_array(tmp_path / "m.ome.zarr" / "labels" / "nuclei" / "0", mode="r")[64:, 96:].all()


def test_all_zero_chunks_stay_absent_unless_they_overwrite(tmp_path):
    """The writer, not zarr, skips all-zero chunks: one never stored leaves no file (as zarr's
    write_empty_chunks=False would), one stored before is overwritten with zeros."""
    path = tmp_path / "m.ome.zarr"
    w = OmeZarrWriter(path, (32, 48), mpp=0.5, chunk=16)
    w.write_tile(Box(0, 0, 16, 16), np.zeros((16, 16), np.int32), np.zeros((16, 16), np.uint8))
    w.write_tile(Box(16, 0, 32, 16), np.ones((16, 16), np.int32), np.full((16, 16), 0.5, np.float32))
    w.write_tile(Box(16, 0, 32, 16), np.zeros((16, 16), np.int32), None)  # stored before: zeros now
    w.write_labels(Box(32, 16, 48, 32), np.zeros((16, 16), np.int32))  # held, then stored at close
    w.close()
    root = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(root["labels/nuclei/0"][:], 0)
    assert (root["0"][:16, 16:32] == 128).all() and not root["0"][:16, :16].any()
    for key in ("labels/nuclei/0/0/0", "0/0/0", "labels/nuclei/0/1/2"):
        assert not (path / key).exists(), key
    assert (path / "labels/nuclei/0/0/1").exists() and (path / "0/0/1").exists()


def test_abort_leaves_no_file(tmp_path, slide):
    lab, prob, plan = slide
    writers = W.SlideOutputs(tmp_path, "s1", shape=(plan.height, plan.width), mpp=MPP, scale=plan.scale, chunk=TILE)
    t = plan.tiles[0]
    table = P.nuclei_table(lab[: TILE, : TILE], mpp0=MPP0, scale=plan.scale)
    writers.write_labels(t.core, lab[: TILE, : TILE])
    writers.write_prob(t.core, prob[: TILE, : TILE])
    writers.write_table(table)
    writers.abort()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no final file, no temp file


def test_a_failing_writer_aborts_the_others(tmp_path, slide):
    lab, prob, plan = slide
    writers = W.SlideOutputs(tmp_path, "s1", shape=(plan.height, plan.width), mpp=MPP, scale=plan.scale, chunk=TILE)
    table = P.nuclei_table(lab[:TILE, :TILE], mpp0=MPP0, scale=plan.scale)
    writers.write_table(table)  # the table is taken, the raster is not
    with pytest.raises(ValueError, match="chunk-aligned"):
        writers.write_labels(Box(8, 0, 8 + TILE, TILE), lab[:TILE, :TILE])
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_failed_close_aborts_and_keeps_no_final_file(tmp_path):
    path = tmp_path / "nuclei" / "slide_id=x" / "part-0.parquet"
    w = GeoParquetWriter(path, {"slide_id": "x"})
    t = P.nuclei_table(np.pad(np.ones((2, 2), np.int32), 1), mpp0=1.0)
    w.write(t)
    w.write(t)  # the same nucleus_id twice
    with pytest.raises(ValueError, match="unique"):
        w.close()
    assert list(path.parent.iterdir()) == []


def test_empty_slide_writes_empty_readable_outputs(tmp_path):
    writers = W.SlideOutputs(tmp_path, "empty", shape=(40, 50), mpp=MPP, scale=2.0, chunk=TILE)
    writers.close({"status": "no tissue"})
    gdf = gpd.read_parquet(W.slide_paths(tmp_path, "empty")["parquet"])
    assert len(gdf) == 0 and list(gdf.columns[:3]) == ["nucleus_id", "geometry", "centroid_x"]
    assert gdf["nucleus_id"].dtype == np.int64
    assert not zarr.open_array(W.slide_paths(tmp_path, "empty")["zarr"] / "labels" / "nuclei" / "0", mode="r")[:].any()


def test_rewrite_replaces_a_finished_slide(tmp_path, slide):
    write_batch(tmp_path, slide, slides=("s1",))
    write_batch(tmp_path, slide, slides=("s1",), row_group_rows=1000)
    assert pq.ParquetFile(W.slide_paths(tmp_path, "s1")["parquet"]).metadata.num_row_groups == 1
    assert sorted(p.name for p in (tmp_path / "s1").iterdir()) == ["masks.ome.zarr"]


def test_hilbert_index_visits_adjacent_cells():
    y, x = np.mgrid[0:8, 0:8]
    d = hilbert_index(x.ravel(), y.ravel(), order=3)
    assert sorted(d) == list(range(64))
    path = np.stack([x.ravel(), y.ravel()], 1)[np.argsort(d)]
    assert (np.abs(np.diff(path, axis=0)).sum(axis=1) == 1).all()


def test_write_json_atomic(tmp_path):
    p = write_json_atomic(tmp_path / "s1" / "run.json", {"status": "done", "n": np.int64(3), "mpp": np.float32(0.5)})
    assert json.loads(p.read_text()) == {"status": "done", "n": 3, "mpp": 0.5}
    with pytest.raises(TypeError):
        write_json_atomic(p, {"bad": object()})
    assert json.loads(p.read_text())["status"] == "done"  # the old file survives a failed write
    assert [q.name for q in p.parent.iterdir()] == ["run.json"]


@pytest.mark.parametrize("bad", ["", "a/b", "x=y", ".hidden"])
def test_slide_ids_that_cannot_be_folders_are_rejected(bad):
    with pytest.raises(ValueError):
        W.slide_paths("/tmp/out", bad)


def test_held_label_chunks_are_read_back_repainted_and_stored_once(tmp_path):
    """write_labels holds the last chunks in memory: reads see them, a repaint replaces them,
    and what close stores is the last content of every chunk (also of those pushed out of
    the hold early), pyramid included; abort stores nothing."""
    import nucleiflow.pipeline.outputs.omezarr as Z

    w = OmeZarrWriter(tmp_path / "m.ome.zarr", (40, 100), mpp=0.5, chunk=16)
    assert w._hold == 9  # 7 chunk columns + 2
    boxes = [Box(x, y, min(x + 16, 100), min(y + 16, 40)) for y in range(0, 40, 16) for x in range(0, 100, 16)]
    expect = np.zeros((40, 100), np.int32)
    for i, b in enumerate(boxes):
        chunk = np.full((b.height, b.width), i + 1, np.int32)
        w.write_labels(b, chunk)
        chunk[:] = -5  # the writer keeps its own copy
        expect[b.y0:b.y1, b.x0:b.x1] = i + 1
    first = boxes[0]  # pushed out of the hold by now: read back from the store
    again = w.read_labels(first)
    assert (again == 1).all()
    again[0, 0] = 99
    w.write_labels(first, again)
    expect[0, 0] = 99
    assert w.read_labels(first)[0, 0] == 99 and w.read_labels(boxes[-1])[0, 0] == len(boxes)
    w.close()
    root = zarr.open_group(str(tmp_path / "m.ome.zarr"), mode="r")
    np.testing.assert_array_equal(root["labels/nuclei/0"][:], expect)
    np.testing.assert_array_equal(root["labels/nuclei/1"][:], expect[::2, ::2])

    small = Z.HELD_BYTES
    try:
        Z.HELD_BYTES = 4 * 16 * 16  # room for one chunk: every write stores the one before
        w = OmeZarrWriter(tmp_path / "n.ome.zarr", (32, 32), mpp=0.5, chunk=16)
        assert w._hold == 1
    finally:
        Z.HELD_BYTES = small
    w.write_labels(Box(0, 0, 16, 16), np.ones((16, 16), np.int32))
    w.abort()
    assert not (tmp_path / "n.ome.zarr").exists()
