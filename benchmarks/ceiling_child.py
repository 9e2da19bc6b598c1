"""The measured side of `benchmarks/ceiling.py`, run in a fresh interpreter per variant.

    python benchmarks/ceiling_child.py record SPEC_JSON     # model maps of every batch -> cache
    python benchmarks/ceiling_child.py measure SPEC_JSON    # stages on replayed maps -> JSON
    python benchmarks/ceiling_child.py fields SPEC_JSON     # the card keys this tree knows -> JSON

``SPEC["root"]`` names the checkout whose ``nucleiflow`` is imported (this one, or an
exported tree of another git ref): `use_root` points the three import packages at it
before anything imports them, so one benchmark script drives old and new code alike.
Only public functions both trees have are timed: ``read_window`` (and the reader's
``_region``, the decode inside it), ``normalise``, ``workers.process_tile`` and the three
module-level names it calls (``run_postprocess``, ``own_tile``, ``nuclei_table``), the
stitcher's ``add`` into a real ``SlideOutputs`` and its ``close``.
"""
from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


class _RootFinder:
    """Meta-path finder: ``nucleiflow.<pkg>`` from ``<root>/<pkg>`` (ahead of the editable install)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def find_spec(self, fullname: str, path=None, target=None):
        head, _, pkg = fullname.partition(".")
        if head == "nucleiflow" and pkg in ("pipeline", "models", "flows"):
            return importlib.machinery.PathFinder.find_spec(fullname, path=[self.root])
        return None


_ROOT_ENV = "NUCLEIFLOW_CEILING_ROOT"


def use_root(root: str) -> None:
    """Import ``nucleiflow`` from ``root`` here and in the pools' processes: multiprocessing's
    forkserver imports this file as ``__mp_main__`` before it unpickles any job, and the
    module-level hook below installs the finder there too (else an older tree's pooled run
    unpickles its jobs against this checkout's modules and dies)."""
    os.environ[_ROOT_ENV] = root
    sys.meta_path.insert(0, _RootFinder(root))


if __name__ != "__main__" and os.environ.get(_ROOT_ENV):
    sys.meta_path.insert(0, _RootFinder(os.environ[_ROOT_ENV]))


def _maps_path(cache: str) -> Path:
    return Path(cache) / "maps.npz"


def _open(spec: dict):
    """(reader, tissue, plan, card) as segment_slide sets them up."""
    from nucleiflow.pipeline.infer.predictor import load_card
    from nucleiflow.pipeline.slide.reader import open_slide
    from nucleiflow.pipeline.slide.tissue import detect_tissue
    from nucleiflow.pipeline.tiles.plan import plan_slide

    card = load_card(spec["model"]) if spec.get("card") is None else spec["card"]
    mpp = card["mpp"] if isinstance(card, dict) else card.mpp
    reader = open_slide(spec["slide"])
    tissue = detect_tissue(reader, mpp=8.0)
    plan = plan_slide(reader.info, tissue, mpp, tile_size=spec["tile_size"], halo=spec["halo"])
    return reader, tissue, plan, card


def _batches(plan, size: int):
    tiles = list(plan)
    return [tiles[i:i + size] for i in range(0, len(tiles), size)]


def record(spec: dict) -> dict:
    """Run the model once over every planned tile (batches as the stream makes them); save its maps."""
    import numpy as np

    from nucleiflow.pipeline.infer.predictor import load_predictor
    from nucleiflow.pipeline.infer.workers import read_window

    reader, _, plan, _ = _open(spec)
    predictor = load_predictor(spec["model"], device=spec.get("device", "cpu"))
    predictor.dense = False  # record "hv": the maps every tree's post-processing takes
    window = plan.tile_size + 2 * plan.halo
    arrays, t0 = {}, time.perf_counter()
    for b, tiles in enumerate(_batches(plan, spec["batch_size"])):
        rgb = np.stack([read_window(reader, None, (t, plan.scale, window, plan.mpp))[1] for t in tiles])
        for k, v in predictor(rgb).items():
            arrays[f"{b}/{k}"] = v
    out = _maps_path(spec["cache"])
    np.savez(out.with_suffix(".tmp.npz"), **arrays)
    out.with_suffix(".tmp.npz").rename(out)
    return {"tiles": len(plan), "model_s": time.perf_counter() - t0, "card": predictor.card.model_dump()}


def _load_calls(cache: str) -> list[dict]:
    import numpy as np

    with np.load(_maps_path(cache)) as z:
        calls: dict[int, dict] = {}
        for key in z.files:
            b, k = key.split("/")
            calls.setdefault(int(b), {})[k] = z[key]
    return [calls[b] for b in sorted(calls)]


class _Timer:
    """Wraps callables so that their seconds add up under a stage name: wall seconds in
    ``s``, CPU seconds of this process (all its threads: zarr's and Blosc's included) in
    ``cpu``. On cores shared with other jobs the wall time also counts the waits for a
    core; the CPU time is the work itself."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0
        return timed


def _outputs(out: Path, plan, tissue, slide_id: str):
    from nucleiflow.pipeline.outputs.layout import SlideOutputs

    return SlideOutputs(out, slide_id, shape=(plan.height, plan.width), mpp=plan.mpp, scale=plan.scale,
                        chunk=plan.tile_size, metadata={"model": "bench"}, tissue=tissue.mask, tissue_mpp=tissue.mpp)


def stages(spec: dict, reader, tissue, plan, card, calls) -> dict:
    """Every stage inline in this one process (one core), each timed on its own."""
    import numpy as np

    from nucleiflow.pipeline.config import ModelCard
    from nucleiflow.pipeline.infer import workers
    from nucleiflow.pipeline.slide.stain import StainReference, normalise
    from nucleiflow.pipeline.tiles.stitch import LabelStitcher

    from nucleiflow.pipeline.postprocess import watershed

    card = ModelCard.of(card)
    tm = _Timer()
    saved = {k: getattr(workers, k) for k in ("run_postprocess", "own_tile", "nuclei_table")}
    names = {"run_postprocess": "watershed", "own_tile": "ownership", "nuclei_table": "polygons_morphometry"}
    for k, fn in saved.items():
        setattr(workers, k, tm.wrap(names[k], fn))
    # Inside watershed: the dense maps a CUDA Predictor computes on the GPU instead
    # (`infer.dense`): the HV edge map and, since the energy split, its energy and seed
    # candidates. Trees from before those splits lack `hv_edge` / `hv_energy`.
    dense_fns = {name: getattr(watershed, fn) for name, fn in (("edge", "hv_edge"), ("energy", "hv_energy"))
                 if hasattr(watershed, fn)}
    for name, fn in dense_fns.items():
        setattr(watershed, fn.__name__, tm.wrap(name, fn))
    region = reader._region
    reader._region = tm.wrap("decode", region)  # inside read: the rest of read is resampling
    ref = StainReference.default()
    window = plan.tile_size + 2 * plan.halo
    out = Path(spec["out"])
    outputs = _outputs(out, plan, tissue, spec["slide_id"])
    stitcher = LabelStitcher(plan, outputs)
    try:
        for tiles, maps in zip(_batches(plan, spec["batch_size"]), calls):
            for i, tile in enumerate(tiles):
                _, rgb, _ = tm.wrap("read", workers.read_window)(reader, None, (tile, plan.scale, window, plan.mpp))
                tm.wrap("stain", normalise)(rgb, ref)
                tn = tm.wrap("postprocess", workers.process_tile)(tile, {k: v[i] for k, v in maps.items()},
                                                                  plan, card.postprocess)
                tm.wrap("write_tiles", stitcher.add)(tn)
        tm.wrap("write_close", outputs.close)({"nuclei": stitcher.count})
    finally:
        reader._region = region
        for k, fn in saved.items():
            setattr(workers, k, fn)
        for fn in dense_fns.values():
            setattr(watershed, fn.__name__, fn)
    for d in (tm.s, tm.cpu):
        d["resample"] = d.get("read", 0.0) - d.get("decode", 0.0)
        d["write"] = d.get("write_tiles", 0.0) + d.get("write_close", 0.0)
        if dense_fns:
            d["dense"] = sum(d.get(name, 0.0) for name in dense_fns)
    return {"seconds": tm.s, "cpu_seconds": tm.cpu, "nuclei": stitcher.count, "tiles": len(plan)}


def pooled(spec: dict, reader, tissue, plan, card, calls, procs: int) -> dict:
    """segment_reader with ``procs`` reader and ``procs`` post-process processes, maps replayed."""
    from nucleiflow.pipeline.infer.predictor import ReplayPredictor
    from nucleiflow.pipeline.infer.segment_reader import segment_reader

    out = Path(tempfile.mkdtemp(prefix="ceiling-pool-", dir=spec["tmp"]))
    try:
        outputs = _outputs(out, plan, tissue, spec["slide_id"])
        t0 = time.perf_counter()
        stats = segment_reader(reader, plan, ReplayPredictor(calls, card), outputs, batch_size=spec["batch_size"],
                               readers=procs, workers=procs)
        outputs.close({"nuclei": stats.nuclei})
        return {"procs": procs, "wall_s": time.perf_counter() - t0, "nuclei": stats.nuclei}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def fields(spec: dict) -> dict:
    """The model card keys this tree knows: top level, and per post-processing method."""
    import typing

    from nucleiflow.pipeline.config import ModelCard, PostprocessConfig

    union = typing.get_args(PostprocessConfig)[0]
    post = {typing.get_args(c.model_fields["method"].annotation)[0]: list(c.model_fields)
            for c in typing.get_args(union)}
    return {"card": list(ModelCard.model_fields), "postprocess": post}


def measure(spec: dict) -> dict:
    reader, tissue, plan, card = _open(spec)
    calls = _load_calls(spec["cache"])
    t0 = time.perf_counter()
    res = stages(spec, reader, tissue, plan, card, calls)
    res["inline_wall_s"] = time.perf_counter() - t0
    res["pooled"] = [pooled(spec, reader, tissue, plan, card, calls, n) for n in spec.get("procs", [])]
    res.update(planned_px=plan.planned_area(), tissue_mm2=float(tissue.mask.sum()) * (tissue.mpp / 1000) ** 2,
               model_mpp=plan.mpp, size=[reader.info.width, reader.info.height])
    reader.close()
    return res


if __name__ == "__main__":
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    use_root(spec["root"])
    result = {"record": record, "measure": measure, "fields": fields}[mode](spec)
    Path(spec["result"]).write_text(json.dumps(result))
