"""Streaming tile inference: read -> model -> post-process, with bounded queues.

Reader processes (each opens the slide at its first tile) read tiles ahead of the model; the model runs in
the calling process on batches (inference_mode; pinned memory, AMP and non-blocking copies
on CUDA); post-processing (watershed + ownership + polygons) runs in a second process pool
while the model works on the next batch. Results come back in tile order, so ids and outputs
are deterministic. Memory is bounded by the prefetch windows, never by the slide.

`ordered_map` is the one concurrency primitive: at most ``window`` items in flight, results
in input order; with 0 processes everything runs inline (tests, `evaluate`). The pools
(`pools.TilePools`) may outlive a stream and serve the next slide.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, Executor, Future
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import numpy as np

from nucleiflow.pipeline.config import PostprocessConfig
from nucleiflow.pipeline.infer.pools import PoolSizes, TilePools
from nucleiflow.pipeline.infer.predictor import Predictor
from nucleiflow.pipeline.slide.reader import SlideReader
from nucleiflow.pipeline.slide.stain import StainReference
from nucleiflow.pipeline.tiles.plan import Tile, TilePlan
from nucleiflow.pipeline.tiles.ownership import TileNuclei
from nucleiflow.pipeline.infer.workers import _post_job, _process_with, _read_job, plan_ref, read_window, slide_ref


T = TypeVar("T")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], pool: Executor | None, window: int
) -> Iterator[R]:
    """Yield ``fn(item)`` for each item, in order, with at most ``window`` in flight."""
    if pool is None:
        for item in items:
            yield fn(item)
        return
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max(window, 1):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # A shared pool outlives this stream: a failed or abandoned slide must not leave
        # its queued jobs in front of the next slide's.
        for f in pending:
            f.cancel()


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
    pools: TilePools | None = None,
    timer: StageTimer | None = None,
    tiles: Iterable[Tile] | None = None,
) -> Iterator[TileNuclei]:
    """Yield each planned tile's owned nuclei, in tile order.

    Args:
        postprocess: the card's post-processing (``predictor.card.postprocess``).
        pools: the batch's pools (kept running after this slide); without them, pools of
            ``readers`` / ``workers`` processes (0 = inline) start and stop with this stream.
        tiles: the plan's tiles to run, in order (default: all; a resumed slide runs the rest).
    """
    if pools is None:
        with TilePools(PoolSizes(readers, workers, 0, 0)) as own:
            yield from stream_tiles(reader, plan, predictor, postprocess, batch_size=batch_size, pools=own,
                                    timer=timer, tiles=tiles)
        return
    timer = timer or StageTimer()
    window = plan.tile_size + 2 * plan.halo
    stain = predictor.card.normalisation.stain
    todo = list(plan if tiles is None else tiles)
    read_pool, post_pool = pools.ensure_started()
    # Inline (0 processes) binds the slide and plan to the call; pooled jobs carry them by
    # key (`workers.Keyed`), so the same processes serve the next slide.
    if read_pool is not None:
        ref = slide_ref(reader, stain)
        read_fn, read_jobs = _read_job, ((ref, t, plan.scale, window, plan.mpp) for t in todo)
    else:
        stain_ref = StainReference.from_dict(stain) if stain else None
        read_fn, read_jobs = partial(read_window, reader, stain_ref), ((t, plan.scale, window, plan.mpp) for t in todo)
    if post_pool is not None:
        pref = plan_ref(plan, postprocess)
        post_fn, to_job = _post_job, (lambda tile, maps: (pref, tile, maps))
    else:
        post_fn, to_job = partial(_process_with, plan, postprocess), (lambda tile, maps: (tile, maps))
    # Enough jobs in flight to keep every process busy, at least two batches.
    reads = ordered_map(read_fn, read_jobs, read_pool, window=max(2 * batch_size, 2 * pools.sizes.readers, 2))

    def batches() -> Iterator[tuple]:
        buf: list[tuple[Tile, np.ndarray]] = []
        for tile, rgb, dt in reads:
            timer.add("read", dt)
            buf.append((tile, rgb))
            if len(buf) == batch_size:
                yield from _predict(buf)
                buf = []
        if buf:
            yield from _predict(buf)

    def _predict(buf: list[tuple[Tile, np.ndarray]]) -> Iterator[tuple]:
        t0 = time.perf_counter()
        maps = predictor(np.stack([rgb for _, rgb in buf]))
        timer.add("model", time.perf_counter() - t0)
        for i, (tile, _) in enumerate(buf):
            yield to_job(tile, {k: v[i] for k, v in maps.items()})

    jobs = batches()
    results = ordered_map(post_fn, jobs, post_pool, window=max(2 * batch_size, batch_size + pools.sizes.workers, 2))
    try:
        for res in results:
            timer.add("postprocess", res.seconds)
            yield res
    except BrokenExecutor:
        pools.reset()  # a process died (killed, out of memory): this slide fails, the next gets new ones
        raise
    finally:
        # Close inner to outer now, not at garbage collection: their queued jobs are cancelled.
        results.close()
        jobs.close()
        reads.close()
