"""Bad weights and data sets are refused before any slide or image: one line naming the
file, exit 2, no Prefect run (real copies of the bundled checkpoint, damaged on disk)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nucleiflow.models.checkpoint import BUNDLED

NUCLEIFLOW = Path(sys.executable).with_name("nucleiflow")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(NUCLEIFLOW), *args], capture_output=True, text=True, timeout=180, check=False)


def assert_one_line(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def damaged(tmp_path: Path, how: str) -> Path:
    folder = Path(shutil.copytree(BUNDLED / "student", tmp_path / f"student-{how}"))
    card_path, weights = folder / "model.json", folder / "model.safetensors"
    card = json.loads(card_path.read_text())
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "kwargs":  # a valid card whose kwargs do not fit the stored weights
        card["kwargs"]["base_channels"] *= 2
    card_path.write_text(json.dumps(card))
    return folder


# Card errors (unknown arch, misspelt post-processing keys) are config.ModelCard's, tested in
# tests/test_config.py; these are the weights, which only loading them finds out.
@pytest.mark.parametrize("how, file, needle", [
    ("truncated", "model.safetensors", "cannot load the weights"),
    ("kwargs", "model.safetensors", "cannot load the weights"),
])
def test_segment_refuses_a_bad_checkpoint_before_any_slide(how, file, needle, cmu_slide, tmp_path):
    folder = damaged(tmp_path, how)
    res = run_cli("segment", str(cmu_slide), "--out", str(tmp_path / "out"), "--model", str(folder))
    assert_one_line(res, str(folder / file), needle)
    assert not (tmp_path / "out").exists(), "nothing started"


def test_evaluate_without_labels_is_one_line(shared_data, tmp_path):
    (tmp_path / "images").mkdir()
    name = min((shared_data / "monuseg" / "images").glob("*.png"))
    Image.fromarray(np.array(Image.open(name).convert("RGB"))[:256, :256]).save(tmp_path / "images" / "a.png")
    (tmp_path / "splits.csv").write_text("name,split,mpp\na,test,0.25\n")
    res = run_cli("evaluate", "--model", "student", "--data", str(tmp_path), "--json")
    assert_one_line(res, str(tmp_path / "labels" / "a.png"), "labels/<name>.png")
    assert res.stdout == ""
    folder = damaged(tmp_path, "truncated")
    assert_one_line(run_cli("evaluate", "--model", str(folder), "--data", str(tmp_path)),
                    str(folder / "model.safetensors"))
