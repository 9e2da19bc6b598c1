"""A batch never destroys a finished slide by accident, and never trusts damaged outputs.

Real tiny slides (MoNuSeg H&E crops in OpenSlide-readable TIFFs), the bundled `student`
model, `segment_slide` as the flow calls it; outputs damaged with ordinary file operations.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from slidefiles import write_tiff

from nucleiflow.models.checkpoint import load_checkpoint, model_hash, resolve
from nucleiflow.pipeline.batch.guard import OutputConflict
from nucleiflow.pipeline.batch.manifest import SlideJob
from nucleiflow.pipeline.batch.run_slide import segment_slide
from nucleiflow.pipeline.config import SegmentConfig
from nucleiflow.pipeline.infer.stream import Predictor
from nucleiflow.pipeline.outputs.layout import slide_paths

CFG = SegmentConfig(model="student", device="cpu", tile_size=256, readers=0, workers=0)


@pytest.fixture(scope="module")
def model() -> tuple[Predictor, str]:
    net, card = load_checkpoint("student")
    return Predictor(net, card, device="cpu"), model_hash(resolve("student"))


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory, shared_data) -> tuple[Path, Path]:
    """a/x.tif and b/x.tif: two different H&E crops with one file name (one default id)."""
    d = tmp_path_factory.mktemp("slides")
    rgb = np.array(Image.open(min((shared_data / "monuseg" / "images").glob("*.png"))).convert("RGB"))
    paths = []
    for name, crop in (("a", rgb[:384, :384]), ("b", rgb[384:768, 384:768])):
        (d / name).mkdir()
        paths.append(write_tiff(d / name / "x.tif", np.ascontiguousarray(crop), mpp=0.25))
    return paths[0], paths[1]


def run(path: Path, out: Path, model, **cfg) -> dict:
    return segment_slide(SlideJob(str(path), "x"), out, CFG.model_copy(update=cfg), *model, log=None)


def test_another_slide_with_the_same_id_is_refused_unless_overwrite(two_slides, model, tmp_path):
    a, b = two_slides
    first = run(a, tmp_path, model)
    paths = slide_paths(tmp_path, "x")
    table = pq.read_table(paths["parquet"])
    with pytest.raises(OutputConflict) as e:
        run(b, tmp_path, model)
    msg = str(e.value)
    assert "\n" not in msg and str(b) in msg and str(a) in msg and "--overwrite" in msg and "slide_id" in msg
    assert pq.read_table(paths["parquet"]).equals(table), "the first slide's results are untouched"
    assert json.loads(paths["run_json"].read_text())["slide_fingerprint"] == first["slide_fingerprint"]
    replaced = run(b, tmp_path, model, overwrite=True)
    assert replaced["status"] == "done" and replaced["slide_fingerprint"] != first["slide_fingerprint"]
    assert run(b, tmp_path, model)["status"] == "skipped"


def test_the_same_slide_failed_mid_run_is_redone(two_slides, model, tmp_path):
    a, _ = two_slides
    first = run(a, tmp_path, model)
    slide_paths(tmp_path, "x")["run_json"].unlink()  # a run killed after the table, before run.json
    again = run(a, tmp_path, model)
    assert again["status"] == "done" and again["nuclei"] == first["nuclei"]


@pytest.mark.parametrize("harm", ["truncate_parquet", "delete_zarr_chunk"])
def test_damaged_outputs_of_a_done_slide_are_redone(two_slides, model, tmp_path, harm):
    a, _ = two_slides
    first = run(a, tmp_path, model)
    assert first["nuclei"] > 0 and run(a, tmp_path, model)["status"] == "skipped"
    paths = slide_paths(tmp_path, "x")
    if harm == "truncate_parquet":
        data = paths["parquet"].read_bytes()
        paths["parquet"].write_bytes(data[: len(data) // 2])
    else:
        chunk = next(p for p in (paths["zarr"] / "labels" / "nuclei" / "0").rglob("*") if p.is_file()
                     and not p.name.startswith("."))
        chunk.unlink()
    again = run(a, tmp_path, model)
    assert again["status"] == "done" and "damaged" in again["reason"], again
    assert pq.read_table(paths["parquet"]).num_rows == first["nuclei"]
    assert run(a, tmp_path, model)["status"] == "skipped"


def test_a_greyscale_slide_is_done_with_a_warning(shared_data, model, tmp_path):
    rgb = np.array(Image.open(min((shared_data / "monuseg" / "images").glob("*.png"))).convert("RGB"))
    grey = np.repeat(rgb[:384, :384].mean(-1, keepdims=True), 3, -1).astype(np.uint8)
    rec = run(write_tiff(tmp_path / "grey.tif", grey, mpp=0.25), tmp_path / "out", model)
    assert rec["status"] == "done" and "greyscale" in rec["reason"], rec
