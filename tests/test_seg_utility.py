"""recipes.seg_utility end to end on tiny pairs: every arm trained and scored, identical data gives
identical segmenters (a zero difference), and a second run resumes instead of retraining."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from recipes.seg_utility import ARMS, main


def _tile(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A pale tile with dark discs and their instance map."""
    inst = np.zeros((size, size), np.uint16)
    yy, xx = np.mgrid[:size, :size]
    for k in range(1, 6):
        y, x = rng.integers(6, size - 6, 2)
        inst[((yy - y) ** 2 + (xx - x) ** 2 < 16) & (inst == 0)] = k
    image = np.full((size, size, 3), 225, np.uint8)
    image[inst > 0] = (70, 40, 110)
    return image, inst


def _folder(root: Path, n: int, size: int, seed: int, ext: str = ".png") -> None:
    rng = np.random.default_rng(seed)
    for sub in ("images", "inst", "types"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, inst = _tile(rng, size)
        Image.fromarray(image).save(root / "images" / f"t{i:02d}{ext}")
        Image.fromarray(inst).save(root / "inst" / f"t{i:02d}.png")
        Image.fromarray(((inst > 0) * 2).astype(np.uint8)).save(root / "types" / f"t{i:02d}.png")


def test_seg_utility_runs_every_arm_and_resumes(tmp_path, one_thread):
    data = tmp_path / "data"
    _folder(data / "consep" / "train", 10, 64, 0)  # 64 px at 0.25 um/px -> 32 px tiles at 0.5 um/px
    _folder(data / "consep" / "test", 4, 64, 1)
    _folder(data / "monuseg" / "test", 2, 64, 2)
    # the synthetic set = the real training tiles at 0.5 um/px, in the same order: synthetic-only
    # and real-only train on identical data with the same seed, so they must score identically
    from metrics.nuclei import load_training_tiles

    real = load_training_tiles(data, "train", sources=("consep",))["consep"]
    syn = tmp_path / "syn"
    for sub in ("images", "inst"):
        (syn / sub).mkdir(parents=True)
    for i, (im, inst) in enumerate(zip(real.images, real.instances)):
        Image.fromarray(im).save(syn / "images" / f"s{i:02d}.png")
        Image.fromarray(inst.astype(np.uint16)).save(syn / "inst" / f"s{i:02d}.png")
    work = tmp_path / "work"
    args = ["--data", str(data), "--work", str(work), "--synthetic", str(syn), "--steps", "3", "--crop", "32",
            "--batch-size", "2", "--n-boot", "20"]
    scores = main(args)

    assert scores["n_train"] == {"real": 10, "real10": 1, "synthetic": 10, "real10+synthetic": 11, "real+synthetic": 20}
    for test in ("consep", "monuseg"):
        arms = scores["test"][test]["arms"]
        assert set(arms) == set(ARMS)
        assert all(0 <= arms[a]["dice"]["value"] <= 1 for a in ARMS)
        same = scores["test"][test]["differences"]["synthetic - real"]
        assert same["dice"]["value"] == 0 and same["aji"]["value"] == 0 and same["dice"]["ci"] == [0, 0]
    assert json.loads((work / "scores.json").read_text())["test"]["consep"]["n_images"] == 4
    assert "| real10+synthetic - real10 |" in (work / "scores.md").read_text()

    stamp = {a: (work / "models" / a / "model.safetensors").stat().st_mtime_ns for a in ARMS}
    again = main(args)  # resumes: every model is found, none retrained
    assert {a: (work / "models" / a / "model.safetensors").stat().st_mtime_ns for a in ARMS} == stamp
    assert again["test"] == scores["test"]


def test_mixed_arms_balance_real_and_synthetic_by_repeating_the_smaller_set():
    from metrics.segmentation import MaskSet
    from recipes.seg_utility import _arm_data

    def tiles(prefix, n):
        return MaskSet([np.zeros((4, 4, 3), np.uint8)] * n, [np.zeros((4, 4), int)] * n, [f"{prefix}{i}" for i in range(n)])

    real, syn = tiles("r", 20), tiles("s", 40)
    pooled = _arm_data("real10+synthetic", real, syn, seed=0, mix="pooled")
    balanced = _arm_data("real10+synthetic", real, syn, seed=0, mix="balanced")
    assert len(pooled) == 42 and sum(p.startswith("r") for p in pooled.paths) == 2
    assert len(balanced) == 80 and sum(p.startswith("r") for p in balanced.paths) == 40  # 2 real tiles x 20
    assert sorted(set(p for p in balanced.paths if p.startswith("r"))) == sorted(set(p for p in pooled.paths if p.startswith("r")))
    assert len(_arm_data("real+synthetic", tiles("r", 80), syn, seed=0, mix="balanced")) == 160  # synthetic twice
    assert len(_arm_data("real+synthetic", tiles("r", 80), syn, seed=0)) == 120  # pooled by default
