"""Random nuclei layouts that look like the training masks: unlimited (image, mask) pairs without
drawing.

:func:`fit_stats` summarises training layouts per tissue in a small JSON-able dict (stored as
``mask_stats.json`` next to the mask model), measured on the model's grid (128 px at 0.5 um/px):

* ``tiles``: per training tile, the nucleus count and class mix (fractions of classes 1..4), an
  empirical joint distribution (a tile is mostly one class in CoNSeP; counts vary 10x);
* ``shape``: per class, mean / std of log area and of the minor/major axis ratio (ellipse fits);
* ``nn_distance``: quantiles of the centre-to-nearest-centre distance (spacing), and
  ``min_gap``: the smallest gap allowed when placing (its 2nd percentile).

:class:`MaskSampler` draws a tile row (count, mix), then places jittered ellipses one by one at
uniform random centres, rejecting a nucleus that overlaps another or sits closer than
``min_gap``; each image's layout depends only on (seed, index).

Example:
    >>> sampler = MaskSampler.from_json("pixgen/weights/pixgen-masks/mask_stats.json", "consep")  # doctest: +SKIP
    >>> layout = sampler.sample(seed=0); layout.inst.max() > 0                                      # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from skimage.draw import polygon as fill_polygon
from skimage.measure import regionprops
from scipy.spatial import cKDTree

from pixgen.errors import InputError
from pixgen.masks import CLASSES, Layout, check_layout, downsample_layout

__all__ = ["fit_stats", "layout_stats", "MaskSampler"]

QUANTILES = np.linspace(0, 1, 21)


def layout_stats(inst: np.ndarray, types: np.ndarray | None) -> dict[str, Any]:
    """Per-layout measurements: ``count``, ``mix`` (class fractions 1..4, or None), ``major``,
    ``ratio``, ``cls`` (per nucleus), ``nn`` (nearest-centre distances), ``area``."""
    inst, types_ = check_layout(inst, types)
    props = regionprops(inst.astype(np.int32))
    cls = [int(np.bincount(types_[p.coords[:, 0], p.coords[:, 1]]).argmax()) for p in props]
    centres = np.array([p.centroid for p in props]).reshape(-1, 2)
    nn = cKDTree(centres).query(centres, k=2)[0][:, 1] if len(centres) > 1 else np.zeros(0)
    typed = types is not None and any(cls)
    mix = (np.bincount(cls, minlength=len(CLASSES))[1:] / max(len(cls), 1)).tolist() if typed else None
    return {"count": len(props), "mix": mix, "cls": cls, "nn": nn.tolist(), "area": [float(p.area) for p in props],
            "major": [max(float(p.axis_major_length), 1.0) for p in props],
            "ratio": [min(max(float(p.axis_minor_length), 1.0) / max(float(p.axis_major_length), 1.0), 1.0) for p in props]}


def fit_stats(layouts: Iterable[dict[str, Any]], factor: int = 2, size: int = 128, mpp: float = 0.5) -> dict[str, Any]:
    """Statistics per tissue of layouts (dicts with ``inst``, ``types`` or None, ``tissue``) after
    nearest-neighbour downsampling by ``factor`` to ``size`` px at ``mpp``.

    Example:
        >>> fit_stats(recipes.mask_controlnet.train_layouts(data))["consep"]["tiles"][:1]   # doctest: +SKIP
        [[23, 0.0, 0.3, 0.7, 0.0]]
    """
    per: dict[str, dict[str, list]] = {}
    for item in layouts:
        inst, types = downsample_layout(item["inst"], item["types"], factor)
        s = layout_stats(inst, types)
        acc = per.setdefault(item["tissue"], {"tiles": [], "area": {}, "ratio": {}, "nn": []})
        acc["tiles"].append([s["count"], *([round(v, 3) for v in s["mix"]] if s["mix"] else [])])
        for c, m, r in zip(s["cls"], s["area"], s["ratio"]):
            acc["area"].setdefault(c, []).append(m)
            acc["ratio"].setdefault(c, []).append(r)
        acc["nn"] += s["nn"]
    out: dict[str, Any] = {"size": size, "mpp": mpp, "classes": list(CLASSES)}
    for tissue, acc in per.items():
        nn = np.asarray(acc["nn"])
        out[tissue] = {
            "tiles": acc["tiles"], "typed": any(len(t) > 1 for t in acc["tiles"]),
            "shape": {str(c): {"log_area": [float(np.mean(np.log(v))), float(np.std(np.log(v)))],
                               "ratio": [float(np.mean(acc["ratio"][c])), float(np.std(acc["ratio"][c]))]}
                      for c, v in sorted(acc["area"].items())},
            "nn_distance": np.quantile(nn, QUANTILES).round(3).tolist() if nn.size else [],
            "min_gap": float(np.quantile(nn, 0.02)) if nn.size else 0.0,
        }
    return out


class MaskSampler:
    """Draw layouts of one tissue from :func:`fit_stats` statistics (see the module docstring).

    Example:
        >>> MaskSampler(stats, "consep").sample(3).shape           # doctest: +SKIP
        (128, 128)
    """

    def __init__(self, stats: dict[str, Any], tissue: str, jitter: float = 0.08):
        tissues = [k for k, v in stats.items() if isinstance(v, dict) and "tiles" in v]
        if tissue not in tissues:
            raise InputError(f"no mask statistics for tissue {tissue!r}", fix=f"use one of {', '.join(tissues)}")
        self.stats, self.tissue, self.jitter = stats[tissue], tissue, jitter
        self.size = int(stats["size"])

    @classmethod
    def from_json(cls, path: str | Path, tissue: str) -> MaskSampler:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no mask statistics at {path}", fix="train or point to a mask model (docs/masks.md)")
        return cls(json.loads(path.read_text()), tissue)

    def sample(self, seed: int) -> Layout:
        """One layout, a function of ``seed`` only."""
        rng = np.random.default_rng([seed, 13])
        row = self.stats["tiles"][rng.integers(len(self.stats["tiles"]))]
        count, mix = int(row[0]), np.asarray(row[1:], float)
        classes = (rng.choice(np.arange(1, len(CLASSES)), size=count, p=mix / mix.sum())
                   if self.stats["typed"] and mix.sum() > 0 else np.zeros(count, int))
        inst = np.zeros((self.size, self.size), np.uint16)
        types = np.zeros_like(inst, dtype=np.uint8)
        centres: list[tuple[float, float]] = []
        for cls in classes:
            for _ in range(30):  # rejection: a few tries per nucleus, then it is dropped (crowded tile)
                rr, cc, centre = self._nucleus(rng, int(cls))
                if len(rr) and not inst[rr, cc].any() and self._spaced(centre, centres):
                    centres.append(centre)
                    inst[rr, cc] = len(centres)
                    types[rr, cc] = cls
                    break
        return Layout(inst, types if self.stats["typed"] else None, f"{self.tissue}_{seed:06d}")

    def _spaced(self, centre: tuple[float, float], centres: list[tuple[float, float]]) -> bool:
        if not centres:
            return True
        d = np.hypot(*(np.asarray(centres) - centre).T)
        return bool(d.min() >= self.stats["min_gap"])

    def _nucleus(self, rng: np.random.Generator, cls: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
        """Pixels of one jittered ellipse (random centre and angle, class-specific axes)."""
        shape = self.stats["shape"].get(str(cls)) or next(iter(self.stats["shape"].values()))
        area = float(np.exp(rng.normal(*shape["log_area"])))
        ratio = float(np.clip(rng.normal(*shape["ratio"]), 0.25, 1.0))
        a = np.sqrt(area / (np.pi * ratio))  # semi-axes of an ellipse of that area and ratio
        b = a * ratio
        cy, cx = rng.uniform(0, self.size, 2)
        theta = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        k = np.arange(2, 5)[:, None]  # low-frequency boundary jitter: lumpy, not perfect, ellipses
        wobble = 1 + (rng.normal(0, self.jitter, (3, 1)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi, (3, 1)))).sum(0)
        angle = rng.uniform(0, np.pi)
        x, y = a * np.cos(theta) * wobble, b * np.sin(theta) * wobble
        ys = cy + x * np.sin(angle) + y * np.cos(angle)
        xs = cx + x * np.cos(angle) - y * np.sin(angle)
        rr, cc = fill_polygon(ys, xs, shape=(self.size, self.size))
        return rr, cc, (cy, cx)
