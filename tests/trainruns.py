"""Helpers of the training-flow tests (tests/train/): a tiny student config on a few MoNuSeg
images, `nucleiflow` as a real process, and reading what it prints."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from nucleiflow.models.checkpoint import load_checkpoint
from nucleiflow.pipeline.train.config import TrainConfig
from nucleiflow.pipeline.train.evaluation import METRICS
from nucleiflow.pipeline.train.loop import train

NUCLEIFLOW = Path(sys.executable).with_name("nucleiflow")
# Four MoNuSeg train images (validation is carved from these) and one test image to score.
NAMES = ["TCGA-18-5592-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1", "TCGA-21-5786-01Z-00-DX1",
         "TCGA-38-6178-01Z-00-DX1"]
EVAL_NAME = "TCGA-2Z-A9J9-01A-01-TS1"
TABLE_ROW = re.compile(r"\b(" + "|".join(METRICS) + r")\s+(-|\d+\.\d{4})\s+(\d+\.\d{4})\s+(-|[+-]\d+\.\d{4})\s*$")


# -- helpers ------------------------------------------------------------------------------
def config(shared_data: Path, tmp: Path, **changes) -> dict:
    """A tiny student config (like configs/ci.yaml) with absolute data root and tmp out/work;
    ``changes`` replace top-level keys, dicts are merged one level deep."""
    cfg = {
        "name": "test-student",
        "arch": "student",
        "kwargs": {"base_channels": 4, "depth": 2},
        "mpp": 0.5,
        "data": {"root": str(shared_data / "monuseg"), "names": NAMES[:3], "val_fraction": 0.34,
                 "eval_split": "test", "eval_names": [EVAL_NAME]},
        "train": {"epochs": 3, "steps_per_epoch": 2, "batch_size": 2, "patch": 96, "lr": 0.001,
                  "patience": 50},
        "postprocess": {"method": "hv"},
        "out": str(tmp / "checkpoint"),
        "work": str(tmp / "work"),
        "device": "cpu",
    }
    for k, v in changes.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def nucleiflow(*args: str, env: dict, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(NUCLEIFLOW), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr  # Prefect's log lines go to either, depending on handlers


def table(text: str) -> dict[str, tuple[str, str, str]]:
    """{metric: (old, new, delta)} from the old-vs-new table the flow prints."""
    rows = {}
    for line in text.splitlines():
        m = TABLE_ROW.search(line)
        if m:
            rows[m.group(1)] = m.group(2, 3, 4)
    return rows


def card_of(folder: str | Path) -> dict:
    return load_checkpoint(folder)[1]


def quiet(cfg: TrainConfig) -> tuple[dict, list[str]]:
    """train() in-process, its log captured."""
    lines: list[str] = []
    return train(cfg, log=lines.append), lines
