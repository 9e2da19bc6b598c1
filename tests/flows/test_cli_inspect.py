"""`nucleiflow inspect` through the real console script: contract keys and bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

KEYS = {
    "width", "height", "level_count", "mpp_x", "mpp_y", "vendor", "objective_power",
    "fingerprint", "tissue_fraction", "tile_count",
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("nucleiflow")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def assert_clean_error(res: subprocess.CompletedProcess, path: str, hint: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, f"one line on stderr, got: {res.stderr}"
    assert "Traceback" not in res.stderr
    assert path in lines[0] and hint in lines[0], lines[0]
    assert res.stdout == ""


def test_inspect_json_on_real_slide(cmu_slide: Path, tmp_path: Path):
    overlay = tmp_path / "o.png"
    res = run_cli("inspect", str(cmu_slide), "--json", "--overlay", str(overlay))
    assert res.returncode == 0, res.stderr
    facts = json.loads(res.stdout)  # exactly one JSON object on stdout
    assert KEYS <= facts.keys()
    assert (facts["width"], facts["height"], facts["vendor"]) == (2220, 2967, "aperio")
    assert facts["mpp_x"] == pytest.approx(0.499)
    assert 0.2 < facts["tissue_fraction"] < 0.5 and facts["tile_count"] >= 1
    assert overlay.stat().st_size > 1000


def test_inspect_human_readable(cmu_slide: Path):
    res = run_cli("inspect", str(cmu_slide))
    assert res.returncode == 0
    for key in KEYS:
        assert key in res.stdout


def test_no_mpp_fails_then_works_with_override(tcga_slide: Path):
    assert_clean_error(run_cli("inspect", str(tcga_slide)), str(tcga_slide), "--mpp")
    res = run_cli("inspect", str(tcga_slide), "--mpp", "2.0", "--json", "--model-mpp", "2.0")
    assert res.returncode == 0, res.stderr
    facts = json.loads(res.stdout)
    assert facts["mpp_source"] == "override" and facts["level_count"] == 2


def test_missing_file(tmp_path: Path):
    p = str(tmp_path / "nope.svs")
    assert_clean_error(run_cli("inspect", p), p, "not found")


def test_directory(tmp_path: Path):
    assert_clean_error(run_cli("inspect", str(tmp_path)), str(tmp_path), "directory")


def test_text_file_renamed_svs(tmp_path: Path):
    p = tmp_path / "notes.svs"
    p.write_text("this is not a slide\n" * 50)
    assert_clean_error(run_cli("inspect", str(p)), str(p), "slide")


def test_truncated_slide(cmu_slide: Path, tmp_path: Path):
    p = tmp_path / "cut.svs"
    data = cmu_slide.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    assert_clean_error(run_cli("inspect", str(p)), str(p), "slide")


def test_help_documents_every_option():
    res = run_cli("inspect", "--help")
    assert res.returncode == 0
    for opt in ("--json", "--mpp", "--overlay", "--tile-size", "--halo", "--model-mpp"):
        assert opt in res.stdout
