"""`outputs.chunk_pyramid`: chunk files byte for byte what zarr writes, and the pyramid built
while level 0 is written equal to the one reduced from disk."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from nucleiflow.pipeline.outputs.chunk_pyramid import ChunkFiles, Pyramid, mean2, nearest2
from nucleiflow.pipeline.outputs.omezarr import level_shapes


def _zarr_array(path, shape, chunks, dtype, codec):
    return zarr.open_group(str(path), mode="a", zarr_format=2).create_array(
        "a", shape=shape, chunks=chunks, dtype=dtype, fill_value=0, compressors=codec,
        chunk_key_encoding={"name": "v2", "separator": "/"}, config={"write_empty_chunks": True})


@pytest.mark.parametrize("dtype,codec", [("int32", ("zstd", 1, 2)), ("uint8", ("lz4", 0, 5))])
def test_chunk_files_are_the_bytes_zarr_writes(tmp_path, dtype, codec):
    import numcodecs

    blosc = numcodecs.Blosc(cname=codec[0], shuffle=codec[1], clevel=codec[2])
    rng = np.random.default_rng(3)
    data = rng.integers(0, 200, (40, 45)).astype(dtype)
    ref = _zarr_array(tmp_path / "ref", (40, 45), (16, 16), dtype, blosc)
    files = ChunkFiles(tmp_path / "new", (40, 45), (16, 16), dtype, blosc)
    for i in range(3):
        for j in range(3):
            block = data[16 * i : 16 * i + 16, 16 * j : 16 * j + 16]
            ref[16 * i : 16 * i + 16, 16 * j : 16 * j + 16] = block
            files.write(i, j, block[:, ::-1][:, ::-1])  # a strided view is fine too
            assert (tmp_path / "new" / str(i) / str(j)).read_bytes() == (tmp_path / "ref" / "a" / str(i) / str(j)).read_bytes()
            np.testing.assert_array_equal(files.read(i, j), block)  # edge chunks: their extent
    np.testing.assert_array_equal(files.region(5, 40, 7, 99), data[5:, 7:])
    files.delete(2, 2)
    assert files.read(2, 2).shape == (8, 13) and not files.read(2, 2).any()


def _reference_pyramid(level0, chunk, reduce):
    """Each level reduced from the whole level above, chunk by chunk as the old close did:
    (arrays, stored chunk keys per level); a chunk is stored iff its block above has a non-zero."""
    shapes = level_shapes(level0.shape, chunk)
    arrays, stored = [level0], [None]
    for shape in shapes[1:]:
        src, dst, keys = arrays[-1], np.zeros(shape, level0.dtype), set()
        ch, cw = min(chunk, shape[0]), min(chunk, shape[1])
        for i in range(0, shape[0], ch):
            for j in range(0, shape[1], cw):
                block = src[2 * i : 2 * (i + ch), 2 * j : 2 * (j + cw)]
                if block.any():
                    dst[i : i + ch, j : j + cw] = reduce(block)
                    keys.add((i // ch, j // cw))
        arrays.append(dst)
        stored.append(keys)
    return arrays, stored


@pytest.mark.parametrize("chunk,cap,order", [(16, 2**30, "rows"), (16, 2**30, "random"), (16, 1, "rows"),
                                             (15, 2**30, "random"), (8, 600, "random")])
@pytest.mark.parametrize("reduce", [mean2, nearest2])
def test_pyramid_built_while_writing_is_the_pyramid_reduced_from_disk(tmp_path, chunk, cap, order, reduce):
    """Chunks in any order, some never written (no tissue), some all zero, some written
    again after their parent was stored, odd chunks, parents stored early (cap): every level
    and the set of stored chunk files are those of reducing each finished level from disk."""
    import numcodecs

    rng = np.random.default_rng(chunk + cap)
    shape = (83, 70)
    final = np.where(rng.random(shape) < 0.3, rng.integers(1, 250, shape), 0).astype(np.uint8)
    final[: 2 * chunk, : 2 * chunk] = 0  # an all-zero parent
    final[-3:, :] = 0
    shapes = level_shapes(shape, chunk)
    codec = numcodecs.Blosc(cname="lz4", shuffle=0)
    levels = [ChunkFiles(tmp_path / str(k), s, (min(chunk, s[0]), min(chunk, s[1])), "uint8", codec)
              for k, s in enumerate(shapes)]
    pyr = Pyramid(levels, reduce, cap_bytes=cap)
    grid = levels[0].grid
    cells = [(i, j) for i in range(grid[0]) for j in range(grid[1])]
    if order == "random":
        cells = [cells[k] for k in rng.permutation(len(cells))]
    skip = cells[-1]  # never written: reads 0
    final[skip[0] * chunk : (skip[0] + 1) * chunk, skip[1] * chunk : (skip[1] + 1) * chunk] = 0
    for i, j in cells[:4]:  # first written with other content, written again at the end
        pyr.put(i, j, rng.integers(0, 250, levels[0].extent(i, j)).astype(np.uint8))
    for i, j in cells[:-1] + cells[:4]:
        pyr.put(i, j, final[i * chunk : (i + 1) * chunk, j * chunk : (j + 1) * chunk].copy())
    pyr.close()
    arrays, stored = _reference_pyramid(final, chunk, reduce)
    for k, lv in enumerate(levels):
        np.testing.assert_array_equal(lv.region(0, lv.shape[0], 0, lv.shape[1]), arrays[k], err_msg=f"level {k}")
        if k:
            files = {(int(i.name), int(j.name)) for i in (tmp_path / str(k)).glob("*") for j in i.glob("*")}
            assert files == stored[k], k


def test_mean2_on_uint8_is_the_rounded_float_mean():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 5), (64, 63), (255, 256)]:
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        a.ravel()[: min(a.size, 8)] = [0, 1, 2, 3, 254, 255, 127, 128][: min(a.size, 8)]
        b = np.pad(a, ((0, shape[0] % 2), (0, shape[1] % 2)), mode="edge").astype(np.float32)
        ref = np.round(b.reshape(b.shape[0] // 2, 2, b.shape[1] // 2, 2).mean(axis=(1, 3))).astype(np.uint8)
        np.testing.assert_array_equal(mean2(a), ref)
    ties = np.array([[0, 0, 1, 1, 2, 2], [1, 1, 2, 2, 3, 3]], np.uint8)  # means 0.5, 1.5, 2.5
    assert mean2(ties).tolist() == [[0, 2, 2]]
