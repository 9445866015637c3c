"""BCI and MIST loaders on tiny files written in the published layouts (no such data is local)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pixgen.errors import InputError
from training.data import BCIDataset, MISTDataset
from training.data.paired import bci_score


def _pair(he_path, ihc_path, seed, ext_size=48):
    rng = np.random.default_rng(seed)
    he = rng.integers(0, 255, (ext_size, ext_size, 3), dtype=np.uint8)
    for path, arr in ((he_path, he), (ihc_path, 255 - he)):          # IHC = inverted H&E: checkable alignment
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path, quality=100) if path.suffix == ".jpg" else Image.fromarray(arr).save(path)


@pytest.fixture
def bci(tmp_path):
    root = tmp_path / "BCI_dataset"
    for split, names in (("train", ["00000_train_1+", "00001_train_3+", "00002_train_0"]), ("test", ["00000_test_2+"])):
        for k, n in enumerate(names):
            _pair(root / "HE" / split / f"{n}.png", root / "IHC" / split / f"{n}.png", k)
    return root


@pytest.fixture
def mist(tmp_path):
    root = tmp_path / "MIST"
    for marker in ("HER2", "Ki67"):
        for split, n in (("train", 3), ("val", 2)):
            for k in range(n):
                d = root / marker / "TrainValAB"
                _pair(d / f"{split}A" / f"{marker}_{k}.jpg", d / f"{split}B" / f"{marker}_{k}.jpg", k)
    return root


def test_bci_pairs_scores_and_aligned_crops(bci):
    ds = BCIDataset(bci, "train", mpp=0.46)
    assert len(ds) == 3
    s = ds[1]
    assert s["he"].shape == s["ihc"].shape == (48, 48, 3) and s["he"].dtype == np.uint8
    assert s["name"] == "00001_train_3+" and s["score"] == "3+" and s["marker"] == "HER2" and s["mpp"] == 0.46
    assert np.array_equal(s["ihc"], 255 - s["he"])
    crops = BCIDataset(bci, "train", mpp=0.46, crop=16, crops_per_image=2, seed=3)
    c = crops[5]
    assert len(crops) == 6 and c["he"].shape == (16, 16, 3) and np.array_equal(c["ihc"], 255 - c["he"])
    grid = BCIDataset(bci, "test", mpp=0.46, crop=16, crop_mode="grid")
    assert len(grid) == 9 and grid[8]["origin"] == (32, 32)
    assert bci_score("00003_train_0") == "0" and bci_score("x") == ""


def test_bci_unmatched_names_are_listed(bci):
    (bci / "IHC" / "train" / "00001_train_3+.png").unlink()
    (bci / "IHC" / "train" / "00001_train_3+.png.bak").write_bytes(b"")
    Image.new("RGB", (48, 48)).save(bci / "IHC" / "train" / "99999_train_2+.png")
    with pytest.raises(InputError) as err:
        BCIDataset(bci, "train", mpp=0.46)
    msg = str(err.value)
    assert "00001_train_3+" in msg and "99999_train_2+" in msg and "\n" not in msg
    with pytest.raises(InputError, match="not a BCI folder"):
        BCIDataset(bci / "HE", "train", mpp=0.46)


def test_mist_markers_and_splits(mist):
    both = MISTDataset(mist, "train", mpp=0.5)
    assert len(both) == 6 and {both[i]["marker"] for i in range(6)} == {"HER2", "Ki67"}
    val = MISTDataset(mist, "val", markers="Ki67", mpp=0.5)
    s = val[0]
    assert len(val) == 2 and s["marker"] == "Ki67" and s["group"] == "Ki67/Ki67_0"
    assert np.abs(s["ihc"].astype(int) - (255 - s["he"].astype(int))).mean() < 8     # JPEG, so approximately
    with pytest.raises(InputError, match="ER"):
        MISTDataset(mist, "train", markers=["ER"], mpp=0.5)
    with pytest.raises(InputError, match="'train' or 'val'"):
        MISTDataset(mist, "test", mpp=0.5)
    (mist / "HER2" / "TrainValAB" / "valB" / "HER2_1.jpg").rename(mist / "HER2" / "TrainValAB" / "valB" / "other.jpg")
    with pytest.raises(InputError, match=r"valA without .*valB: HER2_1.*other"):
        MISTDataset(mist, "val", markers="HER2", mpp=0.5)


def test_mpp_is_required(bci):
    with pytest.raises(TypeError):
        BCIDataset(bci, "train")                                        # type: ignore[call-arg]
