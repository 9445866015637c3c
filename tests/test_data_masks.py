"""Nuclei-mask datasets on the real CoNSeP and MoNuSeg data, and the generic image+mask layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pixgen.errors import InputError
from training.data import CoNSePDataset, ImageMaskDataset, MoNuSegDataset, consep_source_id, group_split


@pytest.mark.parametrize("split,n_tiles,n_images", [("train", 432, 27), ("test", 224, 14)])
def test_consep_counts_dtypes_and_grouping(shared_data, split, n_tiles, n_images):
    ds = CoNSePDataset(shared_data / "consep", split)
    assert len(ds) == n_tiles and ds.has_types
    assert len(set(ds.source_ids)) == n_images
    for i in (0, n_tiles // 2, n_tiles - 1):
        s = ds[i]
        assert s["image"].shape == (256, 256, 3) and s["image"].dtype == np.uint8
        assert s["inst"].shape == (256, 256) and s["inst"].dtype == np.uint16
        assert s["types"].dtype == np.uint8 and s["types"].max() <= 4
        assert s["mask"].dtype == bool and np.array_equal(s["mask"], s["inst"] > 0)
        assert s["mpp"] == 0.25 and s["source_id"] == consep_source_id(s["image_id"]) == s["group"]
        ids = np.unique(s["inst"])[1:]
        assert ids.tolist() == list(range(1, len(ids) + 1))                # relabelled 1..N
        assert np.all(s["types"][s["mask"]] > 0)                            # every nucleus has a class


def test_consep_split_by_image_never_by_tile(shared_data):
    ds = CoNSePDataset(shared_data / "consep", "train")
    assert consep_source_id("train_10_003") == "train_10"
    parts = group_split(ds.source_ids, (0.8, 0.2), seed=1)
    train = {ds.source_ids[i] for i in parts["train"]}
    test = {ds.source_ids[i] for i in parts["test"]}
    assert train and test and not train & test


def test_monuseg_whole_images_and_provenance(shared_data):
    index = {e["id"]: e for e in json.loads((shared_data / "monuseg" / "index.json").read_text())}
    train, test = MoNuSegDataset(shared_data / "monuseg", "train"), MoNuSegDataset(shared_data / "monuseg", "test")
    assert (len(train), len(test)) == (30, 14) and not train.has_types
    s = test[0]
    assert s["image"].shape == (1000, 1000, 3) and s["inst"].shape == (1000, 1000)
    assert s["inst"].dtype == np.uint16 and "types" not in s and s["mpp"] == 0.25
    assert s["instances"] == index[s["image_id"]]["instances"]
    assert s["inst"].max() == index[s["image_id"]]["nuclei"]


def test_monuseg_grid_and_random_crops(shared_data):
    grid = MoNuSegDataset(shared_data / "monuseg", "test", crop=256, crop_mode="grid")
    assert len(grid) == 14 * 16                                      # 0, 256, 512, 744 on each axis
    origins = [grid[i]["origin"] for i in range(16)]
    assert origins[3] == (0, 744) and origins[-1] == (744, 744)
    whole = MoNuSegDataset(shared_data / "monuseg", "test")[0]
    c = grid[5]
    (y, x) = c["origin"]
    assert np.array_equal(c["image"], whole["image"][y:y + 256, x:x + 256])
    assert np.array_equal(c["mask"], whole["inst"][y:y + 256, x:x + 256] > 0)

    rnd = MoNuSegDataset(shared_data / "monuseg", "test", crop=200, crop_mode="random", crops_per_image=3, seed=7)
    assert len(rnd) == 42
    first = rnd[4]["origin"]
    assert rnd[4]["origin"] == first and rnd[4]["image"].shape == (200, 200, 3)   # deterministic
    rnd.set_epoch(1)
    assert rnd[4]["origin"] != first                                               # new crops each epoch
    with pytest.raises(InputError, match="larger than the image"):
        MoNuSegDataset(shared_data / "monuseg", "test", crop=2000)


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_generic_layout_binary_and_instance_masks(tmp_path):
    img = np.full((64, 64, 3), 180, np.uint8)
    binary = np.zeros((64, 64), np.uint8)
    binary[5:15, 5:15] = 255
    binary[30:40, 30:40] = 255
    inst = np.zeros((64, 64), np.uint16)
    inst[0:10, 0:10], inst[10:20, 0:10] = 7, 9                       # touching instances stay apart
    _save(tmp_path / "images" / "a.png", img)
    _save(tmp_path / "images" / "b.png", img)
    _save(tmp_path / "masks" / "a.png", binary)
    _save(tmp_path / "masks" / "b.png", inst)
    ds = ImageMaskDataset(tmp_path, mpp=0.5, source_id=lambda stem: "slide1")
    a, b = ds[0], ds[1]
    assert a["inst"].max() == 2 and a["inst"].dtype == np.uint16          # components of a binary mask
    assert b["inst"].max() == 2 and len(np.unique(b["inst"])) == 3
    assert a["source_id"] == b["source_id"] == "slide1" and "types" not in a
    crops = ImageMaskDataset(tmp_path, mpp=0.5, crop=32)
    assert len(crops) == 8 and crops[0]["image"].shape == (32, 32, 3)


def test_generic_layout_errors(tmp_path):
    img = np.zeros((16, 16, 3), np.uint8)
    for name in ("a", "b", "c"):
        _save(tmp_path / "images" / f"{name}.png", img)
    _save(tmp_path / "masks" / "a.png", np.zeros((16, 16), np.uint8))
    _save(tmp_path / "masks" / "z.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(InputError, match=r"2 in .*images without .*masks: b, c; 1 in .*masks without .*images: z"):
        ImageMaskDataset(tmp_path, mpp=0.5)
    (tmp_path / "masks" / "z.png").unlink()
    for name in ("b", "c"):
        _save(tmp_path / "masks" / f"{name}.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="instance map of b.png"):
        ImageMaskDataset(tmp_path, mpp=0.5)[1]
    with pytest.raises(InputError, match="no images/ folder"):
        ImageMaskDataset(tmp_path / "images", mpp=0.5)
