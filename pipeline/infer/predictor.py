"""The model side of inference: a checkpoint and its validated card -> per-pixel maps.

``load_predictor`` is where a checkpoint's card is validated (`config.ModelCard`): a bad
card fails here, naming the file and the key, before any slide is claimed.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from nucleiflow.models.checkpoint import CARD, WEIGHTS, load_checkpoint, resolve
from nucleiflow.models.outputs import to_maps
from nucleiflow.models.tta import tta_maps
from nucleiflow.pipeline.config import CardError, ModelCard
from nucleiflow.pipeline.infer.dense import dense_maps
from nucleiflow.pipeline.infer.device import pick_device


class Predictor:
    """Model + its card -> per-pixel maps for a batch of RGB tiles.

    ``__call__(images: (B,H,W,3) uint8) -> dict`` of numpy float32 maps: "prob" (B,H,W),
    optionally "hv" (B,2,H,W), "marker" (B,H,W), "type_prob" (B,k,H,W). ``card`` may be a
    plain dict (validated here) or a `ModelCard`. ``tta`` > 1 averages the maps over that many
    flipped/rotated views (`models.tta`; ``tta`` forward passes per batch).

    ``dense``: do the dense part of the card's post-processing here, on the model's device
    (`infer.dense.dense_maps`: "energy" (B,H,W) float32 and "seedable" (B,H,W) bool in place
    of "hv", the same bits the workers would compute, a quarter less to ship to the workers
    and no Sobel or blur work left in them).
    None = on CUDA only: on CPU the workers' NumPy does it 3-7x faster, in parallel with the
    model, so there it only costs (README "Speed").
    """

    def __init__(self, model: torch.nn.Module, card: ModelCard | Mapping[str, Any], device: str = "auto",
                 tta: int = 1, dense: bool | None = None) -> None:
        self.device = pick_device(device)
        self.tta = int(tta)
        self.model = model.to(self.device).eval()
        self.card = ModelCard.of(card)
        self.cuda = self.device.type == "cuda"
        self.dense = self.cuda if dense is None else bool(dense)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, dense: bool | None = None) -> dict[str, np.ndarray]:
        """``dense``: this call's, instead of the predictor's."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.float().div_(255.0)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.cuda):
            if self.tta > 1:
                maps = tta_maps(self._maps, x, self.tta)
            else:
                maps = self._maps(x)
        if self.dense if dense is None else dense:
            maps = dense_maps(maps, self.card.postprocess)
        out = {}
        for k, v in maps.items():
            arr = (v if v.dtype == torch.bool else v.float()).cpu().numpy()
            out[k] = arr[:, 0] if k in ("prob", "marker") else arr
        return out

    def _maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`to_maps` of the model on (B, 3, H, W). On the CPU one tile at a time: the same
        maps in the same time as the whole batch, with a quarter of the activations held at
        once for a batch of 4 (peak RSS, README "Memory"); a GPU gets the whole batch."""
        if self.cuda or x.shape[0] == 1:
            return to_maps(self.model(x))
        parts = [to_maps(self.model(x[i : i + 1])) for i in range(x.shape[0])]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class RecordingPredictor:
    """A `Predictor` that keeps every batch's maps, so `replay` can serve them again.

    It records the model's own maps ("hv", never the ``dense`` ones): those depend on the
    card's thresholds, which a replay may change (`train.tuning`)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor, self.card, self.calls = predictor, predictor.card, []

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self.predictor(images, dense=False)
        self.calls.append(out)
        return out

    def replay(self, card: ModelCard | None = None) -> ReplayPredictor:
        return ReplayPredictor(self.calls, card or self.card)


class ReplayPredictor:
    """Serves recorded maps in call order, without a model: the tiled path's post-processing
    alone (e.g. candidate thresholds through exactly the path `evaluate` scores). The same
    plan and batch size must drive it as drove the recording; recorded dense maps (a
    ``dense`` predictor's "energy" / "seedable") hold the recording card's values
    (`infer.dense.dense_params`), so replay them only with those."""

    def __init__(self, calls: list[dict[str, np.ndarray]], card: ModelCard) -> None:
        self.calls, self.card, self._next = calls, ModelCard.of(card), 0

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if self._next >= len(self.calls):
            raise RuntimeError(f"replay ran past its {len(self.calls)} recorded batches")
        out = self.calls[self._next]
        if len(next(iter(out.values()))) != len(images):
            raise RuntimeError("replayed batch does not match the recording (another plan or batch size?)")
        self._next += 1
        return out


def load_card(name_or_path: str | os.PathLike) -> ModelCard:
    """The validated card of a bundled name or checkpoint folder (CardError if it is bad;
    KeyError / FileNotFoundError if there is no such checkpoint)."""
    folder = resolve(name_or_path)
    if not (folder / CARD).is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint: missing {CARD}")
    return ModelCard.load(folder / CARD)


def check_weights(name_or_path: str | os.PathLike) -> torch.nn.Module:
    """The checkpoint's model with its weights loaded; CardError naming model.safetensors
    when they do not load (truncated file, shapes that do not fit the card's kwargs)."""
    folder = resolve(name_or_path)
    try:
        net, _ = load_checkpoint(folder)
    except Exception as e:  # noqa: BLE001 - safetensors / torch errors have no common type
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CardError(f"{folder / WEIGHTS}: cannot load the weights ({first}); "
                        "copy the checkpoint again or retrain it") from None
    return net


def load_predictor(name_or_path: str | os.PathLike, device: str = "auto", tta: int = 1) -> Predictor:
    """Validate the card first (a clear error, not a TypeError in a worker), then load."""
    card = load_card(name_or_path)
    net = check_weights(name_or_path)
    return Predictor(net, card, device=device, tta=tta)
