"""`nucleiflow train CONFIG` where Prefect is not installed (a lent GPU machine: no network,
and Prefect with its ~60 dependencies would not fit the 64 MiB that travels there).

    python benchmarks/gpu/train_gpu.py benchmarks/gpu/student-gpu.yaml --data DIR --out DIR
        [--work DIR] [--minutes M] [--device cuda] [--compare-with student] [--tiny] [--result FILE]

Runs flows/train.py's `train_model` itself, with Prefect's `flow` / `task` decorators
replaced by plain calls and its run logger by `logging`: the same train -> (tune) ->
evaluate -> write -> compare steps as the CLI. The config is rewritten into --work first:
each data root becomes DIR/<its last part> (run.sh unpacks the carried MoNuSeg and TNBC
there), ``out`` / ``work`` / ``train.max_minutes`` / ``device`` come from the arguments.
--compare-with copies that checkpoint to --out first, so the flow's "old vs new" table
scores it on the same (carried) images in the same run. --tiny: a dry run on a CPU (one
epoch of 2 steps of 2 x 96 px patches, MoNuSeg only, one image scored), to exercise the
script, not to train.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import types
from pathlib import Path

import yaml


def stub_prefect() -> None:
    """A `prefect` module with what flows/train.py imports: decorators that return the
    function, and a logger. Set before flows/train.py is imported, also where Prefect is
    installed, so no API server starts."""
    def decorator(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    prefect = types.ModuleType("prefect")
    prefect.flow = prefect.task = decorator
    prefect.get_run_logger = lambda: logging.getLogger("train")
    sys.modules["prefect"] = prefect


def rewrite(raw: dict, a: argparse.Namespace) -> dict:
    """The config with data roots, out, work and the minute budget from the arguments."""
    for d in raw["data"]:
        d["root"] = str(a.data / Path(d["root"]).name)
    raw["out"], raw["work"] = str(a.out), str(a.work)
    if a.minutes is not None:
        raw["train"]["max_minutes"] = a.minutes
    if a.device:
        raw["device"] = a.device
    if a.tiny:
        first = raw["data"][0]
        test = [ln.split(",")[0] for ln in (Path(first["root"]) / "splits.csv").read_text().splitlines()
                if ",test," in ln]
        train = [ln.split(",")[0] for ln in (Path(first["root"]) / "splits.csv").read_text().splitlines()
                 if ",train," in ln]
        raw["data"] = [{**first, "names": train[:3], "val_fraction": 0.34, "eval_names": test[:1]}]
        raw["train"].update(epochs=1, steps_per_epoch=2, batch_size=2, patch=96)
        raw["eval_tile_size"] = 256
    return raw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path)
    p.add_argument("--data", type=Path, required=True, help="folder holding the data sets, by name")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--work", type=Path, help="resumable state and the rewritten config (default: OUT.work)")
    p.add_argument("--minutes", type=float, help="train.max_minutes (checked after each epoch)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="instead of the config's")
    p.add_argument("--compare-with", help="checkpoint (name or folder) scored as 'old' beside the new one")
    p.add_argument("--tiny", action="store_true", help="CPU dry run: a few steps on a few images")
    p.add_argument("--result", type=Path, help="write the flow's result (metrics, old metrics, table) here")
    a = p.parse_args()
    a.work = a.work or a.out.with_name(a.out.name + ".work")
    a.work.mkdir(parents=True, exist_ok=True)
    cfg = a.work / "config.yaml"
    cfg.write_text(yaml.safe_dump(rewrite(yaml.safe_load(a.config.read_text()), a), sort_keys=False))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    stub_prefect()
    from nucleiflow.models.checkpoint import resolve
    from nucleiflow.flows.train import train_model

    if a.compare_with and not (a.out / "model.json").exists():
        shutil.copytree(resolve(a.compare_with), a.out, dirs_exist_ok=True)
    res = train_model(str(cfg))
    if a.result:
        a.result.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
