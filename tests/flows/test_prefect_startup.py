"""Prefect's temporary API server: more time to start than Prefect's 20 s default on a
loaded machine, and one line (exit 2, no slide started) when it still does not start."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

NUCLEIFLOW = Path(sys.executable).with_name("nucleiflow")


def env(home: Path, **extra: str) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**e, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", **extra}


def test_the_cli_gives_the_temporary_server_more_time(tmp_path):
    code = ("import nucleiflow.flows.cli; from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
            " as T; print(T.value())")
    res = subprocess.run([sys.executable, "-c", code], env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and int(res.stdout.strip()) >= 120, res.stderr[-2000:]


def test_a_server_that_does_not_start_is_one_line_and_exit_2(cmu_slide, tmp_path):
    # 0 s: Prefect gives up at once, as it did after 20 s under load.
    res = subprocess.run([str(NUCLEIFLOW), "segment", str(cmu_slide), "--out", str(tmp_path / "out")],
                         env=env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0"),
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("nucleiflow: error:")]  # Prefect logs around it
    assert "Traceback" not in res.stderr and "did not start" in line, res.stderr[-3000:]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in line and "PREFECT_API_URL" in line
    assert not (tmp_path / "out" / "CMU-1-Small-Region").exists(), "no slide started"


def test_train_uses_the_same_server_one_line_and_exit_2(shared_data, tmp_path):
    # train started Prefect's plain ephemeral server: under load, a traceback before any epoch.
    root = shared_data / "monuseg"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        "name: t\narch: student\nkwargs: {base_channels: 4, depth: 2}\nmpp: 0.5\n"
        f"data:\n  root: {root}\n  names: [TCGA-18-5592-01Z-00-DX1, TCGA-21-5784-01Z-00-DX1]\n"
        "  val_fraction: 0.5\n  eval_split: test\n  eval_names: [TCGA-2Z-A9J9-01A-01-TS1]\n"
        "train: {epochs: 1, steps_per_epoch: 1, batch_size: 1, patch: 64}\n"
        f"out: {tmp_path / 'ckpt'}\nwork: {tmp_path / 'work'}\ndevice: cpu\n")
    res = subprocess.run([str(NUCLEIFLOW), "train", str(cfg)],
                         env=env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0"),
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("nucleiflow: error:")]
    assert "Traceback" not in res.stderr and "did not start" in line and "training was not started" in line
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "work").exists(), "no epoch ran"


def test_evaluate_needs_no_prefect_server(shared_data, tmp_path):
    # evaluate runs the tiled path in-process, outside Prefect: no server to wait for.
    from PIL import Image

    name = "TCGA-2Z-A9J9-01A-01-TS1"
    data = tmp_path / "data"
    for sub in ("images", "labels"):
        (data / sub).mkdir(parents=True)
        src = Image.open(shared_data / "monuseg" / sub / f"{name}.png")
        src.crop((300, 300, 556, 556)).save(data / sub / f"{name}.png")
    (data / "splits.csv").write_text(f"name,split,width,height,mpp\n{name},test,256,256,0.25\n")
    res = subprocess.run([str(NUCLEIFLOW), "evaluate", "--data", str(data), "--device", "cpu", "--json"],
                         env=env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0"),
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
