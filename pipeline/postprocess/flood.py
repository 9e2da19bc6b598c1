"""The seeded watershed of a tile, flooding only where seeds compete.

A watershed floods each connected component of its mask on its own: pixels of one
component never reach another. So a component holding a single seed is that seed's,
whole, and one without a seed keeps its own label (`watershed._seeded_watershed`'s rule);
only components with two or more seeds need the priority-queue flood. On a 1152 px tile
those are a small share of the pixels, so `seeded_flood` packs their bounding boxes side by
side (1 px apart, so they stay apart) into one small canvas and floods that once, instead of
scikit-image's padding, copying and scanning of the whole tile (issue 13: ~0.1 s per Mpx
before, most of it spent away from the flood).

Each component's pixels keep their raster order in the canvas, and their energy, seeds and
8-neighbourhoods are the same, so a component floods as it does in the whole tile. The one
thing the packing could change is the heap's order among seed pixels of *equal* energy
(scikit-image pushes all seeds with age 0, and a binary heap orders equal keys by its own
history): on the 6x6 and 8x8 MoNuSeg mosaics of `benchmarks/ceiling.py` and on
CMU-1-Small-Region (12,788, 19,239 and 3,130 nuclei) the labels came out identical. So
did they with the seeds' inner pixels left out of the heap (`seed_interior`: about half of
the seed pixels, a fifth of the flood's time) and the boxes packed tallest first, on the
6x6 mosaic (0.5 and 0.42 um/px cards: 11,267 and 11,491 nuclei) and CMU-1-Small-Region.
"""
from __future__ import annotations

import numpy as np
from skimage.segmentation import watershed

#: Canvas width in px: boxes are packed in rows ("shelves") up to this width (narrower
#: shelves of like heights waste less canvas; a wider box gets a shelf of its own).
CANVAS_WIDTH = 512


def seeded_flood(energy: np.ndarray, seeds: np.ndarray, components: np.ndarray,
                 fg: np.ndarray | None = None) -> np.ndarray:
    """`seeded_flood_pixels`' labels alone."""
    return seeded_flood_pixels(energy, seeds, components, fg)[0]


def seeded_flood_pixels(energy: np.ndarray, seeds: np.ndarray, components: np.ndarray,
                        fg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marker watershed of ``energy`` from ``seeds`` inside ``components > 0``, 8-connected.

    energy: (H, W) float, low = basin; seeds: (H, W) int >= 0 (0 = none; values outside the
    components are ignored); components: (H, W) int, the 8-connected components of the mask,
    labelled 1..C; fg: ``np.flatnonzero(components)`` if the caller has it. Returns (H, W)
    int32 labels 1..N, consecutive and in the order of ``relabel_consecutive(out)`` where
    ``out`` is scikit-image's
    ``watershed(energy, seeds * mask, mask=mask, connectivity=2)`` with every seedless
    component then labelled ``component + max seed``: the same labels, computed only where
    two seeds share a component. Also returns the object pixels (``fg``, the raveled indices
    of the mask's pixels, ascending int64) and their labels ((n,) int32): the caller's next
    steps need them, and finding them again costs a pass over the tile (issue 13).
    """
    h, w = components.shape
    flat = components.ravel()
    fg = np.flatnonzero(flat) if fg is None else fg  # ascending: raster order
    out = np.zeros(h * w, np.int32)
    if fg.size == 0:
        return out.reshape(h, w), fg, np.zeros(0, np.int32)
    comp = flat[fg]  # int32 as labelled: ids < 2**31, and int32 gathers are cheaper
    seed = seeds.ravel()[fg]
    ncomp, top = int(comp.max()), int(seed.max())
    # Distinct seeds per component: a component with one is that seed's, with none its own.
    has = seed > 0
    seed_has, comp_has = seed[has], comp[has]
    comp_of = np.zeros(top + 1, np.int64)
    comp_of[seed_has] = comp_has
    if np.array_equal(comp_of[seed_has], comp_has):  # each seed in one component (the rule)
        pair_seed = np.flatnonzero(comp_of)
        pair_comp = comp_of[pair_seed]
    else:  # a seed the mask cut in two: (component, seed) pairs, sorted
        key = comp_has.astype(np.int64) * (top + 1) + seed_has
        pair_comp, pair_seed = np.divmod(np.unique(key), top + 1)
    nseeds = np.bincount(pair_comp, minlength=ncomp + 1)
    lut = np.arange(top, ncomp + 1 + top, dtype=np.int32)
    lut[0] = 0
    single = nseeds[pair_comp] == 1
    lut[pair_comp[single]] = pair_seed[single]
    label = lut[comp]
    contested = (nseeds >= 2)[comp]
    if contested.any():
        label[contested] = _flood_packed(energy, seed, fg, comp, contested, w)
    # Consecutive ids in the order of the values (relabel_consecutive, on the foreground alone).
    present = np.zeros(ncomp + top + 1, bool)
    present[label] = True
    rank = np.cumsum(present, dtype=np.int32)
    lab = rank[label]
    out[fg] = lab
    return out.reshape(h, w), fg, lab


def _flood_packed(energy: np.ndarray, seed: np.ndarray, fg: np.ndarray, comp: np.ndarray,
                  contested: np.ndarray, width: int) -> np.ndarray:
    """Watershed labels of the foreground pixels ``fg[contested]`` (raveled indices into an
    (H, ``width``) tile, ascending; ``comp``, ``seed``: their component and seed, int):
    every contested component's box copied into one canvas, flooded once."""
    idx, cs = fg[contested], comp[contested]
    rows, cols = np.divmod(idx, width)
    ids = np.flatnonzero(np.bincount(cs))  # np.unique(cs) without its sort
    # Bounding boxes: rows come in raster order (first and last pixel), columns by min / max.
    n = int(ids[-1]) + 1
    r0, r1 = np.full(n, rows.max() + 1), np.zeros(n, np.int64)
    c0, c1 = np.full(n, cols.max() + 1), np.zeros(n, np.int64)
    np.minimum.at(r0, cs, rows)
    np.maximum.at(r1, cs, rows)
    np.minimum.at(c0, cs, cols)
    np.maximum.at(c1, cs, cols)
    oy, ox = np.zeros(n, np.int64), np.zeros(n, np.int64)
    x = y = shelf = canvas_w = 0
    # Shelf packing, tallest boxes first (ties in component order), 1 px gaps: shelves of
    # boxes of like heights waste less canvas, which scikit-image copies and scans whole
    # several times (on the 6x6 mosaic, with 512 px shelves instead of 1024 in component
    # order, 0.41 of the canvas is mask instead of 0.23).
    heights = r1[ids] - r0[ids]
    for c in ids[np.argsort(-heights, kind="stable")].tolist():
        bh, bw = int(r1[c] - r0[c]) + 1, int(c1[c] - c0[c]) + 1
        if x > 0 and x + bw > CANVAS_WIDTH:
            y, x, shelf = y + shelf + 1, 0, 0
        oy[c], ox[c] = y, x
        x += bw + 1
        shelf, canvas_w = max(shelf, bh), max(canvas_w, x - 1)
    ch, cw = y + shelf, canvas_w
    pos = (rows - r0[cs] + oy[cs]) * cw + (cols - c0[cs] + ox[cs])
    image = np.zeros(ch * cw, np.float64)
    image[pos] = energy.ravel()[idx]  # only pixels inside the mask are ever read
    markers = np.zeros(ch * cw, np.int32)
    sc = seed[contested]
    markers[pos] = sc
    mask = np.zeros(ch * cw, bool)
    mask[pos] = True
    # Seed pixels with no neighbour left to flood stay out of the heap (skimage pushes every
    # seed pixel): about half of them here, a fifth of the flood's time (issue 13).
    inner = seed_interior(markers.reshape(ch, cw) != 0, mask.reshape(ch, cw)).ravel()
    markers[inner] = 0
    mask[inner] = False
    flooded = watershed(image.reshape(ch, cw), markers=markers.reshape(ch, cw), mask=mask.reshape(ch, cw),
                        connectivity=2).ravel()[pos]
    return np.where(flooded == 0, sc, flooded)


def seed_interior(seeded: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of ``seeded`` (H, W) bool whose 8 neighbours are all seeded or
    outside ``mask`` (H, W) bool (outside the array counts as outside the mask). A watershed
    pops them from its heap and finds nothing to flood: leaving them out of it (and of the
    mask: no pixel needs to pass through them) changes no label, only the heap's order among
    seed pixels of equal energy, as `seeded_flood`'s packing does (module doc)."""
    h, w = seeded.shape
    blocked = np.ones((h + 2, w + 2), bool)
    np.logical_or(seeded, ~mask, out=blocked[1:-1, 1:-1])
    out = seeded.copy()
    for dr in (0, 1, 2):
        for dc in (0, 1, 2):
            if dr != 1 or dc != 1:
                out &= blocked[dr : dr + h, dc : dc + w]
    return out
