"""Memorisation audit: is any synthetic image a (near) copy of a training image?

Each synthetic sample's nearest-neighbour (NN) distance to the training set, in a detector's
feature space, is compared with the baseline distribution of real held-out (test) images'
NN distances to the same training set: a real image the generator never saw is "this close"
to the training data by chance. A synthetic sample is a suspect when BOTH

- its NN distance is below the ``quantile`` (default 1st percentile) of the real baseline, and
- its NN distance is below ``max_ratio`` (default 1/3) times the baseline's median

so a slightly "too typical" sample is not flagged, but a copy (distance ~0) always is.

Example:
    >>> rng = np.random.default_rng(0)
    >>> train, test = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    >>> synthetic = np.concatenate([rng.normal(size=(50, 8)), train[:3]])   # 3 planted copies
    >>> memorisation_audit(synthetic, train, test)["suspects"]
    [50, 51, 52]
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.neighbors import NearestNeighbors

from metrics.stats import mean_estimate, warn_if_small

__all__ = ["nn_distances", "memorisation_audit"]


def nn_distances(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query row to its nearest reference row, and that row's index."""
    nn = NearestNeighbors(n_neighbors=1).fit(np.asarray(reference, np.float64))
    dist, idx = nn.kneighbors(np.asarray(queries, np.float64))
    return dist[:, 0], idx[:, 0]


def memorisation_audit(
    synthetic: np.ndarray,
    train: np.ndarray,
    real_test: np.ndarray,
    quantile: float = 0.01,
    max_ratio: float = 1 / 3,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Flag synthetic samples that sit closer to a training image than real held-out images do.

    Returns a dict with the suspects' indices (sorted by distance), every synthetic sample's NN
    distance and NN training index, the baseline distances, the threshold, and
    ``frac_below_quantile`` (expected ~``quantile`` for a generator that does not memorise).
    """
    warn_if_small(
        "memorisation audit", len(real_test), int(np.ceil(10 / quantile)),
        f"the {quantile:.0%} quantile of the real baseline rests on fewer than 10 samples",
    )
    d_syn, nn_idx = nn_distances(synthetic, train)
    d_base, _ = nn_distances(real_test, train)
    threshold = float(np.quantile(d_base, quantile))
    median = float(np.median(d_base))
    ratio = d_syn / max(median, 1e-12)
    flagged = np.flatnonzero((d_syn < threshold) & (ratio < max_ratio))
    flagged = flagged[np.argsort(d_syn[flagged], kind="stable")]
    return {
        "suspects": [int(i) for i in flagged],
        "nn_distance": d_syn,
        "nn_train_index": nn_idx,
        "ratio_to_baseline_median": ratio,
        "baseline_distance": d_base,
        "threshold": threshold,
        "baseline_median": median,
        "quantile": quantile,
        "max_ratio": max_ratio,
        "frac_below_quantile": mean_estimate(d_syn < threshold, n_boot, seed),
    }
