"""The torch edge map (`infer.dense`, on the model's device; here the CPU) is the NumPy
reference's (`postprocess.edge_map.hv_edge`) bit for bit, so labels do not depend on where
it was computed: on random maps, on the bundled models' real maps (tests/golden) and through
the whole tiled path of a real image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi

from nucleiflow.models.checkpoint import load_checkpoint
from nucleiflow.pipeline.config import ModelCard
from nucleiflow.pipeline.infer.dense import correlate1d, dense_maps, hv_edge
from nucleiflow.pipeline.infer.predictor import Predictor, load_card
from nucleiflow.pipeline.infer.segment_reader import segment_array
from nucleiflow.pipeline.postprocess import edge_map, watershed as ws
from nucleiflow.pipeline.slide.reader import ArraySlide

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "maps.npz"


@pytest.mark.parametrize("ksize", [3, 11, 21])
def test_correlate1d_is_scipys_bit_for_bit(ksize: int) -> None:
    x = np.random.default_rng(ksize).standard_normal((37, 53)).astype(np.float32)
    for w in edge_map._sobel_kernels(ksize):
        for axis in (0, 1):
            want = ndi.correlate1d(x, w, axis=axis, mode="mirror")
            got = correlate1d(torch.from_numpy(x[None]), w, axis + 1)[0].numpy()
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("normalise", ["fixed", "tile"])
@pytest.mark.parametrize("ksize", [3, 11, 21])
def test_hv_edge_is_numpys_bit_for_bit(ksize: int, normalise: str) -> None:
    hv = (np.random.default_rng(0).standard_normal((3, 2, 40, 61)) * 0.7).astype(np.float32)
    got = hv_edge(torch.from_numpy(hv), ksize=ksize, normalise=normalise).numpy()
    for i in range(len(hv)):
        np.testing.assert_array_equal(got[i], ws.hv_edge(hv[i], ksize=ksize, normalise=normalise))


@pytest.mark.parametrize("model", ["student", "student-fast"])
def test_labels_from_device_edge_equal_numpy_labels_on_golden_maps(model: str) -> None:
    with np.load(GOLDEN) as f:
        prob, hv = f[f"{model}/prob"].astype(np.float32), f[f"{model}/hv"].astype(np.float32)
    card = load_card(model)  # the card's own thresholds and kernel size
    assert card.postprocess.method == "hv"
    maps = dense_maps({"prob": torch.from_numpy(prob[None]), "hv": torch.from_numpy(hv[None])}, card.postprocess)
    assert sorted(maps) == ["edge", "prob"] and maps["edge"].shape == (1, *prob.shape)
    edge = maps["edge"][0].numpy()
    want = ws.postprocess({"prob": prob, "hv": hv}, "hv", **card.postprocess.params())
    got = ws.postprocess({"prob": prob, "edge": edge}, "hv", **card.postprocess.params())
    assert want.max() > 5, "the golden crop has nuclei"
    np.testing.assert_array_equal(got, want)


def test_dense_maps_leaves_other_methods_and_tiny_tiles_alone() -> None:
    prob, hv = torch.rand(2, 1, 8, 8), torch.rand(2, 2, 8, 8)
    marker = ModelCard.of({"mpp": 0.5, "postprocess": {"method": "marker"}}).postprocess
    assert sorted(dense_maps({"prob": prob, "hv": hv}, marker)) == ["hv", "prob"]
    default = ModelCard.of({"mpp": 0.5}).postprocess  # ksize 21: 8 px is too small
    assert sorted(dense_maps({"prob": prob, "hv": hv}, default)) == ["hv", "prob"]


def test_hv_watershed_needs_hv_or_edge() -> None:
    prob = np.ones((16, 16), np.float32)
    with pytest.raises(ValueError, match="hv .* or its edge"):
        ws.hv_watershed(prob)
    with pytest.raises(ValueError, match="edge must have prob's shape"):
        ws.hv_watershed(prob, edge=np.zeros((4, 4), np.float32))


def test_tiled_path_with_device_edge_equals_numpy_path(shared_data: Path) -> None:
    """A real image through `segment_array` twice: edge in the Predictor vs in the workers."""
    rgb = np.asarray(Image.open(shared_data / "monuseg" / "images" / "TCGA-2Z-A9J9-01A-01-TS1.png").convert("RGB"))
    net, card = load_checkpoint("student")
    slide = ArraySlide(np.ascontiguousarray(rgb[:600, :600]), mpp=0.25)
    out = {}
    for dense in (False, True):
        pred = Predictor(net, card, device="cpu", dense=dense)
        maps = pred(np.zeros((1, 64, 64, 3), np.uint8))
        assert ("edge" in maps) is dense and ("hv" in maps) is not dense
        out[dense] = segment_array(slide, pred, tile_size=128, halo=32)
    assert out[False].max() > 50
    np.testing.assert_array_equal(out[True], out[False])
