"""Image-folder dataset: the real LC25000 folder, target-size policies, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pixgen.errors import InputError
from training.data import ImageFolderDataset, fit_image, scan_image_folder


@pytest.fixture(scope="module")
def lc25000(shared_data):
    return shared_data / "lc25000-lung"


def test_lc25000_counts_labels_and_samples(lc25000, shared_data):
    manifest = json.loads((shared_data / "manifest.json").read_text())["lc25000-lung"]
    ds = ImageFolderDataset(lc25000, mpp=0.5)
    assert ds.classes == ["lung_aca", "lung_n", "lung_scc"]
    assert len(ds) == sum(manifest.values())
    counts = np.bincount(ds.labels)
    assert dict(zip(ds.classes, counts.tolist())) == manifest
    for i in (0, 5000, len(ds) - 1):
        s = ds[i]
        assert s["image"].dtype == np.uint8 and s["image"].shape == (224, 224, 3)
        assert s["class_name"] == ds.classes[s["label"]] and s["mpp"] == 0.5
        assert s["group"].startswith(s["class_name"] + "/") and s["path"].endswith(".jpeg")


def test_fit_policies_and_mpp(lc25000):
    crop = ImageFolderDataset(lc25000, mpp=0.5, size=200)[0]
    assert crop["image"].shape == (200, 200, 3) and crop["mpp"] == 0.5           # crop: no resampling
    full = ImageFolderDataset(lc25000, mpp=0.5)[0]["image"]
    assert np.array_equal(crop["image"], full[12:212, 12:212])                    # centred
    up = ImageFolderDataset(lc25000, mpp=0.5, size=256, fit="resize")[0]
    assert up["image"].shape == (256, 256, 3) and up["mpp"] == pytest.approx(0.5 * 224 / 256)
    with pytest.raises(InputError, match="smaller than the target size"):
        ImageFolderDataset(lc25000, mpp=0.5, size=256)[0]
    img, scale = fit_image(np.zeros((300, 400, 3), np.uint8), (100, 150), "resize")
    assert img.shape == (100, 150, 3) and scale == pytest.approx(150 / 400)   # covers, then crops


def test_tensor_output_and_dataloader(lc25000):
    ds = ImageFolderDataset(lc25000, mpp=0.5, size=64, as_tensor=True,
                            files=sorted((lc25000 / "lung_n").glob("*.jpeg"))[:4])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.uint8
    assert batch["label"].tolist() == [1] * 4 and batch["mpp"].tolist() == [0.5] * 4


def _write(path, arr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def test_layouts_groups_and_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    _write(tmp_path / "flat" / "a.png", rgb)
    _write(tmp_path / "flat" / "b.png", np.full((40, 50, 4), 200, np.uint8))                      # RGBA
    _write(tmp_path / "flat" / "c.png", (np.arange(2000, dtype=np.uint16) * 30).reshape(40, 50))  # 16-bit
    (tmp_path / "flat" / "notes.txt").write_text("ignored")
    flat = ImageFolderDataset(tmp_path / "flat", mpp=1.0)
    assert len(flat) == 3 and flat.classes == [] and flat[0]["label"] == -1 and flat[0]["group"] == "a"
    assert all(flat[i]["image"].shape == (40, 50, 3) and flat[i]["image"].dtype == np.uint8 for i in range(3))
    assert flat[2]["image"].max() > 200                                       # 16-bit scaled, not clipped

    _write(tmp_path / "cls" / "tumour" / "slideA" / "t1.png", rgb)
    _write(tmp_path / "cls" / "tumour" / "slideA" / "t2.png", rgb)
    _write(tmp_path / "cls" / "normal" / "n1.png", rgb)
    ds = ImageFolderDataset(tmp_path / "cls", mpp=0.25)
    assert ds.classes == ["normal", "tumour"] and ds.labels == [0, 1, 1]
    assert ds.groups == ["normal/n1", "tumour/slideA", "tumour/slideA"]
    named = ImageFolderDataset(tmp_path / "cls", mpp=0.25, groups=lambda p: p.stem[0])
    assert named.groups == ["n", "t", "t"]
    with pytest.raises(InputError, match="missing"):
        ImageFolderDataset(tmp_path / "cls", mpp=0.25, classes=["normal", "stroma"])
    with pytest.raises(InputError, match="mpp"):
        ImageFolderDataset(tmp_path / "cls", mpp=250)


def test_corrupt_files_raise_or_are_skipped(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    _write(tmp_path / "x" / "good.png", rgb)
    (tmp_path / "x" / "garbage.png").write_bytes(b"this is not an image")
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    good_jpeg = _write(tmp_path / "x" / "truncated.jpg", noise, quality=90).read_bytes()
    (tmp_path / "x" / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])  # header intact

    ds = ImageFolderDataset(tmp_path / "x", mpp=0.5)
    with pytest.raises(InputError, match="garbage.png") as err:
        ds[0]
    assert "\n" not in str(err.value) and "skip_bad" in str(err.value)

    with pytest.warns(UserWarning, match="garbage.png"):
        skipping = ImageFolderDataset(tmp_path / "x", mpp=0.5, skip_bad=True)
    assert [p.name for p in skipping.paths] == ["good.png", "truncated.jpg"]
    with pytest.warns(UserWarning, match="truncated.jpg"):
        s = skipping[1]                                       # fails at decode: next readable image
    assert s["path"].endswith("good.png") and skipping.bad_files[0].name == "truncated.jpg"


def test_scan_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        scan_image_folder(tmp_path / "empty")
