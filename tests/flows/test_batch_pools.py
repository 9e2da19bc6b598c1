"""One set of process pools serves a whole batch: started once, the same processes for every
slide (a bad one included), stopped at the end, and a slide's outputs equal a one-slide batch's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from slidefiles import write_manifest

from nucleiflow.pipeline.outputs.layout import slide_paths

MODEL, TILE = "golo", 512  # as test_batch.py: tiny real slides, one tile each


def _pooled_batch(out: Path, rows: list[tuple[Path, float | None, str]]) -> dict:
    from nucleiflow.flows.segment import batch_report, segment_slides

    out.mkdir(parents=True)
    manifest = write_manifest(out.parent / f"{out.name}.csv", rows)
    state = segment_slides(slides=[str(manifest)], out=str(out), model=MODEL, device="cpu", tile_size=TILE,
                           readers=1, workers=1, return_state=True)
    return {r["slide_id"]: r for r in batch_report(state)["slides"]}


def test_a_batch_starts_its_pools_once_and_stops_them(prefect_api, inputs, tmp_path):
    import geopandas as gpd
    import psutil

    out = tmp_path / "batch"
    rows = _pooled_batch(out, [(inputs["good"], None, "a"), (inputs["truncated_tiff"], None, "bad"),
                               (inputs["nompp"], 0.25, "b"), (inputs["good"], None, "c")])
    assert [rows[s]["status"] for s in ("a", "bad", "b", "c")] == ["done", "failed", "done", "done"]
    pools = [json.loads(slide_paths(out, s)["run_json"].read_text())["pools"] for s in ("a", "b", "c")]
    assert all(p["starts"] == 1 for p in pools), "started once, by the first slide, for every slide"
    assert pools[0]["pids"] == pools[1]["pids"] == pools[2]["pids"], "the same processes served every slide"
    assert pools[0]["start_s"] == pools[2]["start_s"] > 0
    assert (pools[0]["readers"], pools[0]["workers"], pools[0]["asked"]) == (1, 1, {"readers": 1, "workers": 1})
    pids = pools[0]["pids"]["readers"] + pools[0]["pids"]["workers"]
    assert len(pids) == 2 and not [p for p in pids if psutil.pid_exists(p)
                                   and psutil.Process(p).status() != psutil.STATUS_ZOMBIE], "stopped"

    # The same slide alone in its own batch (its own pools): the same nuclei, to the bit.
    alone = tmp_path / "alone"
    assert _pooled_batch(alone, [(inputs["good"], None, "a")])["a"]["status"] == "done"
    one = json.loads(slide_paths(alone, "a")["run_json"].read_text())["pools"]
    assert one["pids"] != pools[0]["pids"]
    for folder in (out, alone):
        assert zarr.open_group(str(slide_paths(folder, "a")["zarr"]), mode="r")["labels/nuclei/0"][:].max() > 0
    np.testing.assert_array_equal(zarr.open_group(str(slide_paths(out, "a")["zarr"]), mode="r")["labels/nuclei/0"][:],
                                  zarr.open_group(str(slide_paths(alone, "a")["zarr"]), mode="r")["labels/nuclei/0"][:])
    batch_table = gpd.read_parquet(slide_paths(out, "a")["parquet"])
    alone_table = gpd.read_parquet(slide_paths(alone, "a")["parquet"])
    assert len(batch_table) == rows["a"]["nuclei"] > 0
    pd.testing.assert_frame_equal(pd.DataFrame(batch_table.to_wkb()), pd.DataFrame(alone_table.to_wkb()))
