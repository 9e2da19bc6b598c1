"""Fixtures of the batch tests (test_batch.py, test_batch_pools.py): a Prefect API and tiny
real slides with every kind of bad input."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from slidefiles import write_tiff

# Flow runs in these tests talk to a temporary server: no analytics calls from it.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="module")
def prefect_api() -> str:
    """One temporary Prefect API (its URL) for this module's flow runs, in-process and in
    CLI subprocesses alike (as batches share a real server; none starts its own)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data, mosaic_tool, cmu_slide) -> dict[str, Path]:
    """Tiny real slides and broken files:

    good: a 1 x 1 MoNuSeg mosaic (one tile); nompp: a 512 px H&E crop in a TIFF without
    resolution tags; blank: glass; corrupt: random bytes named .svs; truncated: the first
    half of CMU-1-Small-Region.svs (OpenSlide refuses it); truncated_tiff: a tiled TIFF cut
    in its pixel data (it opens, its tiles do not read); missing: a path with no file.
    """
    d = tmp_path_factory.mktemp("inputs")
    subprocess.run([sys.executable, str(mosaic_tool), str(shared_data / "monuseg"), "--split", "test",
                    "--cols", "1", "--rows", "1", "--tissue", "1", "--no-labels", "--out", str(d / "mosaic")],
                   check=True, capture_output=True)
    image = min((shared_data / "monuseg" / "images").glob("*.png"))
    rgb = np.array(Image.open(image).convert("RGB"))
    write_tiff(d / "nompp.tiff", rgb[:512, :512], mpp=None)
    data = write_tiff(d / "whole.tiff", rgb, mpp=0.25).read_bytes()
    (d / "truncated.tiff").write_bytes(data[: len(data) * 6 // 10])
    glass = np.random.default_rng(0).normal(0, 1.5, (512, 768, 3)) + [243, 242, 240]
    write_tiff(d / "blank.tiff", np.clip(glass, 0, 255).astype(np.uint8), mpp=0.5)
    (d / "corrupt.svs").write_bytes(np.random.default_rng(1).bytes(200_000))
    data = cmu_slide.read_bytes()
    (d / "truncated.svs").write_bytes(data[: len(data) // 2])
    return {"good": d / "mosaic.tiff", "nompp": d / "nompp.tiff", "blank": d / "blank.tiff",
            "corrupt": d / "corrupt.svs", "truncated": d / "truncated.svs", "truncated_tiff": d / "truncated.tiff",
            "missing": d / "missing.svs"}
