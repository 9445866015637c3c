"""Fidelity metrics on feature sets: Frechet distance, KID, precision/recall, density/coverage,
the classifier two-sample test, and conditional fidelity.

All functions take ``(N, D)`` feature arrays (one row per image, from a detector in
``metrics.detectors``) and are plain numpy / scipy / scikit-learn. The ``*_estimate``
functions add a seeded bootstrap interval and warn (``SmallSampleWarning``) when ``N`` is too
small for the number to mean much.

Example:
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(500, 8)), rng.normal(size=(500, 8))
    >>> round(frechet_distance(a, a), 6)
    0.0
    >>> frechet_distance(a, b + 1.0) > frechet_distance(a, b)
    True
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist
from threadpoolctl import threadpool_limits

from metrics.stats import Estimate, estimate, mean_estimate, warn_if_small
from pixgen.errors import InputError

__all__ = [
    "frechet_distance",
    "fd_estimate",
    "kid",
    "kid_estimate",
    "prdc",
    "c2st",
    "conditional_fidelity",
]


# ---------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------


def _trace_sqrt_product(xc: np.ndarray, yc: np.ndarray) -> float:
    """``tr sqrt(S1 S2)`` for ``S1 = xc.T @ xc`` and ``S2 = yc.T @ yc`` (scaled, centred rows).

    Why this form and not ``scipy.linalg.sqrtm(S1 @ S2)``: ``S1 S2`` is not symmetric, sqrtm
    on it returns complex round-off and, for rank-deficient covariances (N < D), can fail to
    converge; it is also slow (a Schur decomposition). Instead we use that for any factor
    ``S1 = F F^T`` the eigenvalues of ``S1 S2`` are those of the symmetric PSD matrix
    ``F^T S2 F``, so ``tr sqrt(S1 S2) = sum(sqrt(eigvalsh(F^T S2 F)))`` -- one symmetric
    eigenvalue problem, exact and stable. With ``F = xc.T`` that matrix is the small
    ``N1 x N1`` Gram matrix ``(xc yc^T)(xc yc^T)^T`` (used when N < D); otherwise ``F`` is the
    Cholesky factor of ``S1`` (``D x D``; eigen-square-root if ``S1`` is singular).
    """
    n1, d = xc.shape
    if n1 < d:
        m = xc @ yc.T  # (N1, N2)
        sym = m @ m.T  # (N1, N1)
    else:
        s1 = xc.T @ xc  # (D, D)
        try:
            f = np.linalg.cholesky(s1)
        except np.linalg.LinAlgError:  # singular covariance (constant features)
            w, v = np.linalg.eigh(s1)
            f = v * np.sqrt(np.clip(w, 0, None))
        g = yc @ f  # (N2, D); F^T S2 F = g^T g
        sym = g.T @ g
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(sym), 0, None)).sum())


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID when the features are
    Inception pool3): ``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)``.

    Covariances are unbiased (``N - 1``). The value is biased upward at finite N: compare only
    numbers computed at the same N (the report's calibration rows are).

    Example:
        >>> x = np.random.default_rng(0).normal(size=(100, 4))
        >>> round(frechet_distance(x, x + np.array([3.0, 0, 0, 0])), 6)
        9.0
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need two (N, D) feature arrays of equal D, got {x.shape} and {y.shape}")
    if min(len(x), len(y)) < 2:  # a covariance needs two rows; an InputError so the CLI prints one line
        raise InputError(f"a Frechet distance needs at least 2 images per set, got {len(x)} and {len(y)}",
                         fix="evaluate at least 2 real and 2 synthetic images (hundreds for a number that means much)")
    mu_x, mu_y = x.mean(0), y.mean(0)
    xc = (x - mu_x) / np.sqrt(len(x) - 1)  # S1 = xc.T @ xc
    yc = (y - mu_y) / np.sqrt(len(y) - 1)
    trace_term = (xc**2).sum() + (yc**2).sum() - 2 * _trace_sqrt_product(xc, yc)
    return float(max(((mu_x - mu_y) ** 2).sum() + trace_term, 0.0))


def fd_estimate(x: np.ndarray, y: np.ndarray, n_boot: int = 200, seed: int = 0) -> Estimate:
    """Frechet distance with a bootstrap interval (both sets resampled with replacement).

    Resampling duplicates rows, which (like a smaller N) inflates FD: the replicates sit above
    the estimate, often entirely so at small N, and a percentile interval would not contain
    it. So the interval is the normal one, ``FD +- 1.96 sd(replicates)`` (lower end clipped at
    0): the bootstrap gives the spread, the estimate the centre.
    """
    n, d = min(len(x), len(y)), np.shape(x)[1]
    if not warn_if_small("FD", n, d, f"the covariance of D={d} features is rank-deficient; FD is dominated by small-sample bias"):
        warn_if_small("FD", n, 500, "FID-style numbers need >= 500 (better >= 5000) images; compare only at equal N")
    est = estimate(frechet_distance(x, y), lambda i, j: frechet_distance(x[i], y[j]), [len(x), len(y)], n_boot, seed, normal=True)
    est["ci"][0] = max(est["ci"][0], 0.0)
    return est


# ---------------------------------------------------------------------------------------------
# Kernel inception distance (unbiased MMD^2, cubic polynomial kernel)
# ---------------------------------------------------------------------------------------------


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``k(a, b) = (a . b / D + 1) ** 3`` (Binkowski et al. 2018)."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _mmd2_from_kernels(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, i: np.ndarray, j: np.ndarray) -> float:
    """Unbiased MMD^2 on rows ``i`` of x and ``j`` of y of precomputed kernels.

    Within-set sums skip pairs that are the same original sample (the diagonal, and the
    duplicates a bootstrap resample creates), which keeps the U-statistic unbiased.
    """
    def within(k: np.ndarray, idx: np.ndarray) -> float:
        keep = idx[:, None] != idx[None, :]
        return float(k[np.ix_(idx, idx)][keep].mean())

    return within(kxx, i) + within(kyy, j) - 2 * float(kxy[np.ix_(i, j)].mean())


def kid(x: np.ndarray, y: np.ndarray, subset_size: int = 1000, n_subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance: mean and std of the unbiased MMD^2 over random subsets.

    Subsets of ``min(subset_size, len(x), len(y))`` rows are drawn without replacement (as in
    Binkowski et al. and torchmetrics). KID is unbiased: ~0 (it can be slightly negative) for
    two samples of one distribution.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> abs(kid(rng.normal(size=(300, 16)), rng.normal(size=(300, 16)))[0]) < 0.01
        True
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    m = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_subsets):
        xs = x[rng.choice(len(x), m, replace=False)]
        ys = y[rng.choice(len(y), m, replace=False)]
        idx = np.arange(m)
        values.append(_mmd2_from_kernels(_poly_kernel(xs, xs), _poly_kernel(ys, ys), _poly_kernel(xs, ys), idx, idx))
        if m == len(x) == len(y):  # every subset is the whole set
            break
    return float(np.mean(values)), float(np.std(values))


def kid_estimate(
    x: np.ndarray, y: np.ndarray, n_boot: int = 200, seed: int = 0, subset_size: int = 1000, n_subsets: int = 100
) -> Estimate:
    """KID with a bootstrap interval (kernels computed once, on at most 2000 rows per set).

    Above 2000 rows the interval comes from a random 2000-row subset, so it is conservative.
    """
    warn_if_small("KID", min(len(x), len(y)), 50, "the subset MMD estimates are very noisy")
    value, std = kid(x, y, subset_size, n_subsets, seed)
    rng = np.random.default_rng(seed)
    xs = np.asarray(x, np.float64)[rng.permutation(len(x))[:2000]]
    ys = np.asarray(y, np.float64)[rng.permutation(len(y))[:2000]]
    kxx, kyy, kxy = _poly_kernel(xs, xs), _poly_kernel(ys, ys), _poly_kernel(xs, ys)
    est = estimate(value, lambda i, j: _mmd2_from_kernels(kxx, kyy, kxy, i, j), [len(xs), len(ys)], n_boot, seed)
    est["subset_std"] = std  # type: ignore[typeddict-unknown-key]
    return est


# ---------------------------------------------------------------------------------------------
# Improved precision / recall (Kynkaanniemi et al. 2019), density / coverage (Naeem et al. 2020)
# ---------------------------------------------------------------------------------------------


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    d = cdist(x, x)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 3, n_boot: int = 200, seed: int = 0) -> dict[str, Estimate]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` with k-NN balls.

    - precision: share of fake samples inside some real k-NN ball (are fakes realistic?)
    - recall: share of real samples inside some fake k-NN ball (is the real variety covered?)
    - density: mean number of real balls holding a fake sample, / k (~1 for matched sets;
      > 1 when fakes crowd dense real regions)
    - coverage: share of real samples whose own ball holds at least one fake sample

    The intervals resample the evaluated samples with the k-NN balls held fixed.

    Example (two points; real balls have radius 1 around 0 and 1):
        >>> r = prdc(np.array([[0.0], [1.0]]), np.array([[0.5], [5.0]]), k=1, n_boot=0)
        >>> r["precision"]["value"], r["coverage"]["value"]
        (0.5, 1.0)
    """
    real = np.asarray(real, np.float64)
    fake = np.asarray(fake, np.float64)
    warn_if_small("precision/recall", min(len(real), len(fake)), 10 * k, f"k-NN balls (k={k}) on so few samples are not meaningful")
    r_real, r_fake = _knn_radii(real, k), _knn_radii(fake, k)
    d = cdist(real, fake)  # (N_real, N_fake)
    inside_real = d <= r_real[:, None]  # fake j in the ball of real i
    per_sample = {
        "precision": inside_real.any(axis=0),
        "recall": (d <= r_fake[None, :]).any(axis=1),
        "density": inside_real.sum(axis=0) / k,
        "coverage": (d.min(axis=1) <= r_real),
    }
    return {name: mean_estimate(v, n_boot, seed) for name, v in per_sample.items()}


# ---------------------------------------------------------------------------------------------
# Classifier two-sample test
# ---------------------------------------------------------------------------------------------


def c2st(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, n_boot: int = 200, c: float = 0.1) -> Estimate:
    """Classifier two-sample test: held-out accuracy of a logistic regression telling x from y.

    Both sets are first subsampled to the same size (chance = 50 %). Features are standardised
    inside each fold; accuracy pools the held-out predictions of a stratified ``folds``-fold
    cross-validation. 0.5 = indistinguishable, 1.0 = perfectly separable.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> c2st(rng.normal(size=(200, 4)), rng.normal(size=(200, 4)) + 5, n_boot=0)["value"]
        1.0
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    n = min(len(x), len(y))
    warn_if_small("C2ST", n, 20, "too few samples per side for a cross-validated classifier")
    folds = max(2, min(folds, n))
    feats = np.concatenate([x[rng.permutation(len(x))[:n]], y[rng.permutation(len(y))[:n]]])
    target = np.repeat([0, 1], n)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    # Small L-BFGS problems: multithreaded BLAS only adds overhead (measured 25x slower on a
    # loaded 2-core machine), so the fits run single-threaded.
    with threadpool_limits(limits=1, user_api="blas"):
        pred = cross_val_predict(model, feats, target, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return mean_estimate(pred == target, n_boot, seed)


# ---------------------------------------------------------------------------------------------
# Conditional fidelity
# ---------------------------------------------------------------------------------------------


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return (a * b).sum(axis=1)


def conditional_fidelity(
    generated: np.ndarray,
    conditions: np.ndarray,
    real: np.ndarray | None = None,
    real_labels: np.ndarray | None = None,
    n_pairs: int = 2000,
    seed: int = 0,
    n_boot: int = 200,
) -> dict[str, Estimate]:
    """Does each generated image match its conditioning embedding?

    ``generated[i]`` is the embedding (same encoder as the conditions) of the image generated
    from ``conditions[i]``. Reference scale from real images: the cosine of random same-class
    real pairs (what "same kind of tissue" looks like) and of random real pairs of any class.

    Example:
        >>> e = np.eye(3)
        >>> conditional_fidelity(e, e, n_boot=0)["cos_generated_condition"]["value"]
        1.0
    """
    out = {"cos_generated_condition": mean_estimate(_cosine_rows(generated, conditions), n_boot, seed)}
    if real is None:
        return out
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(real), n_pairs), rng.integers(0, len(real), n_pairs)
    keep = i != j
    out["cos_real_random_pairs"] = mean_estimate(_cosine_rows(real[i[keep]], real[j[keep]]), n_boot, seed)
    if real_labels is not None:
        same, classes = [], np.unique(real_labels)
        for cls in classes:
            idx = np.flatnonzero(real_labels == cls)
            if len(idx) < 2:
                continue
            a, b = rng.choice(idx, n_pairs // len(classes)), rng.choice(idx, n_pairs // len(classes))
            same.append(_cosine_rows(real[a[a != b]], real[b[a != b]]))
        if same:
            out["cos_real_same_class"] = mean_estimate(np.concatenate(same), n_boot, seed)
    return out
