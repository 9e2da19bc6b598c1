"""QuPath export: detections (not annotations), streamed from a real GeoParquet file, read back
the way QuPath's GeoJSON importer reads a feature (UUID id, objectType, geometry,
classification, a measurements map), plain and gzip."""
from __future__ import annotations

import gzip
import json
import uuid

import numpy as np
import pytest

from nucleiflow.pipeline.postprocess.morphometry import nuclei_table
from nucleiflow.pipeline.outputs.qupath import export_slide, feature_id
from nucleiflow.pipeline.outputs.atomic import write_json_atomic
from nucleiflow.pipeline.outputs.geoparquet import GeoParquetWriter
from nucleiflow.pipeline.outputs.layout import slide_paths


@pytest.fixture
def slide_out(tmp_path):
    labels = np.zeros((40, 60), np.int32)
    labels[5:15, 5:15] = 1
    labels[20:30, 30:50] = 2
    table = nuclei_table(labels, np.full(labels.shape, 0.9, np.float32), mpp0=0.25, scale=2.0, ids=7)
    paths = slide_paths(tmp_path, "s1")
    w = GeoParquetWriter(paths["parquet"], {"slide_id": "s1"})
    w.write(table)
    w.close()
    write_json_atomic(paths["run_json"], {"status": "done", "slide_fingerprint": "abc123"})
    return tmp_path / "s1"


def qupath_read(doc: dict) -> list[dict]:
    """What QuPath's importer takes from each feature: it keeps ``id`` only as a UUID, reads
    properties.objectType / classification / measurements (a map of numbers)."""
    assert doc["type"] == "FeatureCollection"
    objs = []
    for f in doc["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        p = f["properties"]
        assert isinstance(p["measurements"], dict)
        assert all(isinstance(v, (int, float)) for v in p["measurements"].values())
        objs.append({"id": uuid.UUID(f["id"]), "type": p["objectType"], "class": p["classification"]["name"],
                     "colour": p["classification"]["color"], "measurements": p["measurements"],
                     "geometry": f["geometry"]})
    return objs


def test_export_writes_detections_with_measurements(slide_out):
    dest, n = export_slide(slide_out)
    objs = qupath_read(json.loads(dest.read_text()))
    assert n == 2 and len(objs) == 2
    o = objs[0]
    assert o["type"] == "detection" and o["class"] == "Nucleus" and len(o["colour"]) == 3
    assert o["measurements"]["nucleus_id"] == 7  # links a detection to its table row and label
    assert str(o["id"]) == feature_id("abc123", 7)
    assert o["measurements"]["area_um2"] == pytest.approx(100 * 0.5**2, rel=0.05)
    xs = [p[0] for p in o["geometry"]["coordinates"][0]]
    assert min(xs) == pytest.approx(10, abs=1.0) and max(xs) == pytest.approx(30, abs=1.0)  # level-0 px


def test_ids_are_stable_uuids_unique_per_nucleus_and_slide(slide_out):
    a, _ = export_slide(slide_out)
    first = [f["id"] for f in json.loads(a.read_text())["features"]]
    b, _ = export_slide(slide_out, slide_out / "again.geojson")
    assert [f["id"] for f in json.loads(b.read_text())["features"]] == first  # re-export: same ids
    assert len(set(first)) == 2 and all(uuid.UUID(i).version == 5 for i in first)
    assert feature_id("other-slide", 7) != feature_id("abc123", 7)


def test_gz_destination_is_gzip(slide_out):
    dest, n = export_slide(slide_out, slide_out / "nuclei.geojson.gz")
    raw = dest.read_bytes()
    assert raw[:2] == b"\x1f\x8b"  # gzip magic
    assert len(qupath_read(json.loads(gzip.decompress(raw)))) == n == 2


def test_missing_destination_folder_is_a_clear_error(slide_out):
    with pytest.raises(FileNotFoundError, match="does not exist; create it"):
        export_slide(slide_out, slide_out / "no" / "such" / "x.geojson")
    assert not list(slide_out.glob("**/.*.tmp-*"))


def test_unfinished_slide_is_refused(tmp_path):
    (tmp_path / "s2").mkdir()
    with pytest.raises(FileNotFoundError, match="nucleiflow segment"):
        export_slide(tmp_path / "s2")
