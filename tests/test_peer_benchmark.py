"""benchmarks/peer_tiatoolbox.py without TIAToolbox: the missing venv's recipe, the figures.

The benchmark itself needs TIAToolbox's own venv and minutes of CPU; these check only what
a user sees when that venv is missing, and the arithmetic of its table.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "peer_tiatoolbox.py"


def load_script():
    spec = importlib.util.spec_from_file_location("peer_tiatoolbox", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_missing_venv_prints_the_recipe_and_exits_2(tmp_path):
    missing = tmp_path / "tiavenv" / "bin" / "python"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tia-python", str(missing), "--mosaic", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{missing} does not exist" in proc.stderr
    for step in (f"-m venv {tmp_path / 'tiavenv'}", "torch==2.14.1 torchvision==0.29.1",
                 "--no-deps tiatoolbox==2.1.3", "_tia_runner.py --requirements", "-r /tmp/tia-reqs.txt"):
        assert step in proc.stderr, step
    assert not (tmp_path / "m.tiff").exists()  # checked before any mosaic is built


def test_figures_per_slide_area_and_ratios(capsys):
    mod = load_script()
    facts = {"width": 1000, "height": 1000, "mpp": 0.25, "source": "monuseg", "splits": ["test"],
             "cols": 1, "rows": 1, "seed": 1}
    nf = {"end_to_end_s": 40.0, "slide_s": 20.0, "model_mpp": 0.5, "nuclei": 500, "model": "student",
          "load_avg": (2.0, 2.0)}
    tia = {"end_to_end_s": 400.0, "slide_s": 300.0, "model_mpp": 0.25, "params": 37.6e6,
           "io_config": "hovernet_fast-pannuke", "versions": {"tiatoolbox": "2.1.3", "torch": "2.14.1"},
           "load_avg": (2.0, 2.0)}
    a = argparse.Namespace(slide_path=Path("/tmp/m.tiff"), threads=2, device="cpu", tia_python=Path("/x/python"))
    fig = mod.report(facts, nf, tia, a)
    assert fig["ratio_end_to_end"] == 10.0 and fig["ratio_slide"] == 15.0
    assert nf["model_mpx"] == 0.25 and tia["model_mpx"] == 1.0  # 0.5 um/px sees 4x fewer pixels
    assert nf["mpx_per_s_slide"] == 1.0 / 20.0 and tia["mpx_per_s_end_to_end"] == 1.0 / 400.0
    assert nf["start_up_s"] == 20.0 and tia["start_up_s"] == 100.0
    out = capsys.readouterr().out
    assert "10.0x end to end, 15.0x slide alone" in out and "0.5 um/px" in out and "0.25 um/px" in out
