"""Post-processing of one tile's model maps into nucleus instance labels.

Three marker-controlled watersheds, one per model family (see shared/SEEDS.md):

- ``hv_watershed``: HoVer-Net / HoVer-UNet student: probability + horizontal/vertical
  distance maps.
- ``marker_watershed``: GoLo with a USE-Net shape-marker output.
- ``distance_watershed``: GoLo with a mask alone: peaks of the distance transform split
  touching nuclei.

Inputs follow the post-processing contract: ``prob`` (H, W) float in [0, 1], ``hv``
(2, H, W) float in [-1, 1] (channel 0 = x, 1 = y), ``marker`` (H, W) float in [0, 1].
Every method returns int32 labels (H, W): 0 = background, nuclei 1..N consecutive (the
order of the ids means nothing). All sizes are in pixels of the tile.

Unlike the HoVer-Net reference code, a foreground component that receives no seed keeps
its own label instead of vanishing: a small or oddly shaped nucleus is never dropped
because its marker was opened away.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max

from nucleiflow.pipeline.postprocess.binary import fill_holes, open_disk
from nucleiflow.pipeline.postprocess.flood import seeded_flood_pixels
# hv_edge, hv_energy are looked up here at call time: benchmarks/ceiling_child.py times them
# by patching these names.
from nucleiflow.pipeline.postprocess.edge_map import dense_windows, edge_setup, hv_edge, hv_energy
from nucleiflow.pipeline.postprocess.labels import remove_small_fg, remove_unsure_pixels

#: Every method's mask threshold on the NP probability when a card leaves it unset.
DEFAULT_PROB_THRESHOLD = 0.5


def mask_threshold(post: Any) -> float:
    """The NP probability a post-processing config (`config.PostprocessConfig`) cuts its mask at."""
    value = getattr(post, "prob_threshold", None)
    return DEFAULT_PROB_THRESHOLD if value is None else float(value)

__all__ = [
    "METHODS",
    "distance_watershed",
    "distance_watershed_pixels",
    "hv_edge",
    "hv_energy",
    "hv_watershed",
    "hv_watershed_pixels",
    "marker_watershed",
    "marker_watershed_pixels",
    "mask_threshold",
    "postprocess",
    "postprocess_pixels",
]

# 8-connectivity: a nucleus touching another only at a corner is still one blob.
_CONN8 = np.ones((3, 3), bool)


def _foreground(prob: np.ndarray, threshold: float, min_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binarise ``prob`` (H, W) at ``>= threshold``; drop blobs < ``min_size`` px.

    Returns (mask (H, W) bool, components (H, W) int32, the raveled indices of the mask's
    pixels (n,) int64 ascending).
    """
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise ValueError(f"prob must be (H, W), got shape {prob.shape}")
    raw = prob >= threshold
    components, _ = ndi.label(raw, structure=_CONN8)
    components, fg = remove_small_fg(components, min_size, where=raw)
    return components > 0, components, fg


def _seeded_watershed(
    energy: np.ndarray, seeds: np.ndarray, mask: np.ndarray, components: np.ndarray, fg: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Watershed of ``energy`` from ``seeds`` inside ``mask``; unseeded components kept whole.

    energy (H, W) float, low = nucleus centre; seeds (H, W) int, 0 = none; mask (H, W) bool;
    components (H, W) int32, the connected components of ``mask`` (so ``mask`` is
    ``components > 0``; ``fg``: the raveled indices of its pixels, if known). Returns int32 1..N. Same labels as scikit-image's
    ``watershed(energy, markers=seeds * mask, mask=mask, connectivity=2)``, seedless
    components then numbered ``component + max seed``, made consecutive; `flood.seeded_flood`
    floods only the components where seeds compete. With the object pixels and their labels
    (`flood.seeded_flood_pixels`).
    """
    return seeded_flood_pixels(energy, seeds, components, fg)


def _none(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """No object: (int32 zeros of ``shape``, no pixels, no labels)."""
    return np.zeros(shape, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32)


def hv_watershed(prob: np.ndarray, hv: np.ndarray | None = None, **params: Any) -> np.ndarray:
    """int32 (H, W) labels 1..N of `hv_watershed_pixels` (HoVer-Net's post-processing; the
    same parameters)."""
    return hv_watershed_pixels(prob, hv, **params)[0]


def hv_watershed_pixels(
    prob: np.ndarray,
    hv: np.ndarray | None = None,
    *,
    edge: np.ndarray | None = None,
    energy: np.ndarray | None = None,
    seedable: np.ndarray | None = None,
    prob_threshold: float = DEFAULT_PROB_THRESHOLD,
    marker_threshold: float = 0.4,
    min_size: int = 10,
    ksize: int = 21,
    opening_radius: int = 2,
    normalise: str = "fixed",
    gradient_range: tuple[float, float] = (-0.8, 0.55),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HoVer-Net post-processing (Graham et al. 2019, ``process_np_hv``) of one tile.

    prob: (H, W) float nucleus probability; hv: (2, H, W) float, channel 0 = horizontal (x)
    and 1 = vertical (y) distance to the nucleus centroid, in [-1, 1]. Or, instead of hv,
    ``edge``: (H, W) float32, `hv_edge` of it already computed (on the model's device,
    `infer.dense`) with this ``ksize``, ``normalise`` and ``gradient_range``. Or, instead of
    either, ``energy`` (H, W) float32 and ``seedable`` (H, W) bool: `hv_energy` of the edge
    with this ``prob_threshold`` and ``marker_threshold`` (the dense part, all of steps 2-4
    that needs no mask; `infer.dense` makes them on the model's device).

    1. mask = prob >= prob_threshold, blobs < ``min_size`` px removed.
    2. h and v min-max normalised over the tile; Sobel derivatives along x of h and along
       y of v (OpenCV kernels of size ``ksize`` px; HoVer-Net uses 21 at 0.25 um/px), each
       min-max normalised and inverted: ``edge = max(1 - d/dx h, 1 - d/dy v)``, high where
       the distance maps jump, i.e. between touching nuclei (`hv_edge`); only its values
       inside the mask matter.
    3. markers = mask & (edge < ``marker_threshold``), holes filled, opened with a disk of
       ``opening_radius`` px, seeds < ``min_size`` px dropped.
    4. watershed of ``-blur3x3((1 - edge) * mask)`` from the markers within the mask.
    Returns (int32 (H, W) labels 1..N, the object pixels' raveled indices ascending, their
    labels); `hv_watershed` returns the labels alone.

    ``normalise="tile"`` is HoVer-Net's tile-wide min-max normalisation of h, v and their
    derivatives. It makes the edge map depend on the rest of the tile, so the same nucleus
    can split differently in two tilings (and on small 300 px crops of exact maps a few
    large nuclei lose their marker). The default ``"fixed"`` is translation-equivariant,
    which seam-exact stitching needs: h, v are clipped to [-1, 1] and each derivative is
    mapped from ``gradient_range`` (in units of the largest possible response, ``B`` =
    sum|deriv| * sum(smooth)) to [0, 1] and clipped. The default range is what tile-wide
    min-max sees on exact MoNuSeg maps at 0.5 um/px with ksize 11 (min -0.69..-0.87 B,
    max 0.52..0.61 B), so thresholds keep their HoVer-Net meaning.
    """
    prob = np.asarray(prob)
    if (energy is None) != (seedable is None):
        raise ValueError("energy and seedable come together")
    for name, given in (("energy", energy), ("seedable", seedable), ("edge", edge)):
        if given is not None and np.shape(given) != prob.shape:
            raise ValueError(f"{name} must have prob's shape {prob.shape}, got {np.shape(given)}")
    if energy is None and edge is None:
        if hv is None:
            raise ValueError("hv_watershed needs hv (2, H, W) or its edge map (H, W)")
        if np.shape(hv) != (2, *prob.shape):
            raise ValueError(f"hv must be (2, H, W) with prob (H, W): {np.shape(hv)}, {prob.shape}")
    setup = dict(ksize=ksize, normalise=normalise, gradient_range=gradient_range)
    edge_setup(**setup)  # bad values fail here, whichever map came in
    mask, components, fg = _foreground(prob, prob_threshold, min_size)
    if not mask.any():
        return _none(prob.shape)
    if energy is None and edge is None and normalise == "fixed":
        energy, seedable = _dense_near(prob, hv, mask, setup, prob_threshold, marker_threshold)
    elif energy is None:
        if edge is None:
            edge = hv_edge(hv, **setup)
        # Nuclei are mountains of (1 - edge); negated, they become basins. Only values inside
        # the mask are read below (both uses are masked): no copy zeroed outside it.
        energy, seedable = hv_energy(prob, edge, prob_threshold, marker_threshold)

    markers = fill_holes(mask & seedable)
    if opening_radius > 0:
        markers = open_disk(markers, opening_radius)
    seeds, _ = ndi.label(markers, structure=_CONN8)
    seeds, _ = remove_small_fg(seeds, min_size, where=markers)
    return _seeded_watershed(energy, seeds, mask, components, fg)


def _dense_near(prob: np.ndarray, hv: np.ndarray, mask: np.ndarray, setup: dict, prob_threshold: float,
                marker_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """`hv_energy` of `hv_edge` (prob (H, W), hv (2, H, W), ``setup``: a "fixed" normalisation),
    computed only in windows around the cleaned ``mask`` (H, W) bool (`edge_map.dense_windows`).

    Returns (energy (H, W) float32, seedable (H, W) bool): the same bits as on the whole tile
    on every mask pixel, 0 / False away from it. Nothing else is read: seeds come from
    ``mask & seedable`` and the flood reads the energy on the mask alone. The margin is the
    Sobel kernels' radius plus the blur's. On the MoNuSeg mosaic of `benchmarks/ceiling.py`
    the mask covers ~13% of a tile and the windows ~60%: half the CPU time of the dense maps
    (issue 13). A "tile" normalisation reads the whole tile: it is not windowed.
    """
    energy = np.zeros(prob.shape, np.float32)
    seedable = np.zeros(prob.shape, bool)
    margin = int(setup["ksize"]) // 2 + 1
    for rows, cols, inner_r, inner_c in dense_windows(mask, margin):
        edge = hv_edge(hv[:, rows, cols], **setup)
        e, s = hv_energy(prob[rows, cols], edge, prob_threshold, marker_threshold)
        energy[rows, cols][inner_r, inner_c] = e[inner_r, inner_c]
        seedable[rows, cols][inner_r, inner_c] = s[inner_r, inner_c]
    return energy, seedable


def marker_watershed(prob: np.ndarray, marker: np.ndarray, **params: Any) -> np.ndarray:
    """int32 (H, W) labels 1..N of `marker_watershed_pixels` (the same parameters)."""
    return marker_watershed_pixels(prob, marker, **params)[0]


def marker_watershed_pixels(
    prob: np.ndarray,
    marker: np.ndarray,
    *,
    prob_threshold: float = DEFAULT_PROB_THRESHOLD,
    marker_threshold: float = 0.5,
    min_size: int = 10,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Watershed from USE-Net shape markers (eroded nuclei) within the nucleus mask.

    prob: (H, W) float nucleus probability; marker: (H, W) float shape-marker probability.
    mask = prob >= prob_threshold without blobs < ``min_size`` px; seeds = connected
    components of marker >= marker_threshold inside the mask; flooding runs on the negated
    Euclidean distance to the background. Mask components without a seed keep their own
    label. Returns (int32 (H, W) labels 1..N, the object pixels' raveled indices ascending,
    their labels); `marker_watershed` returns the labels.
    """
    prob, marker = np.asarray(prob), np.asarray(marker)
    if marker.shape != prob.shape:
        raise ValueError(f"marker must have prob's shape {prob.shape}, got {marker.shape}")
    mask, components, fg = _foreground(prob, prob_threshold, min_size)
    if not mask.any():
        return _none(prob.shape)
    seeds, _ = ndi.label((marker >= marker_threshold) & mask, structure=_CONN8)
    energy = -ndi.distance_transform_edt(mask)
    return _seeded_watershed(energy, seeds, mask, components, fg)


def distance_watershed(prob: np.ndarray, **params: Any) -> np.ndarray:
    """int32 (H, W) labels 1..N of `distance_watershed_pixels` (the same parameters)."""
    return distance_watershed_pixels(prob, **params)[0]


def distance_watershed_pixels(
    prob: np.ndarray,
    *,
    prob_threshold: float = DEFAULT_PROB_THRESHOLD,
    min_distance: int = 3,
    min_size: int = 10,
    smooth_sigma: float = 2.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split touching nuclei of a mask alone at the necks of its distance transform.

    prob: (H, W) float nucleus probability. mask = prob >= prob_threshold without blobs <
    ``min_size`` px; dist = Euclidean distance to the background, Gaussian-smoothed with
    ``smooth_sigma`` px; seeds = its local maxima (one per blob at least, any two at least
    ``min_distance`` px apart); watershed of ``-dist`` from the seeds within the mask.
    Returns (int32 (H, W) labels 1..N, the object pixels' raveled indices ascending, their
    labels); `distance_watershed` returns the labels.

    The smoothing matters: the raw distance transform of a digital shape has plateaus and
    ridges with many local maxima. On MoNuSeg ground-truth masks (0.25 um/px) it lifts AJI
    from ~0.6-0.7 (sigma 0) to ~0.85-0.9 (sigma 2).
    """
    prob = np.asarray(prob)
    mask, components, fg = _foreground(prob, prob_threshold, min_size)
    if not mask.any():
        return _none(prob.shape)
    dist = ndi.distance_transform_edt(mask)
    if smooth_sigma > 0:
        dist = ndi.gaussian_filter(dist, smooth_sigma)
    # One global peak search: per-blob search (labels=components) costs a Python-level loop
    # over blobs, 2-3x slower on a crowded tile. A blob whose only peak lost to a closer,
    # higher one of its neighbour keeps its own label anyway (seedless blobs are kept).
    peaks = peak_local_max(dist, min_distance=min_distance, exclude_border=False)
    seeds = np.zeros(prob.shape, np.int32)
    seeds[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    return _seeded_watershed(-dist, seeds, mask, components, fg)


def _tile_map(maps: Mapping[str, np.ndarray], key: str, method: str) -> np.ndarray:
    if key not in maps:
        raise ValueError(f"post-processing {method!r} needs maps[{key!r}]; got keys {sorted(maps)}")
    return np.asarray(maps[key])


def _squeeze_channel(a: np.ndarray) -> np.ndarray:
    # Accept (1, H, W) as well: it is what slicing one tile out of (B, 1, H, W) gives.
    return a[0] if a.ndim == 3 and a.shape[0] == 1 else a


_PIXEL_METHODS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
    "hv": lambda maps, **kw: hv_watershed_pixels(
        _squeeze_channel(_tile_map(maps, "prob", "hv")),
        None if "edge" in maps or "energy" in maps else _tile_map(maps, "hv", "hv"),
        **{k: _squeeze_channel(np.asarray(maps[k])) for k in ("edge", "energy", "seedable") if k in maps},
        **kw,
    ),
    "marker": lambda maps, **kw: marker_watershed_pixels(
        _squeeze_channel(_tile_map(maps, "prob", "marker")),
        _squeeze_channel(_tile_map(maps, "marker", "marker")),
        **kw,
    ),
    "distance": lambda maps, **kw: distance_watershed_pixels(
        _squeeze_channel(_tile_map(maps, "prob", "distance")), **kw
    ),
}

METHODS: dict[str, Callable[..., np.ndarray]] = {
    name: (lambda fn: lambda maps, **kw: fn(maps, **kw)[0])(fn) for name, fn in _PIXEL_METHODS.items()
}
"""Post-processing methods by name: each takes (maps, **params) -> int32 labels (H, W)."""


def postprocess(maps: Mapping[str, np.ndarray], method: str, *, min_mean_prob: float = 0.0,
                **params: float) -> np.ndarray:
    """Instance labels of one tile from its maps with the post-processing named ``method``.

    maps: "prob" (H, W), "hv" (2, H, W) or its "edge" (H, W) (`hv_edge`, preferred when
    both are there) or "energy" and "seedable" (H, W) (`hv_energy`, preferred to both) for
    "hv", "marker" (H, W) for "marker" ((1, H, W) is accepted for every map but hv). ``params`` go to the method's function; then, for every method,
    objects whose mean probability is below ``min_mean_prob`` are dropped
    (`labels.remove_unsure`; 0 = keep all).
    Returns int32 (H, W), 0 = background, nuclei 1..N.
    """
    return postprocess_pixels(maps, method, min_mean_prob=min_mean_prob, **params)[0]


def postprocess_pixels(maps: Mapping[str, np.ndarray], method: str, *, min_mean_prob: float = 0.0,
                       **params: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`postprocess`, and the object pixels of its labels: (int32 (H, W) labels, their raveled
    indices (n,) int64 ascending, their labels (n,) int32). The watershed has them at hand; a
    caller that needs them (`infer.workers.process_tile`) saves two passes over the tile."""
    if method not in _PIXEL_METHODS:
        valid = ", ".join(sorted(_PIXEL_METHODS))
        raise ValueError(f"unknown post-processing method {method!r}; valid: {valid}")
    labels, fg, lab = _PIXEL_METHODS[method](maps, **params)
    return remove_unsure_pixels(labels, fg, lab, _squeeze_channel(_tile_map(maps, "prob", method)), min_mean_prob)
