"""Slide readers: read semantics on tiny arrays, then the real slides, then every bad input."""
from __future__ import annotations

import json
import math
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import openslide
import pytest
from skimage.transform import resize

from nucleiflow.pipeline.slide import reader as slides
from nucleiflow.pipeline.slide.reader import ArraySlide, SlideError, SlideInfo, open_slide

WHITE = np.array([255, 255, 255], np.uint8)


def grey(values) -> np.ndarray:
    """(h, w) ints -> (h, w, 3) uint8 with the same value in every channel."""
    a = np.asarray(values, np.uint8)
    return np.repeat(a[..., None], 3, axis=2)


# --- ArraySlide: answers you can see -------------------------------------------------

A = grey([[0, 10, 20, 30],
          [40, 50, 60, 70],
          [80, 90, 100, 110],
          [120, 130, 140, 150]])


def test_array_read_at_native_mpp_is_exact():
    s = ArraySlide(A, mpp=0.5)
    out = s.read(1, 2, 3, 2, mpp=0.5)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[..., 0], [[90, 100, 110], [130, 140, 150]])


def test_array_read_pads_with_white_past_every_edge():
    s = ArraySlide(A, mpp=0.5)
    out = s.read(-1, -2, 3, 3, mpp=0.5)
    np.testing.assert_array_equal(out[..., 1], [[255, 255, 255], [255, 255, 255], [255, 0, 10]])
    out = s.read(3, 3, 2, 2, mpp=0.5)
    np.testing.assert_array_equal(out[..., 2], [[150, 255], [255, 255]])
    assert (s.read(100, -100, 5, 5, 0.5) == 255).all()


def test_array_read_at_twice_the_mpp_is_box_averaged():
    s = ArraySlide(A, mpp=0.25)
    out = s.read(0, 0, 2, 2, mpp=0.5)  # each output px = mean of a 2x2 block
    np.testing.assert_array_equal(out[..., 0], [[25, 45], [105, 125]])
    out = s.read(2, 2, 2, 2, mpp=0.5)  # half past the edge: white averaged in
    np.testing.assert_array_equal(out[..., 0], [[125, 255], [255, 255]])


def test_array_read_covers_w_times_mpp_ratio_level0_px():
    ramp = grey(np.tile(np.arange(200), (2, 1)))  # value = level-0 x
    s = ArraySlide(ramp, mpp=0.25)
    out = s.read(10, 0, 100, 1, mpp=0.26)[0, :, 0].astype(int)  # covers 104 level-0 px
    assert abs(out[0] - 10.5) <= 1 and abs(out[-1] - (10 + 103.5)) <= 1
    assert (np.diff(out) >= 0).all()


def test_rgb_image_is_fromarray_without_the_fill():
    """The reader's array -> Pillow step gives Image.fromarray's image, also from a strided view."""
    from PIL import Image

    rgb = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for a in (rgb, rgb[::2, 1::3], np.zeros((1, 1, 3), np.uint8)):
        img = slides.rgb_image(a)
        assert img.mode == "RGB" and img.size == (a.shape[1], a.shape[0])
        np.testing.assert_array_equal(np.array(img), np.array(Image.fromarray(np.ascontiguousarray(a))))


def test_rgbx_image_reads_the_array_in_place():
    """An RGBX array as an "RGB" image: fromarray's image of its first three bytes, without a
    copy where Pillow maps it (the array is never written), a copy for a strided view; resized
    as the RGB image is."""
    from PIL import Image

    from nucleiflow.pipeline.slide.tiff_tiles import to_rgbx

    rgb = np.random.default_rng(4).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rgbx = to_rgbx(rgb)
    assert rgbx.shape == (37, 53, 4) and (rgbx[..., 3] == 255).all()
    np.testing.assert_array_equal(rgbx[..., :3], rgb)
    ref = Image.fromarray(rgb)
    for a in (rgbx, rgbx[::2, 1::3]):
        img = slides.rgbx_image(a)
        assert img.mode == "RGB" and img.size == (a.shape[1], a.shape[0])
        np.testing.assert_array_equal(np.array(img), np.ascontiguousarray(a[..., :3]))
    img = slides.rgbx_image(rgbx)
    assert slides._MAPS_RGBX  # this Pillow maps it
    for f in (Image.Resampling.BOX, Image.Resampling.BILINEAR):
        box = (0.3, 1.7, 50.2, 36.1)
        np.testing.assert_array_equal(np.array(img.resize((30, 20), f, box=box)), np.array(ref.resize((30, 20), f, box=box)))
    img.paste((1, 2, 3), (0, 0, 5, 5))  # a change in place copies first
    np.testing.assert_array_equal(rgbx[..., :3], rgb)


def test_array_slide_info():
    info = ArraySlide(A, mpp=0.5, name="tile-7").info
    assert (info.width, info.height, info.level_count) == (4, 4, 1)
    assert (info.mpp_x, info.mpp_y, info.vendor, info.path) == (0.5, 0.5, "array", "tile-7")
    assert json.loads(json.dumps(info.to_dict()))["level_dimensions"] == [[4, 4]]


def test_array_slide_rejects_bad_arrays_and_mpp():
    with pytest.raises(ValueError, match="uint8"):
        ArraySlide(A[..., 0], mpp=0.5)
    with pytest.raises(ValueError, match="mpp"):
        ArraySlide(A, mpp=0.0)


def test_array_fingerprint_follows_the_pixels():
    b = A.copy()
    b[3, 3] += 1
    assert ArraySlide(A, 0.5).info.fingerprint == ArraySlide(A.copy(), 0.25, "x").info.fingerprint
    assert ArraySlide(A, 0.5).info.fingerprint != ArraySlide(b, 0.5).info.fingerprint


def test_slide_info_validates():
    good = ArraySlide(A, 0.5).info.to_dict()
    for bad in ({"width": 0}, {"mpp_x": -1.0}, {"mpp_y": float("nan")}, {"mpp_source": "guess"},
                {"level_count": 2}):
        d = {**good, **bad}
        with pytest.raises(ValueError):
            SlideInfo(**{**d, "level_dimensions": tuple(map(tuple, d["level_dimensions"])),
                         "level_downsamples": tuple(d["level_downsamples"])})


def test_thumbnail_in_blocks_matches_one_block(monkeypatch):
    rng = np.random.default_rng(0)
    s = ArraySlide(rng.integers(0, 256, (97, 131, 3), dtype=np.uint8), mpp=0.5)
    whole = s.thumbnail(1.5)
    assert whole.shape == (math.ceil(97 / 3), math.ceil(131 / 3), 3)
    monkeypatch.setattr(slides, "MAX_READ_PX", 7)  # 2-px blocks that start between pixels
    blocks = s.thumbnail(1.5)
    assert np.abs(whole.astype(int) - blocks).max() <= 1


# --- Real slides ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def cmu(cmu_slide):
    with open_slide(cmu_slide) as r:
        yield r


@pytest.fixture(scope="module")
def tcga(tcga_slide):
    with open_slide(tcga_slide, mpp=2.0) as r:
        yield r


def test_cmu_info(cmu, cmu_slide):
    i = cmu.info
    assert (i.width, i.height, i.level_count) == (2220, 2967, 1)
    assert (i.mpp_x, i.mpp_y, i.mpp_source, i.vendor) == (0.499, 0.499, "metadata", "aperio")
    assert i.objective_power == 20.0 and i.path == str(cmu_slide)
    assert json.dumps(i.to_dict())


def test_cmu_read_shape_and_padding(cmu):
    out = cmu.read(-50, -30, 120, 100, mpp=0.499)
    assert out.shape == (100, 120, 3) and out.dtype == np.uint8
    assert (out[:30] == WHITE).all() and (out[:, :50] == WHITE).all()
    assert (out[30:, 50:] != WHITE).any()  # slide pixels (glass there is off-white)
    w, h = cmu.info.width, cmu.info.height
    out = cmu.read(w - 10, h - 20, 40, 40, mpp=0.499)
    assert (out[20:] == WHITE).all() and (out[:, 10:] == WHITE).all()


def test_cmu_read_at_0_5_is_level0_as_is(cmu, cmu_slide):
    # 0.5 vs 0.499 is 0.2%: under half a pixel over 200 px, so no resampling blur.
    out = cmu.read(700, 900, 200, 150, mpp=0.5)
    raw = np.asarray(openslide.OpenSlide(cmu_slide).read_region((700, 900), 0, (200, 150)))
    np.testing.assert_array_equal(out, raw[..., :3])


def test_cmu_downsampled_read_matches_manual_mean(cmu, cmu_slide):
    raw = np.asarray(openslide.OpenSlide(cmu_slide).read_region((600, 1000), 0, (400, 300)))
    rgb = raw[..., :3].astype(float)
    # Exactly 2x: the mean of each 2x2 block.
    out = cmu.read(600, 1000, 200, 150, mpp=2 * 0.499)
    manual = rgb.reshape(150, 2, 200, 2, 3).mean((1, 3))
    assert np.abs(out - manual).max() <= 1
    # 1.0 um/px is 2.004x: compare with skimage's antialiased resize of the same area.
    f = 1.0 / 0.499
    out = cmu.read(600, 1000, 150, 120, mpp=1.0)
    manual = resize(rgb[: round(120 * f), : round(150 * f)], (120, 150), anti_aliasing=True,
                    preserve_range=True)
    assert np.abs(out - manual).mean() < 3


def test_tcga_picks_the_coarser_level(tcga, tcga_slide):
    assert [tcga.best_level(m) for m in (2.0, 3.5, 3.99, 4.0, 16.0)] == [0, 0, 1, 1, 1]
    out = tcga.read(1000, 800, 256, 192, mpp=4.0)  # level 1 (4.001 um/px) read as is
    raw = np.asarray(openslide.OpenSlide(tcga_slide).read_region((1000, 800), 1, (256, 192)))
    np.testing.assert_array_equal(out, raw[..., :3])
    out8 = tcga.read(1000, 800, 128, 96, mpp=8.0)
    manual = raw[..., :3].astype(float).reshape(96, 2, 128, 2, 3).mean((1, 3))
    assert out8.shape == (96, 128, 3) and np.abs(out8 - manual).mean() < 2


def test_tcga_read_past_edges_and_thumbnail(tcga):
    i = tcga.info
    out = tcga.read(i.width - 100, -100, 100, 100, mpp=4.0)  # 50x50 inside, rest outside
    assert out.shape == (100, 100, 3)
    assert (out[:45] == WHITE).all() and (out[:, 55:] == WHITE).all()
    th = tcga.thumbnail(16.0)
    assert th.shape == (math.ceil(i.height / 8), math.ceil(i.width / 8), 3)
    assert 0.3 < (th.min(-1) < 200).mean() < 0.8  # a whole section with glass around it


def test_fingerprints_differ_and_are_stable_across_processes(cmu, tcga, cmu_slide):
    assert cmu.info.fingerprint != tcga.info.fingerprint
    assert len(cmu.info.fingerprint) >= 16 and int(cmu.info.fingerprint, 16) >= 0
    code = ("from nucleiflow.pipeline.slide.reader import open_slide; "
            f"print(open_slide({str(cmu_slide)!r}, mpp=0.3).info.fingerprint)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == cmu.info.fingerprint  # the mpp override is not the file


def _read_in_worker(reader, box):
    return reader.info.fingerprint, reader.read(*box)


def test_reader_pickles_and_reads_in_another_process(tcga):
    box = (2000, 1500, 64, 48, 4.0)
    copy = pickle.loads(pickle.dumps(tcga))
    assert copy.info == tcga.info and copy.info.mpp_source == "override"
    np.testing.assert_array_equal(copy.read(*box), tcga.read(*box))
    copy.close()
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        fp, out = pool.submit(_read_in_worker, tcga, box).result(timeout=120)
    assert fp == tcga.info.fingerprint
    np.testing.assert_array_equal(out, tcga.read(*box))


# --- Bad input: one clear line naming the file ----------------------------------------

def assert_one_line_error(path, *words, mpp=None):
    with pytest.raises(SlideError) as e:
        open_slide(path, mpp=mpp)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    for w in words:
        assert w in msg
    return msg


def test_missing_file(tmp_path):
    assert_one_line_error(tmp_path / "nope.svs", "not found")


def test_directory(tmp_path):
    assert_one_line_error(tmp_path, "directory")


def test_text_file_renamed_svs(tmp_path):
    p = tmp_path / "notes.svs"
    p.write_text("this is not a slide\n")
    assert_one_line_error(p, "not a slide")


def test_truncated_slide(tmp_path, cmu_slide):
    p = tmp_path / "cut.svs"
    data = cmu_slide.read_bytes()
    p.write_bytes(data[: int(len(data) * 0.3)])
    assert_one_line_error(p, "truncated")


def test_truncated_tiles_fail_at_open(tmp_path, cmu_slide, monkeypatch):
    # A file whose header is intact but whose tiles fail to decode must fail at open too.
    p = tmp_path / "copy.svs"
    shutil.copy(cmu_slide, p)

    def broken(self, location, level, size):
        raise openslide.OpenSlideError(f"Short read of file {p}")

    monkeypatch.setattr(openslide.OpenSlide, "read_region", broken)
    assert_one_line_error(p, "truncated", "Short read")


def test_no_mpp_needs_an_override(tcga_slide):
    assert_one_line_error(tcga_slide, "--mpp", "microns-per-pixel")
    assert_one_line_error(tcga_slide, "--mpp", "positive", mpp=-1.0)


def _fast_and_openslide(path, mpp=None):
    fast = slides.OpenSlideReader(path, mpp)
    slow = slides.OpenSlideReader.__new__(slides.OpenSlideReader)
    slow.fast_tiff = False  # the instance attribute shadows the class default
    slow.__init__(path, mpp)
    return fast, slow


@pytest.mark.parametrize("name", ["cmu", "mosaic", "zlib"])
def test_tiff_tiles_read_what_openslide_reads(name, cmu_slide, mosaic_tool, tmp_path):
    """Regions decoded straight from the TIFF tiles equal OpenSlide's, on JPEG (SVS RGB with
    JPEG tables; a generic YCbCr pyramid) and zlib tiles, at every level, across tile and
    slide edges, and in a pickled copy."""
    if name == "cmu":
        path = cmu_slide
    elif name == "mosaic":
        subprocess.run([sys.executable, str(mosaic_tool), str(cmu_slide.parents[1] / "monuseg"), "--split", "test",
                        "--cols", "2", "--rows", "2", "--seed", "1", "--no-labels", "--out", str(tmp_path / "m")],
                       check=True, stdout=subprocess.DEVNULL)
        path = tmp_path / "m.tiff"
    else:
        from slidefiles import write_tiff

        rgb = np.random.default_rng(0).integers(0, 256, (700, 900, 3), dtype=np.uint8)
        path = write_tiff(tmp_path / "z.tiff", rgb, 0.25)
    fast, slow = _fast_and_openslide(path)
    try:
        assert slow._tiles is None
        levels = sorted(fast._tiles.pages)
        assert levels == list(range(fast.info.level_count))  # every level of these files
        copy = pickle.loads(pickle.dumps(fast))
        rng = np.random.default_rng(1)
        w0, h0 = fast.info.width, fast.info.height
        for _ in range(6):
            x, y = int(rng.integers(-300, w0)), int(rng.integers(-300, h0))
            for mpp in (fast.info.mpp_x, 2 * fast.info.mpp_x, 4 * fast.info.mpp_x, 0.37):
                a = fast.read(x, y, 500, 333, mpp)
                np.testing.assert_array_equal(a, slow.read(x, y, 500, 333, mpp))
                np.testing.assert_array_equal(a, copy.read(x, y, 500, 333, mpp))
        copy.close()
    finally:
        fast.close()
        slow.close()


def test_tiff_tiles_cache_is_bounded_and_reads_the_same(tmp_path, monkeypatch):
    """Decoded tiles are kept for neighbouring windows (LRU, capped in bytes): overlapping
    reads equal OpenSlide's whether their tiles came from the cache or were decoded again."""
    from slidefiles import write_tiff

    from nucleiflow.pipeline.slide import tiff_tiles

    rgb = np.random.default_rng(2).integers(0, 256, (700, 900, 3), dtype=np.uint8)
    path = write_tiff(tmp_path / "z.tiff", rgb, 0.25)
    for cap in (0, 3 * 2**20, 64 * 2**20):
        monkeypatch.setattr(tiff_tiles, "CACHE_BYTES", cap)
        fast, slow = _fast_and_openslide(path)
        try:
            tiles = fast._tiles
            for x in (0, 150, 300, 450):  # windows overlapping their left-hand neighbour
                np.testing.assert_array_equal(fast.read(x, 100, 400, 400, 0.25), slow.read(x, 100, 400, 400, 0.25))
                assert tiles._cached == sum(t.nbytes for t in tiles._cache.values())
                assert tiles._cached <= max(cap, max(t.nbytes for t in tiles._cache.values()))
            if cap == 64 * 2**20:  # everything read so far is kept: a repeat decodes nothing
                before = dict(tiles._cache)
                fast.read(150, 100, 400, 400, 0.25)
                assert all(tiles._cache[k] is v for k, v in before.items())
        finally:
            fast.close()
            slow.close()
