"""Mask adherence scores: an oracle segmenter scores 1, a blind one scores near 0, folders read as written."""

from __future__ import annotations

import numpy as np
from PIL import Image

from metrics.adherence import relative, score_folder, score_pairs


def _pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An image whose dark discs are exactly the mask's nuclei."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((32, 32), np.uint16)
    yy, xx = np.mgrid[:32, :32]
    for k, (y, x) in enumerate(np.array([(8, 8), (8, 24), (24, 16)]) + rng.integers(-2, 3, (3, 2)), start=1):
        inst[(yy - y) ** 2 + (xx - x) ** 2 < 9] = k  # separate discs
    image = np.full((32, 32, 3), 220, np.uint8)
    image[inst > 0] = 60
    return image, inst


def _dark(image: np.ndarray) -> np.ndarray:
    from skimage.measure import label

    return label(image[..., 0] < 128, connectivity=1)


def test_an_oracle_scores_one_and_a_blind_segmenter_zero():
    images, masks = zip(*[_pair(s) for s in range(6)])
    good = score_pairs(_dark, list(images), list(masks), n_boot=20)
    assert good["dice"]["value"] == 1.0 and good["aji"]["value"] == 1.0 and good["n"] == 6
    shifted = score_pairs(lambda im: _dark(np.roll(im, 16, axis=1)), list(images), list(masks), n_boot=20)
    assert shifted["dice"]["value"] < 0.3 and shifted["aji"]["value"] < 0.3
    assert relative(0.6, 0.2, 0.7) == 0.8 and np.isnan(relative(0.5, 0.5, 0.5))


def test_score_folder_reads_a_paired_set(tmp_path):
    for sub in ("images", "inst"):
        (tmp_path / sub).mkdir()
    for s in range(3):
        image, inst = _pair(s)
        Image.fromarray(image).save(tmp_path / "images" / f"t{s}.png")
        Image.fromarray(inst).save(tmp_path / "inst" / f"t{s}.png")
    assert score_folder(_dark, tmp_path, n_boot=10)["dice"]["value"] == 1.0


def test_the_bundled_segmenter_follows_real_nuclei_and_not_blank_tissue(shared_data):
    from metrics.adherence import bundled_segmenter

    name = "test_1_000"  # a CoNSeP test tile at 0.25 um/px, brought to the segmenter's 0.5 um/px
    image = np.asarray(Image.open(shared_data / "consep" / "test" / "images" / f"{name}.jpg").convert("RGB").resize(
        (128, 128), Image.LANCZOS))
    inst = np.asarray(Image.open(shared_data / "consep" / "test" / "inst" / f"{name}.png").resize((128, 128), Image.NEAREST))
    segment = bundled_segmenter()
    scores = score_pairs(segment, [image, np.full_like(image, 235)], [inst, np.zeros_like(inst)], n_boot=0)
    assert segment(image).max() > 0 and segment(np.full_like(image, 235)).max() == 0
    assert scores["dice"]["value"] > 0.3  # one real tile (its segmenter scores Dice 0.76 on the test split)


def _square_map(centres: list[tuple[int, int, int]], size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Instance and class maps of 3 x 3 nuclei at (row, col) with a class each."""
    inst, cls = np.zeros((size, size), np.int64), np.zeros((size, size), np.int64)
    for k, (y, x, c) in enumerate(centres, start=1):
        inst[y - 1 : y + 2, x - 1 : x + 2], cls[y - 1 : y + 2, x - 1 : x + 2] = k, c
    return inst, cls


def test_per_class_f1_is_exact_on_a_hand_made_case():
    from metrics.nuclei import typed_scores

    # truth: two inflammatory (2), one epithelial (3), one spindle (4)
    gt = _square_map([(5, 5, 2), (5, 20, 2), (20, 5, 3), (20, 20, 4)])
    # found: the first inflammatory 1 px off (right type), the second typed epithelial, the
    # epithelial missed, the spindle exact, and a false "other" (1) far from every true nucleus
    pred = _square_map([(6, 5, 2), (5, 21, 3), (20, 20, 4), (28, 28, 1)])
    s = typed_scores([pred], [gt[0]], [gt[1]], n_types=4, radius=6, n_boot=0)
    f1 = {k: v["value"] for k, v in s["f1"].items()}
    # detection 2*3 / (2*3 + 1 + 1); F_c = 2 tp_c / (2 (tp_c + fp_c + fn_c) + fp_d + fn_d)
    assert f1 == {"detection": 0.75, "other": 0.0, "inflammatory": 0.5, "epithelial": 0.0, "spindle-shaped": 1.0}
    assert s["n_true"] == {"other": 0, "inflammatory": 2, "epithelial": 1, "spindle-shaped": 1}
    from metrics.nuclei import typed_counts, typed_difference

    perfect, found = typed_counts([gt], [gt[0]], [gt[1]]), typed_counts([pred], [gt[0]], [gt[1]], radius=6)
    diff = typed_difference(found, perfect, n_boot=0)  # paired: found minus a perfect segmentation
    assert diff["detection"]["value"] == -0.25 and diff["inflammatory"]["value"] == -0.5 and diff["other"] is None
    far = typed_scores([_square_map([(13, 5, 2), (5, 21, 3), (20, 20, 4), (28, 28, 1)])], [gt[0]], [gt[1]], radius=6, n_boot=0)
    assert far["f1"]["inflammatory"]["value"] == 0.0  # 8 px from its nucleus: beyond the radius, unpaired
    assert far["f1"]["detection"]["value"] == 0.5  # 2*2 / (4 + 2 + 2)


def test_type_scores_need_class_maps_and_a_type_head(tmp_path):
    import pytest

    from metrics.adherence import score_types
    from metrics.nuclei import NucleiSegmenter
    from metrics.segmentation import TinyUNet
    from pixgen.errors import InputError

    for sub in ("images", "inst"):
        (tmp_path / sub).mkdir()
    image, inst = _pair(0)
    Image.fromarray(image).save(tmp_path / "images" / "t.png")
    Image.fromarray(inst).save(tmp_path / "inst" / "t.png")
    with pytest.raises(InputError, match="no class maps"):
        score_types(NucleiSegmenter(TinyUNet(out_channels=6)), tmp_path)
    with pytest.raises(InputError, match="no type head"):
        NucleiSegmenter(TinyUNet(out_channels=2)).classify([image])


def test_the_typed_segmenter_types_real_nuclei(shared_data):
    from metrics.adherence import typed_segmenter
    from metrics.nuclei import TYPE_NAMES, typed_scores

    seg = typed_segmenter()  # the bundled metrics/weights/nuclei-types
    assert seg.n_types == 4 and seg.info["outputs"][2:] == [f"type:{n}" for n in TYPE_NAMES]
    name, d = "test_5_010", shared_data / "consep" / "test"  # 54 nuclei: 4 inflammatory, 22 epithelial, 28 spindle
    image = np.asarray(Image.open(d / "images" / f"{name}.jpg").convert("RGB").resize((128, 128), Image.LANCZOS))
    inst, types = (np.asarray(Image.open(d / sub / f"{name}.png").resize((128, 128), Image.NEAREST)).astype(np.int64)
                   for sub in ("inst", "types"))
    pred_inst, pred_cls = seg.classify([image])[0]
    assert set(np.unique(pred_cls)) <= {0, 1, 2, 3, 4} and np.array_equal(pred_cls > 0, pred_inst > 0)
    f1 = {k: v["value"] for k, v in typed_scores([(pred_inst, pred_cls)], [inst], [types], n_boot=0)["f1"].items() if v}
    # measured on this tile (2026-12-05): detection 0.587, epithelial 0.300, spindle 0.366, inflammatory 0.316
    assert f1["detection"] > 0.45 and f1["epithelial"] > 0.2 and f1["spindle-shaped"] > 0.25
    blank = typed_scores(seg.classify([np.full_like(image, 235)]), [inst], [types], n_boot=0)["f1"]
    assert blank["detection"]["value"] == 0 and blank["spindle-shaped"]["value"] == 0
