"""The bundled checkpoints predict what they predicted when tests/golden/maps.npz was made.

A refactor of the model, checkpoint or inference code cannot change a model's output
unnoticed. Tolerance: the maps are stored as float16 (~1e-3 relative), plus a margin for
CPU kernel differences. Regenerate only for a retrained model (tests/golden/make_golden.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from golden.make_golden import MODELS, predict

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "maps.npz"


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as f:
        return dict(f)


@pytest.mark.parametrize("name", MODELS)
def test_bundled_model_matches_golden_maps(golden: dict[str, np.ndarray], name: str) -> None:
    maps = predict(name, golden["input"])
    stored = sorted(k.split("/", 1)[1] for k in golden if k.startswith(f"{name}/"))
    assert sorted(maps) == stored
    for key in stored:
        got = maps[key][0]
        want = golden[f"{name}/{key}"].astype(np.float32)
        assert got.shape == want.shape, key
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3, err_msg=f"{name} {key}")
