"""What cannot be a nucleus (postprocess.plausible), where it is dropped (infer.workers), and
where nuclei may lie on a thumbnail (slide.tissue.nuclei_region): small arrays you can read."""
from __future__ import annotations

import numpy as np

from nucleiflow.pipeline.config import HvPostprocess
from nucleiflow.pipeline.infer.workers import drop_implausible
from nucleiflow.pipeline.postprocess.plausible import MAX_NUCLEUS_UM2, implausible, ink_or_black, mean_hsv
from nucleiflow.pipeline.slide.tissue import nuclei_region, tissue_mask
from nucleiflow.pipeline.tiles.plan import Region, plan_tiles

# Purple to blue-violet, and CMU-1-Small-Region's cyan-blue haematoxylin (mean hue ~200, saturation 0.6).
HAEMATOXYLIN = [(80, 50, 130), (60, 40, 110), (120, 90, 170), (45, 95, 125)]
PEN = [(30, 120, 70), (20, 110, 40), (30, 30, 35), (10, 10, 12)]  # green markers, black marker; scanner border
BLUE_PEN = (35, 65, 170)  # left to the thumbnail's tissue region: too close to haematoxylin per object


def blobs(colours: list[tuple[int, int, int]], size: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """One square object per colour on glass: labels (H, W) int32 and rgb (H, W, 3) uint8."""
    labels = np.zeros((size * 2, size * 2 * len(colours)), np.int32)
    rgb = np.full(labels.shape + (3,), 240, np.uint8)
    for i, c in enumerate(colours):
        labels[2:2 + size, i * 2 * size:i * 2 * size + size] = i + 1
        rgb[labels == i + 1] = c
    return labels, rgb


def test_ink_and_black_are_not_haematoxylin():
    labels, rgb = blobs(HAEMATOXYLIN + PEN)
    flags = ink_or_black(mean_hsv(labels, rgb, np.arange(1, 9)))
    assert flags.tolist() == [False] * 4 + [True] * 4
    drop = implausible(labels, 0.5, rgb=rgb)
    assert drop["ink_colour"].tolist() == [5, 6, 7, 8] and drop["too_large"].size == drop["off_tissue"].size == 0


def test_size_limit_is_in_um2_at_any_mpp():
    side = 40  # px: 400 um2 at 0.5 um/px (kept), 1600 um2 at 1 um/px (dropped)
    labels = np.zeros((50, 50), np.int32)
    labels[5:5 + side, 5:5 + side] = 1
    assert 400 < MAX_NUCLEUS_UM2 < 1600
    assert implausible(labels, 0.5)["too_large"].size == 0
    assert implausible(labels, 1.0)["too_large"].tolist() == [1]


def test_region_decides_on_the_centroid_in_model_px():
    mask = np.zeros((4, 4), bool)
    mask[:, :2] = True  # mask px 8 model px wide: model x < 16 is in
    region = Region.of(mask, 8.0)
    assert region.contains(np.array([15.9, 16.0, -1.0, 5.0]), np.array([1.0, 1.0, 1.0, 40.0])).tolist() == [
        True, False, False, False]
    labels = np.zeros((10, 20), np.int32)
    labels[2:5, 2:5] = 1  # centroid x = 3.5 (+ offset 10 = 13.5: in)
    labels[2:5, 8:11] = 2  # 9.5 + 10 = 19.5: out
    assert implausible(labels, 0.5, region=region, offset=(10, 0))["off_tissue"].tolist() == [2]


def test_each_object_is_counted_under_its_first_reason_and_only_if_the_tile_owns_it():
    plan = plan_tiles(64, 32, 0.5, 0.5, tile_size=32, halo=8)
    tile = plan.tiles[0]  # core x [0, 32) = window x [8, 40)
    labels = np.zeros((48, 48), np.int32)
    rgb = np.full((48, 48, 3), 240, np.uint8)
    labels[10:16, 10:16] = 1
    rgb[10:16, 10:16] = PEN[0]  # ink, owned
    labels[10:16, 42:48] = 2
    rgb[10:16, 42:48] = PEN[0]  # ink, but its centroid is in the next tile's core: not this tile's to count
    labels[20:26, 20:26] = 3
    rgb[20:26, 20:26] = HAEMATOXYLIN[0]  # a nucleus
    out, dropped = drop_implausible(labels, tile, plan, rgb)
    assert dropped == {"off_tissue": 0, "too_large": 0, "ink_colour": 1}
    assert not (out == 1).any() and (out == 2).any() and (out == 3).sum() == 36


def test_nuclei_region_keeps_pale_tissue_and_drops_ink_and_borders():
    rgb = np.full((60, 80, 3), (242, 240, 245), np.uint8)
    rgb[10:40, 10:30] = (150, 90, 170)  # stained tissue
    rgb[10:40, 30:45] = (200, 185, 215)  # pale tissue: saturation ~0.14, below Otsu's threshold here
    rgb[10:40, 60:70] = BLUE_PEN  # a pen stroke on glass
    rgb[52:, :] = PEN[3]  # black scanner border
    mpp = 8.0
    mask = np.zeros((60, 80), bool)
    mask[10:40, 10:30] = True  # as on a slide where strong stain sets Otsu's threshold above the pale part
    region = nuclei_region(rgb, mpp, mask)
    assert region[25, 20] and region[25, 38], "tissue, pale tissue"
    assert not region[25, 65] and not region[55, 20], "ink, border"
    assert region[25, 46] and not region[25, 50], "grown by 16 um = 2 px, no further"
    assert not tissue_mask(rgb, mpp)[25:40, 60:70].any() and not tissue_mask(rgb, mpp)[52:].any()


def test_process_tile_sees_the_window_colours_through_segment_reader():
    # The post-processing job gets the window's RGB beside the maps (WithImages).
    from nucleiflow.pipeline.infer.segment_reader import WithImages

    class Fake:
        card = type("Card", (), {"postprocess": HvPostprocess()})()

        def __call__(self, images):
            return {"prob": np.zeros(images.shape[:3], np.float32)}

    images = np.zeros((2, 8, 8, 3), np.uint8)
    maps = WithImages(Fake())(images)
    assert maps["rgb"] is images and set(maps) == {"prob", "rgb"}
