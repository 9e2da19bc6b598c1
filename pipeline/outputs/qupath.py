"""QuPath export: a slide's nuclei table -> GeoJSON detections, streamed row group by row group.

QuPath imports a FeatureCollection whose features carry ``properties.objectType`` =
"detection" as detections (fast, no per-object editing); without it every nucleus becomes
a slow annotation. Coordinates stay in level-0 pixels, which is what QuPath expects.
QuPath keeps a feature's ``id`` only when it is a UUID, and reads numbers only from
``properties.measurements``: so each id is a UUID derived from the slide fingerprint and the
nucleus id (the same nucleus gets the same id in every export), and ``nucleus_id`` is a
measurement too (and in ``properties.metadata``), which links a detection to its table row
and label value. A destination ending in ``.gz`` is written gzip-compressed (QuPath reads
``.geojson.gz``), streamed like the plain file.
"""
from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pyarrow.parquet as pq
import shapely

from nucleiflow.pipeline.outputs.atomic import atomic_write
from nucleiflow.pipeline.outputs.layout import slide_paths

MEASUREMENTS = (
    "area_um2", "perimeter_um", "equivalent_diameter_um", "eccentricity", "solidity",
    "major_axis_um", "minor_axis_um", "orientation", "mean_prob",
)
NUCLEUS_COLOUR = [200, 50, 50]
# Class colours for models with a type head (QuPath's RGB lists), in class order.
CLASS_COLOURS = ([200, 50, 50], [50, 120, 220], [40, 170, 70], [230, 160, 20], [150, 60, 200], [20, 180, 180])
# Namespace of the feature UUIDs: uuid5(NAMESPACE, "<slide fingerprint>:<nucleus_id>").
NAMESPACE = uuid.UUID("5b0f3c52-7d0e-4c3e-9a53-6e75636c6569")


def feature_id(fingerprint: str, nucleus_id: int) -> str:
    """Stable UUID string of one nucleus of one slide."""
    return str(uuid.uuid5(NAMESPACE, f"{fingerprint}:{int(nucleus_id)}"))


def _features(parquet: Path, fingerprint: str, slide_id: str) -> Iterator[dict]:
    f = pq.ParquetFile(parquet)
    names = set(f.schema_arrow.names)
    cols = ["nucleus_id", "geometry", *[c for c in (*MEASUREMENTS, "class_name") if c in names]]
    colours: dict[str, list[int]] = {}
    for batch in f.iter_batches(batch_size=20_000, columns=cols):
        d = batch.to_pydict()
        geoms = shapely.from_wkb(d["geometry"])
        for i, g in enumerate(geoms):
            name = d["class_name"][i] if "class_name" in d else "Nucleus"
            if name not in colours:
                colours[name] = NUCLEUS_COLOUR if "class_name" not in d else CLASS_COLOURS[len(colours) % len(CLASS_COLOURS)]
            nid = int(d["nucleus_id"][i])
            measurements = {"nucleus_id": nid}
            measurements.update({m: d[m][i] for m in MEASUREMENTS if m in d and d[m][i] == d[m][i]})
            yield {
                "type": "Feature",
                "id": feature_id(fingerprint, nid),
                "geometry": shapely.geometry.mapping(g),
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": name, "color": colours[name]},
                    "measurements": measurements,
                    "metadata": {"nucleus_id": str(nid), "slide_id": slide_id},
                    "nucleus_id": nid,
                },
            }


def write_geojson(parquet: Path, out: IO[str], fingerprint: str = "", slide_id: str = "") -> int:
    """Stream a FeatureCollection to ``out``; returns the number of features."""
    out.write('{"type": "FeatureCollection", "features": [\n')
    n = 0
    for feat in _features(parquet, fingerprint, slide_id):
        out.write((",\n" if n else "") + json.dumps(feat, separators=(",", ":")))
        n += 1
    out.write("\n]}\n")
    return n


def export_slide(slide_dir: Path, dest: Path | None = None) -> tuple[Path, int]:
    """``<out>/<slide_id>`` -> ``<out>/<slide_id>/nuclei.geojson`` (or ``dest``), atomically."""
    slide_dir = Path(slide_dir)
    parquet = slide_paths(slide_dir.parent, slide_dir.name)["parquet"]
    if not (slide_dir / "run.json").is_file() or not parquet.is_file():
        raise FileNotFoundError(
            f"{slide_dir}: not a finished slide output (needs run.json and {parquet}); run `nucleiflow segment` first"
        )
    dest = Path(dest) if dest else slide_dir / "nuclei.geojson"
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"{dest}: folder {dest.parent} does not exist; create it or pass another --dest")
    try:
        fingerprint = str(json.loads((slide_dir / "run.json").read_text()).get("slide_fingerprint") or "")
    except ValueError as e:
        raise FileNotFoundError(f"{slide_dir / 'run.json'}: unreadable ({e}); segment the slide again") from e
    opener = gzip.open if dest.name.endswith(".gz") else open
    with atomic_write(dest, durable=False) as tmp, opener(tmp, "wt", encoding="utf-8") as f:
        n = write_geojson(parquet, f, fingerprint or slide_dir.name, slide_dir.name)
    return dest, n
