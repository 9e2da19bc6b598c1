"""QuPath export: a slide's nuclei table -> GeoJSON detections, streamed row group by row group.

QuPath imports a FeatureCollection whose features carry ``properties.objectType`` =
"detection" as detections (fast, no per-object editing); without it every nucleus becomes
a slow annotation. Coordinates stay in level-0 pixels, which is what QuPath expects.
"""
from __future__ import annotations

import json
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


def _features(parquet: Path) -> Iterator[dict]:
    f = pq.ParquetFile(parquet)
    names = set(f.schema_arrow.names)
    cols = ["nucleus_id", "geometry", *[c for c in (*MEASUREMENTS, "class_name") if c in names]]
    for batch in f.iter_batches(batch_size=20_000, columns=cols):
        d = batch.to_pydict()
        geoms = shapely.from_wkb(d["geometry"])
        for i, g in enumerate(geoms):
            name = d["class_name"][i] if "class_name" in d else "Nucleus"
            yield {
                "type": "Feature",
                "id": str(d["nucleus_id"][i]),
                "geometry": shapely.geometry.mapping(g),
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": name, "color": NUCLEUS_COLOUR},
                    "measurements": {m: d[m][i] for m in MEASUREMENTS if m in d and d[m][i] == d[m][i]},
                    "nucleus_id": d["nucleus_id"][i],
                },
            }


def write_geojson(parquet: Path, out: IO[str]) -> int:
    """Stream a FeatureCollection to ``out``; returns the number of features."""
    out.write('{"type": "FeatureCollection", "features": [\n')
    n = 0
    for feat in _features(parquet):
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
    with atomic_write(dest, durable=False) as tmp, open(tmp, "w") as f:
        n = write_geojson(parquet, f)
    return dest, n
