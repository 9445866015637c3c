"""Group splits, the Hamming search and near-duplicate grouping (real LC25000 images)."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from pixgen.errors import InputError
from training.data import check_no_straddle, group_split, lc25000_grouped_split, near_duplicate_groups
from training.data import splits as sp
from training.data.folders import scan_image_folder


def test_group_split_keeps_groups_whole_and_follows_fractions():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 300, 5000).tolist()
    parts = group_split(groups, (0.7, 0.15, 0.15), seed=3)
    assert list(parts) == ["train", "val", "test"]
    assert sorted(i for v in parts.values() for i in v) == list(range(5000))
    owners = [{groups[i] for i in v} for v in parts.values()]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    sizes = [len(v) / 5000 for v in parts.values()]
    assert sizes == pytest.approx([0.7, 0.15, 0.15], abs=0.01)
    assert group_split(groups, (0.7, 0.15, 0.15), seed=3) == parts
    assert group_split(groups, (0.7, 0.15, 0.15), seed=4) != parts


def test_group_split_stratified_and_small():
    labels = [0] * 60 + [1] * 40
    groups = [i // 4 for i in range(100)]                            # groups never cross labels
    parts = group_split(groups, (0.5, 0.5), seed=0, stratify=labels)
    for v in parts.values():
        assert sum(labels[i] for i in v) == 20                          # 40 of label 1, halved
    tiny = group_split(["a", "b", "c"], (0.8, 0.1, 0.1), seed=0)
    assert all(len(v) == 1 for v in tiny.values())                    # every split gets a group
    with pytest.raises(InputError, match="sum to 1"):
        group_split(groups, (0.5, 0.6))


def test_check_no_straddle():
    check_no_straddle(["a", "a", "b"], {"train": [0, 1], "test": [2]})
    with pytest.raises(InputError, match="straddles"):
        check_no_straddle(["a", "a", "b"], {"train": [0], "test": [1, 2]})
    with pytest.raises(InputError, match="both"):
        check_no_straddle(["a", "b"], {"train": [0, 1], "test": [1]})


def test_banded_and_brute_force_search_agree():
    rng = np.random.default_rng(1)
    n, v = 400, 5
    index = rng.integers(0, 2**63, (n, v), dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, (n, v), dtype=np.uint64)
    query = index[:, 0].copy()
    for k in range(0, n, 10):                                     # plant near neighbours (5 bits off)
        bits = rng.choice(64, 5, replace=False)
        index[k + 1, 3] = query[k] ^ np.uint64(sum(1 << int(b) for b in bits))
    for radius in (0, 5, 7):
        banded = sp._banded_pairs(query, index, radius)
        d = np.bitwise_count(query[:, None, None] ^ index[None]).min(axis=2)
        np.fill_diagonal(d, 99)
        i, j = np.nonzero(d <= radius)
        assert sorted(zip(banded[0].tolist(), banded[1].tolist())) == sorted(zip(i.tolist(), j.tolist()))
    i, j, var = sp.hamming_pairs(query, index, 12)                  # brute-force path
    assert {(k, k + 1) for k in range(0, n, 10)} <= set(zip(i.tolist(), j.tolist()))
    assert all(var[(i == k) & (j == k + 1)][0] == 3 for k in range(0, n, 10))


def _variants(img: Image.Image) -> list[Image.Image]:
    """Flips, a 90-degree turn and LC25000-like rotations with reflected corners and a zoom."""
    from skimage.transform import rotate

    arr = np.asarray(img, dtype=np.float64) / 255.0
    out = [img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), img.transpose(Image.Transpose.ROTATE_90)]
    for angle, zoom in ((12, 1.15), (-23, 1.3)):
        rot = rotate(arr, angle, mode="reflect", order=1)
        h = arr.shape[0]
        c = int(round(h / zoom))
        o = (h - c) // 2
        crop = Image.fromarray((rot[o:o + c, o:o + c] * 255).astype(np.uint8))
        out.append(crop.resize((h, h), Image.Resampling.LANCZOS))
    return out


def test_near_duplicates_of_real_images_are_grouped(shared_data, tmp_path):
    sources = [shared_data / "lc25000-lung" / c / f for c, f in
               (("lung_n", "lungn1.jpeg"), ("lung_n", "lungn500.jpeg"), ("lung_aca", "lungaca7.jpeg"),
                ("lung_scc", "lungscc1200.jpeg"), ("lung_scc", "lungscc3001.jpeg"))]
    paths, owner = [], []
    for k, src in enumerate(sources):
        img = Image.open(src).convert("RGB")
        for v, var in enumerate([img, *_variants(img)]):
            p = tmp_path / f"{k}_{v}.jpeg"
            var.save(p, quality=90)
            paths.append(p)
            owner.append(k)
    groups = near_duplicate_groups(paths)
    for k in range(len(sources)):
        assert len({g for g, o in zip(groups, owner) if o == k}) == 1, f"copies of {sources[k].name} split apart"
    assert len(set(groups.tolist())) == len(sources)                   # and different images stay apart
    plain = near_duplicate_groups(paths, config=sp.NearDuplicateConfig(angle_step=90, zooms=(1.0,), radius=6))
    assert len(set(plain.tolist())) > len(sources)                    # dihedral-only pHash misses rotations


def test_grouped_split_on_an_lc25000_subset_and_cache(shared_data, tmp_path, monkeypatch):
    paths, labels, _ = scan_image_folder(shared_data / "lc25000-lung")
    pick = [i for i, p in enumerate(paths) if p.stem[-1] in "05"][:: 2][:1200]   # ~1200 images, 3 classes
    sub = [paths[i] for i in pick]
    lab = [labels[i] for i in pick]
    cache = tmp_path / "groups.json"
    t0 = time.perf_counter()
    groups = near_duplicate_groups(sub, lab, cache=cache)
    first = time.perf_counter() - t0
    sizes = np.bincount(groups)
    assert sizes.max() >= 3 and sizes.max() < 40 and len(sizes) < len(sub)   # copies found, no giant group
    assert all(len({lab[i] for i in np.nonzero(groups == g)[0]}) == 1 for g in range(len(sizes)))
    parts = group_split(groups.tolist(), (0.7, 0.15, 0.15), seed=0, stratify=lab)
    check_no_straddle(groups.tolist(), parts)

    calls = []
    monkeypatch.setattr(sp, "fingerprint_images", lambda *a, **k: calls.append(1) or pytest.fail("cache not used"))
    t0 = time.perf_counter()
    again = near_duplicate_groups(sub, lab, cache=cache)
    assert np.array_equal(again, groups) and time.perf_counter() - t0 < max(1.0, first / 5) and not calls


def test_cache_is_invalidated_by_changed_files(shared_data, tmp_path, monkeypatch):
    root = tmp_path / "lc"
    files = sorted((shared_data / "lc25000-lung" / "lung_n").glob("*.jpeg"))[:6]
    (root / "lung_n").mkdir(parents=True)
    for f in files:
        shutil.copy(f, root / "lung_n" / f.name)
    cache = tmp_path / "c.json"
    s1 = lc25000_grouped_split(root, (0.5, 0.5), seed=0, cache=cache)
    assert set(s1.splits) == {"train", "test"} and s1.groups_per_class()["lung_n"] == len(set(s1.groups.tolist()))
    target = root / "lung_n" / files[0].name
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    calls = []
    real = sp.fingerprint_images
    monkeypatch.setattr(sp, "fingerprint_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    lc25000_grouped_split(root, (0.5, 0.5), seed=0, cache=cache)
    assert calls == [1]                                                # recomputed after the mtime change
    lc25000_grouped_split(root, (0.5, 0.5), seed=0, cache=cache)
    assert calls == [1]                                                # and cached again


@pytest.mark.slow
def test_full_lc25000_grouping(shared_data, tmp_path):
    """All 14k images: on the order of 250 originals per class (see docs/data.md for the numbers)."""
    split = lc25000_grouped_split(shared_data / "lc25000-lung", cache=tmp_path / "g.json")
    check_no_straddle(split.groups.tolist(), split.splits)
    labels = np.array(split.labels)
    for c, name in enumerate(split.class_names):
        sizes = np.bincount(split.groups[labels == c])
        sizes = sizes[sizes > 0]
        assert 200 <= (sizes >= 10).sum() <= 300, name                  # the big groups = the originals
        assert sizes[sizes >= 10].sum() > 0.9 * sizes.sum() and sizes.max() < 80
