"""Memorisation audit: planted copies of training images are flagged, nothing else is."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from metrics.detectors import RandomConvDetector, compute_features
from metrics.memorisation import memorisation_audit
from metrics.segmentation import load_mask_folder
from metrics.stats import SmallSampleWarning


@pytest.fixture(scope="module")
def consep(shared_data):
    """CoNSeP tiles: train and test come from different source images (no near-copies across)."""
    train = load_mask_folder(shared_data / "consep" / "train", max_images=120, seed=0).images
    test = load_mask_folder(shared_data / "consep" / "test", max_images=160, seed=0).images
    return train, test


def test_planted_copies_are_flagged_and_nothing_else(consep):
    train, test = consep
    planted_from = [5, 40, 77]
    synthetic = test[100:160] + [train[i].copy() for i in planted_from]  # 60 unseen + 3 copies
    det = RandomConvDetector(seed=0)
    f_train, f_test, f_syn = (compute_features(det, s) for s in (train, test[:100], synthetic))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)  # 100 baseline samples for a 1 % quantile
        audit = memorisation_audit(f_syn, f_train, f_test, n_boot=20)
    assert audit["suspects"] == [60, 61, 62]
    assert audit["nn_train_index"][[60, 61, 62]].tolist() == planted_from
    assert (audit["nn_distance"][60:] < 1e-5 * audit["baseline_median"]).all()  # float32 round-off
    # a few unseen tiles from other source slides also fall below the 1 % quantile of the
    # baseline; the ratio rule (< 1/3 of the median distance) is what keeps them off the list
    assert audit["frac_below_quantile"]["value"] > 3 / 63


def test_a_sample_just_below_the_quantile_but_not_close_is_not_flagged():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(300, 8)), rng.normal(size=(1000, 8))
    audit = memorisation_audit(rng.normal(size=(500, 8)), train, test, n_boot=0)
    # some genuine samples fall below the 1 % quantile by chance; the ratio rule keeps them out
    assert (audit["nn_distance"] < audit["threshold"]).sum() >= 1
    assert audit["suspects"] == []
