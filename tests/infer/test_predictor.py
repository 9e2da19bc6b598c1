"""`Predictor`: a batch's maps on the CPU, one tile at a time."""
from __future__ import annotations

import numpy as np
import torch

from nucleiflow.models.outputs import to_maps
from nucleiflow.models.student import Student
from nucleiflow.pipeline.infer.predictor import Predictor, load_card


def test_cpu_batches_run_one_tile_at_a_time_with_the_batchs_maps() -> None:
    """The model sees batches of 1 (a quarter of the activations at once for a batch of 4)
    and the maps are those of the whole batch in one forward."""
    torch.manual_seed(0)
    net = Student(base_channels=4, depth=2).eval()
    seen: list[int] = []
    net.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    maps = Predictor(net, load_card("student"), device="cpu")(images)
    assert seen == [1, 1, 1]
    with torch.inference_mode():
        whole = to_maps(net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0))
    np.testing.assert_allclose(maps["prob"], whole["prob"][:, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(maps["hv"], whole["hv"].numpy(), atol=1e-6)
