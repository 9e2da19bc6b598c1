"""Helper processes that end with the process they work for (Linux), so a killed batch
leaves nothing running.

Without this, a SIGKILLed `nucleiflow segment` left its pool workers, their forkserver and
multiprocessing's resource tracker running for good: each worker holds the forkserver's
"alive" pipe and its own task queue open, so none of them ever sees end-of-file. And
Prefect's temporary API server (~230 MB, still listening) outlived a SIGTERM or SIGKILL,
since Prefect stops it only from ``atexit``.

* `worker_init` (pool initialisers): ignore SIGINT, which a terminal sends to the whole
  process group (the pool's owner stops the pool; workers printed a traceback each), and
  `exit_with` the pool's owner.
* ``python -m nucleiflow.pipeline.lifeline PID -- CMD...`` runs CMD with a parent-death
  signal (``PR_SET_PDEATHSIG``, kept across exec): the Prefect server gets SIGTERM when
  the process that started it ends, however it ends.

Standard library only: the wrapper must start fast, and workers stay torch-free.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import select
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when the thread that started it
    ends; False where prctl is not available (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_with(pid: int) -> bool:
    """Exit this process (``os._exit(1)``) as soon as process ``pid`` ends: a daemon thread
    waits on its pidfd (no polling). False where pidfds are not available (not Linux 5.3+)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # already gone
        os._exit(1)
    except (AttributeError, OSError):
        return False

    def wait() -> None:
        select.select([fd], [], [])  # readable once the process has ended
        os._exit(1)

    threading.Thread(target=wait, name=f"exit-with-{pid}", daemon=True).start()
    return True


def worker_init() -> None:
    """For a pool worker: leave Ctrl-C to the pool's owner, and end when the owner ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = mp.parent_process()  # the process that made the pool (not the forkserver)
    if parent is not None and parent.pid is not None:
        exit_with(parent.pid)


def main(argv: list[str]) -> None:
    """``PID -- CMD...``: exec CMD, with SIGTERM as its parent-death signal."""
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m nucleiflow.pipeline.lifeline PID -- CMD...")
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != int(argv[0]):  # the parent died before the prctl: nobody to serve
        sys.exit(1)
    os.execv(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
