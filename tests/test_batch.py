"""Overnight batches: claims, bad input, the batch report, the Prefect state, Dask, the summary.

Unit tests on tiny hand-made inputs first (claims, overlay drawing, summary numbers); then
one real batch (the `golo` model on tiny real slides) holding every kind of bad input, run
once through the flow in-process under Prefect's test harness, with one test per input;
then the CLI (exit codes), two concurrent CLI batches on one folder, and a 2-worker Dask
cluster.
"""
from __future__ import annotations

import csv
import errno
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
import zarr
from PIL import Image

from nucleiflow.pipeline import claims
from nucleiflow.pipeline.claims import ClaimLost, SlideBusy, acquire
from nucleiflow.pipeline.manifest import expand_slides, read_manifest
from nucleiflow.pipeline.polygons import nuclei_table
from nucleiflow.pipeline.slidejob import clean_partial, tidy_done
from nucleiflow.pipeline.slides import ArraySlide
from nucleiflow.pipeline.summary import (
    area_plot, draw_outlines, nuclei_overlay, overlay_mpp, parquet_rings, slide_row, write_summary,
)
from nucleiflow.pipeline.writers import GeoParquetWriter, slide_paths, write_json_atomic



def write_tiff(path: Path, rgb: np.ndarray, mpp: float | None) -> Path:
    """A tiled, lossless, OpenSlide-readable one-level generic TIFF; mpp None: no mpp."""
    kw = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=0, **kw)
    return path


# -- claims -------------------------------------------------------------------------------
def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()  # reaped: the pid is free
    return p.pid


def write_claim(folder: Path, age_s: float = 0.0, **info) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".claim"
    path.write_text(json.dumps({**claims.holder_info(), **info}) if info.get("raw") is None else info["raw"])
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_a_claim_is_exclusive_while_held_and_free_after(tmp_path):
    c = acquire(tmp_path / "s1")
    rec = json.loads((tmp_path / "s1" / ".claim").read_text())
    assert rec["pid"] == os.getpid() and rec["token"] == c.token and c.owned()
    with pytest.raises(SlideBusy, match=f"pid {os.getpid()}"):
        acquire(tmp_path / "s1")  # same live process, another claimant (a second flow run)
    c.release()
    assert not (tmp_path / "s1" / ".claim").exists()
    with acquire(tmp_path / "s1") as again:
        assert again.owned() and again.token != c.token
    assert not (tmp_path / "s1" / ".claim").exists()


def test_a_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    write_claim(tmp_path / "s", pid=dead_pid())
    with acquire(tmp_path / "s") as c:
        assert json.loads(c.path.read_text())["pid"] == os.getpid()


def test_a_reused_pid_does_not_keep_a_claim_alive(tmp_path):
    # our own (live) pid, but another process start time: the holder died, the pid was reused
    write_claim(tmp_path / "s", proc_start=(claims._proc_start(os.getpid()) or 0) + 1)
    assert acquire(tmp_path / "s").owned()


def test_another_hosts_claim_holds_until_its_heartbeat_is_older_than_the_ttl(tmp_path):
    write_claim(tmp_path / "s", host="other-node", pid=1, age_s=30)
    with pytest.raises(SlideBusy, match="other-node"):
        acquire(tmp_path / "s", ttl_s=60)
    write_claim(tmp_path / "s", host="other-node", pid=1, age_s=90)
    assert acquire(tmp_path / "s", ttl_s=60).owned()


def test_an_unreadable_claim_is_busy_while_young_and_stale_when_old(tmp_path):
    write_claim(tmp_path / "s", raw="")  # the creator was killed between create and write
    with pytest.raises(SlideBusy):
        acquire(tmp_path / "s")
    write_claim(tmp_path / "s", raw="", age_s=claims.GRACE_S + 5)
    assert acquire(tmp_path / "s").owned()


def test_the_heartbeat_refreshes_the_mtime_and_stops_on_release(tmp_path):
    with acquire(tmp_path / "s", ttl_s=0.2) as c:
        os.utime(c.path, (0, 0))
        time.sleep(0.3)
        assert time.time() - c.path.stat().st_mtime < 1
    assert not c.path.exists()


def test_a_lost_claim_is_detected_and_the_new_holders_file_is_left_alone(tmp_path):
    c = acquire(tmp_path / "s")
    c.path.unlink()
    write_claim(tmp_path / "s", host="other-node", pid=1)
    assert not c.owned()
    with pytest.raises(ClaimLost, match="other-node"):
        c.verify()
    with pytest.raises(ClaimLost):
        clean_partial(tmp_path, "s", c)
    c.release()
    assert json.loads((tmp_path / "s" / ".claim").read_text())["host"] == "other-node"


def test_breaking_puts_back_a_fresh_claim_that_replaced_the_stale_one(tmp_path):
    stale = write_claim(tmp_path / "s", pid=dead_pid())
    seen = stale.read_bytes(), stale.stat()
    stale.unlink()  # another worker broke it and claimed the slide meanwhile
    fresh = acquire(tmp_path / "s")
    claims._break(stale, *seen)
    assert fresh.owned()


def _race(folder: str, barrier, results) -> None:
    barrier.wait()
    try:
        c = acquire(folder)
    except SlideBusy:
        results.put("busy")
        return
    results.put("won")
    time.sleep(0.5)
    c.release()


def test_of_many_processes_racing_for_a_stale_claim_exactly_one_wins(tmp_path):
    write_claim(tmp_path / "s", pid=dead_pid())
    ctx = mp.get_context("fork")
    n = 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "s"), barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    got = sorted(results.get(timeout=5) for _ in range(n))
    assert got == ["busy"] * (n - 1) + ["won"]


def test_clean_partial_removes_leftovers_of_killed_runs_but_not_the_claim(tmp_path):
    paths = slide_paths(tmp_path, "s")
    c = acquire(paths["run_json"].parent)
    paths["parquet"].parent.mkdir(parents=True)
    leftovers = [paths["parquet"].with_name(".part-0.parquet.tmp-123"), paths["parquet"],
                 paths["run_json"], paths["run_json"].with_name(".run.json.abc.tmp"),
                 paths["run_json"].with_name(".claim.stale-1a2b")]
    for p in leftovers:
        p.write_text("x")
    (paths["zarr"].parent / ".masks.ome.zarr.tmp-123").mkdir()
    (paths["zarr"] / "0").mkdir(parents=True)
    clean_partial(tmp_path, "s", c)
    assert sorted(p.name for p in paths["run_json"].parent.iterdir()) == [".claim"]
    assert list(paths["parquet"].parent.iterdir()) == []


def test_tidy_done_clears_a_dead_runs_claim_and_temp_files_but_not_a_live_claim(tmp_path):
    folder = tmp_path / "s"
    write_claim(folder, pid=dead_pid())
    (folder / ".nuclei_overlay.png.tmp-99").write_text("half a picture")
    (folder / "run.json").write_text("{}")
    tidy_done(tmp_path, "s")
    assert sorted(p.name for p in folder.iterdir()) == ["run.json"]
    (folder / ".nuclei_overlay.png.tmp-99").write_text("being drawn by a live worker")
    with acquire(folder):
        tidy_done(tmp_path, "s")
        assert (folder / ".nuclei_overlay.png.tmp-99").exists()


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


def test_nuclei_overlay_outlines_each_nucleus_on_the_thumbnail(tmp_path):
    paths = tiny_slide_table(tmp_path, "s", mpp0=1.0)
    reader = ArraySlide(np.full((40, 60, 3), 200, np.uint8), mpp=1.0)
    png = nuclei_overlay(reader, paths["parquet"], tmp_path / "s" / "nuclei_overlay.png", min_mpp=1.0)
    a = np.array(Image.open(png))
    assert a.shape == (40, 60, 3)  # 1 um/px: the slide's own pixels
    marked = (a != 200).any(-1)
    assert marked[5, 7:13].all() and marked[22:28, 30].all()  # top edge of 1, left edge of 2 (corners cut)
    assert not marked[8:12, 8:12].any() and not marked[35:, :].any()  # insides, glass
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
    assert Image.open(png_path).size == (900, 520)
    assert (tmp_path / "a" / "nuclei_overlay.png").is_file() and (tmp_path / "b" / "nuclei_overlay.png").is_file()


def test_area_plot_draws_one_coloured_line_per_slide():
    rng = np.random.default_rng(0)
    img = np.array(area_plot({"a": rng.normal(40, 5, 500), "b": rng.normal(80, 5, 500)}))
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (img == colour).all(-1).sum() > 100


# -- a real batch full of bad input ----------------------------------------------------------
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
MODEL, TILE = "golo", 512
FAILING = {"missing", "corrupt", "truncated", "truncated_tiff", "nompp", "blocked", "diskfull", "diskfull_late"}


@pytest.fixture(scope="module")
def prefect_api() -> str:
    """One temporary Prefect API (its URL) for this module's flow runs, in-process and in
    CLI subprocesses alike (as batches share a real server; none starts its own)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data, mosaic_tool, cmu_slide) -> dict[str, Path]:
    """Tiny real slides and broken files:

    good: a 1 x 1 MoNuSeg mosaic (one tile); nompp: a 512 px H&E crop in a TIFF without
    resolution tags; blank: glass; corrupt: random bytes named .svs; truncated: the first
    half of CMU-1-Small-Region.svs (OpenSlide refuses it); truncated_tiff: a tiled TIFF cut
    in its pixel data (it opens, its tiles do not read); missing: a path with no file.
    """
    d = tmp_path_factory.mktemp("inputs")
    subprocess.run([sys.executable, str(mosaic_tool), str(shared_data / "monuseg"), "--split", "test",
                    "--cols", "1", "--rows", "1", "--tissue", "1", "--no-labels", "--out", str(d / "mosaic")],
                   check=True, capture_output=True)
    image = min((shared_data / "monuseg" / "images").glob("*.png"))
    rgb = np.array(Image.open(image).convert("RGB"))
    write_tiff(d / "nompp.tiff", rgb[:512, :512], mpp=None)
    data = write_tiff(d / "whole.tiff", rgb, mpp=0.25).read_bytes()
    (d / "truncated.tiff").write_bytes(data[: len(data) * 6 // 10])
    glass = np.random.default_rng(0).normal(0, 1.5, (512, 768, 3)) + [243, 242, 240]
    write_tiff(d / "blank.tiff", np.clip(glass, 0, 255).astype(np.uint8), mpp=0.5)
    (d / "corrupt.svs").write_bytes(np.random.default_rng(1).bytes(200_000))
    data = cmu_slide.read_bytes()
    (d / "truncated.svs").write_bytes(data[: len(data) // 2])
    return {"good": d / "mosaic.tiff", "nompp": d / "nompp.tiff", "blank": d / "blank.tiff",
            "corrupt": d / "corrupt.svs", "truncated": d / "truncated.svs", "truncated_tiff": d / "truncated.tiff",
            "missing": d / "missing.svs"}


def write_manifest(path: Path, rows: list[tuple[Path, float | None, str]]) -> Path:
    path.write_text("path,mpp,slide_id\n" + "".join(f"{p},{'' if m is None else m},{s}\n" for p, m, s in rows))
    return path


@pytest.fixture(scope="module")
def bad_batch(prefect_api, inputs, tmp_path_factory):
    """Every bad input in one batch, run once through the flow: (out, final state, rows by id).

    blocked: a regular file sits where the slide's output folder goes; diskfull: the table
    writer fails with ENOSPC on its first write (a full disk, mid-slide); diskfull_late: the
    disk fills up at the last write, run.json, after the table and masks were published."""
    from nucleiflow.pipeline import slidejob
    from nucleiflow.flows.segment import segment_slides

    d = tmp_path_factory.mktemp("bad-batch")
    manifest = write_manifest(d / "batch.csv", [
        (inputs["good"], None, "good"), (inputs["missing"], None, "missing"), (inputs["corrupt"], None, "corrupt"),
        (inputs["truncated"], None, "truncated"), (inputs["truncated_tiff"], None, "truncated_tiff"),
        (inputs["nompp"], None, "nompp"),
        (inputs["nompp"], 0.25, "nompp_fixed"), (inputs["blank"], None, "blank"),
        (inputs["good"], None, "blocked"), (inputs["nompp"], 0.25, "diskfull"),
        (inputs["nompp"], 0.25, "diskfull_late"),
    ])
    out = d / "out"
    out.mkdir()
    (out / "blocked").write_text("a file where the slide's output folder goes")
    original = GeoParquetWriter.write

    def full_disk(self, table):
        if self.path.parent.name == "slide_id=diskfull":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.tmp))
        return original(self, table)

    def full_disk_at_run_json(path, obj):
        if Path(path).parent.name == "diskfull_late":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_json_atomic(path, obj)

    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(GeoParquetWriter, "write", full_disk)
        mp_.setattr(slidejob, "write_json_atomic", full_disk_at_run_json)
        state = segment_slides(slides=[str(manifest)], out=str(out), model=MODEL, device="cpu", tile_size=TILE,
                               readers=0, workers=0, return_state=True)
    print(f"bad batch: {time.perf_counter() - t0:.1f} s")
    report = state.result(raise_on_failure=False)
    return out, state, {r["slide_id"]: r for r in report["slides"]}


def assert_failed(rows: dict, sid: str, *needles: str) -> str:
    r = rows[sid]
    assert r["status"] == "failed" and r["nuclei"] is None, r
    reason = r["reason"]
    assert reason and "\n" not in reason and len(reason) < 400, reason
    for needle in needles:
        assert needle in reason, reason
    assert rows["good"]["status"] == "done" and rows["good"]["nuclei"] > 0, "the rest of the batch finishes"
    return reason


def assert_nothing_final(out: Path, sid: str) -> None:
    paths = slide_paths(out, sid)
    assert not paths["run_json"].exists() and not paths["parquet"].exists() and not paths["zarr"].exists()
    for folder in (paths["run_json"].parent, paths["parquet"].parent):
        if folder.is_dir():
            assert [p.name for p in folder.iterdir() if p.name not in ("overlay.png",)] == []


def test_missing_file(bad_batch, inputs):
    assert_failed(bad_batch[2], "missing", str(inputs["missing"]), "file not found")


def test_corrupt_file(bad_batch):
    assert_failed(bad_batch[2], "corrupt", "corrupt.svs", "not a slide OpenSlide can read")


def test_truncated_file(bad_batch):
    assert_failed(bad_batch[2], "truncated", "truncated.svs", "truncated or corrupt")
    assert_failed(bad_batch[2], "truncated_tiff", "truncated.tiff", "cannot read slide data", "truncated or corrupt")


def test_no_mpp_fails_and_a_manifest_mpp_fixes_it(bad_batch):
    out, _, rows = bad_batch
    assert_failed(rows, "nompp", "no microns-per-pixel", "--mpp", "manifest")
    fixed = rows["nompp_fixed"]
    assert fixed["status"] == "done" and fixed["nuclei"] > 0
    rec = json.loads(slide_paths(out, "nompp_fixed")["run_json"].read_text())
    assert rec["slide"]["mpp_x"] == 0.25 and rec["slide"]["mpp_source"] == "override"


def test_no_tissue_is_done_with_zero_nuclei(bad_batch):
    out, _, rows = bad_batch
    assert rows["blank"]["status"] == "done" and rows["blank"]["nuclei"] == 0 and rows["blank"]["reason"] is None
    assert pq.read_table(slide_paths(out, "blank")["parquet"]).num_rows == 0


def test_unwritable_slide_output_fails_that_slide_only(bad_batch):
    out, _, rows = bad_batch
    assert_failed(rows, "blocked", "cannot write", str(out / "blocked"))
    assert (out / "blocked").read_text().startswith("a file")


def test_disk_full_while_writing_fails_that_slide_and_leaves_nothing_final(bad_batch):
    out, _, rows = bad_batch
    for sid in ("diskfull", "diskfull_late"):
        assert_failed(rows, sid, "disk full while writing", "free space")
        assert_nothing_final(out, sid)
    assert "run.json" in rows["diskfull_late"]["reason"]


def test_batch_report_file_and_table(bad_batch):
    from nucleiflow.flows.segment import format_report

    out, state, rows = bad_batch
    report = state.result(raise_on_failure=False)
    (path,) = out.glob("batch-*.json")
    assert json.loads(path.read_text())["slides"] == report["slides"] and report["report"] == str(path)
    assert (report["done"], report["failed"], report["skipped"], report["busy"]) == (3, 8, 0, 0)
    assert {r["slide_id"] for r in report["slides"] if r["status"] == "failed"} == FAILING
    lines = format_report(report)
    assert lines[0].split() == ["slide", "status", "nuclei", "tissue", "mm2", "time", "s", "reason"]
    corrupt = next(line for line in lines if line.startswith("corrupt "))
    assert corrupt.split()[1:4] == ["failed", "-", "-"]
    assert rows["corrupt"]["reason"] in corrupt
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert {r["slide_id"] for r in summary} == {"good", "nompp_fixed", "blank"}
    assert (out / "good" / "nuclei_overlay.png").is_file()


def test_the_flow_run_ends_failed_with_a_message_naming_the_failed_slides(bad_batch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    _, state, rows = bad_batch
    assert state.is_failed() and state.name == "CompletedWithFailures"
    for sid in FAILING:
        assert f"{sid}: {rows[sid]['reason']}" in state.message
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.type.value == "FAILED"
        for _ in range(50):  # task states reach the API as events, a moment later
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            types = {t.name.removeprefix("segment-"): t.state.type.value for t in tasks if t.state}
            if len(types) == len(rows) and all(v in ("FAILED", "COMPLETED") for v in types.values()):
                break
            time.sleep(0.2)
    assert types == {sid: "FAILED" if sid in FAILING else "COMPLETED" for sid in rows}


def test_model_not_found_fails_before_any_slide(prefect_api, inputs, tmp_path):
    from nucleiflow.flows.segment import segment_slides

    with pytest.raises(KeyError, match="unknown checkpoint 'no-such-model'"):
        segment_slides(slides=[str(inputs["good"])], out=str(tmp_path / "out"), model="no-such-model")
    assert not (tmp_path / "out").exists()


def test_output_folder_not_writable_fails_before_any_slide(prefect_api, inputs, tmp_path):
    from nucleiflow.flows.segment import OutputNotWritable, segment_slides

    (tmp_path / "afile").write_text("not a folder")  # root ignores permissions, not this
    with pytest.raises(OutputNotWritable, match="output folder is not writable"):
        segment_slides(slides=[str(inputs["good"])], out=str(tmp_path / "afile" / "out"), model=MODEL)


# -- the command line ---------------------------------------------------------------------------
def cli_env(home: Path, api_url: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def cli(args: list[str], home: Path, api_url: str | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("nucleiflow")
    return subprocess.run([str(exe), *args], env=cli_env(home, api_url), capture_output=True, text=True,
                          timeout=300, check=False)


def segment_args(slides: list, out: Path, *extra: str) -> list[str]:
    return ["segment", *map(str, slides), "--out", str(out), "--model", MODEL, "--tile-size", str(TILE),
            "--device", "cpu", *extra]


def test_cli_model_not_found_and_unwritable_output_exit_2_before_any_slide(inputs, tmp_path):
    res = cli(["segment", str(inputs["good"]), "--out", str(tmp_path / "out"), "--model", "no-such-model"], tmp_path)
    assert res.returncode == 2 and "unknown checkpoint 'no-such-model'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    (tmp_path / "afile").write_text("not a folder")
    res = cli(segment_args([inputs["good"]], tmp_path / "afile" / "out"), tmp_path)
    assert res.returncode == 2 and "output folder is not writable" in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_prints_the_table_logs_the_reason_and_exits_1(prefect_api, inputs, tmp_path):
    res = cli(segment_args([inputs["good"], inputs["corrupt"]], tmp_path / "out"), tmp_path, prefect_api)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    rows = {line.split()[0]: line for line in res.stdout.splitlines() if line.split()[:1] in (["mosaic"], ["corrupt"])}
    assert rows["mosaic"].split()[1] == "done" and rows["corrupt"].split()[1] == "failed"
    assert "not a slide OpenSlide can read" in rows["corrupt"]
    assert "corrupt: failed: " in res.stdout + res.stderr  # the Prefect log line
    assert len(list((tmp_path / "out").glob("batch-*.json"))) == 1


# -- two workers, one batch ------------------------------------------------------------------
def test_two_concurrent_batches_on_one_folder_do_each_slide_once(prefect_api, bad_batch, inputs, tmp_path):
    manifest = write_manifest(tmp_path / "batch.csv", [(inputs["good"], None, "good"),
                                                       (inputs["nompp"], 0.25, "nompp_fixed")])
    out = tmp_path / "out"
    exe = str(Path(sys.executable).with_name("nucleiflow"))
    procs = [subprocess.Popen([exe, *segment_args([manifest], out)], env=cli_env(tmp_path / f"home{i}", prefect_api),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-2000:] for x in logs)
    reports = [json.loads(p.read_text()) for p in out.glob("batch-*.json")]
    assert len(reports) == 2
    print("two workers:", [{r["slide_id"]: (r["status"], r["worker"]) for r in rep["slides"]} for rep in reports])
    for sid in ("good", "nompp_fixed"):
        rows = [r for rep in reports for r in rep["slides"] if r["slide_id"] == sid]
        statuses = sorted(r["status"] for r in rows)
        assert statuses.count("done") == 1 and set(statuses) <= {"done", "busy", "skipped"}, statuses
        done = next(r for r in rows if r["status"] == "done")
        rec = json.loads(slide_paths(out, sid)["run_json"].read_text())
        assert f"{rec['written_by']['host']}:{rec['written_by']['pid']}" == done["worker"]
        assert_same_outputs(out, bad_batch[0], sid)
        assert not (out / sid / ".claim").exists()


def assert_same_outputs(out: Path, ref: Path, sid: str) -> None:
    a, b = (pq.read_table(slide_paths(o, sid)["parquet"]).to_pandas().sort_values("nucleus_id", ignore_index=True)
            for o in (out, ref))
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b)
    la, lb = (zarr.open_group(str(slide_paths(o, sid)["zarr"]), mode="r")["labels/nuclei/0"][...] for o in (out, ref))
    np.testing.assert_array_equal(la, lb)


# -- scale-out on Dask ---------------------------------------------------------------------------
def test_dask_cluster_of_two_workers_runs_the_slides(prefect_api, bad_batch, inputs, tmp_path):
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    from nucleiflow.flows.segment import segment_slides

    manifest = write_manifest(tmp_path / "batch.csv", [(inputs["good"], None, "good"),
                                                       (inputs["nompp"], 0.25, "nompp_fixed")])
    kw = {"slides": [str(manifest)], "model": MODEL, "device": "cpu", "tile_size": TILE}
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        # a deployment parameter / --dask-address ...
        by_address = segment_slides(out=str(tmp_path / "a"), dask_address=cluster.scheduler_address, **kw)
        # ... or, from Python, the flow with a DaskTaskRunner of one's own
        on_runner = segment_slides.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(
            out=str(tmp_path / "b"), **kw)
    for out, report in ((tmp_path / "a", by_address), (tmp_path / "b", on_runner)):
        assert [r["status"] for r in report["slides"]] == ["done", "done"]
        print("dask workers:", [r["worker"] for r in report["slides"]], "flow process:", os.getpid())
        assert all(not r["worker"].endswith(f":{os.getpid()}") for r in report["slides"])
        for sid in ("good", "nompp_fixed"):
            assert_same_outputs(out, bad_batch[0], sid)
