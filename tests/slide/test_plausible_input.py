"""Implausible mpp (tags or --mpp) is refused before any work with the numbers, and a
greyscale slide is reported, not silently "done, 0 nuclei": real TIFFs through OpenSlide."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from slidefiles import write_tiff

from nucleiflow.pipeline.batch.manifest import expand_slides
from nucleiflow.pipeline.slide.reader import SlideError, open_slide


def run_cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("nucleiflow")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=180, check=False)


def he_crop(shared_data: Path, size: int = 512) -> np.ndarray:
    rgb = np.array(Image.open(min((shared_data / "monuseg" / "images").glob("*.png"))).convert("RGB"))
    return np.ascontiguousarray(rgb[:size, :size])


def test_implausible_mpp_in_the_tags_is_refused_at_open(shared_data, tmp_path):
    path = write_tiff(tmp_path / "coarse.tif", he_crop(shared_data, 256), mpp=50.0)
    with pytest.raises(SlideError, match=r"50 um/px \(its metadata says\).*12.8 x 12.8 mm.*--mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.25) as r:  # the fix the message names
        assert r.info.mpp_x == 0.25
    res = run_cli("inspect", str(path), "--json")
    assert res.returncode == 2 and res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert str(path) in res.stderr and "not a plausible slide resolution" in res.stderr


@pytest.mark.parametrize("mpp", ["50", "0.001"])
def test_implausible_mpp_option_is_refused_before_any_slide(mpp, cmu_slide, tmp_path):
    for args in (["inspect", str(cmu_slide), "--mpp", mpp],
                 ["segment", str(cmu_slide), "--out", str(tmp_path / "out"), "--mpp", mpp]):
        res = run_cli(*args)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
        assert f"{float(mpp):g} um/px" in res.stderr and "plausible" in res.stderr
    assert not (tmp_path / "out").exists()


def test_implausible_manifest_mpp_is_refused(tmp_path):
    m = tmp_path / "batch.csv"
    m.write_text("path,mpp\na.svs,50\n")
    with pytest.raises(ValueError, match=r"batch.csv:2: 50 um/px"):
        expand_slides([str(m)])


def test_greyscale_slide_warns_in_inspect(shared_data, tmp_path):
    grey = np.repeat(he_crop(shared_data).mean(-1, keepdims=True), 3, -1).astype(np.uint8)
    path = write_tiff(tmp_path / "grey.tif", grey, mpp=0.25)
    res = run_cli("inspect", str(path), "--json")
    assert res.returncode == 0, res.stderr
    assert "greyscale" in json.loads(res.stdout)["warning"] and "greyscale" in res.stderr
    colour = write_tiff(tmp_path / "colour.tif", he_crop(shared_data), mpp=0.25)
    assert "warning" not in json.loads(run_cli("inspect", str(colour), "--json").stdout)
