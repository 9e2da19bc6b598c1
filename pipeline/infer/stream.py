"""Streaming tile inference: read -> model -> post-process, with bounded queues.

Reader processes (one slide handle each) read tiles ahead of the model; the model runs in
the calling process on batches (inference_mode; pinned memory, AMP and non-blocking copies
on CUDA); post-processing (watershed + ownership + polygons) runs in a second process pool
while the model works on the next batch. Results come back in tile order, so ids and outputs
are deterministic. Memory is bounded by the prefetch windows, never by the slide.

`ordered_map` is the one concurrency primitive: at most ``window`` items in flight, results
in input order; with 0 processes everything runs inline (tests, `evaluate`).
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import numpy as np

from nucleiflow.pipeline.config import PostprocessConfig
from nucleiflow.pipeline.infer.predictor import Predictor
from nucleiflow.pipeline.slide.reader import SlideReader
from nucleiflow.pipeline.slide.stain import StainReference
from nucleiflow.pipeline.tiles.plan import Tile, TilePlan
from nucleiflow.pipeline.tiles.ownership import TileNuclei
from nucleiflow.pipeline.infer.workers import _init_post, _init_reader, _process, _process_with, _read_window, read_window


T = TypeVar("T")
R = TypeVar("R")

# forkserver: children fork from a clean single-threaded server, not from a parent that
# holds torch/OpenMP and Prefect's event-loop threads (forking those can deadlock).
_CONTEXT = "forkserver"


def make_pool(processes: int, initializer: Callable[..., Any] | None = None, initargs: tuple = ()) -> Executor | None:
    """A process pool, or None for inline execution when ``processes`` is 0."""
    if processes <= 0:
        return None
    ctx = mp.get_context(_CONTEXT)
    return ProcessPoolExecutor(processes, mp_context=ctx, initializer=initializer, initargs=initargs)


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], pool: Executor | None, window: int
) -> Iterator[R]:
    """Yield ``fn(item)`` for each item, in order, with at most ``window`` in flight."""
    if pool is None:
        for item in items:
            yield fn(item)
        return
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= max(window, 1):
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


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
    postprocess: PostprocessConfig,
    *,
    batch_size: int = 4,
    readers: int = 1,
    workers: int = 1,
    timer: StageTimer | None = None,
    tiles: Iterable[Tile] | None = None,
) -> Iterator[TileNuclei]:
    """Yield each planned tile's owned nuclei, in tile order.

    Args:
        postprocess: the card's post-processing (``predictor.card.postprocess``).
        readers / workers: process counts for reading / post-processing (0 = inline).
        tiles: the plan's tiles to run, in order (default: all; a resumed slide runs the rest).
    """
    timer = timer or StageTimer()
    window = plan.tile_size + 2 * plan.halo
    stain = predictor.card.normalisation.stain
    # Inline (0 processes) binds the slide and plan to the call, not to module globals as
    # the pools' initialisers do: two streams in threads of one process stay apart.
    read_pool = make_pool(readers, _init_reader, (reader, stain))
    stain_ref = StainReference.from_dict(stain) if stain else None
    read_fn = _read_window if read_pool is not None else partial(read_window, reader, stain_ref)
    post_pool = make_pool(workers, _init_post, (plan, postprocess))
    post_fn = _process if post_pool is not None else partial(_process_with, plan, postprocess)
    try:
        jobs = ((t, plan.scale, window, plan.mpp) for t in (plan if tiles is None else tiles))
        reads = ordered_map(read_fn, jobs, read_pool, window=max(2 * batch_size, 2))

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
        results = ordered_map(post_fn, jobs2, post_pool, window=max(2 * batch_size, 2))
        for res in results:
            timer.add("postprocess", res.seconds)
            yield res
    finally:
        for pool in (read_pool, post_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
