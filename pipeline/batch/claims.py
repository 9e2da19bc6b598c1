"""Per-slide claim files: two batches on one output folder never work the same slide at once.

A worker that is about to segment a slide creates ``<out>/<slide_id>/.claim`` with
``O_CREAT | O_EXCL`` (exactly one creator wins, also on NFS v3+), holding its pid, host,
pid namespace, process start time, start time and a random token; it refreshes the file's
mtime (a heartbeat) while it works and removes the file when done (``finally``). Anyone
else finds the slide *busy* and moves on.

Why a claim file and not Prefect's tag concurrency limits: a limit lives in one Prefect
API, but `nucleiflow segment` runs each CLI batch on its own ephemeral API, and a tag limit
counts slots, not slides (two batches would still both run slide A, one after the other,
and a slide could be counted twice). The output folder is the one thing every worker of a
batch shares -- CLI runs, Prefect process workers, Dask workers on other hosts -- and the
claim protects exactly what needs protecting: one slide's output paths.

A claim is *stale*, and may be broken, when
  * its holder ran on this host (same hostname and pid namespace) and that pid is gone, or
    now belongs to another process (its start time differs): a SIGKILLed batch is
    re-claimable at once;
  * otherwise (another host or container) its mtime is older than ``ttl_s``: the holder
    stopped refreshing it;
  * its content is unreadable (the creator died between create and write) and it is older
    than ``GRACE_S``.
Breaking renames the file aside and checks that the moved file is the one judged stale
(inode, mtime and bytes); if a fresh claim was moved by mistake, it is linked back. A holder
checks it still owns its claim (``verify``) before it publishes outputs.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Self

CLAIM_NAME = ".claim"
DEFAULT_TTL_S = 600.0  # a holder on another host that stopped heartbeating for 10 min is gone
GRACE_S = 30.0  # an unreadable claim younger than this may be a creator still writing it


class SlideBusy(Exception):
    """Another live worker holds the slide's claim. The message says who and since when."""


class ClaimLost(Exception):
    """Our claim was broken by another worker (we looked dead to it); do not publish outputs."""


def _host() -> str:
    return socket.gethostname()


def _pid_namespace() -> str:
    """Id of this process's pid namespace: pids are comparable only inside one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, ...; Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the command name (field 2) may hold spaces and ')'


def _proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), None where unknown."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    """Is ``pid`` a running process of this pid namespace? A zombie is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    fields = _proc_stat(pid)
    return not (fields and fields[0] in ("Z", "X"))


def holder_info(token: str | None = None) -> dict:
    """What a claim records about its holder (this process)."""
    pid = os.getpid()
    return {"pid": pid, "host": _host(), "pid_ns": _pid_namespace(), "proc_start": _proc_start(pid),
            "started": time.time(), "token": token or uuid.uuid4().hex}


def holder_alive(info: dict) -> bool | None:
    """True/False when ``info``'s holder can be checked from here (same host and pid
    namespace), None when it cannot (another host or container)."""
    if info.get("host") != _host() or info.get("pid_ns", "") != _pid_namespace():
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not _pid_alive(pid):
        return False
    start = info.get("proc_start")
    return start is None or _proc_start(pid) in (None, start)  # another start time = pid reused


def stale_reason(info: dict | None, age_s: float, ttl_s: float = DEFAULT_TTL_S) -> str | None:
    """Why a claim with content ``info`` (None: unreadable) and mtime age ``age_s`` is
    stale, or None when it is live."""
    if info is None:
        return f"unreadable claim, {age_s:.0f} s old" if age_s > GRACE_S else None
    alive = holder_alive(info)
    if alive is False:
        return f"pid {info.get('pid')} on {info.get('host')} is gone"
    if alive is None and age_s > ttl_s:
        return f"no heartbeat from {info.get('host')} for {age_s:.0f} s (ttl {ttl_s:.0f} s)"
    return None


def describe(info: dict | None) -> str:
    if info is None:
        return "a worker that is still writing its claim"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} since {since}"


def _read(path: Path) -> tuple[bytes, os.stat_result] | None:
    """(bytes, stat) of the claim file, None when there is none."""
    try:
        with open(path, "rb") as f:
            return f.read(), os.fstat(f.fileno())
    except FileNotFoundError:
        return None


def _parse(raw: bytes) -> dict | None:
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    return info if isinstance(info, dict) and "token" in info else None


def _break(path: Path, raw: bytes, st: os.stat_result) -> None:
    """Remove the claim at ``path`` if it is still the file (``raw``, ``st``) judged stale."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another worker broke it first
    try:
        moved = _read(aside)
        same = moved is not None and moved[0] == raw and (moved[1].st_ino, moved[1].st_mtime_ns) == (
            st.st_ino, st.st_mtime_ns)
        if not same:  # a fresh claim replaced the stale one after we looked: put it back
            try:
                os.link(aside, path)
            except FileExistsError:
                pass  # yet another claim is there; the moved one's holder fails `verify`
    finally:
        aside.unlink(missing_ok=True)


@dataclass
class Claim:
    """A held claim. Use as a context manager: heartbeat while inside, release on exit."""

    path: Path
    info: dict
    ttl_s: float = DEFAULT_TTL_S

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.info["token"]

    def owned(self) -> bool:
        """Is the claim file still ours?"""
        got = _read(self.path)
        return got is not None and (_parse(got[0]) or {}).get("token") == self.token

    def verify(self) -> None:
        """Raise ClaimLost unless the claim file is still ours."""
        if not self.owned():
            got = _read(self.path)
            raise ClaimLost(f"{self.path.parent.name}: claim lost to "
                            f"{describe(_parse(got[0])) if got else 'nobody (it was removed)'}")

    def refresh(self) -> bool:
        """Heartbeat: touch the file if it is ours; False when it no longer is."""
        if not self.owned():
            return False
        try:
            os.utime(self.path)
        except FileNotFoundError:
            return False
        return True

    def release(self) -> None:
        """Stop the heartbeat and remove the file if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.owned():
            self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        interval = max(0.05, min(60.0, self.ttl_s / 4))
        while not self._stop.wait(interval):
            if not self.refresh():
                return

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._beat, name=f"claim-{self.path.parent.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(folder: str | os.PathLike, ttl_s: float = DEFAULT_TTL_S, name: str = CLAIM_NAME) -> Claim:
    """Claim ``folder`` (a slide's output folder; created if missing) for this process.

    Returns a `Claim` (enter it to heartbeat and release); raises SlideBusy when a live
    claim is there, OSError when the folder cannot be written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    for _ in range(8):  # each round either creates, reports busy, or breaks a stale claim
        info = holder_info()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            got = _read(path)
            if got is None:
                continue  # released between our create and our read: try again
            raw, st = got
            theirs = _parse(raw)
            why = stale_reason(theirs, time.time() - st.st_mtime, ttl_s)
            if why is None:
                raise SlideBusy(f"{folder.name}: claimed by {describe(theirs)}") from None
            _break(path, raw, st)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Claim(path, info, ttl_s)
    raise SlideBusy(f"{folder.name}: claim keeps changing hands; another worker is contending for it")
