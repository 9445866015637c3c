"""Fidelity metrics: FD, KID, precision/recall/density/coverage, C2ST, bootstrap, warnings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg

from metrics.detectors import RandomConvDetector, compute_features
from metrics.fidelity import c2st, conditional_fidelity, fd_estimate, frechet_distance, kid, kid_estimate, prdc
from metrics.images import colour_matched_noise, image_crops, load_image_folder
from metrics.stats import SmallSampleWarning, bootstrap_ci
from pixgen.errors import InputError


@pytest.fixture(scope="module")
def lc_tiles(shared_data):
    """200 LC25000 tiles (seeded, class-stratified) as HWC uint8 arrays."""
    return load_image_folder(shared_data / "lc25000-lung", max_images=200, seed=1)


@pytest.fixture(scope="module")
def lc_feats(lc_tiles):
    return compute_features(RandomConvDetector(seed=0), lc_tiles.images)


def _fd_reference(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook formula with scipy.linalg.sqrtm (what pytorch-fid computes)."""
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("n,d", [(400, 8), (300, 64), (40, 128)])  # N > D, N > D, N < D
def test_fd_matches_sqrtm_formula(n, d):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n + 5, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm complains on singular products
        ref = _fd_reference(x, y)
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_noise(lc_tiles):
    """Additive Gaussian noise of increasing sigma on real tiles, through the random-conv detector."""
    det = RandomConvDetector(seed=0)
    images = lc_tiles.images[:64]
    real = compute_features(det, images)
    rng = np.random.default_rng(0)
    fds = []
    for sigma in (0, 4, 8, 16, 32):
        noisy = [np.clip(im + rng.normal(0, sigma, im.shape), 0, 255).astype(np.uint8) for im in images] if sigma else images
        fds.append(frechet_distance(real, compute_features(det, noisy)))
    assert fds[0] == pytest.approx(0.0, abs=1e-9)
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


def test_kid_is_about_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, _ = kid(a, b, subset_size=200, n_subsets=50)
    shifted, _ = kid(a, b + 0.5, subset_size=200, n_subsets=50)
    assert abs(same) < shifted / 20
    est = kid_estimate(a, b, n_boot=50)
    assert est["ci"][0] < 0 < est["ci"][1]  # unbiased: the interval straddles 0


def _naive_prdc(real, fake, k):
    """Straight from the definitions, with loops (the hand computation)."""
    def radius(points, i):
        d = sorted(np.linalg.norm(points[i] - points[j]) for j in range(len(points)) if j != i)
        return d[k - 1]

    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, j) for j in range(len(fake))]
    dist = lambda a, b: float(np.linalg.norm(a - b))  # noqa: E731
    precision = np.mean([any(dist(f, r) <= r_real[i] for i, r in enumerate(real)) for f in fake])
    recall = np.mean([any(dist(r, f) <= r_fake[j] for j, f in enumerate(fake)) for r in real])
    density = sum(dist(f, r) <= r_real[i] for f in fake for i, r in enumerate(real)) / (k * len(fake))
    coverage = np.mean([min(dist(r, f) for f in fake) <= r_real[i] for i, r in enumerate(real)])
    return precision, recall, density, coverage


def test_prdc_on_a_hand_computed_example():
    # real radii (k=1) are all 2; fake (1,0) sits in two real balls, (0,3) in one, (10,10) in none
    real = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    fake = np.array([[1.0, 0.0], [10.0, 10.0], [0.0, 3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        r = prdc(real, fake, k=1, n_boot=0)
    assert r["precision"]["value"] == pytest.approx(2 / 3)
    assert r["recall"]["value"] == pytest.approx(1.0)  # the outlier's huge ball covers everything
    assert r["density"]["value"] == pytest.approx(1.0)  # (2 + 0 + 1) / (1 * 3)
    assert r["coverage"]["value"] == pytest.approx(1.0)


def test_prdc_matches_the_definitions_on_2d_gaussians():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 2))
    fake = rng.normal(size=(50, 2)) * 1.5 + [0.7, 0.0]
    r = prdc(real, fake, k=3, n_boot=20)
    expected = _naive_prdc(real, fake, 3)
    got = tuple(r[m]["value"] for m in ("precision", "recall", "density", "coverage"))
    assert got == pytest.approx(expected)
    assert r["precision"]["ci"][0] <= r["precision"]["value"] <= r["precision"]["ci"][1]


def test_c2st_is_chance_for_two_halves_of_real_data_and_perfect_against_noise(lc_tiles, lc_feats):
    perm = np.random.default_rng(0).permutation(len(lc_feats))
    halves = c2st(lc_feats[perm[:100]], lc_feats[perm[100:]], n_boot=100)
    assert 0.38 < halves["value"] < 0.62
    assert halves["ci"][0] < 0.5 < halves["ci"][1]
    noise = compute_features(RandomConvDetector(seed=0), colour_matched_noise(lc_tiles.images[:100]))
    assert c2st(lc_feats[:100], noise, n_boot=0)["value"] > 0.95


def test_bootstrap_is_seeded_and_fd_interval_contains_the_estimate():
    x = np.arange(50.0)
    assert bootstrap_ci(lambda i: x[i].mean(), [50], seed=3) == bootstrap_ci(lambda i: x[i].mean(), [50], seed=3)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(80, 4)), rng.normal(size=(80, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        est = fd_estimate(a, b, n_boot=50)
    assert est["ci"][0] <= est["value"] <= est["ci"][1]


def test_small_samples_warn():
    rng = np.random.default_rng(0)
    with pytest.warns(SmallSampleWarning, match="rank-deficient"):
        fd_estimate(rng.normal(size=(20, 64)), rng.normal(size=(20, 64)), n_boot=0)
    with pytest.warns(SmallSampleWarning, match=">= 500"):
        fd_estimate(rng.normal(size=(100, 8)), rng.normal(size=(100, 8)), n_boot=0)


def test_conditional_fidelity_scale():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32)) * 3
    labels = np.repeat([0, 1, 2], 40)
    real = centres[labels] + rng.normal(size=(120, 32))
    cond = real[:30]
    generated = cond + rng.normal(size=cond.shape) * 0.3  # close to their conditions
    r = conditional_fidelity(generated, cond, real, labels, n_boot=20)
    assert r["cos_generated_condition"]["value"] > r["cos_real_same_class"]["value"] > r["cos_real_random_pairs"]["value"]


def test_crop_fd_inputs():
    big = [np.zeros((600, 520, 3), np.uint8)]
    assert len(image_crops(big, 256, mode="grid")) == 4  # 2 x 2; the rest is dropped
    crops = image_crops(big, 256, mode="random", per_image=5, seed=0)
    assert len(crops) == 5 and all(c.shape == (256, 256, 3) for c in crops)


def test_a_synthetic_set_loads_the_files_its_manifest_declares(tmp_path):
    from pixgen.io import Condition, ImageEntry, ModelId, SamplerSettings, SetManifest, SetWriter

    writer = SetWriter.create(tmp_path, SetManifest(ModelId("m"), SamplerSettings(2, 1.0, "Euler", 8, 2)))
    for i, colour in enumerate((200, 30)):
        writer.add(np.full((16, 16, 3), colour, np.uint8), ImageEntry(f"{i:04d}.png", i, Condition("bank", f"x[{i}]")))
    (tmp_path / "stray.png").write_bytes((tmp_path / "0000.png").read_bytes())  # not part of the set
    with pytest.raises(InputError, match="incomplete"):
        load_image_folder(tmp_path)
    writer.finish()
    s = load_image_folder(tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in map(str, s.paths)] == ["0000.png", "0001.png"]  # no sheet, no stray
