"""Mask adherence of a paired set: does the generated tissue follow the nuclei mask it was given?

A nuclei segmenter (any ``image -> instance map`` callable) segments every image of a paired
folder (``images/`` + ``inst/``, as ``pixgen generate --mask`` writes); Dice (foreground) and
AJI (instances) against the input mask, mean with a bootstrap interval. With a class map
(``types/``) the typed segmenter (``metrics/weights/nuclei-types``) also gives per-class F1 of
nucleus types (:func:`score_types`: HoVer-Net's detection and type F1). Read it between two
references scored the same way: the **ceiling** (the real images of those masks: what the
segmenter can reach) and the **floor** (images generated from the same masks with the
ControlNet off, ``--control-scale 0``: what chance overlap gives).

Example:
    >>> score_folder(bundled_segmenter(), "pairs/")["dice"]["value"]    # doctest: +SKIP
    0.61
    >>> score_types(typed_segmenter(), "pairs/")["f1"]["inflammatory"]  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from metrics.segmentation import aji, dice, load_mask_folder
from metrics.stats import Estimate, mean_estimate
from pixgen.errors import InputError

if TYPE_CHECKING:
    from metrics.nuclei import NucleiSegmenter

__all__ = ["score_folder", "score_pairs", "score_types", "type_counts_folder", "bundled_segmenter", "typed_segmenter",
           "relative"]

Segmenter = Callable[[np.ndarray], np.ndarray]


def bundled_segmenter() -> Segmenter:
    """The bundled nuclei segmenter (:class:`metrics.nuclei.NucleiSegmenter`, 0.5 um/px) as an
    image -> instance-map callable, for images already at its scale."""
    from metrics.nuclei import NucleiSegmenter

    segmenter = NucleiSegmenter.load()
    return lambda image: segmenter.instances([image])[0]


def typed_segmenter(folder: str | Path | None = None) -> "NucleiSegmenter":
    """The typed nuclei segmenter (CoNSeP's 4 types, 0.5 um/px; by default the bundled
    ``metrics/weights/nuclei-types``)."""
    from metrics.nuclei import TYPED, NucleiSegmenter

    return NucleiSegmenter.load(folder or TYPED)


def type_counts_folder(segmenter: "NucleiSegmenter", folder: str | Path) -> np.ndarray:
    """Per-image pairing counts (:func:`metrics.nuclei.typed_counts`) of a typed segmenter on the
    images of a paired folder against its masks (``inst/`` + ``types/``), in file-name order."""
    from metrics.nuclei import typed_counts

    data = load_mask_folder(folder)
    if data.types is None:
        raise InputError(f"{folder} has no class maps for its masks", fix="per-class F1 needs types/ PNGs beside inst/ (CoNSeP layout)")
    return typed_counts(segmenter.classify(data.images), data.instances, data.types, segmenter.n_types)


def score_types(segmenter: "NucleiSegmenter", folder: str | Path, n_boot: int = 200) -> dict[str, Any]:
    """Detection and per-class type F1 (:func:`metrics.nuclei.typed_scores`) of a typed
    segmenter on the images of a paired folder against its masks (``inst/`` + ``types/``)."""
    from metrics.nuclei import typed_scores

    return typed_scores(type_counts_folder(segmenter, folder), n_boot=n_boot)


def score_pairs(segment: Segmenter, images: list[np.ndarray], masks: list[np.ndarray],
                n_boot: int = 200) -> dict[str, Estimate]:
    """Dice and AJI of ``segment(image)`` against each mask (instance maps, 0 = background).

    Example:
        >>> score_pairs(lambda im: (im[..., 0] < 100).astype(int), [img], [inst])["dice"]["value"]  # doctest: +SKIP
    """
    preds = [segment(im) for im in images]
    d = np.array([dice(p > 0, m > 0) for p, m in zip(preds, masks)])
    a = np.array([aji(m, p) for p, m in zip(preds, masks)])
    a = a[np.isfinite(a)]  # AJI is undefined for an empty mask and an empty prediction
    return {"dice": mean_estimate(d, n_boot), "aji": mean_estimate(a, n_boot), "n": len(images)}


def score_folder(segment: Segmenter, folder: str | Path, n_boot: int = 200) -> dict[str, Estimate]:
    """:func:`score_pairs` over a paired folder (``images/`` + ``inst/`` of the same stems)."""
    data = load_mask_folder(folder)
    return score_pairs(segment, data.images, data.instances, n_boot)


def relative(value: float, floor: float, ceiling: float) -> float:
    """Where ``value`` sits between the floor (0) and the ceiling (1).

    Example:
        >>> relative(0.6, 0.2, 0.7)
        0.8
    """
    return round((value - floor) / (ceiling - floor), 4) if ceiling != floor else float("nan")
