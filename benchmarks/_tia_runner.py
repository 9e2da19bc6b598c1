"""TIAToolbox's HoVerNet-fast whole-slide engine on one slide, timed; run by peer_tiatoolbox.py.

Runs in TIAToolbox's own venv (it cannot share nucleiflow's: see peer_tiatoolbox.py), so it
imports tiatoolbox (and the torch it brings) and never nucleiflow.

    /work/tiavenv/bin/python benchmarks/_tia_runner.py SLIDE --save-dir DIR --threads 2 \
        [--device cpu] [--batch-size 8] [--output-type zarr] [--result FILE.json]
    python benchmarks/_tia_runner.py --requirements   # the venv recipe's third step (stdlib only)

The model is `HoVerNet(num_types=6, mode="fast")` with random weights (no pretrained weights
can be downloaded here; the compute is the same) and the io config of TIAToolbox's own
`hovernet_fast-pannuke` entry (0.25 um/px, 256 -> 164 px patches, 1024 px tiles, 128 px
margin), through `MultiTaskSegmentor.run(..., patch_mode=False)` with its defaults
(auto tissue mask, batch 8, no worker processes). The JSON result holds the seconds of
`import tiatoolbox`, of building the model and of `run()` (the slide), the torch threads, and
the versions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

IO_CONFIG = "hovernet_fast-pannuke"
EXTRA = ("umap-learn", "psutil", "transformers", "bokeh", "flask")  # imported by its engines


def requirements() -> list[str]:
    """tiatoolbox's Requires-Dist without torch/torchvision (kept at the venv's own), plus EXTRA."""
    from importlib.metadata import requires

    out = []
    for req in requires("tiatoolbox") or []:
        if "extra ==" in req:
            continue
        name = req.split(";")[0].strip()
        for sep in "<>=!~ [":
            name = name.split(sep)[0]
        if name.lower() not in ("torch", "torchvision"):
            out.append(req)
    return out + list(EXTRA)


def run(slide: Path, save_dir: Path, threads: int, device: str, batch_size: int, output_type: str) -> dict:
    t0 = time.perf_counter()
    import torch
    import tiatoolbox
    from tiatoolbox.models.architecture import PRETRAINED_INFO
    from tiatoolbox.models.architecture.hovernet import HoVerNet
    from tiatoolbox.models.engine.io_config import IOInstanceSegmentorConfig
    from tiatoolbox.models.engine.multi_task_segmentor import MultiTaskSegmentor
    t_import = time.perf_counter() - t0

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    info = PRETRAINED_INFO[IO_CONFIG]
    kwargs = {k: v for k, v in info["architecture"]["kwargs"].items() if k in ("num_types", "mode")}
    model = HoVerNet(**kwargs)  # random weights: same compute as the pretrained ones
    ioconfig = IOInstanceSegmentorConfig(**info["ioconfig"]["kwargs"])
    engine = MultiTaskSegmentor(model=model, batch_size=batch_size, device=device, verbose=False)
    t_build = time.perf_counter() - t0

    t0 = time.perf_counter()
    output = engine.run([slide], patch_mode=False, ioconfig=ioconfig, save_dir=save_dir,
                        overwrite=True, output_type=output_type, device=device)
    t_slide = time.perf_counter() - t0
    return {
        "import_s": t_import, "build_s": t_build, "slide_s": t_slide,
        "torch_threads": torch.get_num_threads(), "device": device, "batch_size": batch_size,
        "model": f"HoVerNet({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}), random weights",
        "params": sum(p.numel() for p in model.parameters()),
        "io_config": IO_CONFIG, "io": info["ioconfig"]["kwargs"],
        "output_type": output_type, "output": {str(k): str(v) for k, v in dict(output).items()},
        "versions": {"tiatoolbox": tiatoolbox.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slide", type=Path, nargs="?")
    ap.add_argument("--save-dir", type=Path, help="engine output folder (must not exist)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=8, help="patches per forward (engine default 8)")
    ap.add_argument("--output-type", default="zarr", choices=["zarr", "dict"],
                    help="not annotationstore: its SQLiteStore fails on this Python")
    ap.add_argument("--result", type=Path, help="write the JSON result here (default: stdout)")
    ap.add_argument("--requirements", action="store_true", help="print the venv's requirements and exit")
    a = ap.parse_args()
    if a.requirements:
        print("\n".join(requirements()))
        return
    if a.slide is None or a.save_dir is None:
        ap.error("SLIDE and --save-dir are needed")
    res = run(a.slide, a.save_dir, a.threads, a.device, a.batch_size, a.output_type)
    text = json.dumps(res, indent=2)
    if a.result:
        a.result.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
