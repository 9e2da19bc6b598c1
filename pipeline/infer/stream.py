"""Streaming tile inference: read -> model -> post-process, with bounded queues.

Reader processes (one slide handle each) read tiles ahead of the model; the model runs in
the calling process on batches (inference_mode; pinned memory, AMP and non-blocking copies
on CUDA); post-processing (watershed + ownership + polygons) runs in a second process pool
while the model works on the next batch. Results come back in tile order, so ids and outputs
are deterministic. Memory is bounded by the prefetch windows, never by the slide.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from nucleiflow.models.outputs import to_maps
from nucleiflow.pipeline.infer import parallel
from nucleiflow.pipeline.slide.reader import SlideReader
from nucleiflow.pipeline.slide.stain import StainReference
from nucleiflow.pipeline.tiles.plan import Tile, TilePlan
from nucleiflow.pipeline.tiles.ownership import TileNuclei
from nucleiflow.pipeline.infer.workers import _init_post, _init_reader, _process, _process_with, _read_window, read_window


def pick_device(device: str) -> torch.device:
    """'auto' -> CUDA when there is one, else CPU; 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


class Predictor:
    """Model + its card -> per-pixel maps for a batch of RGB tiles.

    ``__call__(images: (B,H,W,3) uint8) -> dict`` of numpy float32 maps: "prob" (B,H,W),
    optionally "hv" (B,2,H,W), "marker" (B,H,W), "type_prob" (B,k,H,W).
    """

    def __init__(self, model: torch.nn.Module, card: dict, device: str = "auto") -> None:
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.card = card
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.float().div_(255.0)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.cuda):
            maps = to_maps(self.model(x))
        out = {}
        for k, v in maps.items():
            arr = v.float().cpu().numpy()
            out[k] = arr[:, 0] if k in ("prob", "marker") else arr
        return out


@dataclass
class StageTimer:
    """Seconds spent per stage (read, model, post-process wait, write), summed over tiles."""

    seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "model": 0.0, "postprocess": 0.0})

    def add(self, stage: str, dt: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + dt


def stream_tiles(
    reader: SlideReader,
    plan: TilePlan,
    predictor: Predictor,
    postprocess: dict,
    *,
    batch_size: int = 4,
    readers: int = 1,
    workers: int = 1,
    timer: StageTimer | None = None,
) -> Iterator[TileNuclei]:
    """Yield each planned tile's owned nuclei, in tile order.

    Args:
        postprocess: the card's post-processing entry: {"method": ..., **params}.
        readers / workers: process counts for reading / post-processing (0 = inline).
    """
    timer = timer or StageTimer()
    window = plan.tile_size + 2 * plan.halo
    stain = (predictor.card.get("normalisation") or {}).get("stain")
    # Inline (0 processes) binds the slide and plan to the call, not to module globals as
    # the pools' initialisers do: two streams in threads of one process stay apart.
    read_pool = parallel.make_pool(readers, _init_reader, (reader, stain))
    stain_ref = StainReference.from_dict(stain) if stain else None
    read_fn = _read_window if read_pool is not None else partial(read_window, reader, stain_ref)
    post_pool = parallel.make_pool(workers, _init_post, (plan, postprocess))
    post_fn = _process if post_pool is not None else partial(_process_with, plan, postprocess)
    try:
        jobs = ((t, plan.scale, window, plan.mpp) for t in plan)
        reads = parallel.ordered_map(read_fn, jobs, read_pool, window=max(2 * batch_size, 2))

        def batches() -> Iterator[tuple[Tile, dict[str, np.ndarray]]]:
            buf: list[tuple[Tile, np.ndarray]] = []
            for tile, rgb, dt in reads:
                timer.add("read", dt)
                buf.append((tile, rgb))
                if len(buf) == batch_size:
                    yield from _predict(buf)
                    buf = []
            if buf:
                yield from _predict(buf)

        def _predict(buf: list[tuple[Tile, np.ndarray]]) -> Iterator[tuple[Tile, dict[str, np.ndarray]]]:
            t0 = time.perf_counter()
            maps = predictor(np.stack([rgb for _, rgb in buf]))
            timer.add("model", time.perf_counter() - t0)
            for i, (tile, _) in enumerate(buf):
                yield tile, {k: v[i] for k, v in maps.items()}

        jobs2 = batches()
        results = parallel.ordered_map(post_fn, jobs2, post_pool, window=max(2 * batch_size, 2))
        for res in results:
            timer.add("postprocess", res.seconds)
            yield res
    finally:
        for pool in (read_pool, post_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
