"""The disk fills up after the last slide: the batch report cannot be written, yet the table
prints, the slides' results stand, the flow run ends Failed and the exit status says so.

A real one-slide batch through the `nucleiflow segment` command (in-process, so the batch
report's write can hit the same ENOSPC hook as tests/flows/test_batch.py's disk-full slides)."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from slidefiles import write_tiff
from typer.testing import CliRunner

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_report_not_written_still_prints_the_table_and_exits_3(prefect_api, shared_data, tmp_path, monkeypatch):
    from nucleiflow.flows import segment as flow_module
    from nucleiflow.flows.cli import app
    from nucleiflow.pipeline.outputs.atomic import write_json_atomic

    rgb = np.array(Image.open(min((shared_data / "monuseg" / "images").glob("*.png"))).convert("RGB"))
    slide = write_tiff(tmp_path / "he.tif", np.ascontiguousarray(rgb[:384, :384]), mpp=0.25)

    def full_disk_at_report(path, obj):
        if Path(path).name.startswith("batch-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_json_atomic(path, obj)

    monkeypatch.setattr(flow_module, "write_json_atomic", full_disk_at_report)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["segment", str(slide), "--out", str(out), "--device", "cpu",
                                   "--tile-size", "256", "--readers", "0", "--workers", "0"])
    assert res.exit_code == 3, (res.output, res.exception)
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.output[-3000:]
    row = next(line for line in res.stdout.splitlines() if line.startswith("he "))
    assert row.split()[1] == "done", res.stdout
    assert "report: NOT WRITTEN" in res.stdout
    (err,) = res.stderr.strip().splitlines()[-1:]
    assert "batch report" in err and "not written" in err and "disk full" in err and "free space" in err
    assert (out / "he" / "run.json").is_file() and not list(out.glob("batch-*.json"))
