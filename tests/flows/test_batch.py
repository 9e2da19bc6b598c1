"""Overnight batches: bad input, the batch report, the Prefect state, Dask, the summary.

One real batch (the `golo` model on tiny real slides) holding every kind of bad input, run
once through the flow in-process under Prefect's test harness, with one test per input;
then the CLI (exit codes), two concurrent CLI batches on one folder, and a 2-worker Dask
cluster. Claims are in test_claims.py, the summary pieces in test_summary.py, pools shared by
a batch in test_batch_pools.py; the fixtures in conftest.py.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from polygons import assert_same_table
from slidefiles import write_manifest

from nucleiflow.pipeline.outputs.atomic import write_json_atomic
from nucleiflow.pipeline.outputs.geoparquet import GeoParquetWriter
from nucleiflow.pipeline.outputs.layout import slide_paths


# -- a real batch full of bad input ----------------------------------------------------------
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
MODEL, TILE = "golo", 512
FAILING = {"missing", "corrupt", "truncated", "truncated_tiff", "nompp", "blocked", "diskfull", "diskfull_late"}


@pytest.fixture(scope="module")
def bad_batch(prefect_api, inputs, tmp_path_factory):
    """Every bad input in one batch, run once through the flow: (out, final state, rows by id).

    blocked: a regular file sits where the slide's output folder goes; diskfull: the table
    writer fails with ENOSPC on its first write (a full disk, mid-slide); diskfull_late: the
    disk fills up at the last write, run.json, after the table and masks were published."""
    from nucleiflow.pipeline.batch import run_slide as slidejob
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
    from nucleiflow.flows.segment import batch_report

    report = batch_report(state)
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
            # .resume/ (finished tiles kept for the next run) is hidden and never read as output.
            assert [p.name for p in folder.iterdir() if p.name not in ("overlay.png", ".resume")] == []


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
    from nucleiflow.flows.segment import batch_report, format_report

    out, state, rows = bad_batch
    report = batch_report(state)
    (path,) = out.glob("batch-*.json")
    assert json.loads(path.read_text())["slides"] == report["slides"] and report["report"] == str(path)
    # Readable by the group on a shared results folder, like every other output (umask 022 here).
    from nucleiflow.pipeline.outputs.atomic import umask

    for written in (path, slide_paths(out, "good")["run_json"], out / "summary.csv"):
        assert os.stat(written).st_mode & 0o777 == 0o666 & ~umask(), written
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
    # A standard Failed (not a custom name: the UI's filters and run counts use standard ones).
    assert state.is_failed() and state.name == "Failed"
    assert state.message.startswith(f"{len(FAILING)} of {len(rows)} slides failed: ")
    named = set(state.message.split(": ", 1)[1].split(" (")[0].split(", "))
    assert named == FAILING, state.message
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
    both = res.stdout + res.stderr
    assert both.count("tissue mm2") == 1  # the table, printed once (the flow no longer logs it)
    # One log line per failure (besides its table row), no empty or engine traceback.
    assert res.stderr.count("not a slide OpenSlide can read") == 1, res.stderr
    assert "NoneType: None" not in both and "Traceback" not in both and "Engine execution" not in both
    # Short prefixes ("HH:MM:SS LEVEL"), so ordinary lines fit a terminal; plain progress lines
    # (stdout is a pipe here, no bar).
    logs = [line for line in res.stderr.splitlines() if line[:2].isdigit()]
    long = [line for line in logs if len(line) > 130 and "OpenSlide" not in line and str(tmp_path) not in line]
    assert logs and not long, long
    assert "mosaic: 1/" in res.stderr and "tiles, the first after" in res.stderr, res.stderr
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
    # Another process (the CLI's, with its own pools) computes the model's maps to the last
    # bits only (torch's CPU kernels): same labels, outlines equal to float noise (tests/polygons.py).
    assert_same_table(a, b)
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
