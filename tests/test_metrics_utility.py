"""Downstream utility (TSTR, augmentation) and segmentation scores (Dice, AJI)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from metrics.detectors import RandomConvDetector, compute_features
from metrics.images import load_image_folder
from metrics.segmentation import MaskSet, aji, dice, instances_from_probability
from metrics.stats import SmallSampleWarning
from metrics.utility import classification_scores, classification_utility, segmentation_utility


@pytest.fixture(scope="module")
def lc_sets(shared_data):
    full = load_image_folder(shared_data / "lc25000-lung", max_images=180, seed=2)
    train, test = full.subset(np.arange(0, 180, 2)), full.subset(np.arange(1, 180, 2))
    det = RandomConvDetector(seed=0)
    feats = {"train": compute_features(det, train.images), "test": compute_features(det, test.images)}
    return train, test, feats


def test_tstr_with_real_as_synthetic_reproduces_the_real_baseline(lc_sets):
    train, test, feats = lc_sets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        res = classification_utility(
            train, test, synthetic=train, features={**feats, "synthetic": feats["train"]},
            learners=["linear-probe"], fractions=(0.1, 1.0), n_boot=50,
        )
    tstr = res["tstr"]["linear-probe"]
    for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert tstr["train_on_synthetic"][metric] == tstr["train_on_real"][metric]
    assert tstr["train_on_real"]["accuracy"]["value"] > 0.6  # three classes: chance is 1/3
    assert [r["n_real"] for r in res["augmentation"]["linear-probe"]] == [9, 90]


def test_small_cnn_runs_end_to_end(lc_sets):
    train, test, _ = lc_sets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        res = classification_utility(None, test.subset(range(30)), train.subset(range(30)), learners=["small-cnn"], cnn_steps=3, n_boot=10)
    scores = res["tstr"]["small-cnn"]["train_on_synthetic"]
    assert 0.0 <= scores["accuracy"]["value"] <= 1.0 and res["augmentation"] == {}


def test_classification_scores_by_hand():
    s = classification_scores(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]), n_boot=0)
    assert s["accuracy"]["value"] == 0.75
    assert s["balanced_accuracy"]["value"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["macro_f1"]["value"] == pytest.approx((0.8 + 2 / 3) / 2)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_scores_agree_with_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 4, 200), rng.integers(0, 5, 200)  # a predicted class absent from t
    s = classification_scores(t, p, n_boot=0)
    assert s["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(t, p))
    assert s["macro_f1"]["value"] == pytest.approx(f1_score(t, p, labels=np.unique(t), average="macro", zero_division=0))


def _squares(shape, boxes):
    m = np.zeros(shape, int)
    for k, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        m[y0:y1, x0:x1] = k
    return m


def test_aji_and_dice_on_hand_made_instance_maps():
    gt = _squares((12, 12), [(0, 4, 0, 4), (6, 10, 6, 10)])  # two 4x4 nuclei
    # exact match, shifted by one column (overlap 12, union 20), one 2x2 false positive
    pred = _squares((12, 12), [(0, 4, 0, 4), (6, 10, 7, 11), (0, 2, 10, 12)])
    assert aji(gt, pred) == pytest.approx((16 + 12) / (16 + 20 + 4))
    assert dice(pred > 0, gt > 0) == pytest.approx(2 * 28 / (32 + 36))
    # one prediction merging both nuclei: matched twice, its area counted twice (Kumar et al.)
    merged = _squares((12, 12), [(0, 10, 0, 10)])
    assert aji(gt, merged) == pytest.approx((16 + 16) / (100 + 100))
    # a missed nucleus adds its area to the union only
    assert aji(gt, _squares((12, 12), [(0, 4, 0, 4)])) == pytest.approx(16 / 32)
    assert aji(gt, gt) == 1.0 and np.isnan(aji(np.zeros((4, 4)), np.zeros((4, 4))))
    assert dice(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0


def test_instances_from_probability_splits_components_and_drops_specks():
    prob = np.zeros((10, 10))
    prob[0:4, 0:4] = prob[6:9, 0:5] = 0.9
    prob[9, 9] = 0.9  # a 1-pixel speck
    inst = instances_from_probability(prob, min_size=5)
    assert inst.max() == 2 and inst[9, 9] == 0


def test_segmentation_utility_runs_on_consep(shared_data):
    from metrics.segmentation import load_mask_folder

    def corner(s: MaskSet) -> MaskSet:  # 64 px corners keep the test fast on a CPU
        return MaskSet([im[:64, :64] for im in s.images], [m[:64, :64] for m in s.instances], s.paths)

    train = corner(load_mask_folder(shared_data / "consep" / "train", max_images=6, seed=0))
    test = corner(load_mask_folder(shared_data / "consep" / "test", max_images=3, seed=0))
    syn = MaskSet(train.images[:2], train.instances[:2], train.paths[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        res = segmentation_utility(train, test, syn, steps=2, n_boot=10)
    for key in ("real", "real+synthetic"):
        assert 0.0 <= res[key]["dice"]["value"] <= 1.0
        assert 0.0 <= res[key]["aji"]["value"] <= 1.0 or np.isnan(res[key]["aji"]["value"])
