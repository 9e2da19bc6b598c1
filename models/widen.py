"""Net2Net widening (Chen et al., ICLR 2016) of a trained U-Net into a wider one.

A teacher has to be stronger than its student, but on our CPUs a wide U-Net trained from
scratch never catches up with the student's hours of training. Widening copies the trained
student into a wider net that computes the same function: each new channel j of a layer
repeats old channel j mod c_old, and every consumer of that layer divides the weights of the
repeated inputs by their repeat count. Training then starts from the student's accuracy and
uses the extra width. A little noise breaks the symmetry of the copies; without it they
would receive identical gradients and stay copies forever.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .unet import DoubleConv, SqueezeExcite, UNet


def channel_map(c_old: int, c_new: int) -> Tensor:
    """(c_new,) int64: the old channel each new channel copies (j mod c_old); c_new >= c_old."""
    if c_new < c_old:
        raise ValueError(f"cannot widen {c_old} channels to fewer ({c_new})")
    return torch.arange(c_new) % c_old


def _in_weights(w: Tensor, in_map: Tensor) -> Tensor:
    """Weights (O, I_old, ...) -> (O, I_new, ...) for inputs copied by `in_map`, split evenly."""
    counts = torch.bincount(in_map, minlength=w.shape[1]).to(w.dtype)
    return w[:, in_map] / counts[in_map].view(1, -1, *([1] * (w.dim() - 2)))


@torch.no_grad()
def _conv(dst: nn.Conv2d, src: nn.Conv2d, in_map: Tensor, out_map: Tensor | None,
          noise: float, gen: torch.Generator) -> None:
    w = _in_weights(src.weight, in_map)
    if out_map is not None:
        w = w[out_map]
    if noise:
        w = w + noise * w.std() * torch.randn(w.shape, generator=gen, dtype=w.dtype)
    dst.weight.zero_()  # inputs src lacks (extra input channels) get zero weights
    dst.weight[:, : w.shape[1]].copy_(w)
    if src.bias is not None:
        dst.bias.copy_(src.bias if out_map is None else src.bias[out_map])


@torch.no_grad()
def _norm(dst: nn.Module, src: nn.Module, out_map: Tensor) -> None:
    """Per-channel norm parameters and running statistics follow their channel."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        s = getattr(src, name, None)
        if isinstance(s, Tensor):
            getattr(dst, name).copy_(s[out_map])
    if isinstance(src, nn.BatchNorm2d):
        dst.num_batches_tracked.copy_(src.num_batches_tracked)


def _block(dst: DoubleConv, src: DoubleConv, in_map: Tensor, out_map: Tensor, noise: float,
           gen: torch.Generator) -> None:
    """Widen one DoubleConv in place: inputs copied by `in_map`, outputs by `out_map`."""
    if any(isinstance(m, SqueezeExcite) for m in src):  # before anything is copied
        raise NotImplementedError("widening squeeze-and-excitation blocks is not supported")
    maps = [in_map, out_map]
    convs = [m for m in src if isinstance(m, nn.Conv2d)]
    dconvs = [m for m in dst if isinstance(m, nn.Conv2d)]
    norms = [m for m in src if not isinstance(m, (nn.Conv2d, nn.ReLU, SqueezeExcite))]
    dnorms = [m for m in dst if not isinstance(m, (nn.Conv2d, nn.ReLU, SqueezeExcite))]
    for i, (d, s) in enumerate(zip(dconvs, convs)):
        _conv(d, s, maps[i], out_map, noise, gen)
    for d, s in zip(dnorms, norms):
        _norm(d, s, out_map)


def widen_unet(src: UNet, dst: UNet, noise: float = 1e-2, seed: int = 0) -> UNet:
    """Copy trained `src` into the wider `dst` (same depth, norm, up mode) in place.

    With noise=0 and both in eval mode, dst(x) equals src(x) up to float rounding. `noise`
    is relative to each weight tensor's std. Extra input channels of `dst` (GoLo's local
    stage adds the coarse probability to RGB) start with zero weights, so they change
    nothing until trained. Heads of `dst` that `src` lacks keep their fresh initialisation;
    an "np" head becomes a "mask" head as the logit difference of its two classes (softmax
    of two logits = sigmoid of their difference). Returns `dst`.
    """
    if src.depth != dst.depth or src.in_channels > dst.in_channels:
        raise ValueError("widen_unet needs the same depth and at least src's input channels")
    gen = torch.Generator().manual_seed(seed)
    c_src = [b[0].out_channels for b in src.down]
    c_dst = [b[0].out_channels for b in dst.down]
    out_maps = [channel_map(a, b) for a, b in zip(c_src, c_dst)]
    in_map = torch.arange(src.in_channels)
    for i, (d, s) in enumerate(zip(dst.down, src.down)):
        _block(d, s, in_map, out_maps[i], noise, gen)
        in_map = out_maps[i]
    # Decoder level i: reduce (deep -> skip channels), then conv over cat([skip, reduced]).
    for k, (d, s) in enumerate(zip(dst.up, src.up)):
        i = src.depth - 1 - k
        if isinstance(s.reduce, nn.ConvTranspose2d):
            _transpose(d.reduce, s.reduce, in_map, out_maps[i])
        else:
            _conv(d.reduce, s.reduce, in_map, out_maps[i], noise, gen)
        cat_map = torch.cat([out_maps[i], out_maps[i] + c_src[i]])
        _block(d.conv, s.conv, cat_map, out_maps[i], noise, gen)
        in_map = out_maps[i]
    for name, head in dst.heads.items():
        if name in src.heads:
            _conv(head, src.heads[name], in_map, None, 0.0, gen)
        elif name == "mask" and "np" in src.heads:
            _conv(head, _logit_difference(src.heads["np"]), in_map, None, 0.0, gen)
    return dst


def _logit_difference(np_head: nn.Conv2d) -> nn.Conv2d:
    """A 1-channel conv computing logit 1 - logit 0 of a 2-class head."""
    out = nn.Conv2d(np_head.in_channels, 1, 1)
    with torch.no_grad():
        out.weight.copy_(np_head.weight[1:2] - np_head.weight[0:1])
        out.bias.copy_(np_head.bias[1:2] - np_head.bias[0:1])
    return out


@torch.no_grad()
def _transpose(dst: nn.ConvTranspose2d, src: nn.ConvTranspose2d, in_map: Tensor, out_map: Tensor) -> None:
    """ConvTranspose2d weights are (I, O, k, k): split inputs on dim 0, copy outputs on dim 1."""
    w = _in_weights(src.weight.transpose(0, 1), in_map).transpose(0, 1)
    dst.weight.copy_(w[:, out_map])
    if src.bias is not None:
        dst.bias.copy_(src.bias[out_map])
