"""Data set reading, resampling, validation split and the training patch sampler."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.draw import disk

from nucleiflow.pipeline.train.datasets import AnnotatedDataset, load_image, read_splits, resample_labels, validation_split
from nucleiflow.pipeline.train.sampler import PatchSampler, UnlabelledTiles, tiles
from nucleiflow.pipeline.train.targets import hv_maps

MONUSEG_TRAIN = ["TCGA-18-5592-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1"]


def _write_set(root, names_splits, size=(48, 64), mpp=0.25, columns=("name", "split", "mpp")):
    """A tiny data set in the shared layout: pink images with purple discs as nuclei."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    with (root / "splits.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for name, split in names_splits:
            img = np.full(size + (3,), (230, 170, 210), np.uint8)
            lab = np.zeros(size, np.uint16)
            for i in range(1, 6):
                rr, cc = disk((rng.integers(6, size[0] - 6), rng.integers(6, size[1] - 6)), 5, shape=size)
                lab[rr, cc] = i
                img[rr, cc] = (120, 60, 160)
            Image.fromarray(img).save(root / "images" / f"{name}.png")
            Image.fromarray(lab).save(root / "labels" / f"{name}.png")
            w.writerow({"name": name, "split": split, "mpp": mpp}.get(c, "x") for c in columns)
    return root


@pytest.fixture
def tiny(tmp_path):
    return _write_set(tmp_path / "tiny", [("a", "train"), ("b", "train"), ("c", "test")])


@pytest.fixture(scope="module")
def monuseg(shared_data):
    return shared_data / "monuseg"


@pytest.fixture(scope="module")
def real_set(monuseg):
    return AnnotatedDataset(monuseg, MONUSEG_TRAIN, mpp=0.5)


def test_read_splits_records(tiny):
    recs = read_splits(tiny)
    assert [(r.name, r.split, r.mpp) for r in recs] == [("a", "train", 0.25), ("b", "train", 0.25), ("c", "test", 0.25)]
    assert recs[0].image_path == tiny / "images" / "a.png" and recs[0].label_path.is_file()


def test_read_splits_names_file_and_missing_column(tmp_path):
    root = _write_set(tmp_path / "bad", [("a", "train")], columns=("name", "split", "resolution"))
    with pytest.raises(ValueError, match=r"splits\.csv.*mpp"):
        read_splits(root)
    with pytest.raises(FileNotFoundError, match="splits.csv"):
        read_splits(tmp_path)


def test_read_splits_rejects_bad_mpp(tmp_path):
    root = _write_set(tmp_path / "bad", [("a", "train")], mpp="n/a")
    with pytest.raises(ValueError, match="line 2.*mpp"):
        read_splits(root)


def test_resample_labels_by_pixel_centres():
    inst = np.array([[1, 1, 2, 2],
                     [1, 1, 2, 2],
                     [3, 3, 0, 4],
                     [3, 3, 0, 0]])
    # Halving picks pixels (1,1),(1,3),(3,1),(3,3): nucleus 4 vanishes, the rest keep ids.
    out = resample_labels(inst, (2, 2))
    np.testing.assert_array_equal(out, [[1, 2], [3, 0]])
    assert out.dtype == np.int32
    gap = np.array([[0, 5], [9, 9]])  # ids come back consecutive
    np.testing.assert_array_equal(resample_labels(gap, (4, 4)), np.kron([[0, 1], [2, 2]], np.ones((2, 2))))


def test_load_tiny_image_at_half_resolution(tiny):
    rgb, inst = load_image(read_splits(tiny)[0], mpp=0.5)
    assert rgb.shape == (24, 32, 3) and rgb.dtype == np.uint8
    assert inst.shape == (24, 32) and inst.dtype == np.int32
    assert inst.max() == len(np.unique(inst)) - 1


def test_load_real_monuseg_at_half_resolution(monuseg):
    recs = {r.name: r for r in read_splits(monuseg)}
    for name in MONUSEG_TRAIN:
        rgb, inst = load_image(recs[name], mpp=0.5)
        assert rgb.shape == (500, 500, 3) and inst.shape == (500, 500)
        with Image.open(recs[name].label_path) as lab:
            n_full = int(np.array(lab).max())
        assert 0.95 * n_full <= inst.max() <= n_full
        np.testing.assert_array_equal(np.unique(inst), np.arange(inst.max() + 1))


def test_validation_split_is_deterministic_disjoint_and_train_only(monuseg):
    recs = read_splits(monuseg)
    train_recs = [r for r in recs if r.split == "train"]
    tr, va = validation_split(train_recs, 0.2, seed=0)
    assert len(va) == 6 and len(tr) == 24
    assert {r.name for r in tr}.isdisjoint(r.name for r in va)
    assert {r.name for r in tr + va} == {r.name for r in train_recs}
    assert [r.name for r in validation_split(train_recs, 0.2, seed=0)[1]] == [r.name for r in va]
    assert {r.name for r in validation_split(train_recs, 0.2, seed=1)[1]} != {r.name for r in va}
    with pytest.raises(ValueError, match="test"):
        validation_split(recs)


def test_validation_split_edge_cases(tiny):
    train = [r for r in read_splits(tiny) if r.split == "train"]
    tr, va = validation_split(train, 0.01)
    assert len(tr) == 1 and len(va) == 1  # always at least one of each
    with pytest.raises(ValueError, match="at least 2"):
        validation_split(train[:1])
    with pytest.raises(ValueError, match="fraction"):
        validation_split(train, 1.0)


def test_dataset_selects_by_split_or_name(tiny):
    assert [r.name for r in AnnotatedDataset(tiny, "train", 0.25).records] == ["a", "b"]
    recs = read_splits(tiny)
    ds = AnnotatedDataset(tiny, [recs[2], "a"], 0.25, cache=False)
    assert [r.name for r in ds.records] == ["c", "a"]
    item = ds[1]
    assert item["image"].shape == (48, 64, 3) and item["hv"].shape == (2, 48, 64)
    with pytest.raises(KeyError, match="nope"):
        AnnotatedDataset(tiny, ["nope"], 0.25)
    with pytest.raises(ValueError, match="val"):
        AnnotatedDataset(tiny, "val", 0.25)


def test_sampler_shapes_and_dtypes(real_set):
    b = PatchSampler(real_set, patch=128, seed=0).sample(3)
    assert b["image"].shape == (3, 3, 128, 128) and b["image"].dtype == torch.float32
    assert 0 <= b["image"].min() and b["image"].max() <= 1
    assert b["mask"].shape == (3, 1, 128, 128) and b["marker"].shape == (3, 1, 128, 128)
    assert b["hv"].shape == (3, 2, 128, 128) and b["hv"].abs().max() <= 1
    assert all(b[k].dtype == torch.float32 for k in ("mask", "hv", "marker"))
    assert set(b) == {"image", "mask", "hv", "marker"}
    assert (b["marker"] <= b["mask"]).all() and b["mask"].sum() > 0


def test_sampler_is_seeded(real_set):
    a = PatchSampler(real_set, patch=64, seed=5).sample(4)
    b = PatchSampler(real_set, patch=64, seed=5).sample(4)
    c = PatchSampler(real_set, patch=64, seed=6).sample(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["image"], c["image"])


def test_sampler_augmentation_keeps_hv_consistent(real_set):
    b = PatchSampler(real_set, patch=96, seed=1).sample(8, with_inst=True)
    checked = 0
    for inst, hv, mask in zip(b["inst"].numpy(), b["hv"].numpy(), b["mask"].numpy()):
        np.testing.assert_array_equal(mask[0], inst > 0)
        # Nuclei cut by the crop keep their whole-image centroid; compare the others.
        cut = np.unique(np.concatenate([inst[0], inst[-1], inst[:, 0], inst[:, -1]]))
        whole = (inst > 0) & ~np.isin(inst, cut)
        np.testing.assert_allclose(hv[:, whole], hv_maps(inst)[:, whole], atol=1e-5)
        checked += whole.sum()
    assert checked > 1000


def test_unaugmented_patches_are_plain_crops(real_set):
    b = PatchSampler(real_set, patch=64, seed=2, augment=False, stain_augment=False).sample(2)
    img = (b["image"].numpy() * 255).round().astype(np.uint8)
    full = [np.moveaxis(real_set[i]["image"], -1, 0) for i in range(len(real_set))]
    for patch in img:  # each patch occurs somewhere in one of the images
        found = False
        for f in full:
            ys, xs = np.nonzero((f[0] == patch[0, 0, 0]) & (f[1] == patch[1, 0, 0]) & (f[2] == patch[2, 0, 0]))
            found |= any(np.array_equal(f[:, y:y + 64, x:x + 64], patch) for y, x in zip(ys, xs))
        assert found


def test_unlabelled_patches(real_set):
    arrays = [real_set[0]["image"][:100, :80]]  # smaller than the patch: zero-padded
    s = PatchSampler(real_set, patch=96, seed=0, unlabelled=arrays)
    b = s.sample(2)
    assert b["unlabelled"].shape == (2, 3, 96, 96) and b["unlabelled"].dtype == torch.float32
    only = UnlabelledTiles(arrays, patch=32, rng=3).sample(5)
    assert set(only) == {"image"} and only["image"].shape == (5, 3, 32, 32)
    with pytest.raises(ValueError):
        UnlabelledTiles([])


def test_tiles_cover_each_image_in_fixed_order(real_set):
    batches = list(tiles(real_set, patch=256, batch_size=3))
    assert [len(b["image"]) for b in batches] == [3, 3, 2]  # 2 images x starts {0, 244}^2
    first = batches[0]
    np.testing.assert_array_equal(first["hv"][0].numpy(), real_set[0]["hv"][:, :256, :256])
    np.testing.assert_array_equal(first["mask"][1, 0].numpy(), real_set[0]["mask"][:256, 244:500])
    again = next(tiles(real_set, patch=256, batch_size=3))
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_tiles_pad_small_images(tiny):
    ds = AnnotatedDataset(tiny, ["a"], 0.25)
    (b,) = list(tiles(ds, patch=80))
    assert b["image"].shape == (1, 3, 80, 80)
    assert b["mask"][0, 0, 48:].sum() == 0 and b["mask"][0, 0, :48, :64].sum() == ds[0]["mask"].sum()



# -- several data sets, grouped validation, robustness augmentations ----------------------
def test_validation_split_holds_out_whole_patients(shared_data):
    recs = [r for r in read_splits(shared_data / "tnbc", group_by="patient") if r.split == "train"]
    train, val = validation_split(recs, fraction=0.2, seed=0)
    assert {r.group for r in train}.isdisjoint({r.group for r in val})
    assert len(val) >= round(0.2 * len(recs)) and len(train) + len(val) == len(recs)
    assert validation_split(recs, fraction=0.2, seed=0) == (train, val)


def test_read_splits_group_column_must_exist(tiny):
    with pytest.raises(ValueError, match="patient"):
        read_splits(tiny, group_by="patient")


def test_sampler_draws_from_each_data_set_by_weight(real_set, shared_data):
    tnbc = AnnotatedDataset(shared_data / "tnbc", ["tnbc_01_1", "tnbc_02_1"], mpp=0.5)
    s = PatchSampler([real_set, tnbc], patch=64, seed=0, weights=[1, 3])
    s.sample(40)
    assert sum(s.counts) == 40 and s.counts[1] > s.counts[0] > 0
    only = PatchSampler([real_set, tnbc], patch=64, seed=0, weights=[0, 1])
    only.sample(5)
    assert only.counts == [0, 5]
    with pytest.raises(ValueError, match="weights"):
        PatchSampler([real_set, tnbc], weights=[1])


def test_scale_blur_jpeg_focus_keep_targets_consistent(real_set):
    from nucleiflow.pipeline.train.augment import AugmentConfig

    aug = AugmentConfig(scale=0.2, blur_p=1.0, jpeg_p=1.0, focus=1.0)
    b = PatchSampler(real_set, patch=96, seed=3, aug=aug).sample(8, with_inst=True)
    assert b["image"].shape == (8, 3, 96, 96) and b["hv"].abs().max() <= 1.0
    assert set(b["mask"].unique().tolist()) <= {0.0, 1.0}
    # Nearest resampling keeps masks and instances in step; focus puts nuclei in every patch.
    assert torch.equal(b["mask"][:, 0] > 0, b["inst"] > 0)
    assert (b["mask"].flatten(1).sum(1) > 0).all()
    plain = PatchSampler(real_set, patch=96, seed=3, aug=AugmentConfig()).sample(8)
    assert not torch.equal(plain["image"], b["image"])


def test_resize_patch_and_degrade_shapes():
    from nucleiflow.pipeline.train.augment import AugmentConfig, degrade, resize_patch

    img = np.random.default_rng(0).integers(0, 255, (3, 120, 120), dtype=np.uint8)
    inst = np.zeros((120, 120), np.int32)
    inst[10:40, 10:40] = 7
    out_img, out = resize_patch(img, {"inst": inst}, 100)
    assert out_img.shape == (3, 100, 100) and out_img.dtype == np.uint8
    assert set(np.unique(out["inst"])) == {0, 7} and 600 < (out["inst"] == 7).sum() < 650
    rng = np.random.default_rng(1)
    deg = degrade(img, rng, AugmentConfig(blur_p=1.0, jpeg_p=1.0))
    assert deg.shape == img.shape and deg.dtype == np.uint8 and deg.std() < img.std()
    assert degrade(img, rng, AugmentConfig()) is img  # nothing asked, nothing done
