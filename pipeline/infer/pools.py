"""The reader and post-processing process pools: how many processes (`pool_sizes`, a pure
rule on the cores and the device), and `TilePools`, which starts them once and serves every
slide of a batch (each job carries its slide or plan by key: `workers.Keyed`).

Starting a pool costs seconds (fork from the forkserver, import numpy, scipy, scikit-image,
shapely and OpenSlide in each process): paid once per batch (`shared_pools`), not per slide.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Literal

from nucleiflow.pipeline.infer.workers import warm_up
from nucleiflow.pipeline.lifeline import worker_init

Auto = Literal["auto"]
# forkserver: children fork from a clean single-threaded server, not from a parent that
# holds torch/OpenMP and Prefect's event-loop threads (forking those can deadlock).
_CONTEXT = "forkserver"
MAX_AUTO_READERS, MAX_AUTO_WORKERS = 8, 32  # beyond these, memory grows and nothing gets faster


@dataclass(frozen=True)
class PoolSizes:
    """Processes for reading (``readers``) and post-processing (``workers``), torch's
    intra-op threads for the model (``torch_threads``; applied on CPU only) and the
    ``cores`` the rule saw. 0 processes = that stage runs in the calling process."""

    readers: int
    workers: int
    torch_threads: int
    cores: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def pool_sizes(cores: int, cuda: bool, readers: int | Auto = "auto", workers: int | Auto = "auto") -> PoolSizes:
    """The `auto` rule; explicit numbers are kept as given.

    Per tile on a CPU the model costs about 4x the post-processing's core time and 50x the
    read's (CMU-1-Small-Region, `student`, run.json timings), so on CPU the model keeps most
    cores: a reader process only from 4 cores (inline reads cost ~2% of a tile), a quarter
    of the cores for post-processing (at least 1 from 2 cores, so the watershed runs beside
    the model), and torch gets the rest: readers + workers + torch_threads == cores, no
    oversubscribed OpenMP threads. On CUDA the model needs no CPU threads and the watershed
    is the slow stage: 1 core for the main process (feeding the GPU, stitching, writing),
    an eighth of the cores for readers (at least 1), the rest for post-processing; torch 1.

    >>> pool_sizes(2, cuda=False)
    PoolSizes(readers=0, workers=1, torch_threads=1, cores=2)
    >>> pool_sizes(16, cuda=True)
    PoolSizes(readers=2, workers=13, torch_threads=1, cores=16)
    """
    cores = max(int(cores), 1)
    if cuda:
        r = min(max(1, cores // 8), MAX_AUTO_READERS) if readers == "auto" else readers
        w = min(max(1, cores - 1 - r), MAX_AUTO_WORKERS) if workers == "auto" else workers
        return PoolSizes(r, w, 1, cores)
    r = (min(max(1, cores // 16), MAX_AUTO_READERS) if cores >= 4 else 0) if readers == "auto" else readers
    w = (min(max(1, cores // 4), MAX_AUTO_WORKERS) if cores >= 2 else 0) if workers == "auto" else workers
    return PoolSizes(r, w, max(1, cores - r - w), cores)


def usable_cores() -> int:
    """Cores this process may run on (its affinity: taskset, cgroup cpusets), not the
    machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        return os.cpu_count() or 1


def make_pool(processes: int) -> Executor | None:
    """A process pool, or None for inline execution when ``processes`` is 0."""
    if processes <= 0:
        return None
    # worker_init: Ctrl-C is the owner's to handle, and a process ends with its owner
    # (pipeline.lifeline), so a killed batch leaves no pool processes behind.
    return ProcessPoolExecutor(processes, mp_context=mp.get_context(_CONTEXT), initializer=worker_init)


class TilePools:
    """The reader and post-processing pools of a batch, started at the first slide that
    needs them and kept for the next; `close` (or leaving the ``with``) stops them.

    A pool whose process died (killed, out of memory) fails only the slide it was serving
    (`BrokenProcessPool`); `reset` drops it and the next slide starts a fresh one.
    ``starts`` counts pool starts, ``start_s`` the seconds spent in them.
    """

    def __init__(self, sizes: PoolSizes) -> None:
        self.sizes = sizes
        self.read: Executor | None = None
        self.post: Executor | None = None
        self.starts, self.start_s = 0, 0.0
        self._lock = threading.Lock()

    def ensure_started(self) -> tuple[Executor | None, Executor | None]:
        """The (reader, post-processing) pools, started now if they are not running."""
        with self._lock:
            if any(getattr(p, "_broken", False) for p in (self.read, self.post)):
                self._shutdown(wait=False)  # a process died between slides
            if self.read is None and self.post is None and (self.sizes.readers or self.sizes.workers):
                t0 = time.perf_counter()
                self.read, self.post = make_pool(self.sizes.readers), make_pool(self.sizes.workers)
                # One no-op per process: start-up is paid here (and timed), not in the first tiles.
                futures = [p.submit(warm_up) for p, n in ((self.read, self.sizes.readers),
                                                          (self.post, self.sizes.workers)) if p for _ in range(n)]
                for f in futures:
                    f.result()
                self.starts += 1
                self.start_s += time.perf_counter() - t0
            return self.read, self.post

    def pids(self) -> dict[str, list[int]]:
        """Process ids of the running pools' processes (``readers``, ``workers``)."""
        # ProcessPoolExecutor keeps its processes in ``_processes`` (pid -> Process) since 3.2.
        return {name: sorted(getattr(p, "_processes", None) or {}) for name, p in
                (("readers", self.read), ("workers", self.post))}

    def reset(self) -> None:
        """Drop the pools (after a `BrokenProcessPool`): the next slide starts new ones."""
        with self._lock:
            self._shutdown(wait=False)

    def close(self) -> None:
        """Stop the processes and wait for them to exit."""
        with self._lock:
            self._shutdown(wait=True)

    def _shutdown(self, wait: bool) -> None:
        for p in (self.read, self.post):
            if p is not None:
                p.shutdown(wait=wait, cancel_futures=True)
        self.read = self.post = None

    def __enter__(self) -> TilePools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- one set of pools per process (a CLI batch, a Prefect flow-run process, a Dask worker) --
_SHARED: TilePools | None = None
_SHARED_LOCK = threading.Lock()
_TORCH_THREADS: int | None = None  # torch's own setting before the batch changed it


def shared_pools(sizes: PoolSizes, cuda: bool) -> TilePools:
    """This process's pools for ``sizes``, kept from slide to slide (new ones if the sizes
    changed), and on CPU torch's intra-op threads set to ``sizes.torch_threads``;
    `close_shared_pools` stops them and gives torch its threads back."""
    global _SHARED, _TORCH_THREADS
    with _SHARED_LOCK:
        if _SHARED is not None and _SHARED.sizes != sizes:
            _SHARED.close()
            _SHARED = None
        if _SHARED is None:
            _SHARED = TilePools(sizes)
        if not cuda:
            import torch  # here, not at the top: keep this module light for the flows' imports

            if _TORCH_THREADS is None:
                _TORCH_THREADS = torch.get_num_threads()
            torch.set_num_threads(sizes.torch_threads)
        return _SHARED


def close_shared_pools() -> None:
    """Stop this process's shared pools (end of a batch, an error, exit); idempotent."""
    global _SHARED, _TORCH_THREADS
    with _SHARED_LOCK:
        if _SHARED is not None:
            _SHARED.close()
            _SHARED = None
        if _TORCH_THREADS is not None:
            import torch

            torch.set_num_threads(_TORCH_THREADS)
            _TORCH_THREADS = None


atexit.register(close_shared_pools)  # a Dask or Prefect worker process that never ends a batch
