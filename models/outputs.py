"""Raw model outputs -> probability maps for post-processing (see the output contract)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor


def to_maps(out: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """{"np"|"mask", ["hv", "marker", "tp"]} raw outputs -> float32 maps (B,C,H,W).

    "prob": (B,1,H,W) nucleus probability in [0, 1] (softmax(np)[:, 1] or sigmoid(mask));
    "hv": (B,2,H,W) as is; "marker": (B,1,H,W) sigmoid; "type_prob": (B,k,H,W) softmax.
    """
    if "np" in out:
        prob = torch.softmax(out["np"].float(), dim=1)[:, 1:2]
    elif "mask" in out:
        prob = torch.sigmoid(out["mask"].float())
    else:
        raise KeyError(f"outputs need 'np' or 'mask' for a nucleus probability; got {sorted(out)}")
    maps = {"prob": prob}
    if "hv" in out:
        maps["hv"] = out["hv"].float()
    if "marker" in out:
        maps["marker"] = torch.sigmoid(out["marker"].float())
    if "tp" in out:
        maps["type_prob"] = torch.softmax(out["tp"].float(), dim=1)
    return maps


def postprocess_method(out_keys: Iterable[str]) -> str:
    """Post-processing suited to the outputs: "hv" watershed, "marker" watershed or "distance"."""
    keys = set(out_keys)
    if "hv" in keys:
        return "hv"
    if "marker" in keys:
        return "marker"
    return "distance"
