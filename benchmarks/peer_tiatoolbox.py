"""nucleiflow vs TIAToolbox's HoVerNet-fast, one mosaic slide, one run: wall times and ratios.

    python benchmarks/peer_tiatoolbox.py [--tia-python /work/tiavenv/bin/python]
        [--cols 1 --rows 1] [--threads 2] [--device cpu] [--model student] [--json FILE]

Builds (if missing) a mosaic of MoNuSeg test tiles with ../shared/tools/mosaic_slide.py
(`--cols C --rows R --seed 1`, 1000 px cells at 0.25 um/px: 1x1 = 1000 x 1000 px), then,
one after the other on the same slide with the same torch thread count:

  nucleiflow  `nucleiflow segment SLIDE --out TMP --model M --device D` in a subprocess
              (Prefect ephemeral mode, as a user runs it); the slide time is run.json
              `timings_s.total`.
  TIAToolbox  benchmarks/_tia_runner.py under --tia-python (TIAToolbox's own venv; it
              cannot share nucleiflow's: it pins torch<2.13, numpy<2.4.4, dask, openslide,
              ...): `MultiTaskSegmentor` + `HoVerNet(num_types=6, mode="fast")` with random
              weights (same compute as pretrained, which cannot be downloaded here) and the
              `hovernet_fast-pannuke` io config; zarr output (its SQLiteStore output fails
              on this Python). The slide time is `engine.run()`.

Each runs at its natural resolution: HoVerNet's io config at 0.25 um/px, nucleiflow's model
at its card's mpp (0.5 um/px for the bundled models: 4x fewer pixels). So speed is also
given per slide area: level-0 Mpx of slide per second, end to end and for the slide alone.
End to end = the subprocess's wall time (interpreter, imports, and for nucleiflow Prefect's
temporary server, with ~/.cache/nucleiflow-bench/prefect as PREFECT_HOME unless one is set:
the first run there also creates Prefect's database). Prints figures only; asserts nothing. Wall times on a shared CPU are only
as steady as the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NUCLEIFLOW_SHARED", REPO.parent / "shared"))
RUNNER = Path(__file__).resolve().parent / "_tia_runner.py"
DEFAULT_TIA_PYTHON = Path(os.environ.get("NUCLEIFLOW_TIA_PYTHON", REPO.parent / "tiavenv" / "bin" / "python"))
SLIDE_MPP = 0.25  # mosaic_slide.py's default, and HoVerNet's io config
PREFECT_HOME = Path.home() / ".cache" / "nucleiflow-bench" / "prefect"


def venv_recipe(tia_python: Path) -> str:
    """The commands that make TIAToolbox's venv (../shared/STACK.md), for that interpreter."""
    venv = tia_python.parent.parent
    pip = f"{venv}/bin/python -m pip install"
    return "\n".join([
        f"python3.11 -m venv {venv}",
        f"{pip} torch==2.14.1 torchvision==0.29.1        # from local disk; a few small CUDA helpers download",
        f"{pip} --no-deps tiatoolbox==2.1.3",
        f"{venv}/bin/python {RUNNER.relative_to(REPO)} --requirements > /tmp/tia-reqs.txt"
        "   # its Requires-Dist less torch/torchvision, + umap-learn psutil transformers bokeh flask",
        f"{pip} -r /tmp/tia-reqs.txt torch==2.14.1 torchvision==0.29.1   # ~7 GB; pip warns torch is past its cap: it runs",
    ])


def check_tia(tia_python: Path) -> str:
    """tiatoolbox's version in that interpreter, or exit 2 with the recipe."""
    probe = "import importlib.metadata as m; import tiatoolbox.models.engine.multi_task_segmentor; print(m.version('tiatoolbox'))"
    why = f"{tia_python} does not exist"
    if tia_python.exists():
        r = subprocess.run([str(tia_python), "-c", probe], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.strip().splitlines()[-1]
        why = f"{tia_python} cannot import TIAToolbox's engine: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    print(f"{why}\nMake TIAToolbox's own venv (never in nucleiflow's), from the repository root:\n\n"
          f"{venv_recipe(tia_python)}\n\nthen pass --tia-python {tia_python}", file=sys.stderr)
    sys.exit(2)


def mosaic(prefix: Path, dataset: Path, split: str, cols: int, rows: int, seed: int) -> dict:
    """The mosaic at ``prefix``.tiff with its .json facts; built (all or nothing) when missing or
    made with other cells, split or seed."""
    meta, slide = prefix.with_suffix(".json"), prefix.with_suffix(".tiff")
    want = {"source": dataset.name, "splits": [split], "seed": seed, "cols": cols, "rows": rows, "mpp": SLIDE_MPP}
    if meta.exists() and slide.exists():
        facts = json.loads(meta.read_text())
        if all(facts.get(k) == v for k, v in want.items()):
            return facts
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=prefix.parent))
    cmd = [sys.executable, str(SHARED / "tools" / "mosaic_slide.py"), str(dataset), "--split", split,
           "--cols", str(cols), "--rows", str(rows), "--seed", str(seed), "--mpp", str(SLIDE_MPP),
           "--out", str(tmp / "m")]
    print(f"building {slide} ({cols}x{rows} cells) ...", file=sys.stderr, flush=True)
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        for ext in (".labels.tiff", ".tiff", ".json"):  # .json last: it marks the build whole
            (tmp / f"m{ext}").replace(Path(f"{prefix}{ext}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads(meta.read_text())


def thread_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    # A Prefect home of its own that outlives the run: only the first run pays for creating
    # Prefect's database, as on a lab's machine; and no other user's server shares it.
    env.setdefault("PREFECT_HOME", str(PREFECT_HOME))
    return env


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, tuple[float, float]]:
    """Wall seconds of ``cmd`` and the 1-min load average before and after it; its output
    goes to ``log``; a failure exits with the log's tail."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        sys.exit(f"{cmd[0]} ... exited {rc} (log {log}):\n{tail}")
    return wall, (load, os.getloadavg()[0])


def run_nucleiflow(slide: Path, work: Path, a: argparse.Namespace) -> dict:
    out = work / "nucleiflow"
    cmd = [sys.executable, "-c", "from nucleiflow.flows.cli import app; app()", "segment", str(slide),
           "--out", str(out), "--model", a.model, "--device", a.device]
    wall, load = timed(cmd, thread_env(a.threads), work / "nucleiflow.log")
    rec = json.loads((out / slide.stem / "run.json").read_text())
    return {"end_to_end_s": wall, "load_avg": load, "slide_s": rec["timings_s"]["total"], "timings_s": rec["timings_s"],
            "model_mpp": rec["model_mpp"], "nuclei": rec["nuclei"], "tiles": rec["tiles"],
            "model": a.model, "config": rec["config"]}


def run_tia(slide: Path, work: Path, a: argparse.Namespace) -> dict:
    result = work / "tia.json"
    cmd = [str(a.tia_python), str(RUNNER), str(slide), "--save-dir", str(work / "tia"), "--threads",
           str(a.threads), "--device", a.device, "--batch-size", str(a.tia_batch_size), "--result", str(result)]
    wall, load = timed(cmd, thread_env(a.threads), work / "tia.log")
    rec = json.loads(result.read_text())
    return {"end_to_end_s": wall, "load_avg": load, **rec, "model_mpp": rec["io"]["input_resolutions"][0]["resolution"]}


def report(facts: dict, nf: dict, tia: dict, a: argparse.Namespace) -> dict:
    """Print the side-by-side table and return every figure."""
    w, h, mpp = facts["width"], facts["height"], facts["mpp"]
    mpx = w * h / 1e6
    rows = []
    for r in (nf, tia):
        scale = (mpp / r["model_mpp"]) ** 2
        r.update(model_mpx=mpx * scale, mpx_per_s_end_to_end=mpx / r["end_to_end_s"],
                 mpx_per_s_slide=mpx / r["slide_s"], start_up_s=r["end_to_end_s"] - r["slide_s"])
        rows.append(r)
    ratio_e2e = tia["end_to_end_s"] / nf["end_to_end_s"]
    ratio_slide = tia["slide_s"] / nf["slide_s"]
    print(f"\nslide: {a.slide_path}  {w} x {h} px at {mpp} um/px = {mpx:.2f} Mpx "
          f"({facts['source']} {','.join(facts['splits'])}, {facts['cols']}x{facts['rows']} cells, seed {facts['seed']})")
    print(f"CPU: {a.threads} torch threads each (OMP_NUM_THREADS={a.threads}), device {a.device}, "
          f"one after the other; TIAToolbox {tia['versions']['tiatoolbox']}, torch {tia['versions']['torch']} "
          f"in {a.tia_python}\n")
    lines = [
        ("model", f"{nf['model']} (bundled)", f"HoVerNet fast, {tia['params'] / 1e6:.1f}M params, random weights"),
        ("runs at (natural mpp)", f"{nf['model_mpp']} um/px (model card)",
         f"{tia['model_mpp']} um/px ({tia['io_config']})"),
        ("Mpx at that mpp", f"{nf['model_mpx']:.2f}", f"{tia['model_mpx']:.2f}"),
        ("end to end s", f"{nf['end_to_end_s']:.1f}", f"{tia['end_to_end_s']:.1f}"),
        ("  slide s", f"{nf['slide_s']:.1f} (run.json timings_s.total)", f"{tia['slide_s']:.1f} (engine.run)"),
        ("  start-up s", f"{nf['start_up_s']:.1f} (CLI, Prefect server)", f"{tia['start_up_s']:.1f} (imports, model)"),
        ("slide Mpx/s end to end", f"{nf['mpx_per_s_end_to_end']:.4f}", f"{tia['mpx_per_s_end_to_end']:.4f}"),
        ("slide Mpx/s, slide alone", f"{nf['mpx_per_s_slide']:.4f}", f"{tia['mpx_per_s_slide']:.4f}"),
        ("nuclei", f"{nf['nuclei']}", "(random weights: not meaningful)"),
        ("1-min load before/after", "%.1f / %.1f" % nf["load_avg"], "%.1f / %.1f" % tia["load_avg"]),
    ]
    print(f"{'':<26}{'nucleiflow segment':<36}TIAToolbox HoVerNet-fast")
    for name, x, y in lines:
        print(f"{name:<26}{x:<36}{y}")
    print(f"\nTIAToolbox / nucleiflow time: {ratio_e2e:.1f}x end to end, {ratio_slide:.1f}x slide alone "
          f"(per level-0 slide area; nucleiflow's model sees {(tia['model_mpp'] / nf['model_mpp']) ** -2:.0f}x "
          f"fewer pixels at {nf['model_mpp']} um/px)")
    return {"slide": {"path": str(a.slide_path), **{k: facts[k] for k in ("width", "height", "mpp", "cols", "rows", "seed")}},
            "threads": a.threads, "device": a.device, "nucleiflow": nf, "tiatoolbox": tia,
            "ratio_end_to_end": ratio_e2e, "ratio_slide": ratio_slide}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tia-python", type=Path, default=DEFAULT_TIA_PYTHON,
                    help="python of TIAToolbox's own venv (default ../tiavenv/bin/python or $NUCLEIFLOW_TIA_PYTHON)")
    ap.add_argument("--dataset", type=Path, default=SHARED / "data" / "monuseg")
    ap.add_argument("--split", default="test")
    ap.add_argument("--cols", type=int, default=1, help="mosaic cells across (1000 px each)")
    ap.add_argument("--rows", type=int, default=1, help="mosaic cells down")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mosaic", type=Path, default=Path(tempfile.gettempdir()) / "peer" / "mosaic",
                    help="mosaic path without extension (built there when missing)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads, the same for both")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="student", help="nucleiflow model (registry name or folder)")
    ap.add_argument("--tia-batch-size", type=int, default=8, help="TIAToolbox patches per forward (its default)")
    ap.add_argument("--work", type=Path, help="keep both runs' outputs and logs here (default: a temp folder, removed)")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    a = ap.parse_args()

    version = check_tia(a.tia_python)
    facts = mosaic(a.mosaic, a.dataset, a.split, a.cols, a.rows, a.seed)
    a.slide_path = a.mosaic.with_suffix(".tiff")
    work = a.work or Path(tempfile.mkdtemp(prefix="peer-tia-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"nucleiflow segment on {a.slide_path} ...", file=sys.stderr, flush=True)
        nf = run_nucleiflow(a.slide_path, work, a)
        print(f"TIAToolbox {version} HoVerNet-fast on {a.slide_path} ...", file=sys.stderr, flush=True)
        tia = run_tia(a.slide_path, work, a)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    figures = report(facts, nf, tia, a)
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
