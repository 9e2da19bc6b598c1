"""Ctrl-C and kills of `nucleiflow segment` mid-slide, on the real CMU slide with its reader
and post-processing pools and Prefect's temporary API server.

Ctrl-C (SIGINT to the process group, as a terminal sends it): exit 130 within seconds, two
lines naming what is unfinished, no tracebacks, the claim released. SIGINT, SIGTERM or
SIGKILL: no process the command started (server, forkserver, workers, resource tracker)
is alive a few seconds later. Descendants are listed from /proc before the signal, since
orphans are re-parented and the server runs in a session of its own.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

NUCLEIFLOW = Path(sys.executable).with_name("nucleiflow")


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of every live process below ``root``."""
    children: dict[int, list[tuple[int, str]]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        f = _stat(int(d.name))
        if f and f[0] not in "ZX":
            children.setdefault(int(f[1]), []).append((int(d.name), f[19]))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def alive(procs: list[tuple[int, str]]) -> list[int]:
    return [pid for pid, start in procs if (f := _stat(pid)) and f[19] == start and f[0] not in "ZX"]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def start_mid_slide(tmp_path: Path, slide: Path) -> tuple[subprocess.Popen, list[tuple[int, str]], Path]:
    """`segment` in its own process group, returned once the slide is claimed and a pool
    worker runs; with its descendants at that moment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    out = tmp_path / "out"
    cmd = [str(NUCLEIFLOW), "segment", str(slide), "--out", str(out), "--device", "cpu", "--tile-size", "256"]
    p = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "log", "w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    claim = out / slide.stem / ".claim"
    t0 = time.monotonic()
    while True:
        procs = descendants(p.pid)
        workers = [pid for pid, _ in procs if "forkserver" in cmdline(pid)]
        if claim.exists() and len(workers) >= 2:  # the forkserver and a worker of it
            time.sleep(1)  # tiles in flight
            return p, descendants(p.pid), claim
        if p.poll() is not None or time.monotonic() - t0 > 400:
            os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"no claimed slide with pools (rc {p.returncode}):\n{(tmp_path / 'log').read_text()[-3000:]}")
        time.sleep(0.05)


def assert_all_gone(procs: list[tuple[int, str]], within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while alive(procs):
        if time.monotonic() > deadline:
            left = alive(procs)
            names = [cmdline(pid)[:90] for pid in left]
            for pid in left:  # do not leave them to the next test
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"still alive {within_s} s after: {names}")
        time.sleep(0.1)


def test_ctrl_c_stops_in_seconds_with_two_lines_and_130(cmu_slide, tmp_path):
    p, procs, claim = start_mid_slide(tmp_path, cmu_slide)
    assert any("uvicorn" in cmdline(pid) for pid, _ in procs), "the temporary server is a descendant"
    t0 = time.monotonic()
    os.killpg(p.pid, signal.SIGINT)
    try:
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    took = time.monotonic() - t0
    log = (tmp_path / "log").read_text()
    print(f"exit {rc} {took:.1f} s after SIGINT")
    assert rc == 130, log[-3000:]
    assert took < 15, f"took {took:.1f} s"
    assert "Traceback" not in log, log[-3000:]
    lines = [x for x in log.splitlines() if x.startswith("nucleiflow:")]
    assert len(lines) == 2 and "1 of 1 slides not finished (CMU-1-Small-Region)" in lines[0], log[-2000:]
    assert "re-run the same command to resume" in lines[1]
    assert not claim.exists(), "the claim was not released"
    assert not (claim.parent / "run.json").exists()
    assert_all_gone(procs)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_segment_leaves_no_process_behind(cmu_slide, tmp_path, sig):
    p, procs, _ = start_mid_slide(tmp_path, cmu_slide)
    os.kill(p.pid, sig)  # the main process only, as `kill PID` or the OOM killer does
    p.wait(timeout=60)
    assert_all_gone(procs)
