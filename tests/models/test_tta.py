"""Test-time augmentation: views and their inverses, HV vectors turned back correctly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nucleiflow.models.tta import VIEWS, tta_maps, unview, unview_hv, view
from nucleiflow.pipeline.train.targets import dihedral, dihedral_hv, hv_maps


def _blobs() -> np.ndarray:
    inst = np.zeros((40, 48), np.int32)
    inst[5:15, 6:20] = 1
    inst[22:35, 30:41] = 2
    return inst


@pytest.mark.parametrize("k,flip", VIEWS)
def test_view_matches_the_training_transform_and_inverts(k, flip):
    inst = _blobs()
    hv = hv_maps(inst)
    t_hv = torch.from_numpy(hv)[None]
    # The view of an image is the transform training applies; its HV targets are dihedral_hv.
    assert np.array_equal(view(torch.from_numpy(inst)[None, None], k, flip)[0, 0].numpy(), dihedral(inst, k, flip))
    turned = torch.from_numpy(dihedral_hv(hv, k, flip))[None]
    assert torch.allclose(unview_hv(turned, k, flip), t_hv)
    assert torch.equal(unview(view(t_hv, k, flip), k, flip), t_hv)


def test_tta_of_an_equivariant_predictor_is_the_plain_prediction():
    """A 'model' that returns the true maps of whatever it sees: every view agrees after
    turning back, so the TTA mean equals one pass (HV included)."""
    inst = _blobs()

    def oracle(x: torch.Tensor) -> dict[str, torch.Tensor]:
        lab = x[0, 0].numpy().astype(np.int32)
        return {"prob": torch.from_numpy((lab > 0).astype(np.float32))[None, None],
                "hv": torch.from_numpy(hv_maps(lab))[None]}

    x = torch.from_numpy(inst.astype(np.float32))[None, None].expand(1, 3, -1, -1)
    one = oracle(x)
    for n in (2, 4, 8):
        avg = tta_maps(oracle, x, n)
        assert torch.allclose(avg["prob"], one["prob"]) and torch.allclose(avg["hv"], one["hv"], atol=1e-6)
    with pytest.raises(ValueError, match="views"):
        tta_maps(oracle, x, 9)
