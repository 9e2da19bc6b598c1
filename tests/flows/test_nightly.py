"""The `nightly` deployment end to end, with real parts and the commands of the README section "Nightly batches".

A `prefect server` on a free loopback port (private PREFECT_HOME, analytics off), a process
work pool, `nucleiflow deploy`, a process worker, then `prefect deployment run
'segment-slides/nightly'` on three slides: the CMU region, the TCGA slide (no mpp in the
file: a CSV manifest gives it) and a text file named .svs. The outputs
are read back with geopandas and zarr; the batch report and the flow run's logs must name
the corrupt slide with its reason. Everything started here is stopped in the finalisers,
the worker with SIGINT (Prefect's worker turns SIGTERM into a first SIGINT, which alone does not stop it).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import typer
import zarr
from typer.testing import CliRunner

from nucleiflow.flows.deploy import deploy, deploy_command

BIN = Path(sys.executable).parent  # the venv's bin: prefect, nucleiflow (not resolved: a venv symlinks python)
POOL = "nucleiflow"
# Speed: both slides are read at a fraction of their pixels (model at 0.5 um/px).
MPP = 0.25  # the flow's mpp parameter: overrides the CMU slide's 0.499 from its metadata
TCGA_MPP = 0.125  # the manifest's mpp for the slide with none (a manifest mpp wins over MPP)


# -- processes ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Pids of every live process below ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(proc: subprocess.Popen, sig: int, timeout: float = 30) -> None:
    """Send ``sig`` to ``proc``; kill it after ``timeout`` s; then kill what it left behind."""
    below = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for pid in below:  # e.g. a flow-run process of a worker stopped mid-run
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_flow_processes(worker_pid: int, timeout: float = 60) -> None:
    """Wait until the worker has no flow-run process (`python -m prefect.engine`) left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cmdlines = []
        for pid in descendants(worker_pid):
            try:
                cmdlines.append(Path(f"/proc/{pid}/cmdline").read_bytes())
            except OSError:
                pass
        if not any(b"prefect.engine" in c for c in cmdlines):
            return
        time.sleep(0.5)
    raise AssertionError(f"flow-run process of worker {worker_pid} still running after {timeout} s")


def run(cmd: str, env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """One shell command line from the doc (``env`` puts the venv's bin first on PATH)."""
    return subprocess.run(cmd, shell=True, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def api(env: dict, path: str, body: dict | None = None):
    req = urllib.request.Request(env["PREFECT_API_URL"] + path, method="POST" if body is not None else "GET",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


# -- fixtures -------------------------------------------------------------------------
@pytest.fixture
def prefect_server(tmp_path):
    """A real `prefect server start` on a free port; yields the environment that reaches it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_UI_ENABLED="false",  # no UI build to copy into the fresh PREFECT_HOME
        PREFECT_WORKER_QUERY_SECONDS="1",  # the default 10 s poll would dominate the test
    )
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if api(env, "/health") is True:
                    break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            assert server.poll() is None, f"server exited: {(tmp_path / 'server.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "server not healthy in 90 s"
            time.sleep(0.5)
        yield env
    finally:
        stop(server, signal.SIGINT)
        log.close()


@pytest.fixture
def worker(prefect_server, tmp_path):
    """Pool + deployment (the doc's commands), then a process worker for the pool; yields
    the environment and the worker process."""
    env = prefect_server
    r = run(f"prefect work-pool create {POOL} --type process", env, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(f"nucleiflow deploy --pool {POOL} --name nightly --model golo", env, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "segment-slides/nightly" in r.stdout
    # The printed worker command is the README's: one batch at a time.
    assert f"prefect worker start --pool {POOL} --type process --limit 1" in r.stdout
    dep = api(env, "/deployments/name/segment-slides/nightly")
    # The installed module, no pull step: nothing in the deployment names this checkout.
    assert dep["entrypoint"] == "nucleiflow.flows.segment.segment_slides" and not dep["pull_steps"]
    assert dep["parameters"] == {"model": "golo", "device": "auto"}
    assert dep["job_variables"] == {"working_dir": str(tmp_path.resolve())}
    log = open(tmp_path / "worker.log", "w")
    # No shell in between: the signals below must reach the worker itself.
    proc = subprocess.Popen(shlex.split(f"prefect worker start --pool {POOL} --type process --limit 1"),
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        yield env, proc
    finally:
        stop(proc, signal.SIGINT)  # SIGTERM is ignored by the worker
        log.close()


# -- argument checks, before any server is needed -------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"device": "gpu"}, "device must be auto, cpu or cuda"),
    ({"cron": "0 20 * * *", "out": "/data/results"}, "needs default --slides and --out"),
    ({"model": "no-such-model"}, "unknown checkpoint 'no-such-model'"),
])
def test_deploy_rejects_bad_arguments_before_contacting_prefect(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        deploy("nucleiflow", "nightly", **kwargs)


def test_deploy_command_says_what_is_wrong_in_one_line():
    app = typer.Typer()
    app.command()(deploy_command)
    r = CliRunner().invoke(app, ["--model", "no-such-model"])
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and r.output.startswith("nucleiflow: error: unknown checkpoint")


# -- the real thing -------------------------------------------------------------------
@pytest.mark.slow
def test_nightly_deployment_runs_a_batch_with_a_corrupt_slide(worker, tmp_path, cmu_slide, tcga_slide):
    env, worker_proc = worker
    manifest = tmp_path / "tonight.csv"
    manifest.write_text(f"path,mpp\n{tcga_slide},{TCGA_MPP}\n")
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_text("not a slide, only text with a slide's name\n" * 50)
    out = tmp_path / "results"
    slides = shlex.quote("slides=" + json.dumps([str(cmu_slide), str(manifest), str(corrupt)]))

    t0 = time.monotonic()
    r = run(f"prefect deployment run 'segment-slides/nightly' --param {slides} --param {shlex.quote(f'out={out}')} "
            f"--param mpp={MPP} --param tile_size=512 --watch --watch-timeout 150", env, tmp_path, timeout=200)
    seconds = time.monotonic() - t0
    logs = r.stdout + r.stderr + (tmp_path / "worker.log").read_text()[-4000:]
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", r.stdout)
    assert run_id, logs
    flow_run = api(env, f"/flow_runs/{run_id.group(1)}")
    state = flow_run["state"]
    # One bad slide: the batch finishes (its report is written, below) in a Failed state
    # that names the slide, so `--watch` exits 1 and alerts keyed on state types fire.
    assert state["type"] == "FAILED" and "corrupt" in state["message"], f"{state} after {seconds:.0f} s\n{logs}"
    assert state["name"] == "Failed", state  # the standard name: the UI's filters and counts use it
    assert r.returncode == 1, logs
    # The deployment's runs filtered on the Failed type (what the UI's views do) list this night.
    failed_runs = api(env, "/flow_runs/filter", {"flow_runs": {
        "deployment_id": {"any_": [flow_run["deployment_id"]]}, "state": {"type": {"any_": ["FAILED"]}}}})
    assert [fr["id"] for fr in failed_runs] == [run_id.group(1)]
    assert flow_run["parameters"]["model"] == "golo"  # the deployment's default, not given in the run

    reports = sorted(out.glob("batch-*.json"))
    assert len(reports) == 1, logs
    report = json.loads(reports[0].read_text())
    rows = {row["slide_id"]: row for row in report["slides"]}
    good = {cmu_slide.stem: cmu_slide, tcga_slide.stem: tcga_slide}
    assert set(rows) == {*good, "corrupt"}
    for sid in good:
        assert rows[sid]["status"] == "done" and rows[sid]["reason"] is None, rows[sid]
    bad = rows["corrupt"]
    assert bad["status"] == "failed" and bad["nuclei"] is None
    assert str(corrupt) in bad["reason"] and "\n" not in bad["reason"]
    assert report["failed"] == 1 and report["done"] == 2

    # The reason is in the flow run's logs too (the Prefect UI shows them), exactly once, and
    # no traceback: the flow-run process flushes its logs when it exits, so wait for that.
    wait_for_flow_processes(worker_proc.pid)
    messages = [m["message"] for m in api(env, "/logs/filter", {
        "logs": {"flow_run_id": {"any_": [run_id.group(1)]}}, "limit": 200})]
    assert sum(bad["reason"] in m for m in messages) == 1, messages
    for noise in ("Traceback", "Engine execution", "NoneType: None", "Unexpected result"):
        assert not [m for m in messages if noise in m], (noise, messages)
        assert noise not in (tmp_path / "worker.log").read_text(), noise

    # The run page's artifacts: the batch table, and one progress bar per segmented slide.
    artifacts = api(env, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id.group(1)]}}})
    (table,) = [a for a in artifacts if a["type"] == "table"]
    assert table["key"] == "nucleiflow-batch"
    table_rows = {row["slide_id"]: row for row in json.loads(table["data"])}
    assert table_rows["corrupt"]["status"] == "failed" and table_rows["corrupt"]["reason"] == bad["reason"]
    assert {sid: row["nuclei"] for sid, row in table_rows.items()} == {sid: row["nuclei"] for sid, row in rows.items()}
    progress = sorted(a["description"] for a in artifacts if a["type"] == "progress")
    assert len(progress) == 2 and all(a["data"] == 100 for a in artifacts if a["type"] == "progress"), artifacts
    assert [p.split(":")[0] for p in progress] == sorted(good), progress

    # geopandas: one table for the batch, rows for the two good slides only.
    table = gpd.read_parquet(out / "nuclei")
    counts = table.groupby("slide_id").size().to_dict()
    assert counts == {sid: rows[sid]["nuclei"] for sid in good}
    assert all(n > 0 for n in counts.values()), counts
    assert not (out / "corrupt" / "run.json").exists()
    assert not (out / "nuclei" / "slide_id=corrupt").exists()

    # zarr: each good slide's label raster holds exactly its table's nucleus ids.
    for sid, path in good.items():
        run_json = json.loads((out / sid / "run.json").read_text())
        assert run_json["status"] == "done" and run_json["model"] == "golo"
        assert run_json["slide"]["mpp_x"] == pytest.approx(TCGA_MPP if sid == tcga_slide.stem else MPP)
        labels = zarr.open_group(str(out / sid / "masks.ome.zarr"), mode="r")["labels/nuclei/0"]
        assert labels.chunks == (512, 512)
        lab = labels[...]
        ids = np.unique(lab[lab > 0])
        np.testing.assert_array_equal(ids, np.sort(table.loc[table.slide_id == sid, "nucleus_id"].to_numpy()))
