"""QuPath export: detections (not annotations), streamed from a real GeoParquet file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nucleiflow.pipeline.postprocess.morphometry import nuclei_table
from nucleiflow.pipeline.outputs.qupath import export_slide
from nucleiflow.pipeline.outputs.atomic import write_json_atomic
from nucleiflow.pipeline.outputs.geoparquet import GeoParquetWriter
from nucleiflow.pipeline.outputs.layout import slide_paths


def test_export_writes_detections_with_measurements(tmp_path):
    labels = np.zeros((40, 60), np.int32)
    labels[5:15, 5:15] = 1
    labels[20:30, 30:50] = 2
    table = nuclei_table(labels, np.full(labels.shape, 0.9, np.float32), mpp0=0.25, scale=2.0, ids=7)
    paths = slide_paths(tmp_path, "s1")
    w = GeoParquetWriter(paths["parquet"], {"slide_id": "s1"})
    w.write(table)
    w.close()
    write_json_atomic(paths["run_json"], {"status": "done"})
    dest, n = export_slide(tmp_path / "s1")
    doc = json.loads(dest.read_text())
    assert n == 2 and doc["type"] == "FeatureCollection" and len(doc["features"]) == 2
    f = doc["features"][0]
    assert f["properties"]["objectType"] == "detection"
    assert f["properties"]["nucleus_id"] == 7 and f["id"] == "7"
    assert f["properties"]["measurements"]["area_um2"] == pytest.approx(100 * 0.5**2, rel=0.05)
    xs = [p[0] for p in f["geometry"]["coordinates"][0]]
    assert min(xs) == pytest.approx(10, abs=1.0) and max(xs) == pytest.approx(30, abs=1.0)  # level-0 px


def test_unfinished_slide_is_refused(tmp_path):
    (tmp_path / "s2").mkdir()
    with pytest.raises(FileNotFoundError, match="nucleiflow segment"):
        export_slide(tmp_path / "s2")
