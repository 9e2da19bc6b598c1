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
