"""The README's main command and its "Opening results" snippets, run as written.

Set-up command 1 ends in `nucleiflow segment <real slide> --out out` with the bundled
default model; this runs that exact command (with `out` moved to a temp folder), then the
Python block of "Opening results" on what it wrote, then the resume and QuPath commands.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CLI = Path(sys.executable).parent / "nucleiflow"


def setup_segment_command() -> list[str]:
    """The `nucleiflow segment ...` part of set-up command 1, as argv."""
    block = re.search(r"## Set-up.*?```bash\n(.*?)```", README, re.S).group(1)
    line = next(ln for ln in block.splitlines() if "nucleiflow segment" in ln)
    cmd = line[line.index("nucleiflow segment"):].split("&&")[0]
    return shlex.split(cmd)


def opening_results_snippet() -> str:
    section = README[README.index("## Opening results"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory, shared_data) -> tuple[Path, subprocess.CompletedProcess]:
    argv = setup_segment_command()
    assert argv[:2] == ["nucleiflow", "segment"] and "--out" in argv
    out = tmp_path_factory.mktemp("readme") / "out"
    argv[argv.index("--out") + 1] = str(out)
    # The README runs from the repository root, where ../shared sits beside the checkout.
    argv = [str(CLI)] + [str(shared_data / a.split("data/", 1)[1]) if a.startswith("../shared/data/") else a
                         for a in argv[1:]]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    return out, proc


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
