"""Net2Net widening: a wider U-Net that starts as the same function, then trains apart."""
from __future__ import annotations

import pytest
import torch

from nucleiflow.models.checkpoint import save_checkpoint
from nucleiflow.models.student import Student
from nucleiflow.models.unet import UNet
from nucleiflow.models.widen import channel_map, widen_unet
from nucleiflow.pipeline.train.loop import initial_weights


def _trained(net: UNet) -> UNet:
    """Non-trivial batch-norm statistics, as a trained net has."""
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(2, 3, 48, 48) * 2)
    return net.eval()


@pytest.mark.parametrize("up", ["bilinear", "transpose"])
@pytest.mark.parametrize("width", [12, 16])
def test_widened_net_computes_the_same_function(up: str, width: int) -> None:
    torch.manual_seed(0)
    src = _trained(UNet(3, {"np": 2, "hv": 2}, base_channels=8, depth=3, up=up))
    dst = widen_unet(src, UNet(3, {"np": 2, "hv": 2}, base_channels=width, depth=3, up=up), noise=0).eval()
    x = torch.rand(1, 3, 70, 52)
    a, b = src(x), dst(x)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


def test_noise_breaks_the_copies_but_keeps_the_function_close() -> None:
    torch.manual_seed(0)
    src = _trained(UNet(3, {"np": 2, "hv": 2}, base_channels=8, depth=2))
    dst = widen_unet(src, UNet(3, {"np": 2, "hv": 2}, base_channels=16, depth=2)).eval()
    x = torch.rand(1, 3, 32, 32)
    diff = (src(x)["hv"] - dst(x)["hv"]).abs().max().item()
    assert 0 < diff < 0.05
    w = dst.down[0][0].weight
    assert not torch.equal(w[0], w[8])  # channel 8 copies channel 0, plus its own noise


def test_channel_map_and_narrowing_refused() -> None:
    assert channel_map(4, 6).tolist() == [0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError):
        channel_map(6, 4)
    with pytest.raises(ValueError):
        widen_unet(UNet(3, base_channels=8, depth=2), UNet(3, base_channels=16, depth=3))


def test_training_init_widens_a_narrower_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    small = _trained(Student(base_channels=8, depth=2))
    save_checkpoint(small, tmp_path / "small", {"name": "small", "arch": "student",
                                                "kwargs": {"base_channels": 8, "depth": 2}, "mpp": 0.5})
    wide = Student(base_channels=12, depth=2)
    msg = initial_weights(wide, str(tmp_path / "small"))
    assert "widened" in msg and "8 to 12" in msg
    x = torch.rand(1, 3, 32, 32)
    wide.eval()
    assert (wide(x)["np"] - small(x)["np"]).abs().max().item() < 0.05
    same = Student(base_channels=8, depth=2)
    assert "widened" not in initial_weights(same, str(tmp_path / "small"))


def test_golo_with_hv_heads_starts_as_the_student(tmp_path) -> None:
    """GoLo's local stage carries NP + HV; initialised from a student it computes the
    student's maps (zero weight on the coarse input; context ring wide enough)."""
    from nucleiflow.models.golo import GoLo
    from nucleiflow.models.outputs import postprocess_method
    torch.manual_seed(0)
    student = _trained(Student(base_channels=8, depth=2))
    save_checkpoint(student, tmp_path / "s", {"name": "s", "arch": "student",
                                              "kwargs": {"base_channels": 8, "depth": 2}, "mpp": 0.5})
    golo = GoLo(base_channels=8, depth=2, crop=32, context=16, hv=True)
    assert set(golo.outputs) == {"np", "hv", "coarse"} and postprocess_method(golo.outputs) == "hv"
    assert "GoLo" in initial_weights(golo, str(tmp_path / "s"))
    golo.eval()
    x = torch.rand(1, 3, 64, 64)
    g, s = golo(x), student(x)
    assert set(g) == {"np", "hv", "coarse"}
    # Crops see 16 px of context, not the whole tile: compare away from the crop borders.
    inner = (slice(None), slice(None), slice(8, 24), slice(8, 24))
    torch.testing.assert_close(g["np"][inner], s["np"][inner], atol=0.05, rtol=0.05)
    assert torch.isfinite(g["coarse"]).all()
