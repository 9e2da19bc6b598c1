"""Per-slide claims (pipeline.claims) and the leftovers of killed runs (clean_partial,
tidy_done), on tiny hand-made folders."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import time
from pathlib import Path

import pytest

from nucleiflow.pipeline.batch import claims
from nucleiflow.pipeline.batch.claims import ClaimLost, SlideBusy, acquire
from nucleiflow.pipeline.batch.cleanup import clean_partial, tidy_done
from nucleiflow.pipeline.outputs.atomic import temp_path
from nucleiflow.pipeline.outputs.layout import slide_paths


# -- claims -------------------------------------------------------------------------------
def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()  # reaped: the pid is free
    return p.pid


def write_claim(folder: Path, age_s: float = 0.0, **info) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".claim"
    path.write_text(json.dumps({**claims.holder_info(), **info}) if info.get("raw") is None else info["raw"])
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_a_claim_is_exclusive_while_held_and_free_after(tmp_path):
    c = acquire(tmp_path / "s1")
    rec = json.loads((tmp_path / "s1" / ".claim").read_text())
    assert rec["pid"] == os.getpid() and rec["token"] == c.token and c.owned()
    with pytest.raises(SlideBusy, match=f"pid {os.getpid()}"):
        acquire(tmp_path / "s1")  # same live process, another claimant (a second flow run)
    c.release()
    assert not (tmp_path / "s1" / ".claim").exists()
    with acquire(tmp_path / "s1") as again:
        assert again.owned() and again.token != c.token
    assert not (tmp_path / "s1" / ".claim").exists()


def test_a_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    write_claim(tmp_path / "s", pid=dead_pid())
    with acquire(tmp_path / "s") as c:
        assert json.loads(c.path.read_text())["pid"] == os.getpid()


def test_a_reused_pid_does_not_keep_a_claim_alive(tmp_path):
    # our own (live) pid, but another process start time: the holder died, the pid was reused
    write_claim(tmp_path / "s", proc_start=(claims._proc_start(os.getpid()) or 0) + 1)
    assert acquire(tmp_path / "s").owned()


def test_another_hosts_claim_holds_until_its_heartbeat_is_older_than_the_ttl(tmp_path):
    write_claim(tmp_path / "s", host="other-node", pid=1, age_s=30)
    with pytest.raises(SlideBusy, match="other-node"):
        acquire(tmp_path / "s", ttl_s=60)
    write_claim(tmp_path / "s", host="other-node", pid=1, age_s=90)
    assert acquire(tmp_path / "s", ttl_s=60).owned()


def test_an_unreadable_claim_is_busy_while_young_and_stale_when_old(tmp_path):
    write_claim(tmp_path / "s", raw="")  # the creator was killed between create and write
    with pytest.raises(SlideBusy):
        acquire(tmp_path / "s")
    write_claim(tmp_path / "s", raw="", age_s=claims.GRACE_S + 5)
    assert acquire(tmp_path / "s").owned()


def test_the_heartbeat_refreshes_the_mtime_and_stops_on_release(tmp_path):
    with acquire(tmp_path / "s", ttl_s=0.2) as c:
        os.utime(c.path, (0, 0))
        time.sleep(0.3)
        assert time.time() - c.path.stat().st_mtime < 1
    assert not c.path.exists()


def test_a_lost_claim_is_detected_and_the_new_holders_file_is_left_alone(tmp_path):
    c = acquire(tmp_path / "s")
    c.path.unlink()
    write_claim(tmp_path / "s", host="other-node", pid=1)
    assert not c.owned()
    with pytest.raises(ClaimLost, match="other-node"):
        c.verify()
    with pytest.raises(ClaimLost):
        clean_partial(tmp_path, "s", c)
    c.release()
    assert json.loads((tmp_path / "s" / ".claim").read_text())["host"] == "other-node"


def test_breaking_puts_back_a_fresh_claim_that_replaced_the_stale_one(tmp_path):
    stale = write_claim(tmp_path / "s", pid=dead_pid())
    seen = stale.read_bytes(), stale.stat()
    stale.unlink()  # another worker broke it and claimed the slide meanwhile
    fresh = acquire(tmp_path / "s")
    claims._break(stale, *seen)
    assert fresh.owned()


def _race(folder: str, barrier, results) -> None:
    barrier.wait()
    try:
        c = acquire(folder)
    except SlideBusy:
        results.put("busy")
        return
    results.put("won")
    time.sleep(0.5)
    c.release()


def test_of_many_processes_racing_for_a_stale_claim_exactly_one_wins(tmp_path):
    write_claim(tmp_path / "s", pid=dead_pid())
    ctx = mp.get_context("fork")
    n = 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "s"), barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    got = sorted(results.get(timeout=5) for _ in range(n))
    assert got == ["busy"] * (n - 1) + ["won"]


def test_clean_partial_removes_leftovers_of_killed_runs_but_not_the_claim(tmp_path):
    paths = slide_paths(tmp_path, "s")
    c = acquire(paths["run_json"].parent)
    paths["parquet"].parent.mkdir(parents=True)
    leftovers = [paths["parquet"].with_name(".part-0.parquet.tmp-123"), paths["parquet"],
                 paths["run_json"], temp_path(paths["run_json"]), temp_path(paths["parquet"]),
                 paths["run_json"].with_name(".claim.stale-1a2b")]
    for p in leftovers:
        p.write_text("x")
    (paths["zarr"].parent / ".masks.ome.zarr.tmp-123").mkdir()
    (paths["zarr"] / "0").mkdir(parents=True)
    clean_partial(tmp_path, "s", c)
    assert sorted(p.name for p in paths["run_json"].parent.iterdir()) == [".claim"]
    assert list(paths["parquet"].parent.iterdir()) == []


def test_tidy_done_clears_a_dead_runs_claim_and_temp_files_but_not_a_live_claim(tmp_path):
    folder = tmp_path / "s"
    write_claim(folder, pid=dead_pid())
    (folder / ".nuclei_overlay.png.tmp-99").write_text("half a picture")
    (folder / "run.json").write_text("{}")
    tidy_done(tmp_path, "s")
    assert sorted(p.name for p in folder.iterdir()) == ["run.json"]
    (folder / ".nuclei_overlay.png.tmp-99").write_text("being drawn by a live worker")
    with acquire(folder):
        tidy_done(tmp_path, "s")
        assert (folder / ".nuclei_overlay.png.tmp-99").exists()
