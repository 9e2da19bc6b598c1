"""Fixtures of the training-flow tests: a private Prefect home for `nucleiflow` subprocesses,
and in-process training on one thread."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """Subprocess environment: a private Prefect home, no telemetry, one thread (shared cores)."""
    home = tmp_path_factory.mktemp("prefect")
    return {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_thread():
    """In-process training on one thread: the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
