"""Kill-and-resume: a `nucleiflow segment` batch SIGKILLed at several points, then run again.

One output folder lives through three kills (of the whole process group: the flow and its
reader/post-processing pools; the Prefect API is a server that outlives them, as in
production), each at a different moment:

1. before the first slide ends: as soon as the slide is claimed;
2. mid-write: as soon as the hidden temp table of the first slide appears;
3. between slides: as soon as the first slide's run.json appears.

After each kill nothing half-done looks finished; the last run finishes the batch, skips
the slide that was done, and the outputs equal those of a clean, uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr

from nucleiflow.pipeline.config import SegmentConfig
from nucleiflow.pipeline.batch.manifest import read_manifest
from nucleiflow.pipeline.outputs.layout import slide_paths

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # also for the harness's server
os.environ.setdefault("DO_NOT_TRACK", "1")
MODEL, TILE = "golo", 512
SLIDES = ("cmu", "mosaic")  # in batch order


@pytest.fixture(scope="module")
def api_url(tmp_path_factory):
    """A Prefect API that outlives the killed batches, like a real server does (and saves
    each run starting its own): the test harness's temporary server."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def cli_env(prefect_home: Path, api_url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1")
    return env


def segment_cmd(manifest: Path, out: Path) -> list[str]:
    exe = Path(sys.executable).with_name("nucleiflow")
    # One tile per model batch, post-processed in the main process (a reader process stays):
    # the first tile is written before the second enters the model, so "mid-write" lasts a
    # tile's inference, not the few ms between two pooled results (speed-only settings,
    # not part of the run key).
    return [str(exe), "segment", str(manifest), "--out", str(out), "--model", MODEL, "--tile-size", str(TILE),
            "--device", "cpu", "--batch-size", "1", "--workers", "0"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, shared_data, mosaic_tool, cmu_slide) -> Path:
    """CMU-1-Small-Region (its mpp overridden to 0.125: two tiles, so a kill can land
    between its first write and its close) then a 1 x 1 MoNuSeg mosaic (one tile)."""
    d = tmp_path_factory.mktemp("resume-slides")
    subprocess.run([sys.executable, str(mosaic_tool), str(shared_data / "monuseg"), "--split", "test",
                    "--cols", "1", "--rows", "1", "--tissue", "1", "--no-labels", "--out", str(d / "mosaic")],
                   check=True, capture_output=True)
    m = d / "batch.csv"
    m.write_text(f"path,mpp,slide_id\n{cmu_slide},0.125,cmu\n{d / 'mosaic.tiff'},,mosaic\n")
    return m


def load(out: Path, sid: str) -> tuple[pd.DataFrame, np.ndarray]:
    """(nuclei table sorted by nucleus_id, full-resolution label array) of one slide."""
    paths = slide_paths(out, sid)
    table = pq.read_table(paths["parquet"]).to_pandas().sort_values("nucleus_id", ignore_index=True)
    labels = zarr.open_group(str(paths["zarr"]), mode="r")["labels/nuclei/0"][...]
    return table, labels


@pytest.fixture(scope="module")
def clean(manifest, tmp_path_factory) -> Path:
    """The uninterrupted run, in this process (no pools): the reference outputs."""
    from nucleiflow.flows.segment import _predictor
    from nucleiflow.models.checkpoint import model_hash, resolve
    from nucleiflow.pipeline.batch.run_slide import segment_slide

    import torch

    from nucleiflow.pipeline.infer.pools import pool_sizes, usable_cores

    out = tmp_path_factory.mktemp("clean")
    cfg = SegmentConfig(model=MODEL, tile_size=TILE, device="cpu", readers=0, workers=0)
    predictor, mhash = _predictor(MODEL, "cpu")
    assert mhash == model_hash(resolve(MODEL))
    # The CLI sets torch's threads by the pool rule (`pools.shared_pools`); golo's maps move
    # by float32 ulps with the thread count (polygon vertices follow them), so the reference
    # runs with the same threads whatever OMP_NUM_THREADS this process was started with.
    before = torch.get_num_threads()
    torch.set_num_threads(pool_sizes(usable_cores(), False, workers=0).torch_threads)  # as segment_cmd
    try:
        for job in read_manifest(manifest):
            assert segment_slide(job, out, cfg, predictor, mhash, log=None)["status"] == "done"
    finally:
        torch.set_num_threads(before)
    return out


def temp_tables(out: Path, sid: str) -> list[Path]:
    folder = slide_paths(out, sid)["parquet"].parent
    return sorted(folder.glob(".part-0.parquet.tmp-*")) if folder.is_dir() else []


def run_until(cmd: list[str], env: dict, log: Path, ready, timeout: float = 240) -> float:
    """Start ``cmd`` in its own process group, wait until ``ready()``, SIGKILL the group.
    Returns the seconds it ran. Fails if the batch ends first."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not ready():
            if p.poll() is not None:
                pytest.fail(f"the batch ended (rc {p.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"kill point not reached in {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.01)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    deadline = time.monotonic() + 10
    while group_alive(p.pid):  # the pools and the ephemeral server die with it
        if time.monotonic() > deadline:
            pytest.fail(f"processes of the killed batch are still alive: {group_alive(p.pid)}")
        time.sleep(0.05)
    return time.monotonic() - t0


def group_alive(pgid: int) -> list[int]:
    """Pids of process group ``pgid`` that are not zombies (Linux /proc)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(stat.parent.name))
    return alive


def assert_not_finished(out: Path, sid: str) -> None:
    paths = slide_paths(out, sid)
    assert not paths["run_json"].exists(), "a slide caught half-way looks done"
    assert not paths["parquet"].exists(), "a half-written table is under its final name"


def claim_written(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def test_a_batch_killed_three_times_resumes_to_the_clean_result(manifest, clean, api_url, tmp_path):
    out = tmp_path / "out"
    env, cmd = cli_env(tmp_path / "prefect", api_url), segment_cmd(manifest, out)
    cmu = slide_paths(out, "cmu")
    timings = {}

    # 1. before the first slide ends, once its claim is written: a kill inside the claim's
    # own write leaves an unreadable claim, which the next run rightly treats as busy for
    # claims.GRACE_S (tests/batch/test_claims.py), not what this test is about.
    timings["kill1"] = run_until(cmd, env, tmp_path / "run1.log", lambda: claim_written(cmu["run_json"].parent / ".claim"))
    assert_not_finished(out, "cmu")

    # 2. mid-write: tiles are streaming into the hidden temp table
    timings["kill2"] = run_until(cmd, env, tmp_path / "run2.log", lambda: bool(temp_tables(out, "cmu")))
    assert_not_finished(out, "cmu")
    assert temp_tables(out, "cmu"), "the kill left the temp table it caught"

    # 3. between slides: the first is done
    timings["kill3"] = run_until(cmd, env, tmp_path / "run3.log", lambda: cmu["run_json"].exists())
    assert json.loads(cmu["run_json"].read_text())["status"] == "done"
    assert_not_finished(out, "mosaic")
    done_at = cmu["run_json"].stat().st_mtime_ns

    # 4. the batch runs to its end
    t0 = time.monotonic()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    timings["final"] = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reports = sorted(out.glob("batch-*.json"), key=lambda p: p.stat().st_mtime)
    assert len(reports) == 1, "killed batches write no report"
    status = {r["slide_id"]: r["status"] for r in json.loads(reports[-1].read_text())["slides"]}
    assert status == {"cmu": "skipped", "mosaic": "done"}
    assert cmu["run_json"].stat().st_mtime_ns == done_at, "a done slide was redone"

    for sid in SLIDES:
        table, labels = load(out, sid)
        ref_table, ref_labels = load(clean, sid)
        assert len(table) > 0
        pd.testing.assert_frame_equal(table, ref_table)
        np.testing.assert_array_equal(labels, ref_labels)
        folder = slide_paths(out, sid)["run_json"].parent
        leftovers = [p.name for d in (folder, slide_paths(out, sid)["parquet"].parent)
                     for p in d.iterdir() if p.name.startswith(".")]
        assert leftovers == [], f"temp files or claims left behind: {leftovers}"
        assert (folder / "nuclei_overlay.png").is_file()
    assert (out / "summary.csv").is_file() and (out / "summary.png").is_file()
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})


def test_tta_changes_the_config_key_only_when_on():
    """TTA changes results, so a slide done without it is not 'done' with it; off (1) keeps
    the keys of runs made before the option existed."""
    from nucleiflow.pipeline.config import SegmentConfig

    base = SegmentConfig()
    assert SegmentConfig(tta=1).key() == base.key()
    assert SegmentConfig(tta=4).key() != base.key()
