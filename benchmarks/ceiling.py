"""The ceiling: how fast everything but the model can go, per stage and per core.

    python benchmarks/ceiling.py [--slide PATH | --cols 6 --rows 6] [--model student]
        [--tile-size 1024] [--halo 64] [--batch-size 4] [--procs 1 2] [--repeats 3]
        [--compare REF] [--cache DIR] [--json FILE]

The model runs once (``ceiling_child.py record``, cached under --cache); after that every
measurement replays its recorded maps (`infer.predictor.ReplayPredictor` semantics: same
plan, same batches), so the model costs nothing and the figures are what reading,
post-processing and writing alone sustain. Without --slide a mosaic of MoNuSeg test tiles
is built with ../shared/tools/mosaic_slide.py (--cols x --rows cells of 1000 px at 0.25
um/px, seed 1; its pyramid has no 0.5 um/px level, so reads decode level 0 and resample).

Each repeat runs, in fresh interpreters, this checkout and (with --compare) the tree of git
ref REF exported to the cache (``git archive``), one after the other: interleaved, best of
--repeats per stage. In each run:

  stages    one process, inline: read (decode = the reader's region read, resample = the
            rest of read_window), stain (Macenko on each window with the default reference;
            informational: only cards with a stain reference pay it), post-process =
            watershed + ownership + polygons/morphometry (+ glue), write = the stitcher's
            per-tile chunk/spill/table writes + the final close (pyramids, publish).
  pooled    segment_reader with N reader + N post-process processes (--procs), wall.

Figures are per planned model Mpx (tissue tile cores at the model's mpp) and per mm2 of
tissue. Per-core cost = read + post-process + write seconds per Mpx (stain excluded unless
--with-stain); projection for C cores: the main process writes serially, the others read
and post-process: Mpx/s = min((C - 1) / (read + post), 1 / write). "dense" (inside
watershed: "edge", the HV edge map, `watershed.hv_edge`, plus "energy", its blurred energy
and seed candidates, `watershed.hv_energy`) is what a CUDA Predictor computes on the GPU
instead (`infer.dense`); the "gpu_dense" / "dense on GPU" rows leave it out (its GPU time is
not measured here). A tree from before the energy split (`2c4aee5` and older) has only the
edge map to move: its "dense" is its "edge"; one from before the edge split (`af54397`) has
none and shows no dense rows. The same stages are also given in CPU time (the process's, all
its threads), best of the repeats: on cores shared with other jobs the wall time counts the
waits for a core too, and moved by +-10% between runs of the same code. With --compare the
outputs of both are compared too: label rasters and tables identical, or else the share of
REF's nuclei matched at IoU >= 0.9 and the count difference (goal: >= 99.5%, within 0.5%).
Card keys REF does not know (e.g. ``postprocess.min_mean_prob``) are left out for both trees,
so both do the same work; the run says which.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NUCLEIFLOW_SHARED", REPO.parent / "shared"))
CHILD = Path(__file__).resolve().parent / "ceiling_child.py"
STAGES = ("read", "decode", "resample", "stain", "postprocess", "watershed", "dense", "edge", "energy", "ownership",
          "polygons_morphometry", "write", "write_tiles", "write_close")


def mosaic(cache: Path, cols: int, rows: int) -> Path:
    out = cache / f"monuseg-test-{cols}x{rows}-s1"
    if not out.with_suffix(".tiff").exists():
        subprocess.run([sys.executable, str(SHARED / "tools" / "mosaic_slide.py"), str(SHARED / "data" / "monuseg"),
                        "--split", "test", "--cols", str(cols), "--rows", str(rows), "--seed", "1", "--no-labels",
                        "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return out.with_suffix(".tiff")


def export_ref(ref: str, cache: Path) -> tuple[str, Path]:
    """(commit, folder) of ``ref``'s tree exported with git archive (no worktree registered)."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", ref], check=True, capture_output=True,
                         text=True).stdout.strip()
    folder = cache / f"ref-{sha[:12]}"
    if not folder.exists():
        tmp = Path(tempfile.mkdtemp(dir=cache))
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        tmp.rename(folder)
    return sha, folder


def run_child(mode: str, spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as d:
        spec = {**spec, "result": str(Path(d) / "r.json")}
        subprocess.run([sys.executable, str(CHILD), mode, json.dumps(spec)], check=True)
        return json.loads(Path(spec["result"]).read_text())


def common_card(card: dict, known: dict) -> tuple[dict, list[str]]:
    """``card`` without the keys an older tree's `ModelCard` (``known``, from the child's
    ``fields``) would refuse, and the names of those left out. Both trees then run the same
    card: e.g. a post-processing filter the old tree lacks (``min_mean_prob``) is off for
    both, so they do the same work and their outputs can be compared."""
    dropped = [k for k in card if k not in known["card"]]
    out = {k: v for k, v in card.items() if k in known["card"]}
    post = dict(card.get("postprocess") or {})
    allowed = known["postprocess"].get(post.get("method", "hv"), list(post))
    dropped += [f"postprocess.{k}" for k in post if k not in allowed and post[k] is not None]
    if "postprocess" in out:
        out["postprocess"] = {k: v for k, v in post.items() if k in allowed}
    return out, dropped


def per_mpx(r: dict, with_stain: bool) -> dict:
    """Seconds per planned Mpx of each stage, and the per-core total."""
    mpx = r["planned_px"] / 1e6
    s = {k: v / mpx for k, v in r["seconds"].items()}
    s["per_core"] = s["read"] + s["postprocess"] + s["write"] + (s["stain"] if with_stain else 0.0)
    # A CUDA Predictor computes the dense maps on the GPU (infer.dense): off the CPU there.
    s["per_core_gpu_dense"] = s["per_core"] - _dense(s)
    return s


def _dense(s: dict) -> float:
    """Seconds per Mpx of the dense maps a CUDA Predictor makes instead (0 if none)."""
    dense = s.get("dense", float("nan"))
    dense = s.get("edge", float("nan")) if dense != dense else dense  # no energy split: the edge alone
    return dense if dense == dense else 0.0


def project(s: dict, cores: int, with_stain: bool, gpu_dense: bool = False) -> float:
    parallel = s["read"] + s["postprocess"] - (_dense(s) if gpu_dense else 0.0) + (s["stain"] if with_stain else 0.0)
    return min((cores - 1) / parallel, 1 / s["write"])


def compare_outputs(ref_out: Path, new_out: Path, slide_id: str) -> dict:
    """Old vs new outputs: identical rasters / tables, or IoU matching of the nuclei."""
    import numpy as np
    import pyarrow.parquet as pq
    import zarr

    def load(out: Path):
        lab = np.asarray(zarr.open_group(str(out / slide_id / "masks.ome.zarr"), mode="r")["labels/nuclei/0"][:])
        tab = pq.read_table(out / "nuclei" / f"slide_id={slide_id}" / "part-0.parquet").to_pandas()
        return lab, tab.sort_values("nucleus_id").reset_index(drop=True)

    (la, ta), (lb, tb) = load(ref_out), load(new_out)
    res = {"ref_nuclei": len(ta), "new_nuclei": len(tb), "labels_identical": bool(np.array_equal(la, lb))}
    same_cols = list(ta.columns) == list(tb.columns) and len(ta) == len(tb)
    res["table_identical"] = bool(same_cols and all(ta[c].equals(tb[c]) for c in ta.columns if c != "bbox"))
    if same_cols:
        res["max_abs_diff"] = {c: float(np.max(np.abs(ta[c].to_numpy(float) - tb[c].to_numpy(float)), initial=0))
                               for c in ta.columns if ta[c].dtype.kind in "fiub"}
    both = (la > 0) & (lb > 0)
    pairs, inter = np.unique(np.stack([la[both], lb[both]]).astype(np.int64), axis=1, return_counts=True)
    area_a = np.bincount(la.ravel()).astype(np.int64)
    area_b = np.bincount(lb.ravel()).astype(np.int64)
    iou = inter / (area_a[pairs[0]] + area_b[pairs[1]] - inter)
    best = np.zeros(len(area_a))
    np.maximum.at(best, pairs[0], iou)
    ids = np.flatnonzero(area_a[1:]) + 1
    res["matched_iou90"] = float(np.mean(best[ids] >= 0.9)) if len(ids) else 1.0
    res["count_diff"] = (len(tb) - len(ta)) / max(len(ta), 1)
    return res


def model_digest(model: str) -> str:
    """SHA-1 of the checkpoint's card and weights (a name under models/checkpoints or a
    folder), so recorded maps are not replayed for another card or weights of the same name."""
    folder = Path(model) if Path(model).is_dir() else REPO / "models" / "checkpoints" / model
    h = hashlib.sha1()
    for name in ("model.json", "model.safetensors"):
        path = folder / name
        h.update(path.read_bytes() if path.is_file() else name.encode())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, help="a slide file (default: a MoNuSeg mosaic, --cols x --rows)")
    p.add_argument("--cols", type=int, default=6)
    p.add_argument("--rows", type=int, default=6)
    p.add_argument("--model", default="student")
    p.add_argument("--tile-size", type=int, default=1024)
    p.add_argument("--halo", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--procs", type=int, nargs="*", default=[1, 2], help="pooled runs: N readers + N workers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare", metavar="REF", help="git ref to run side by side (e.g. main)")
    p.add_argument("--with-stain", action="store_true", help="count stain normalisation in the per-core cost")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "nucleiflow-ceiling")
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    a.cache.mkdir(parents=True, exist_ok=True)
    slide = (a.slide or mosaic(a.cache, a.cols, a.rows)).resolve()
    st = slide.stat()
    key = hashlib.sha1(json.dumps([str(slide), st.st_size, st.st_mtime, a.model, model_digest(a.model),
                                   a.tile_size, a.halo, a.batch_size]).encode()).hexdigest()[:12]
    maps = a.cache / f"maps-{key}"
    base = {"slide": str(slide), "model": a.model, "tile_size": a.tile_size, "halo": a.halo,
            "batch_size": a.batch_size, "cache": str(maps), "slide_id": "bench", "tmp": str(a.cache)}
    if not (maps / "card.json").exists():
        maps.mkdir(exist_ok=True)
        print(f"recording model maps of {slide.name} (runs the model once) ...", file=sys.stderr, flush=True)
        rec = run_child("record", {**base, "root": str(REPO), "card": None})
        (maps / "card.json").write_text(json.dumps(rec["card"]))
    card = json.loads((maps / "card.json").read_text())
    variants = {"new": REPO}
    if a.compare:
        sha, folder = export_ref(a.compare, a.cache)
        variants = {f"ref {a.compare}@{sha[:8]}": folder, "new": REPO}
        card, dropped = common_card(card, run_child("fields", {"root": str(folder)}))
        if dropped:
            print(f"card keys {a.compare} does not know, left out for both trees (same work on each side): "
                  f"{', '.join(dropped)}", file=sys.stderr, flush=True)
    outs = {name: a.cache / f"out-{i}" for i, name in enumerate(variants)}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for rep in range(a.repeats):
        for name, root in variants.items():
            shutil.rmtree(outs[name], ignore_errors=True)
            print(f"repeat {rep + 1}/{a.repeats}: {name} ...", file=sys.stderr, flush=True)
            runs[name].append(run_child("measure", {**base, "root": str(root), "card": card, "out": str(outs[name]),
                                                    "procs": a.procs}))
    report(a, slide, runs, outs)


def report(a, slide: Path, runs: dict[str, list[dict]], outs: dict[str, Path]) -> None:
    r0 = next(iter(runs.values()))[0]
    mpx, mm2 = r0["planned_px"] / 1e6, r0["tissue_mm2"]
    print(f"slide {slide.name} {r0['size'][0]}x{r0['size'][1]} level-0 px, {r0['tiles']} tiles of {a.tile_size} + halo "
          f"{a.halo} at {r0['model_mpp']} um/px, {mpx:.2f} planned Mpx, tissue {mm2:.2f} mm2, {r0['nuclei']} nuclei; "
          f"best of {a.repeats} interleaved repeats; {os.cpu_count()} CPUs (shared)")
    names = list(runs)

    def best_rates(key: str) -> dict[str, dict]:
        best = {name: {k: min(r.get(key, {}).get(k, float("nan")) for r in rs) for k in STAGES}
                for name, rs in runs.items()}
        return {name: per_mpx({"seconds": b, "planned_px": r0["planned_px"]}, a.with_stain) for name, b in best.items()}

    def table(title: str, rates: dict[str, dict], keys) -> None:
        print(f"\n{title:22s}" + "".join(f"{n + ' s/Mpx':>20s}{'s/mm2':>9s}" for n in names)
              + ("   new/ref" if len(names) == 2 else ""))
        for k in keys:
            row = f"{k:22s}" + "".join(f"{rates[n][k]:20.3f}{rates[n][k] * mpx / mm2:9.3f}" for n in names)
            if len(names) == 2:
                row += f"{rates[names[1]][k] / rates[names[0]][k]:10.3f}" if rates[names[0]][k] > 0 else f"{'-':>10s}"
            print(row)

    rates = best_rates("seconds")
    table("stage (one core)", rates, (*STAGES, "per_core", "per_core_gpu_dense"))
    # Trees whose child predates the CPU clock have no cpu_seconds: their rows read nan.
    cpu = best_rates("cpu_seconds")
    table("CPU time (same runs)", cpu, ("read", "decode", "postprocess", "watershed", "dense", "edge", "energy",
                                        "polygons_morphometry", "write", "per_core", "per_core_gpu_dense"))
    print(f"{'per-core Mpx/s':22s}" + "".join(f"{1 / rates[n]['per_core']:20.3f}{'':9s}" for n in names))
    for cores in (8, 16):
        print(f"{f'projected {cores} cores':22s}" + "".join(
            f"{project(rates[n], cores, a.with_stain):17.2f} Mpx/s {mm2 / mpx * project(rates[n], cores, a.with_stain):6.2f}"
            "mm2/s" for n in names))
        print(f"{f'  dense on GPU':22s}" + "".join(
            f"{project(rates[n], cores, a.with_stain, True):17.2f} Mpx/s {mm2 / mpx * project(rates[n], cores, a.with_stain, True):6.2f}"
            "mm2/s" for n in names))
    for procs in a.procs:
        cells = []
        for n in names:
            wall = min(next(p["wall_s"] for p in r["pooled"] if p["procs"] == procs) for r in runs[n])
            cells.append(f"{mpx / wall:13.3f} Mpx/s {wall / mm2:6.2f} s/mm2")
        print(f"{f'pooled {procs}+{procs} procs':22s}" + "".join(cells) + "  (wall incl. pool start)")
    result = {"rates_s_per_mpx": rates, "cpu_s_per_mpx": cpu, "runs": runs}
    if len(names) == 2:
        cmp = compare_outputs(outs[names[0]], outs[names[1]], "bench")
        result["compare"] = cmp
        print(f"\noutputs {names[1]} vs {names[0]}: {json.dumps(cmp)}")
        print(f"per-core non-model cost new/ref: {rates['new']['per_core'] / rates[names[0]]['per_core']:.3f} "
              f"(CPU machine), {rates['new']['per_core_gpu_dense'] / rates[names[0]]['per_core']:.3f} (CUDA "
              "machine: dense maps on the GPU, their GPU time not counted; ref's per_core as on a CPU "
              "machine) (goal <= 0.333)")
        print(f"same in CPU time: {cpu['new']['per_core'] / cpu[names[0]]['per_core']:.3f} (CPU machine), "
              f"{cpu['new']['per_core_gpu_dense'] / cpu[names[0]]['per_core']:.3f} (CUDA machine); "
              f"both on CUDA: {rates['new']['per_core_gpu_dense'] / rates[names[0]]['per_core_gpu_dense']:.3f} "
              f"(CPU time {cpu['new']['per_core_gpu_dense'] / cpu[names[0]]['per_core_gpu_dense']:.3f})")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
