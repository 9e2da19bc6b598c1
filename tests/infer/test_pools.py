"""Process pools: the `auto` sizing rule; one `TilePools` serving slide after slide (real
slides through OpenSlide in its reader processes) with the inline result; a bad slide or a
dead process failing only its own slide; no process left behind after `close`."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from slidefiles import write_tiff

from nucleiflow.pipeline.infer.pools import PoolSizes, TilePools, pool_sizes
from nucleiflow.pipeline.infer.predictor import Predictor
from nucleiflow.pipeline.infer.stream import stream_tiles
from nucleiflow.pipeline.slide.reader import ArraySlide, SlideError, open_slide
from nucleiflow.pipeline.tiles.plan import plan_tiles
from nucleiflow.pipeline.tiles.stitch import LabelStitcher, MemoryMerger

MODEL_MPP = 0.5


class RedLogit(torch.nn.Module):
    """Identity "model": the nucleus probability is the red channel (as in test_stitch)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mask": torch.logit(x[:, :1].double()).float()}


def predictor(**post) -> Predictor:
    return Predictor(RedLogit(), {"mpp": MODEL_MPP, "postprocess": {"method": "distance", **post}}, device="cpu")


def stitch(reader, plan, pred, **kw) -> MemoryMerger:
    """The real stream + stitcher into memory."""
    store = MemoryMerger(plan.height, plan.width)
    stitcher = LabelStitcher(plan, store)
    for tn in stream_tiles(reader, plan, pred, pred.card.postprocess, batch_size=3, **kw):
        stitcher.add(tn)
    return store


# -- the rule ---------------------------------------------------------------------------
@pytest.mark.parametrize("cores, cuda, expected", [
    (1, False, (0, 0, 1)),    # nothing beside the model: every stage inline
    (2, False, (0, 1, 1)),    # the watershed beside the model; reads inline (~2% of a tile)
    (4, False, (1, 1, 2)),
    (8, False, (1, 2, 5)),
    (16, False, (1, 4, 11)),
    (64, False, (4, 16, 44)),
    (1, True, (1, 1, 1)),     # the GPU needs a reader and a watershed process even on 1 core
    (2, True, (1, 1, 1)),
    (16, True, (2, 13, 1)),   # CPU cores to post-processing: the slow stage beside a GPU
    (128, True, (8, 32, 1)),  # capped: more processes only cost memory
])
def test_auto_rule(cores, cuda, expected):
    s = pool_sizes(cores, cuda)
    assert (s.readers, s.workers, s.torch_threads, s.cores) == (*expected, cores)


def test_auto_rule_keeps_cpu_stages_within_the_cores_and_explicit_numbers():
    for cores in range(2, 129):
        s = pool_sizes(cores, cuda=False)
        assert s.readers + s.workers + s.torch_threads == cores and s.workers >= 1 and s.torch_threads >= 1
    assert pool_sizes(8, False, readers=3) == PoolSizes(3, 2, 3, 8)  # the auto part fills the rest
    assert pool_sizes(8, False, workers=0) == PoolSizes(1, 0, 7, 8)
    assert pool_sizes(2, False, readers=2, workers=4) == PoolSizes(2, 4, 1, 2)  # asked for: kept
    assert pool_sizes(16, True, readers=0, workers=5) == PoolSizes(0, 5, 1, 16)


def test_usable_cores_is_the_affinity_not_the_machine():
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from nucleiflow.pipeline.infer.pools import usable_cores; print(usable_cores(), os.cpu_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    used, machine = map(int, out.stdout.split())
    assert used == 1, "one core allowed: one core used"
    assert machine >= 1


# -- one set of pools, many slides --------------------------------------------------------
@pytest.fixture(scope="module")
def slides(tmp_path_factory, cmu_slide, shared_data):
    """Two real slides (CMU-1 through OpenSlide at 0.25 um/px; a MoNuSeg image as a TIFF)
    and a TIFF cut in its pixel data (it opens, its tiles do not read)."""
    d = tmp_path_factory.mktemp("pool-slides")
    image = min((shared_data / "monuseg" / "images").glob("*.png"))
    rgb = np.array(Image.open(image).convert("RGB"))
    rgb[..., 0] = 255 - rgb[..., 0]  # nuclei bright in red: the identity model finds them
    tiff = write_tiff(d / "monuseg.tiff", rgb, mpp=0.25)
    data = tiff.read_bytes()
    (d / "truncated.tiff").write_bytes(data[: len(data) * 6 // 10])
    return {"cmu": (cmu_slide, 0.25), "monuseg": (tiff, None), "truncated": (d / "truncated.tiff", None)}


def run(slide, pools=None, **kw):
    path, mpp = slide
    with open_slide(path, mpp=mpp) as reader:
        plan = plan_tiles(reader.info.width, reader.info.height, reader.info.mpp_x, MODEL_MPP, tile_size=256, halo=16)
        store = stitch(reader, plan, predictor(prob_threshold=0.6, min_size=10), pools=pools, **kw)
    return store.labels


def alive(pids) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_one_set_of_pools_serves_slide_after_slide_with_the_inline_result(slides):
    inline = {k: run(slides[k], readers=0, workers=0) for k in ("cmu", "monuseg")}
    assert all(v.max() > 20 for v in inline.values()), "real nuclei, not an empty raster"
    with TilePools(PoolSizes(readers=2, workers=1, torch_threads=1, cores=2)) as pools:
        seen = []
        for k in ("cmu", "monuseg", "cmu"):
            np.testing.assert_array_equal(run(slides[k], pools), inline[k])
            seen.append(pools.pids())
        assert pools.starts == 1, "started once for the three slides"
        assert seen[0] == seen[1] == seen[2] and len(seen[0]["readers"]) == 2 and len(seen[0]["workers"]) == 1
    assert pools.read is None and not alive(seen[0]["readers"] + seen[0]["workers"]), "no process left behind"


def test_a_bad_slide_fails_alone_and_the_pools_serve_the_next(slides):
    with TilePools(PoolSizes(1, 1, 1, 2)) as pools:
        before = run(slides["cmu"], pools)
        pids = pools.pids()
        with pytest.raises(SlideError, match="truncated"):
            run(slides["truncated"], pools)  # its tiles fail in the reader process
        np.testing.assert_array_equal(run(slides["cmu"], pools), before)
        assert pools.pids() == pids and pools.starts == 1


class DiesInChild(ArraySlide):
    """A slide whose reads kill the process they run in, unless it is the parent: a reader
    process killed mid-slide (out of memory, a crashing codec)."""

    def __init__(self, array: np.ndarray, mpp: float) -> None:
        super().__init__(array, mpp, name="dies")
        self.parent = os.getpid()

    def _region(self, level, x, y, w, h):
        if os.getpid() != self.parent:
            os._exit(3)
        return super()._region(level, x, y, w, h)


def test_a_dead_process_fails_only_its_slide(slides):
    with TilePools(PoolSizes(1, 1, 1, 2)) as pools:
        good = run(slides["monuseg"], pools)
        first = pools.pids()
        with open_slide(*slides["monuseg"]) as r:
            dying = DiesInChild(r.read(0, 0, 300, 300, 0.25), 0.25)
        plan = plan_tiles(300, 300, 0.25, MODEL_MPP, tile_size=128, halo=16)
        with pytest.raises(BrokenProcessPool):
            stitch(dying, plan, predictor(prob_threshold=0.6), pools=pools)
        np.testing.assert_array_equal(run(slides["monuseg"], pools), good)
        assert pools.starts == 2, "new processes for the next slide"
        second = pools.pids()
    assert not alive(first["readers"] + first["workers"] + second["readers"] + second["workers"])
