"""Shared fixtures: where the real data lives, small synthetic slides."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
