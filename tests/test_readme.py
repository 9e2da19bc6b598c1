"""The README's main command and its "Opening results" snippets, run as written.

Set-up command 1 ends in `nucleiflow segment <real slide> --out out` with the bundled
default model; the session fixture `readme_run` (conftest.py) runs that exact command (with
`out` moved to a temp folder); here the Python block of "Opening results" runs on what it
wrote, then the resume and QuPath commands (tests/flows/test_view.py: the napari line).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CLI = Path(sys.executable).parent / "nucleiflow"


def opening_results_snippet() -> str:
    section = README[README.index("## Opening results"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_main_command_segments_the_real_slide(readme_run):
    out, proc = readme_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((out / "CMU-1-Small-Region" / "run.json").read_text())
    assert run["status"] == "done" and run["model"] == "student"
    # A 2220 x 2967 px H&E region at 0.5 um/px holds thousands of nuclei; a broken model
    # or post-processing gives none or a handful of blobs.
    assert 1000 < run["nuclei"] < 20000
    assert re.search(r"CMU-1-Small-Region\s+done\s+%d\b" % run["nuclei"], proc.stdout)
    assert (out / "summary.csv").exists() and (out / "CMU-1-Small-Region" / "nuclei_overlay.png").exists()


def test_inspect_tile_count_is_what_segment_ran(readme_run, cmu_slide):
    out, proc = readme_run
    assert proc.returncode == 0
    res = subprocess.run([str(CLI), "inspect", str(cmu_slide), "--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    run = json.loads((out / "CMU-1-Small-Region" / "run.json").read_text())
    assert json.loads(res.stdout)["tile_count"] == run["tiles"]


def test_opening_results_snippet_runs_on_the_output(readme_run, capsys):
    out, proc = readme_run
    assert proc.returncode == 0
    code = opening_results_snippet()
    assert 'OUT = "out"' in code
    exec(compile(code.replace('OUT = "out"', f'OUT = "{out}"'), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "CMU-1-Small-Region" in printed and "nuclei in the top-left" in printed


def test_rerun_skips_and_qupath_export(readme_run, cmu_slide):
    out, proc = readme_run
    assert proc.returncode == 0
    again = subprocess.run([str(CLI), "segment", str(cmu_slide), "--out", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and re.search(r"CMU-1-Small-Region\s+skipped", again.stdout), again.stdout
    exp = subprocess.run([str(CLI), "export-qupath", str(out / "CMU-1-Small-Region")],
                         capture_output=True, text=True, timeout=600)
    assert exp.returncode == 0, exp.stderr
    geo = json.loads((out / "CMU-1-Small-Region" / "nuclei.geojson").read_text())
    run = json.loads((out / "CMU-1-Small-Region" / "run.json").read_text())
    assert len(geo["features"]) == run["nuclei"]
