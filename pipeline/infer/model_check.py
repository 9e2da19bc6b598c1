"""A checkpoint checked in full before any slide: card, architecture, weights, post-processing.

`nucleiflow segment` and `evaluate` call `check_model` before Prefect or any image starts,
so a truncated safetensors file, an unknown arch or a misspelt post-processing key is one
line naming the file (exit 2), not a traceback in every slide.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

from nucleiflow.models.checkpoint import CARD, WEIGHTS, load_checkpoint, resolve
from nucleiflow.pipeline.postprocess.watershed import distance_watershed, hv_watershed, marker_watershed

METHOD_FUNCTIONS = {"hv": hv_watershed, "marker": marker_watershed, "distance": distance_watershed}
MAP_ARGS = {"prob", "hv", "marker"}  # a method's positional maps, not card parameters


class BadCheckpoint(ValueError):
    """The checkpoint's files exist but cannot be used; the message names the file."""


def check_model(model: str) -> None:
    """Fail fast, before any slide: the model cannot be found (KeyError / FileNotFoundError)
    or its card, weights or post-processing settings are unusable (BadCheckpoint). Loads it
    fully once, so a truncated file or a misspelt key is one line here, not every slide's
    traceback later."""
    folder = resolve(model)
    missing = [n for n in (CARD, WEIGHTS) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a checkpoint: missing {', '.join(missing)}")
    try:
        card = json.loads((folder / CARD).read_text())
    except ValueError as e:
        raise BadCheckpoint(f"{folder / CARD}: not valid JSON ({e}); restore the model card") from None
    if not isinstance(card, dict) or any(k not in card for k in ("arch", "kwargs", "mpp")):
        raise BadCheckpoint(f"{folder / CARD}: a model card needs 'arch', 'kwargs' and 'mpp'")
    try:
        load_checkpoint(folder)
    except KeyError as e:  # unknown arch
        raise BadCheckpoint(f"{folder / CARD}: {str(e).strip(chr(39) + chr(34))}") from None
    except TypeError as e:  # kwargs the architecture does not take
        raise BadCheckpoint(f"{folder / CARD}: kwargs do not fit arch {card['arch']!r} ({e})") from None
    except Exception as e:  # noqa: BLE001 - safetensors/torch errors: truncated or mismatched weights
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BadCheckpoint(f"{folder / WEIGHTS}: cannot load the weights ({first}); "
                            "copy the checkpoint again or retrain it") from None
    _check_postprocess(card.get("postprocess") or {"method": "hv"}, folder / CARD)


def _check_postprocess(post: dict, where: Path) -> None:
    """The card's post-processing method exists and takes every parameter it names."""
    if not isinstance(post, dict):
        raise BadCheckpoint(f"{where}: 'postprocess' must be a mapping with a 'method'")
    params = dict(post)
    method = params.pop("method", "hv")
    if method not in METHOD_FUNCTIONS:
        raise BadCheckpoint(f"{where}: unknown post-processing method {method!r}; valid: "
                            f"{', '.join(sorted(METHOD_FUNCTIONS))}")
    taken = set(inspect.signature(METHOD_FUNCTIONS[method]).parameters) - MAP_ARGS
    unknown = sorted(set(params) - taken)
    if unknown:
        raise BadCheckpoint(f"{where}: post-processing {method!r} has no parameter(s) {', '.join(unknown)}; "
                            f"valid: {', '.join(sorted(taken))}")
