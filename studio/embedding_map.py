"""The Explore page's map: real and synthetic images in one detector's feature space, clustered,
to see which kinds of real tissue the synthetic set covers and which it misses (in the spirit of
DendroMap: clusters of a hierarchy, browsed by their thumbnails).

Features come from :mod:`metrics.detectors` (the same spaces the evaluation reports use);
clusters are Ward's hierarchical clustering of the joint features; the 2-D map is their PCA.

Example:
    >>> m = embedding_map(real_images, syn_images, get_detector("random-conv"), clusters=8)   # doctest: +SKIP
    >>> m.table()[0]["real"], m.table()[0]["synthetic"]                                          # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EmbeddingMap", "embedding_map", "thumbnail_uri"]


@dataclass
class EmbeddingMap:
    """``xy`` (N, 2) map coordinates, ``cluster`` (N,) ids, ``synthetic`` (N,) flags; rows are the
    real images then the synthetic ones, in the order given."""

    xy: np.ndarray
    cluster: np.ndarray
    synthetic: np.ndarray

    def table(self) -> list[dict[str, Any]]:
        """Per cluster: real and synthetic counts and the synthetic share relative to the whole set's
        (``coverage`` 1 = as many synthetic images as the set's mix predicts, 0 = none: a mode the
        generator misses; well above 1: over-produced), sorted from least to most covered."""
        expected = self.synthetic.mean()
        rows = []
        for c in np.unique(self.cluster):
            inside = self.cluster == c
            syn, real = int(self.synthetic[inside].sum()), int((~self.synthetic[inside]).sum())
            rows.append({"cluster": int(c), "real": real, "synthetic": syn,
                         "coverage": round(float(syn / inside.sum() / expected), 2) if expected > 0 else 0.0})
        return sorted(rows, key=lambda r: (r["coverage"], -r["real"]))


def embedding_map(real: Sequence[np.ndarray], synthetic: Sequence[np.ndarray], detector: Any, clusters: int = 8,
                  batch_size: int = 32) -> EmbeddingMap:
    """Embed both sets (HWC uint8 images) with ``detector``, cluster them together, map to 2-D."""
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.decomposition import PCA

    from metrics.detectors import compute_features
    from pixgen.errors import InputError

    if len(real) < 2 or len(synthetic) < 1:
        raise InputError(f"the map needs at least 2 real and 1 synthetic images, got {len(real)} and {len(synthetic)}")
    feats = compute_features(detector, [*real, *synthetic], batch_size=batch_size)
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-8)
    k = max(1, min(clusters, len(feats) - 1))
    labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(feats)
    xy = PCA(n_components=2, random_state=0).fit_transform(feats)
    flags = np.r_[np.zeros(len(real), bool), np.ones(len(synthetic), bool)]
    return EmbeddingMap(xy, labels, flags)


def thumbnail_uri(image: np.ndarray, size: int = 64) -> str:
    """A small PNG data URI of ``image``, for chart tooltips."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).resize((size, size)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
