"""Resume inside a slide: a slide killed part-way is taken over, not redone from zero.

* The kill test: `nucleiflow segment` on a 25-tile MoNuSeg mosaic, its process group
  SIGKILLed at ~30%, ~60% and ~90% of the tiles (counted as parts in ``<slide>/.resume``),
  each run taking over what the one before finished; a last run finishes it. Its model saw
  only the remaining tiles, and every output equals an uninterrupted run's: the nuclei table
  (every column, row order, file metadata), every level of the label and probability
  pyramids, the keys of run.json.
* A changed slide, model or config never takes old parts over (in-process: a run stopped
  by an exception from its progress callback leaves its parts as a kill does).
* A part the kill caught half-written (temp name) or torn is run again, not trusted, and
  so is the rest of its model batch (the model's floats depend on the batch, in the last bit).

The model is the bundled ``student-fast``: real nuclei, so seams, spills and dropped seam
duplicates all take part in what is replayed (the CI student paints one blob per tile).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import shapely
import zarr
from test_resume import api_url, cli_env, run_until  # noqa: F401 - api_url is a fixture

from nucleiflow.pipeline.batch.manifest import SlideJob
from nucleiflow.pipeline.batch.run_slide import segment_slide
from nucleiflow.pipeline.batch.tile_parts import decode, encode, pack, parts_folder, unpack, whole_batches
from nucleiflow.pipeline.config import SegmentConfig
from nucleiflow.pipeline.outputs.layout import slide_paths
from nucleiflow.pipeline.tiles.ownership import Spill, TileNuclei
from nucleiflow.pipeline.tiles.plan import Box, Tile

MODEL, SID = "student-fast", "m"
# 2000 px at 0.25 um/px = 1000 model px: 5 x 5 tiles of 200 px (halo 32: small windows, quick).
TILE, HALO = 200, 32


def mosaic(tool: Path, data: Path, out: Path, cols: int, rows: int, seed: int = 1) -> Path:
    subprocess.run([sys.executable, str(tool), str(data / "monuseg"), "--split", "test", "--cols", str(cols),
                    "--rows", str(rows), "--seed", str(seed), "--tissue", "1", "--no-labels", "--out", str(out)],
                   check=True, capture_output=True)
    return out.with_suffix(".tiff")


class Counting:
    """A predictor that counts the tiles it is given (the model's work in a run)."""

    def __init__(self, predictor) -> None:
        self.predictor, self.tiles = predictor, 0

    def __getattr__(self, name: str):
        return getattr(self.predictor, name)

    def __call__(self, batch: np.ndarray):
        self.tiles += len(batch)
        return self.predictor(batch)


@pytest.fixture(scope="module")
def predictors():
    from nucleiflow.flows.segment import _predictor

    return {m: _predictor(m, "cpu") for m in (MODEL, "student")}


def run(job: SlideJob, out: Path, predictors, *, model: str = MODEL, stop_at: int | None = None, **cfg) -> tuple:
    """(record, tiles the model saw) of one in-process run; ``stop_at`` raises after that many tiles."""
    pred, mhash = predictors[model]
    counting = Counting(pred)
    config = SegmentConfig(model=model, tile_size=cfg.pop("tile_size", TILE), halo=cfg.pop("halo", HALO),
                           device="cpu", readers=0, workers=0, **cfg)

    def progress(done: int, total: int) -> None:
        if done == stop_at:
            raise Interrupted

    try:
        rec = segment_slide(job, out, config, counting, mhash, log=None, progress=progress)
    except Interrupted:
        rec = None
    return rec, counting.tiles


class Interrupted(Exception):
    pass


def parts(out: Path, sid: str = SID) -> dict[str, tuple[int, int]]:
    """Finished parts of the slide: name -> (inode, mtime ns)."""
    folder = parts_folder(out, sid)
    found = {}
    for p in (folder.glob("tile-*.npz") if folder.is_dir() else []):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        found[p.name] = (st.st_ino, st.st_mtime_ns)
    return found


def taken_over(found: dict[str, tuple[int, int]], total: int, batch_size: int = 4) -> set[str]:
    """Names of the parts a run takes over: those in whole model batches."""
    index = {int(n.removeprefix("tile-").removesuffix(".npz")): n for n in found}
    return {index[i] for i in whole_batches(index, total, batch_size)}


def assert_same_outputs(out: Path, ref: Path, sid: str = SID) -> None:
    """Every column, row and metadata key of the table; every zarr level; run.json's keys."""
    a, b = slide_paths(out, sid), slide_paths(ref, sid)
    ta, tb = pq.read_table(a["parquet"]), pq.read_table(b["parquet"])
    assert ta.num_rows > 100
    assert ta.schema.names == tb.schema.names
    for name in ta.schema.names:
        assert ta.column(name).equals(tb.column(name)), name
    meta = lambda p: {k: v for k, v in pq.read_metadata(p).metadata.items()}  # noqa: E731
    assert meta(a["parquet"]) == meta(b["parquet"])
    za, zb = zarr.open_group(str(a["zarr"]), mode="r"), zarr.open_group(str(b["zarr"]), mode="r")
    levels = [f"{g}{k}" for g in ("", "labels/nuclei/", "labels/tissue/") for k in range(len(zb["labels/nuclei"]))]
    assert len(levels) >= 6
    for level in levels:
        np.testing.assert_array_equal(za[level][...], zb[level][...], err_msg=level)
    assert dict(za.attrs) == dict(zb.attrs)
    ra, rb = json.loads(a["run_json"].read_text()), json.loads(b["run_json"].read_text())
    assert set(ra) == set(rb)
    for k in ("nuclei", "tiles", "halo_edge_nuclei", "dropped", "zarr_files", "config_key", "model_hash",
              "slide_fingerprint"):
        assert ra[k] == rb[k], k
    assert not parts_folder(out, sid).exists(), "a done slide keeps its parts"


def assert_nothing_visible(out: Path) -> None:
    """What readers of the batch see of a killed slide: no rows, no run.json."""
    assert not slide_paths(out, SID)["run_json"].exists()
    nuclei = out / "nuclei"
    visible = [p for p in nuclei.rglob("*") if p.is_file()
               and not any(part.startswith(".") for part in p.relative_to(out).parts)] if nuclei.is_dir() else []
    assert visible == [], f"a half slide is visible under nuclei/: {visible}"
    if nuclei.is_dir():  # pyarrow (what geopandas reads a folder with) finds no file, hence no row
        assert ds.dataset(nuclei, format="parquet", partitioning="hive").count_rows() == 0


# -- the kill test ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def big(tmp_path_factory, shared_data, mosaic_tool) -> SlideJob:
    d = tmp_path_factory.mktemp("inside-slides")
    return SlideJob(str(mosaic(mosaic_tool, shared_data, d / "x", 2, 2)), SID)


@pytest.fixture(scope="module")
def clean(big, predictors, tmp_path_factory) -> Path:
    """The uninterrupted run: the reference outputs."""
    out = tmp_path_factory.mktemp("inside-clean")
    rec, seen = run(big, out, predictors)
    assert rec["status"] == "done" and rec["tiles_resumed"] == 0 and seen == rec["tiles"]
    return out


def test_a_slide_killed_at_30_60_90_percent_resumes_its_tiles(big, clean, predictors, api_url, tmp_path):
    total = json.loads(slide_paths(clean, SID)["run_json"].read_text())["tiles"]
    assert 20 <= total <= 40
    manifest = tmp_path / "batch.csv"
    manifest.write_text(f"path,slide_id\n{big.path},{SID}\n")
    out = tmp_path / "out"
    exe = Path(sys.executable).with_name("nucleiflow")
    # Post-processed in the main process (--workers 0): each batch of 4 tiles leaves the
    # model, then its parts appear one by one, so kills also land inside a batch.
    cmd = [str(exe), "segment", str(manifest), "--out", str(out), "--model", MODEL, "--tile-size", str(TILE),
           "--halo", str(HALO), "--device", "cpu", "--workers", "0"]
    env = cli_env(tmp_path / "prefect", api_url)
    before: dict[str, tuple[int, int]] = {}
    for i, fraction in enumerate((0.3, 0.6, 0.9)):
        log = tmp_path / f"run{i}.log"
        need = round(fraction * total)
        run_until(cmd, env, log, lambda: len(parts(out)) >= need)
        assert_nothing_visible(out)
        now = parts(out)
        assert need <= len(now) < total
        taken = taken_over(before, total)
        assert {n: now.get(n) for n in taken} == {n: before[n] for n in taken}, \
            "parts of the run before were rewritten or lost: those tiles ran again"
        assert all(now.get(n) != before[n] for n in set(before) - taken), "a half-done batch was taken over"
        if taken:
            assert f"taking over {len(taken)}/{total} tiles" in log.read_text()
        before = now

    # The last run, in-process, counting what the model sees.
    resumed = len(taken_over(before, total))
    assert resumed >= 0.8 * total
    rec, seen = run(big, out, predictors)
    assert rec["status"] == "done"
    assert rec["tiles"] == total and rec["tiles_resumed"] == resumed
    assert seen == total - resumed, "tiles a killed run finished went through the model again"
    assert json.loads(slide_paths(out, SID)["run_json"].read_text())["tiles_resumed"] == resumed
    assert_same_outputs(out, clean)
    leftovers = [p.name for d in (out / SID, slide_paths(out, SID)["parquet"].parent) for p in d.iterdir()
                 if p.name.startswith(".")]
    assert leftovers == []


# -- what may be taken over ---------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory, shared_data, mosaic_tool) -> dict[str, SlideJob]:
    """1 x 1 mosaics (500 model px: 16 tiles of 128): two different slides of one size."""
    d = tmp_path_factory.mktemp("inside-small")
    return {seed: SlideJob(str(mosaic(mosaic_tool, shared_data, d / f"s{seed}", 1, 1, seed)), SID) for seed in (1, 2)}


def interrupted(job: SlideJob, out: Path, predictors, at: int = 8) -> dict[str, tuple[int, int]]:
    rec, _ = run(job, out, predictors, tile_size=128, stop_at=at)
    assert rec is None
    found = parts(out)
    assert len(found) == at
    return found


@pytest.mark.parametrize("change", ["none", "slide", "model", "config", "batch_size"])
def test_parts_are_taken_over_only_with_the_same_slide_model_and_config(change, small, predictors, tmp_path):
    out, ref = tmp_path / "out", tmp_path / "ref"
    interrupted(small[1], out, predictors)
    job = small[2] if change == "slide" else small[1]
    kw = {"model": {"model": "student"}, "config": {"halo": 48}, "batch_size": {"batch_size": 2}}.get(change, {})
    rec, seen = run(job, out, predictors, tile_size=128, **kw)
    # Another model may run at another mpp (student 0.42 um/px), so another tile grid.
    tiles = rec["tiles"] if change == "model" else 16
    assert rec["status"] == "done" and rec["tiles"] == tiles
    if change == "none":  # the control: the same key takes the 8 parts over
        assert (rec["tiles_resumed"], seen) == (8, 8)
        run(job, ref, predictors, tile_size=128)
        assert_same_outputs(out, ref)
    else:  # every tile went through the model: nothing of the old parts was used
        assert (rec["tiles_resumed"], seen) == (0, tiles)
        assert not parts_folder(out, SID).exists()


def test_a_part_caught_half_written_or_torn_is_run_again(small, predictors, tmp_path):
    out, ref = tmp_path / "out", tmp_path / "ref"
    interrupted(small[1], out, predictors)
    folder = parts_folder(out, SID)
    (folder / ".tile-000008.npz.tmp-1-deadbeef").write_bytes(b"half")  # the kill came mid-write
    torn = folder / "tile-000007.npz"
    torn.write_bytes(torn.read_bytes()[:100])  # e.g. a power cut after the rename
    rec, seen = run(small[1], out, predictors, tile_size=128)
    assert (rec["tiles_resumed"], seen) == (4, 12)  # tile 7's batch (4-7) runs again whole
    run(small[1], ref, predictors, tile_size=128)
    assert_same_outputs(out, ref)


def test_a_done_slide_skipped_later_drops_parts_left_by_a_kill(small, predictors, tmp_path):
    """Killed between run.json and removing its parts: the next look (a skip) removes them."""
    out = tmp_path / "out"
    run(small[1], out, predictors, tile_size=128)
    folder = parts_folder(out, SID)
    folder.mkdir()
    (folder / "tile-000000.npz").write_bytes(b"x")
    rec, seen = run(small[1], out, predictors, tile_size=128)
    assert rec["status"] == "skipped" and seen == 0
    assert not folder.exists()


# -- the part format -----------------------------------------------------------------------
def test_pack_and_unpack_give_the_tile_back():
    tile = Tile(3, 1, 2, Box(10, 10, 14, 13), Box(8, 8, 16, 15))
    core = np.array([[0, 1, 1, 0], [0, 1, 0, 2], [0, 0, 0, 2]], np.int32)
    spill = Spill((1, 3), Box(14, 10, 15, 12), np.array([[2], [2]], np.int32))
    table = {"nucleus_id": np.array([1, 2], np.int64),
             "geometry": np.array([shapely.box(0.1, 0.2, 3.3, 4.4), shapely.box(5, 5, 7.25, 6)], dtype=object),
             "eccentricity": np.array([0.5, 0.25], np.float32), "class_name": np.array(["tumour", "é"], dtype=object),
             "touches_halo_edge": np.array([False, True])}
    tn = TileNuclei(tile, core, np.arange(12, dtype=np.uint8).reshape(3, 4), [spill], 2, 1, table,
                    dropped={"off_tissue": 3, "too_large": 0, "ink_colour": 1})
    back = unpack(decode(encode(pack(tn))), tile)
    assert back.dropped == tn.dropped, "run.json's dropped counts survive a resume"
    np.testing.assert_array_equal(back.core_labels, core)
    assert back.prob.dtype == np.uint8 and back.prob.tolist() == tn.prob.tolist()
    assert [(s.cell, s.box, s.labels.tolist()) for s in back.spills] == [(spill.cell, spill.box, [[2], [2]])]
    assert (back.n, back.n_halo_edge) == (2, 1)
    assert list(back.table) == list(table)
    assert shapely.to_wkb(back.table["geometry"]).tolist() == shapely.to_wkb(table["geometry"]).tolist()
    for k in ("nucleus_id", "eccentricity", "class_name", "touches_halo_edge"):
        assert back.table[k].dtype == table[k].dtype and back.table[k].tolist() == table[k].tolist(), k
    empty = TileNuclei(tile, np.zeros((3, 4), np.int32), np.zeros((3, 4), np.uint8), [], 0, 0, None)
    again = unpack(decode(encode(pack(empty))), tile)
    assert again.spills == [] and again.table is None and again.n == 0
    with pytest.raises(ValueError, match="read for tile"):
        unpack(decode(encode(pack(tn))), Tile(4, 1, 3, tile.core, tile.read))
