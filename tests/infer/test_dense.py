"""The torch dense maps (`infer.dense`, on the model's device; here the CPU: edge, energy,
seed candidates) are the NumPy reference's (`postprocess.edge_map`) bit for bit, so labels
do not depend on where they were computed: on random maps, on the bundled models' real maps
(tests/golden) and through the whole tiled path of a real image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi

from nucleiflow.models.checkpoint import load_checkpoint
from nucleiflow.pipeline.config import ModelCard
from nucleiflow.pipeline.infer.dense import correlate1d, dense_maps, dense_params, hv_edge, hv_energy
from nucleiflow.pipeline.infer.predictor import Predictor, RecordingPredictor, load_card
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


@pytest.mark.parametrize("thresholds", [(0.5, 0.4), (0.45, 0.35), (0.4, 0.55)])
def test_hv_energy_is_numpys_bit_for_bit(thresholds: tuple[float, float]) -> None:
    rng = np.random.default_rng(1)
    prob, edge = rng.random((2, 3, 40, 61), dtype=np.float32)
    prob[0, :3, :3] = np.float32(thresholds[0])  # exactly at the (float32) threshold
    prob[0, 3, :3] = np.nextafter(np.float32(thresholds[0]), np.float32(0))
    edge[1, :2, :2] = np.float32(thresholds[1])
    energy, seedable = hv_energy(torch.from_numpy(prob), torch.from_numpy(edge), *thresholds)
    assert energy.dtype == torch.float32 and seedable.dtype == torch.bool
    for i in range(len(prob)):
        want_e, want_s = edge_map.hv_energy(prob[i], edge[i], *thresholds)
        np.testing.assert_array_equal(energy[i].numpy(), want_e)
        np.testing.assert_array_equal(seedable[i].numpy(), want_s)


@pytest.mark.parametrize("model", ["student", "student-fast"])
@pytest.mark.parametrize("override", [{}, {"prob_threshold": 0.45, "marker_threshold": 0.35}])
def test_labels_from_device_maps_equal_numpy_labels_on_golden_maps(model: str, override: dict) -> None:
    with np.load(GOLDEN) as f:
        prob, hv = f[f"{model}/prob"].astype(np.float32), f[f"{model}/hv"].astype(np.float32)
    card = load_card(model)  # the card's own thresholds and kernel size
    post = card.postprocess.model_copy(update=override)
    assert post.method == "hv"
    maps = dense_maps({"prob": torch.from_numpy(prob[None, None]), "hv": torch.from_numpy(hv[None])}, post)
    assert sorted(maps) == ["energy", "prob", "seedable"] and maps["energy"].shape == (1, *prob.shape)
    dense = {k: maps[k][0].numpy() for k in ("energy", "seedable")}
    want = ws.postprocess({"prob": prob, "hv": hv}, "hv", **post.params())
    got = ws.postprocess({"prob": prob, **dense}, "hv", **post.params())
    assert want.max() > 5, "the golden crop has nuclei"
    np.testing.assert_array_equal(got, want)
    # The energy itself is the NumPy one wherever the flood reads it (the cleaned mask).
    params = dense_params(post)
    edge = ws.hv_edge(hv, **{k: params[k] for k in edge_map.EDGE_PARAMS if k in params})
    energy, seedable = edge_map.hv_energy(prob, edge, params["prob_threshold"], params["marker_threshold"])
    np.testing.assert_array_equal(dense["energy"], energy)
    np.testing.assert_array_equal(dense["seedable"], seedable)


def test_dense_params_fill_in_the_watersheds_defaults() -> None:
    assert dense_params(ModelCard.of({"mpp": 0.5}).postprocess) == {"prob_threshold": 0.5, "marker_threshold": 0.4}


def test_dense_maps_leaves_other_methods_and_tiny_tiles_alone() -> None:
    prob, hv = torch.rand(2, 1, 8, 8), torch.rand(2, 2, 8, 8)
    marker = ModelCard.of({"mpp": 0.5, "postprocess": {"method": "marker"}}).postprocess
    assert sorted(dense_maps({"prob": prob, "hv": hv}, marker)) == ["hv", "prob"]
    default = ModelCard.of({"mpp": 0.5}).postprocess  # ksize 21: 8 px is too small
    assert sorted(dense_maps({"prob": prob, "hv": hv}, default)) == ["hv", "prob"]


def test_hv_watershed_needs_hv_or_edge_or_energy() -> None:
    prob = np.ones((16, 16), np.float32)
    with pytest.raises(ValueError, match="hv .* or its edge"):
        ws.hv_watershed(prob)
    with pytest.raises(ValueError, match="edge must have prob's shape"):
        ws.hv_watershed(prob, edge=np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="come together"):
        ws.hv_watershed(prob, energy=np.zeros((16, 16), np.float32))
    with pytest.raises(ValueError, match="seedable must have prob's shape"):
        ws.hv_watershed(prob, energy=np.zeros((16, 16), np.float32), seedable=np.zeros((4, 4), bool))


def test_tiled_path_with_device_maps_equals_numpy_path(shared_data: Path) -> None:
    """A real image through `segment_array` twice: dense maps in the Predictor vs in the
    workers; a recording keeps "hv" (its replays may change the thresholds)."""
    rgb = np.asarray(Image.open(shared_data / "monuseg" / "images" / "TCGA-2Z-A9J9-01A-01-TS1.png").convert("RGB"))
    net, card = load_checkpoint("student")
    slide = ArraySlide(np.ascontiguousarray(rgb[:600, :600]), mpp=0.25)
    out = {}
    for dense in (False, True):
        pred = Predictor(net, card, device="cpu", dense=dense)
        maps = pred(np.zeros((1, 64, 64, 3), np.uint8))
        assert ("energy" in maps) is dense and ("hv" in maps) is not dense
        assert not dense or maps["seedable"].dtype == bool
        out[dense] = segment_array(slide, pred, tile_size=128, halo=32)
    assert out[False].max() > 50
    np.testing.assert_array_equal(out[True], out[False])
    rec = RecordingPredictor(pred)  # the dense predictor
    assert sorted(rec(np.zeros((1, 64, 64, 3), np.uint8))) == ["hv", "prob"]
