"""Polygon comparisons for seam tests: duplicates within a run, matches between runs."""
from __future__ import annotations

import numpy as np
import shapely


def overlaps(geoms: np.ndarray) -> np.ndarray:
    """Intersection / smaller area of every intersecting pair of polygons."""
    i, j = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    i, j = i[i < j], j[i < j]
    inter = shapely.area(shapely.intersection(geoms[i], geoms[j]))
    return inter / np.minimum(shapely.area(geoms[i]), shapely.area(geoms[j]))


def match_rate(a: np.ndarray, b: np.ndarray, iou: float = 0.9) -> float:
    """Fraction of polygons of ``a`` with a polygon of ``b`` at IoU >= ``iou``."""
    ia, ib = shapely.STRtree(b).query(a, predicate="intersects")
    inter = shapely.area(shapely.intersection(a[ia], b[ib]))
    best = np.zeros(len(a))
    np.maximum.at(best, ia, inter / (shapely.area(a[ia]) + shapely.area(b[ib]) - inter))
    return float((best >= iou).mean())


def max_overlap(geoms: np.ndarray) -> float:
    """Largest intersection of two polygons as a fraction of the smaller one's area."""
    o = overlaps(geoms)
    return float(o.max()) if len(o) else 0.0


def assert_same_table(a, b, tolerance: float = 1e-3) -> None:
    """Nuclei tables (DataFrames, rows in the same order) equal, with polygon vertices and
    solidity allowed to move by float noise: the outlines follow the probability
    (`postprocess.subpixel`), whose last bits (~1e-7) can differ between processes (torch's
    CPU kernels: thread count, memory layout). Every other column must be identical."""
    import pandas as pd

    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    rest = [c for c in a.columns if c not in ("geometry", "solidity", "bbox")]
    pd.testing.assert_frame_equal(a[rest], b[rest])
    ga, gb = (shapely.from_wkb(t["geometry"].to_numpy()) if isinstance(t["geometry"].iloc[0], bytes)
              else np.asarray(t["geometry"]) for t in (a, b))
    assert shapely.equals_exact(ga, gb, tolerance=tolerance).all()
    np.testing.assert_allclose(a["solidity"].to_numpy(), b["solidity"].to_numpy(), atol=1e-5)
    if "bbox" in a.columns:  # GeoParquet's covering column: the polygons' bounds
        ba, bb = (np.array([[d[k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in t["bbox"]]) for t in (a, b))
        np.testing.assert_allclose(ba, bb, atol=tolerance)
