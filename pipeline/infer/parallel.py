"""Bounded, ordered parallel map: the one concurrency primitive the tile stream uses.

`ordered_map` keeps at most `window` items in flight and yields results in input order, so
memory is bounded by the window (never by the slide) and outputs are deterministic.
With ``processes=0`` everything runs inline, which tests and `evaluate` use.
"""
from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any, TypeVar

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
