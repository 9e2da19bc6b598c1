"""Training losses of the seed papers (torch only). Outputs are raw logits, see the contract.

Every composite loss returns (total, parts): `total` a scalar to backpropagate, `parts` a
dict of detached scalars for logging. Losses are computed in float32 (safe under AMP).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

Out = Mapping[str, Tensor]


def _parts(**terms: Tensor) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in terms.items()}


def bce_dice(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """0.5 * BCE + 0.5 * soft Dice loss; logits and 0/1 target (B,1,H,W). Dice per image.

    `smooth` keeps the Dice of an empty image with an empty prediction at 1 (loss 0).
    """
    logits, target = logits.float(), target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    total = p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    dice = 1 - (2 * inter + smooth) / (total + smooth)
    return 0.5 * bce + 0.5 * dice.mean()


def golo_loss(out: Out, tgt: Out) -> tuple[Tensor, dict[str, Tensor]]:
    """GoLo / USE-Net: bce_dice on "mask" and "coarse" vs tgt "mask" (+ "marker" if present)."""
    terms = {"mask": bce_dice(out["mask"], tgt["mask"]),
             "coarse": bce_dice(out["coarse"], tgt["mask"])}
    if "marker" in out:
        terms["marker"] = bce_dice(out["marker"], tgt["marker"])
    return sum(terms.values()), _parts(**terms)


def twostage_loss(out: Out, tgt: Out, stage: str = "finetune") -> tuple[Tensor, dict[str, Tensor]]:
    """Enhancement paper: BCE on the output being trained ("coarse" in stage1, else "mask")."""
    key = "coarse" if stage == "stage1" else "mask"
    bce = F.binary_cross_entropy_with_logits(out[key].float(), tgt["mask"].float())
    return bce, _parts(**{f"{key}_bce": bce})


def sobel_hv(hv: Tensor, size: int = 5) -> Tensor:
    """HoVer-Net gradients (B,2,H,W) -> (B,2,H,W): d(h)/dx in channel 0, d(v)/dy in channel 1.

    Kernel x / (x^2 + y^2) over a size x size window (HoVer-Net's 5x5 Sobel-like filter).
    Replicate padding, so a constant map has zero gradient everywhere, borders included.
    """
    r = torch.arange(size, device=hv.device, dtype=torch.float32) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    norm = x * x + y * y + 1e-15
    kernel = torch.stack([x / norm, y / norm]).unsqueeze(1)  # (2,1,k,k), one per channel
    padded = F.pad(hv.float(), (size // 2,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=2)


def msge(pred_hv: Tensor, true_hv: Tensor, focus: Tensor) -> Tensor:
    """Mean squared gradient error inside `focus` (B,1,H,W) weights (nucleus mask), HoVer-Net."""
    err = (sobel_hv(pred_hv) - sobel_hv(true_hv)) ** 2
    focus = focus.float().expand_as(err)
    return (focus * err).sum() / (focus.sum() + 1e-8)


def hv_loss(pred_hv: Tensor, true_hv: Tensor, focus: Tensor) -> tuple[Tensor, Tensor]:
    """(MSE over all pixels, MSGE inside `focus`)."""
    return F.mse_loss(pred_hv.float(), true_hv.float()), msge(pred_hv, true_hv, focus)


def multiclass_dice(logits: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """Soft Dice loss of softmax(logits (B,C,H,W)) vs labels (B,H,W), over the batch.

    Mean of 1 - Dice over the classes present in `target` (as smp's multiclass DiceLoss).
    """
    prob = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    card = (prob + onehot).sum(dim=(0, 2, 3))
    present = (onehot.sum(dim=(0, 2, 3)) > 0).float()
    loss = 1 - 2 * inter / card.clamp_min(eps)
    return (loss * present).sum() / present.sum().clamp_min(1)


def weighted_ce(logits: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Cross-entropy vs labels (B,H,W); weights: per class (C,) or per pixel (B,H,W)/(B,1,H,W)."""
    logits, target = logits.float(), target.long()
    if weights is None or weights.ndim == 1:
        return F.cross_entropy(logits, target, weight=weights)
    w = weights.float().reshape(target.shape)
    return (w * F.cross_entropy(logits, target, reduction="none")).sum() / w.sum().clamp_min(1e-8)


def student_loss(out: Out, tgt: Out, np_weights: Tensor | None = None,
                 tp_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """HoVer-Net / HoVer-UNet supervised loss; every term weighted 1 as in HoVer-Net.

    NP: weighted CE + Dice vs tgt "mask" (B,1,H,W); HV: MSE + MSGE (inside nuclei) vs tgt
    "hv" (B,2,H,W); TP: weighted CE + Dice vs tgt "type" (B,H,W), if both have it.
    """
    mask = tgt["mask"]
    labels = mask[:, 0].long()
    terms = {"np_ce": weighted_ce(out["np"], labels, np_weights),
             "np_dice": multiclass_dice(out["np"], labels)}
    terms["hv_mse"], terms["hv_msge"] = hv_loss(out["hv"], tgt["hv"], mask)
    if "tp" in out and "type" in tgt:
        terms["tp_ce"] = weighted_ce(out["tp"], tgt["type"], tp_weights)
        terms["tp_dice"] = multiclass_dice(out["tp"], tgt["type"])
    return sum(terms.values()), _parts(**terms)


def soft_ce(student_logits: Tensor, teacher_prob: Tensor) -> Tensor:
    """Cross-entropy of student logits against teacher soft labels, mean over pixels."""
    return -(teacher_prob * torch.log_softmax(student_logits.float(), dim=1)).sum(1).mean()


def kl_div(student_logits: Tensor, teacher_logits: Tensor, T: float = 1.0) -> Tensor:
    """T^2 * KL(teacher || student) of the softened class distributions, mean over pixels."""
    log_t = torch.log_softmax(teacher_logits.float() / T, dim=1)
    log_s = torch.log_softmax(student_logits.float() / T, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean() * T * T


def two_class_logits(out: Out) -> Tensor | None:
    """Teacher NP logits (B,2,H,W); a 1-channel "mask" m becomes [0, m]: softmax = [1-p, p]."""
    if "np" in out:
        return out["np"]
    if "mask" in out:
        m = out["mask"]
        return torch.cat([torch.zeros_like(m), m], dim=1)
    return None


def distill_loss(student_out: Out, teacher_out: Out,
                 T: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """HoVer-UNet distillation against whatever heads the teacher has.

    NP (teacher "np", or "mask" as [1-p, p]): CE vs teacher soft labels + T^2 KL at T.
    HV (teacher "hv"): MSE + MSGE inside the teacher's soft nucleus probability.
    TP (teacher and student "tp"): CE + T^2 KL as NP.
    """
    teacher = {k: v.detach() for k, v in teacher_out.items()}
    t_np = two_class_logits(teacher)
    if t_np is None:
        raise KeyError(f"teacher outputs need 'np' or 'mask'; got {sorted(teacher)}")
    s_np = student_out["np"]
    terms = {"np_ce": soft_ce(s_np, torch.softmax(t_np.float(), dim=1)),
             "np_kl": kl_div(s_np, t_np, T)}
    if "hv" in teacher:
        focus = torch.softmax(t_np.float(), dim=1)[:, 1:2]
        terms["hv_mse"], terms["hv_msge"] = hv_loss(student_out["hv"], teacher["hv"], focus)
    if "tp" in teacher and "tp" in student_out:
        terms["tp_ce"] = soft_ce(student_out["tp"], torch.softmax(teacher["tp"].float(), dim=1))
        terms["tp_kl"] = kl_div(student_out["tp"], teacher["tp"], T)
    return sum(terms.values()), _parts(**terms)


def hover_unet_loss(student_out: Out, tgt: Out | None, teacher_out: Out | None,
                    alpha: float = 0.5, T: float = 1.0,
                    np_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """alpha * student_loss + (1 - alpha) * distill_loss.

    tgt None (unlabelled tiles): the distillation loss alone, unweighted, as HoVer-UNet's
    code does; teacher_out None: the student loss alone. Parts are prefixed
    "student/" and "distill/", with the two totals under "student" and "distill".
    """
    if tgt is None and teacher_out is None:
        raise ValueError("hover_unet_loss needs a target, a teacher output or both")
    parts: dict[str, Tensor] = {}
    s = d = None
    if tgt is not None:
        s, sp = student_loss(student_out, tgt, np_weights)
        parts |= {"student": s.detach()} | {f"student/{k}": v for k, v in sp.items()}
    if teacher_out is not None:
        d, dp = distill_loss(student_out, teacher_out, T)
        parts |= {"distill": d.detach()} | {f"distill/{k}": v for k, v in dp.items()}
    if s is None:
        return d, parts
    if d is None:
        return s, parts
    return alpha * s + (1 - alpha) * d, parts
