"""Losses on tiny tensors whose answers can be worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nucleiflow.models.losses import (bce_dice, distill_loss, golo_loss, hover_unet_loss, kl_div,
                                      msge, multiclass_dice, sobel_hv, student_loss, twostage_loss,
                                      weighted_ce)

BIG = 30.0  # |logit| at which sigmoid/softmax are 0/1 to ~1e-13


def square_mask(h: int = 12, w: int = 12) -> torch.Tensor:
    """(1,1,h,w) with one 4x4 nucleus at rows/cols 4..7."""
    m = torch.zeros(1, 1, h, w)
    m[..., 4:8, 4:8] = 1
    return m


def perfect_np(mask: torch.Tensor) -> torch.Tensor:
    """(B,2,H,W) logits that put all mass on the true class."""
    return torch.cat([BIG * (1 - 2 * mask), BIG * (2 * mask - 1)], dim=1)


def targets(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    hv = torch.rand(mask.shape[0], 2, *mask.shape[-2:]) * 2 - 1
    types = mask[:, 0].long() * 2  # background 0, nuclei type 2
    return {"mask": mask, "hv": hv * mask, "type": types, "marker": mask}


def test_bce_dice_is_zero_at_perfect_and_large_when_wrong():
    t = square_mask()
    assert bce_dice(BIG * (2 * t - 1), t) < 1e-6
    assert bce_dice(-BIG * (2 * t - 1), t) > 10
    assert bce_dice(torch.full_like(t, -BIG), torch.zeros_like(t)) < 1e-6  # empty and empty


def test_bce_dice_at_one_half_matches_hand_computation():
    t = torch.zeros(1, 1, 4, 4)
    t[..., :2, :2] = 1  # 4 of 16 pixels are nucleus
    # p = 0.5 everywhere: BCE = ln 2; Dice = (2 * 0.5 * 4 + 1) / (0.5 * 16 + 4 + 1) = 5/13.
    expected = 0.5 * math.log(2) + 0.5 * (1 - 5 / 13)
    assert bce_dice(torch.zeros_like(t), t).item() == pytest.approx(expected, rel=1e-6)


def test_golo_loss_sums_its_terms_and_adds_the_marker_when_present():
    t = square_mask()
    out = {"mask": torch.zeros_like(t), "coarse": BIG * (2 * t - 1)}
    total, parts = golo_loss(out, {"mask": t, "marker": t})
    assert set(parts) == {"mask", "coarse"}
    assert total.item() == pytest.approx(bce_dice(out["mask"], t).item(), rel=1e-5)
    total_m, parts_m = golo_loss(out | {"marker": torch.zeros_like(t)}, {"mask": t, "marker": t})
    assert set(parts_m) == {"mask", "coarse", "marker"}
    assert total_m.item() == pytest.approx(sum(v.item() for v in parts_m.values()), rel=1e-6)


def test_twostage_loss_supervises_the_output_of_the_stage():
    t = square_mask()
    good, bad = BIG * (2 * t - 1), torch.zeros_like(t)
    assert twostage_loss({"mask": bad, "coarse": good}, {"mask": t}, "stage1")[0] < 1e-6
    assert twostage_loss({"mask": good, "coarse": bad}, {"mask": t}, "stage2")[0] < 1e-6
    loss, _ = twostage_loss({"mask": bad, "coarse": good}, {"mask": t})
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_sobel_hv_differentiates_h_along_x_and_v_along_y():
    y, x = torch.meshgrid(torch.arange(9.0), torch.arange(9.0), indexing="ij")
    g = sobel_hv(torch.stack([x, y])[None])
    # Interior: sum over the 5x5 window of dx^2 / (dx^2 + dy^2) -> the same for both channels.
    r = torch.arange(-2.0, 3.0)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    slope = (dx**2 / (dx**2 + dy**2 + 1e-15)).sum()
    torch.testing.assert_close(g[0, :, 2:-2, 2:-2], torch.full((2, 5, 5), slope.item()))
    # h varies along x only, so its y-gradient would be zero: swap the channels to see it.
    assert sobel_hv(torch.stack([y, x])[None])[0, :, 2:-2, 2:-2].abs().max() < 1e-5


def test_msge_ignores_a_constant_offset_but_mse_does_not():
    mask = square_mask()
    hv = targets(mask)["hv"]
    assert sobel_hv(torch.full((1, 2, 6, 7), 3.0)).abs().max() == 0  # borders included
    assert msge(hv + 0.3, hv, mask) < 1e-10
    assert F.mse_loss(hv + 0.3, hv).item() == pytest.approx(0.09)


def test_msge_only_counts_errors_inside_nuclei():
    mask = square_mask(16, 16)
    hv = targets(mask)["hv"]
    far = hv.clone()
    far[..., 12:, 12:] += torch.rand(1, 2, 4, 4)  # > 2 px (kernel radius) from the nucleus
    assert msge(far, hv, mask) == 0
    near = hv.clone()
    near[..., 5, 5] += 1.0
    assert msge(near, hv, mask) > 0


def test_multiclass_dice_ignores_classes_absent_from_the_target():
    labels = square_mask()[:, 0].long()
    logits = perfect_np(square_mask())
    assert multiclass_dice(logits, labels) < 1e-6
    three = torch.cat([logits, torch.full_like(logits[:, :1], -BIG)], dim=1)  # class 2 absent
    assert multiclass_dice(three, labels) < 1e-6


def test_weighted_ce_class_and_pixel_weights():
    logits, labels = torch.randn(2, 2, 5, 5), torch.randint(0, 2, (2, 5, 5))
    w = torch.tensor([0.6, 1.4])
    assert weighted_ce(logits, labels, w) == F.cross_entropy(logits, labels, weight=w)
    ones = torch.ones(2, 1, 5, 5)
    torch.testing.assert_close(weighted_ce(logits, labels, ones), F.cross_entropy(logits, labels))
    # Per-pixel weights equal to the class weights of each pixel: the same weighted mean.
    torch.testing.assert_close(weighted_ce(logits, labels, w[labels]), weighted_ce(logits, labels, w))


def test_student_loss_is_near_zero_at_perfect_predictions():
    mask = square_mask()
    tgt = targets(mask)
    out = {"np": perfect_np(mask), "hv": tgt["hv"].clone(),
           "tp": torch.cat([perfect_np(mask), torch.full_like(mask, -BIG)], dim=1)[:, [0, 2, 1]]}
    total, parts = student_loss(out, tgt)
    assert set(parts) == {"np_ce", "np_dice", "hv_mse", "hv_msge", "tp_ce", "tp_dice"}
    assert total < 1e-5
    _, no_tp = student_loss({k: out[k] for k in ("np", "hv")}, tgt)
    assert set(no_tp) == {"np_ce", "np_dice", "hv_mse", "hv_msge"}


def test_kl_is_zero_when_student_equals_teacher_and_scales_with_T():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert kl_div(t, t, T=1) == 0 and kl_div(t, t, T=4) == 0
    assert kl_div(s, t) > 0
    torch.testing.assert_close(kl_div(s, t, T=2), 4 * kl_div(s / 2, t / 2, T=1))


def test_distill_from_a_mask_teacher_uses_two_class_probabilities():
    m = torch.randn(1, 1, 6, 6)
    student = {"np": torch.cat([torch.zeros_like(m), m], dim=1), "hv": torch.zeros(1, 2, 6, 6)}
    total, parts = distill_loss(student, {"mask": m, "coarse": m})
    assert set(parts) == {"np_ce", "np_kl"}  # a mask teacher has no hv to distil
    assert parts["np_kl"].abs() < 1e-6
    # CE against its own soft labels = the teacher's binary entropy.
    p = torch.sigmoid(m)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    torch.testing.assert_close(parts["np_ce"], entropy)
    torch.testing.assert_close(total, parts["np_ce"] + parts["np_kl"])


def test_distill_from_a_hovernet_teacher_covers_every_head():
    teacher = {"np": torch.randn(2, 2, 8, 8), "hv": torch.rand(2, 2, 8, 8), "tp": torch.randn(2, 4, 8, 8)}
    _, same = distill_loss(teacher, teacher, T=2.0)
    assert set(same) == {"np_ce", "np_kl", "hv_mse", "hv_msge", "tp_ce", "tp_kl"}
    assert same["np_kl"].abs() < 1e-6 and same["tp_kl"].abs() < 1e-6
    assert same["hv_mse"] == 0 and same["hv_msge"] == 0


def test_hover_unet_loss_weights_student_and_distill_by_alpha():
    mask = square_mask()
    tgt = targets(mask)
    torch.manual_seed(1)
    student = {"np": torch.randn(1, 2, 12, 12), "hv": torch.randn(1, 2, 12, 12)}
    teacher = {"np": torch.randn(1, 2, 12, 12), "hv": torch.randn(1, 2, 12, 12)}
    s, _ = student_loss(student, tgt)
    d, _ = distill_loss(student, teacher)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        total, parts = hover_unet_loss(student, tgt, teacher, alpha=alpha)
        torch.testing.assert_close(total, alpha * s + (1 - alpha) * d)
    assert {"student", "distill", "student/np_ce", "distill/np_kl"} <= set(parts)
    torch.testing.assert_close(hover_unet_loss(student, None, teacher)[0], d)  # unlabelled tile
    torch.testing.assert_close(hover_unet_loss(student, tgt, None)[0], s)
    with pytest.raises(ValueError):
        hover_unet_loss(student, None, None)


def test_gradients_flow_through_every_loss():
    mask = square_mask()
    tgt = targets(mask)
    out = {"np": torch.randn(1, 2, 12, 12, requires_grad=True),
           "hv": torch.randn(1, 2, 12, 12, requires_grad=True),
           "tp": torch.randn(1, 3, 12, 12, requires_grad=True),
           "mask": torch.randn(1, 1, 12, 12, requires_grad=True),
           "coarse": torch.randn(1, 1, 12, 12, requires_grad=True)}
    teacher = {"np": torch.randn(1, 2, 12, 12), "hv": torch.randn(1, 2, 12, 12),
               "tp": torch.randn(1, 3, 12, 12)}
    losses = [golo_loss(out, tgt)[0], twostage_loss(out, tgt)[0],
              hover_unet_loss(out, tgt, teacher)[0]]
    sum(losses).backward()
    for k, v in out.items():
        assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0, k
