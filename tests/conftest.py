"""Shared fixtures: where the real data lives, small synthetic slides."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CLI = Path(sys.executable).parent / "nucleiflow"


def shared_dir() -> Path:
    """../shared beside the checkout (CI clones main with shared/ beside it)."""
    return Path(os.environ.get("NUCLEIFLOW_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data (slides/, monuseg/). Missing data fails the tests that need it
    rather than skipping them: a suite that silently skips its real-data tests proves nothing."""
    p = shared_dir() / "data"
    if not (p / "slides").is_dir() or not (p / "monuseg").is_dir():
        pytest.fail(f"real data not found at {p}: put ../shared beside the checkout or set NUCLEIFLOW_SHARED",
                    pytrace=False)
    return p


@pytest.fixture(scope="session")
def cmu_slide(shared_data: Path) -> Path:
    return shared_data / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def tcga_slide(shared_data: Path) -> Path:
    return shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs"


@pytest.fixture(scope="session")
def mosaic_tool(shared_data: Path) -> Path:
    """../shared/tools/mosaic_slide.py: builds pyramidal slides with ground truth."""
    tool = shared_data.parent / "tools" / "mosaic_slide.py"
    if not tool.is_file():
        pytest.fail(f"{tool} not found: it ships in ../shared/tools", pytrace=False)
    return tool


def setup_segment_command() -> list[str]:
    """The `nucleiflow segment ...` part of README set-up command 1, as argv."""
    block = re.search(r"## Set-up.*?```bash\n(.*?)```", README, re.S).group(1)
    line = next(ln for ln in block.splitlines() if "nucleiflow segment" in ln)
    cmd = line[line.index("nucleiflow segment"):].split("&&")[0]
    return shlex.split(cmd)


@pytest.fixture(scope="session")
def readme_run(tmp_path_factory, shared_data) -> tuple[Path, subprocess.CompletedProcess]:
    """README set-up command 1's `nucleiflow segment` of the real CMU slide, run as written
    (`out` in a temp folder): one segmented output for every test that reads one."""
    argv = setup_segment_command()
    assert argv[:2] == ["nucleiflow", "segment"] and "--out" in argv
    out = tmp_path_factory.mktemp("readme") / "out"
    argv[argv.index("--out") + 1] = str(out)
    # The README runs from the repository root, where ../shared sits beside the checkout.
    argv = [str(CLI)] + [str(shared_data / a.split("data/", 1)[1]) if a.startswith("../shared/data/") else a
                         for a in argv[1:]]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    return out, proc
