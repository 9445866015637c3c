"""Virtual-staining measurement: paired image metrics, DAB quantification and its validation.

Three parts, all on HWC uint8 RGB images:

- **Paired metrics** (a generated IHC image against the real IHC image of the same field):
  PSNR and SSIM (scikit-image) after a Gaussian blur of several widths, because consecutive
  sections never align cell to cell (BCI practice); FD / KID to the real IHC set in the
  :mod:`metrics.detectors` feature spaces (:mod:`metrics.fidelity`).
- **DAB quantification** (:func:`quantify_dab`): colour deconvolution
  (``skimage.color.rgb2hed``), the DAB-positive area fraction, nuclei (the bundled nuclei
  segmenter, :mod:`metrics.nuclei`, run on a hematoxylin-equivalent rendering of the
  hematoxylin + DAB channels), each nucleus's DAB, the positive-nucleus fraction (a Ki67-style
  index), an H-score and a HER2-*like* 0 / 1+ / 2+ / 3+ tile score. :func:`agreement` compares a
  quantity between generated and real IHC of the same fields (Pearson, Spearman, Bland-Altman).
- **Validation** (:func:`validate_quantifier`) on real Ki67 IHC with ground-truth positive and
  negative nuclei (the DeepLIIF fields in ``shared/data/ihc-deepliif``): positive-nucleus
  detection F1 (centroids matched within a radius) and the positive fraction per field.

Stain values are rgb2hed's: optical density in natural log divided by ln(1e6) (so 1 / 6 of the
log10 OD that QuPath shows, for the same stain vectors). Thresholds: :class:`DabThresholds`;
how they were chosen: ``docs/staining-metrics.md``.

Example:
    >>> q = quantify_dab(load_rgb("ihc_tile.png"), mpp=0.5)               # doctest: +SKIP
    >>> q.positive_fraction, q.score, q.summary()["positive_area_fraction"]  # doctest: +SKIP
    (0.21, '2+', 0.087)
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from metrics.stats import Estimate, SmallSampleWarning, estimate, mean_estimate
from pixgen.errors import InputError

__all__ = [
    "MPP",
    "BLUR_SIGMAS",
    "DabThresholds",
    "DabQuantification",
    "StainWarning",
    "as_rgb",
    "stain_channels",
    "stain_statistics",
    "check_ihc",
    "positive_area_fraction",
    "segment_nuclei",
    "quantify_dab",
    "dab_overlay",
    "paired_image_metrics",
    "agreement",
    "match_points",
    "read_deepliif_nuclei",
    "validate_quantifier",
    "evaluate_staining",
    "add_parser",
    "run",
    "main",
]

MPP = 0.5  # um/px the generator works at: the default scale of images given here
BLUR_SIGMAS = (0.0, 1.0, 2.0, 4.0, 8.0)  # px: Gaussian blur widths for PSNR / SSIM
GLASS = 215  # a pixel whose darkest RGB channel is above this is empty glass, not tissue
EOSIN_SHARE_HE = 0.02  # eosin share above which an "IHC" image looks like H&E (0.000 on all 14 IHC images of shared/data)
MATCH_RADIUS_UM = 4.0  # centroid distance within which a predicted nucleus matches a true one


class StainWarning(UserWarning):
    """An image's stain statistics do not fit what it was given as (e.g. H&E given as IHC)."""


@dataclass(frozen=True)
class DabThresholds:
    """DAB thresholds in rgb2hed units (see the module docstring).

    ``pixel``: a pixel is DAB-positive above it (positive-area fraction). ``bins``: lower edges of
    1+ / 2+ / 3+ for a nucleus's DAB (the 90th percentile of its pixels); a nucleus is positive
    from ``bins[0]``. ``min_positive_share``: the HER2-like tile score is the intensity bin of the
    median positive nucleus when at least this share of nuclei is positive, else 0.

    Example:
        >>> DabThresholds().bins[0] == DabThresholds().nucleus
        True
    """

    pixel: float = 0.07
    bins: tuple[float, float, float] = (0.09, 0.25, 0.50)
    min_positive_share: float = 0.10

    @property
    def nucleus(self) -> float:
        return self.bins[0]


DEFAULT_THRESHOLDS = DabThresholds()


@dataclass
class DabQuantification:
    """The DAB measurements of one image; per-nucleus arrays are in the image's pixel frame.

    Example:
        >>> q = DabQuantification(0.1, np.zeros((4, 2)), np.array([0.0, 0.1, 0.3, 0.6]), np.array([0, 1, 2, 3]), "2+")
        >>> q.positive_fraction, q.h_score
        (0.75, 150.0)
    """

    positive_area_fraction: float
    centroids: np.ndarray  # (N, 2) row, col in px
    nucleus_dab: np.ndarray  # (N,) 90th percentile of DAB inside each nucleus
    nucleus_bin: np.ndarray  # (N,) 0 = negative, 1..3 = 1+ .. 3+
    score: str  # HER2-like tile score "0", "1+", "2+", "3+"
    thresholds: DabThresholds = field(default=DEFAULT_THRESHOLDS)

    @property
    def n_nuclei(self) -> int:
        return len(self.nucleus_bin)

    @property
    def n_positive(self) -> int:
        return int((self.nucleus_bin > 0).sum())

    @property
    def positive_fraction(self) -> float:
        """Positive nuclei / all nuclei (the Ki67 index); NaN without nuclei."""
        return self.n_positive / self.n_nuclei if self.n_nuclei else float("nan")

    @property
    def h_score(self) -> float:
        """100 x the mean bin over all nuclei (0-300); NaN without nuclei."""
        return float(100 * self.nucleus_bin.mean()) if self.n_nuclei else float("nan")

    def summary(self) -> dict[str, Any]:
        """The scalar measurements as a JSON-ready dict."""
        return {"positive_area_fraction": self.positive_area_fraction, "n_nuclei": self.n_nuclei, "n_positive": self.n_positive,
                "positive_fraction": self.positive_fraction, "h_score": self.h_score, "score": self.score}


# ---------------------------------------------------------------------------------------------
# Input checks and stain separation
# ---------------------------------------------------------------------------------------------


def as_rgb(image: Any, name: str = "image") -> np.ndarray:
    """An (H, W, 3) uint8 array from a uint8 array or a float array in [0, 1]; anything else
    (other shapes, NaN, out-of-range floats) is an :class:`InputError`.

    Example:
        >>> int(as_rgb(np.ones((2, 2, 3))).max())
        255
    """
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise InputError(f"{name} has shape {arr.shape}, not (H, W, 3) RGB",
                         fix="pass an RGB image (drop an alpha channel, convert greyscale or multiplexed images to RGB)")
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{name} has dtype {arr.dtype}", fix="pass uint8 (0-255) or float (0-1) RGB")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} holds NaN or infinite values", fix="pass a finite image (check the generator's output)")
    if arr.min() < 0 or arr.max() > 1:
        raise InputError(f"{name} is float with values in [{arr.min():.3g}, {arr.max():.3g}], not [0, 1]",
                         fix="scale float images to [0, 1] or pass uint8")
    return np.rint(arr * 255).astype(np.uint8)


def stain_channels(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) hematoxylin, eosin, DAB densities of an RGB image (``skimage.color.rgb2hed``).

    Pixel values of 0 are read as 1: rgb2hed maps 0 to 1e-6, which turns a few black JPEG pixels
    into densities 3x those of any stain (they dominated nuclei's percentiles on the DeepLIIF fields).

    Example:
        >>> float(stain_channels(np.full((2, 2, 3), 255, np.uint8)).max())
        0.0
    """
    from skimage.color import rgb2hed

    return rgb2hed(np.maximum(as_rgb(image), 1))


def _tissue(rgb: np.ndarray) -> np.ndarray:
    return rgb.min(-1) < GLASS


def stain_statistics(image: np.ndarray) -> dict[str, float]:
    """Tissue share and median hematoxylin / eosin / DAB density over tissue pixels, and the
    eosin share of their sum (~0 on IHC, >= 0.14 on every H&E image of shared/data).

    Example:
        >>> stain_statistics(np.full((4, 4, 3), 255, np.uint8))["tissue_fraction"]
        0.0
    """
    hed = stain_channels(image)
    tissue = _tissue(as_rgb(image))
    out = {"tissue_fraction": float(tissue.mean())}
    for i, name in enumerate(("hematoxylin", "eosin", "dab")):
        out[name] = float(np.median(hed[..., i][tissue])) if tissue.any() else 0.0
    total = out["hematoxylin"] + out["eosin"] + out["dab"]
    out["eosin_share"] = out["eosin"] / total if total > 0 else 0.0
    return out


def check_ihc(image: np.ndarray, name: str = "image") -> dict[str, float]:
    """Stain statistics of an image given as IHC: greyscale tissue is an :class:`InputError`
    (no stain colours to separate); an H&E-looking image (eosin share above
    ``EOSIN_SHARE_HE``) warns with :class:`StainWarning`.

    Example:
        >>> check_ihc(np.full((4, 4, 3), 255, np.uint8))["eosin_share"]
        0.0
    """
    rgb = as_rgb(image, name)
    stats = stain_statistics(rgb)
    if stats["tissue_fraction"] > 0.01 and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        raise InputError(f"{name} is greyscale: it has no stain colours to separate", fix="pass the colour (RGB) IHC image")
    if stats["eosin_share"] > EOSIN_SHARE_HE:
        warnings.warn(f"{name} looks like H&E, not IHC (eosin share {stats['eosin_share']:.2f} > {EOSIN_SHARE_HE}); "
                      "its DAB numbers mean nothing (fix: pass the IHC image)", StainWarning, stacklevel=2)
    return stats


def positive_area_fraction(image: np.ndarray, threshold: float = DEFAULT_THRESHOLDS.pixel) -> float:
    """Share of tissue pixels whose DAB density exceeds ``threshold`` (0 without tissue).

    Example:
        >>> positive_area_fraction(np.full((4, 4, 3), 255, np.uint8))
        0.0
    """
    rgb = as_rgb(image)
    hed = stain_channels(rgb)
    tissue = _tissue(rgb)
    return float((hed[..., 2] > threshold)[tissue].sum() / tissue.sum()) if tissue.any() else 0.0


# ---------------------------------------------------------------------------------------------
# Nuclei and their DAB
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _bundled_segmenter():
    from metrics.nuclei import NucleiSegmenter

    return NucleiSegmenter.load()


def _hematoxylin_equivalent(hed: np.ndarray) -> np.ndarray:
    """RGB rendering of hematoxylin + DAB as hematoxylin only: the bundled segmenter learnt
    nuclei on H&E, where they are blue-purple; DAB-filled nuclei are brown and it misses them
    (positive-nucleus F1 0.00-0.28 on 4 of the 6 DeepLIIF fields from the raw RGB)."""
    from skimage.color import hed2rgb

    zero = np.zeros(hed.shape[:2])
    return np.clip(np.rint(hed2rgb(np.stack([hed[..., 0] + hed[..., 2], zero, zero], -1)) * 255), 0, 255).astype(np.uint8)


def segment_nuclei(image: np.ndarray, mpp: float = MPP, segmenter: Any | None = None) -> np.ndarray:
    """Nucleus instance map (0 = background) of an IHC image at ``mpp`` um/px, in its own pixel frame.

    ``segmenter``: a :class:`metrics.nuclei.NucleiSegmenter` (default: the bundled one), run on
    the hematoxylin-equivalent rendering at its own scale.

    Example:
        >>> segment_nuclei(np.full((64, 64, 3), 255, np.uint8)).max()     # doctest: +SKIP
        0
    """
    from skimage.transform import resize

    from metrics.nuclei import _rescale

    seg = segmenter or _bundled_segmenter()
    rgb = as_rgb(image)
    small = _rescale(_hematoxylin_equivalent(stain_channels(rgb)), mpp / seg.mpp)
    inst = seg.instances([small])[0]
    return resize(inst, rgb.shape[:2], order=0, preserve_range=True, anti_aliasing=False).astype(np.int64)


def _nucleus_dab(instances: np.ndarray, dab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (N, 2), 90th-percentile DAB (N,)) of every instance; the 90th percentile, not the
    mean, because Ki67 fills a nucleus unevenly (granular, nucleolar) and the segmenter's outline
    takes in unstained rim."""
    from skimage.measure import regionprops

    props = regionprops(instances, intensity_image=dab)
    cents = np.array([p.centroid for p in props], np.float64).reshape(-1, 2)
    p90 = np.array([np.percentile(p.image_intensity[p.image], 90) for p in props], np.float64)
    return cents, p90


def _tile_score(bins: np.ndarray, t: DabThresholds) -> str:
    positive = bins[bins > 0]
    if not len(bins) or len(positive) < t.min_positive_share * len(bins):
        return "0"
    return f"{int(np.median(positive))}+"


def quantify_dab(image: np.ndarray, mpp: float = MPP, thresholds: DabThresholds = DEFAULT_THRESHOLDS,
                 segmenter: Any | None = None, name: str = "image") -> DabQuantification:
    """DAB quantification of one IHC image taken at ``mpp`` um/px (warns if it looks like H&E).

    Example:
        >>> q = quantify_dab(load_rgb("ki67.jpg"), mpp=0.25)      # doctest: +SKIP
        >>> q.positive_fraction, q.h_score, q.score               # doctest: +SKIP
        (0.19, 31.0, '1+')
    """
    rgb = as_rgb(image, name)
    check_ihc(rgb, name)
    inst = segment_nuclei(rgb, mpp, segmenter)
    cents, dab = _nucleus_dab(inst, stain_channels(rgb)[..., 2])
    bins = np.searchsorted(np.asarray(thresholds.bins), dab, side="right")
    return DabQuantification(positive_area_fraction(rgb, thresholds.pixel), cents, dab, bins, _tile_score(bins, thresholds), thresholds)


def dab_overlay(image: np.ndarray, q: DabQuantification, truth: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """A picture to check the quantifier by eye: the DAB channel (dark = more DAB) with each
    predicted nucleus as a dot (red = positive, blue = negative); with ``truth`` (positive,
    negative centroids) the true nuclei as rings of the same colours.

    Example:
        >>> Image.fromarray(dab_overlay(img, quantify_dab(img))).save("overlay.png")   # doctest: +SKIP
    """
    from skimage.draw import circle_perimeter, disk

    dab = stain_channels(image)[..., 2]
    grey = np.clip(255 - dab / max(float(np.percentile(dab, 99.5)), 1e-6) * 200, 0, 255).astype(np.uint8)
    out = np.repeat(grey[..., None], 3, -1)
    colour = {True: (220, 0, 0), False: (0, 60, 255)}
    for (r, c), b in zip(q.centroids, q.nucleus_bin):
        out[disk((r, c), 3, shape=out.shape[:2])] = colour[bool(b > 0)]
    for positive, pts in zip((True, False), truth or ()):
        for r, c in pts:
            out[circle_perimeter(int(r), int(c), 9, shape=out.shape[:2])] = colour[positive]
    return out


# ---------------------------------------------------------------------------------------------
# Paired image metrics and agreement
# ---------------------------------------------------------------------------------------------


def paired_image_metrics(generated: np.ndarray, real: np.ndarray, sigmas: Sequence[float] = BLUR_SIGMAS) -> dict[str, dict[str, float]]:
    """PSNR (dB) and SSIM of a generated image against the real image of the same field, both
    blurred by a Gaussian of each width in ``sigmas`` (px; 0 = none). scikit-image's metrics.

    Example:
        >>> m = paired_image_metrics(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.uint8) + 1)
        >>> round(m["psnr"]["0"], 2), list(m["ssim"])
        (48.13, ['0', '1', '2', '4', '8'])
    """
    from skimage.filters import gaussian
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    gen, ref = as_rgb(generated, "generated image"), as_rgb(real, "real image")
    if gen.shape != ref.shape:
        raise InputError(f"a pair has different sizes: generated {gen.shape[1]}x{gen.shape[0]}, real {ref.shape[1]}x{ref.shape[0]}",
                         fix="generate at the real image's size, or crop / resize both to one size before comparing")
    out: dict[str, dict[str, float]] = {"psnr": {}, "ssim": {}}
    for s in sigmas:
        a, b = ((gaussian(x.astype(np.float64), s, channel_axis=-1, preserve_range=True) if s > 0 else x.astype(np.float64)) for x in (gen, ref))
        key = f"{s:g}"
        with np.errstate(divide="ignore"):  # identical images: PSNR is +inf, not a warning
            out["psnr"][key] = float(peak_signal_noise_ratio(b, a, data_range=255))
        out["ssim"][key] = float(structural_similarity(b, a, data_range=255, channel_axis=-1))
    return out


def agreement(generated: Sequence[float], real: Sequence[float], n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Agreement of one quantity measured on generated and on real IHC of the same fields:
    Pearson and Spearman correlation, Bland-Altman bias (mean of generated - real) and 95 %
    limits of agreement (bias +- 1.96 sd), each with a paired bootstrap interval. Pairs with a
    NaN on either side are dropped (``n`` says how many remain).

    Example:
        >>> a = agreement([0.1, 0.2, 0.3, 0.4], [0.12, 0.18, 0.33, 0.41], n_boot=0)
        >>> round(a["pearson"]["value"], 3), round(a["bias"]["value"], 3)
        (0.987, -0.01)
    """
    from scipy.stats import pearsonr, spearmanr

    g, r = np.asarray(generated, np.float64), np.asarray(real, np.float64)
    keep = np.isfinite(g) & np.isfinite(r)
    g, r = g[keep], r[keep]
    out: dict[str, Any] = {"n": int(keep.sum()), "n_dropped": int((~keep).sum())}
    if len(g) < 3:
        warnings.warn(f"agreement: only {len(g)} paired values (< 3); no correlation or limits", SmallSampleWarning, stacklevel=2)
        nan = {"value": float("nan"), "ci": [float("nan")] * 2, "n_boot": 0}
        return {**out, **{k: dict(nan) for k in ("pearson", "spearman", "bias", "loa_low", "loa_high")}}

    def corr(f: Callable) -> Callable[[np.ndarray, np.ndarray], float]:
        def stat(i: np.ndarray, j: np.ndarray) -> float:
            with warnings.catch_warnings():  # a resample with one distinct value has no correlation
                warnings.simplefilter("ignore")
                return float(f(g[i], r[j])[0])
        return stat

    d = g - r
    stats: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "pearson": corr(pearsonr), "spearman": corr(spearmanr),
        "bias": lambda i, j: float(d[i].mean()),
        "loa_low": lambda i, j: float(d[i].mean() - 1.96 * d[i].std(ddof=1)),
        "loa_high": lambda i, j: float(d[i].mean() + 1.96 * d[i].std(ddof=1)),
    }
    idx = np.arange(len(g))
    for k, f in stats.items():
        out[k] = estimate(f(idx, idx), f, [len(g), len(g)], n_boot, seed, paired=True)
    return out


# ---------------------------------------------------------------------------------------------
# Validation against nuclei with known positivity
# ---------------------------------------------------------------------------------------------


def match_points(pred: np.ndarray, true: np.ndarray, radius: float) -> dict[str, float]:
    """One-to-one matching of predicted to true points (Hungarian, scipy) within ``radius``:
    counts, precision, recall and F1 (1.0 when both are empty).

    Example:
        >>> match_points(np.array([[0, 0], [10, 10]]), np.array([[1, 1]]), radius=3)["f1"]
        0.6666666666666666
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    pred, true = np.asarray(pred, np.float64).reshape(-1, 2), np.asarray(true, np.float64).reshape(-1, 2)
    tp = 0
    if len(pred) and len(true):
        d = cdist(pred, true)
        i, j = linear_sum_assignment(np.where(d <= radius, d, 1e9))
        tp = int((d[i, j] <= radius).sum())
    fp, fn = len(pred) - tp, len(true) - tp
    f1 = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    return {"tp": tp, "fp": fp, "fn": fn, "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "f1": f1}


def _deepliif_instances(seg: np.ndarray, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) instance maps of a DeepLIIF nucleus map; components under ``min_area`` px dropped."""
    from skimage.measure import label

    s = as_rgb(seg, "nucleus map").astype(np.int64)
    high, low = s > 128, s < 128
    out = []
    for mask in (high[..., 0] & low[..., 1] & low[..., 2], high[..., 2] & low[..., 0] & low[..., 1]):
        inst = label(mask)
        inst[np.bincount(inst.ravel())[inst] < min_area] = 0
        out.append(label(inst > 0) if inst.any() else inst)
    return out[0], out[1]


def read_deepliif_nuclei(seg: np.ndarray, min_area: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) nucleus centroids (row, col) of a DeepLIIF nucleus map (red = positive,
    blue = negative, green = boundary between them); components under ``min_area`` px (anti-aliased
    specks) are dropped.

    Example:
        >>> seg = np.zeros((40, 40, 3), np.uint8); seg[2:10, 2:10, 0] = 255; seg[20:30, 20:30, 2] = 255
        >>> [len(c) for c in read_deepliif_nuclei(seg)]
        [1, 1]
    """
    from skimage.measure import regionprops

    return tuple(np.array([p.centroid for p in regionprops(inst)], np.float64).reshape(-1, 2) for inst in _deepliif_instances(seg, min_area))


def _deepliif_fields(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from pixgen.io import load_rgb

    tiles = folder / "tiles" if (folder / "tiles").is_dir() else folder
    segs = sorted(tiles.glob("*_seg.png"))
    if not segs:
        raise InputError(f"no DeepLIIF fields (*_seg.png beside *_ihc.jpg) in {tiles}", fix="pass shared/data/ihc-deepliif")
    return [(p.name[: -len("_seg.png")], load_rgb(p.with_name(p.name.replace("_seg.png", "_ihc.jpg"))), load_rgb(p)) for p in segs]


def validate_quantifier(folder: str | Path, mpp: float = 0.25, radius_um: float = MATCH_RADIUS_UM,
                        thresholds: DabThresholds = DEFAULT_THRESHOLDS, grid: Sequence[float] | None = None,
                        overlays: str | Path | None = None) -> dict[str, Any]:
    """Score :func:`quantify_dab` on DeepLIIF fields (``tiles/{name}_ihc.jpg`` + ``{name}_seg.png``).

    Per field: detection F1 of all nuclei and of positive nuclei (centroids within ``radius_um``),
    predicted vs true positive fraction. Twice: at ``thresholds`` as given, and leave-one-field-out
    (the nucleus threshold that maximises the mean positive F1 of the other fields, over ``grid``),
    so a threshold tuned on these fields can be read honestly. ``overlays``: a folder for
    :func:`dab_overlay` pictures of each field.

    Example:
        >>> v = validate_quantifier("shared/data/ihc-deepliif")         # doctest: +SKIP
        >>> v["given"]["mean_positive_f1"], v["leave_one_out"]["mean_positive_f1"]   # doctest: +SKIP
    """
    from PIL import Image

    radius = radius_um / mpp
    grid = np.round(np.arange(0.03, 0.301, 0.005), 3) if grid is None else np.asarray(grid, np.float64)
    fields = []
    for name, ihc, seg in _deepliif_fields(Path(folder)):
        q = quantify_dab(ihc, mpp, thresholds, name=name)
        pos, neg = read_deepliif_nuclei(seg)
        dab = stain_channels(ihc)[..., 2]
        true_dab = tuple(_nucleus_dab(inst, dab)[1] for inst in _deepliif_instances(seg, 20))
        fields.append(_Field(name, q, pos, neg, *true_dab))
        if overlays is not None:
            Path(overlays).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate([ihc, dab_overlay(ihc, q, (pos, neg))], 1)).save(Path(overlays) / f"{name}_dab_overlay.png")
    f1 = np.array([[match_points(f.q.centroids[f.q.nucleus_dab >= t], f.pos, radius)["f1"] for t in grid] for f in fields])
    loo = [float(grid[np.delete(f1, k, 0).mean(0).argmax()]) for k in range(len(fields))]
    out = {"folder": str(folder), "mpp": mpp, "radius_um": radius_um, "radius_px": radius, "thresholds": asdict(thresholds),
           "threshold_tuned_on_all": float(grid[f1.mean(0).argmax()]), "grid": [float(grid[0]), float(grid[-1]), len(grid)]}
    for key, per_field in (("given", [thresholds.nucleus] * len(fields)), ("leave_one_out", loo)):
        rows = [_field_row(f, t, radius) for f, t in zip(fields, per_field)]
        out[key] = {"fields": rows, "mean_positive_f1": float(np.mean([r["positive"]["f1"] for r in rows])),
                    "fraction_agreement": agreement([r["positive_fraction"] for r in rows], [r["true_positive_fraction"] for r in rows], n_boot=0)}
    return out


@dataclass
class _Field:
    """One validation field: the quantification, the true nuclei's centroids and their DAB."""

    name: str
    q: DabQuantification
    pos: np.ndarray
    neg: np.ndarray
    pos_dab: np.ndarray
    neg_dab: np.ndarray


def _field_row(f: _Field, t: float, radius: float) -> dict[str, Any]:
    positive = f.q.nucleus_dab >= t
    tp, fp = int((f.pos_dab >= t).sum()), int((f.neg_dab >= t).sum())
    fn = len(f.pos_dab) - tp
    return {"field": f.name, "nucleus_threshold": t, "nuclei": match_points(f.q.centroids, np.concatenate([f.pos, f.neg]), radius),
            "positive": match_points(f.q.centroids[positive], f.pos, radius), "n_nuclei": f.q.n_nuclei,
            "positive_fraction": float(positive.mean()) if f.q.n_nuclei else float("nan"),
            "true_positive_fraction": len(f.pos) / max(len(f.pos) + len(f.neg), 1), "positive_area_fraction": f.q.positive_area_fraction,
            # the same DAB rule on the true nuclei: what a perfect segmentation would score with it
            "true_nuclei": {"tp": tp, "fp": fp, "fn": fn, "f1": 2 * tp / max(2 * tp + fp + fn, 1),
                            "positive_fraction": (tp + fp) / max(len(f.pos_dab) + len(f.neg_dab), 1)}}


# ---------------------------------------------------------------------------------------------
# Folders of generated vs real IHC: evaluate_staining and `pixgen stain-eval`
# ---------------------------------------------------------------------------------------------

QUANTITIES = ("positive_area_fraction", "positive_fraction", "h_score")
SCORES = ("0", "1+", "2+", "3+")


def _pairs(generated: Path, real: Path) -> tuple[list[tuple[Path, Path]], dict[str, list[str]]]:
    """Files of the two folders paired by stem (name without suffix), and the unpaired names."""
    from metrics.images import image_files

    for label, folder in (("generated", generated), ("real", real)):
        if not folder.is_dir():
            raise InputError(f"{label} folder not found: {folder}", fix=f"pass an existing folder of {label} IHC images")
    g, r = ({p.stem: p for p in image_files(f)} for f in (generated, real))
    common = sorted(set(g) & set(r))
    if not common:
        raise InputError(f"no file of {generated} has a same-name partner in {real}",
                         fix="name each generated image like the real IHC image of its field (suffixes may differ)")
    return [(g[k], r[k]) for k in common], {"generated_only": sorted(set(g) - set(r)), "real_only": sorted(set(r) - set(g))}


def _he_looking(images: Sequence[np.ndarray], names: Sequence[str]) -> list[str]:
    """Names of the images that :func:`check_ihc` finds H&E-looking (its warnings collected)."""
    found = []
    for im, name in zip(images, names):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StainWarning)
            check_ihc(im, name)
        found += [name] if any(issubclass(w.category, StainWarning) for w in caught) else []
    return found


def _fidelity(gen: list[np.ndarray], real: list[np.ndarray], detectors: Sequence[str], inception_weights: str | Path | None,
              n_boot: int, seed: int, device: str | None) -> dict[str, dict[str, Estimate]]:
    """FD and KID to the real IHC of the generated set and of a blurred-real baseline, per detector."""
    from metrics.detectors import compute_features, get_detector
    from metrics.fidelity import fd_estimate, kid_estimate
    from metrics.images import blurred

    rows: dict[str, dict[str, Estimate]] = {"generated": {}, "baseline: blurred real": {}}
    for spec in detectors:
        det = get_detector(spec, inception_weights=inception_weights, device=device, seed=seed)
        f_real = compute_features(det, real)
        for row, images in (("generated", gen), ("baseline: blurred real", blurred(real))):
            f = compute_features(det, images)
            rows[row][f"FD_{det.name}"] = fd_estimate(f_real, f, n_boot, seed)
            rows[row][f"KID_{det.name}"] = kid_estimate(f_real, f, n_boot, seed)
    return rows


def _score_agreement(gen: Sequence[str], real: Sequence[str]) -> dict[str, Any]:
    from sklearn.metrics import cohen_kappa_score, confusion_matrix

    g, r = [SCORES.index(s) for s in gen], [SCORES.index(s) for s in real]
    kappa = float(cohen_kappa_score(r, g, labels=list(range(4)), weights="quadratic")) if len(set(g) | set(r)) > 1 else float("nan")
    return {"exact": float(np.mean(np.equal(g, r))), "quadratic_kappa": kappa,
            "confusion_real_rows_generated_columns": confusion_matrix(r, g, labels=list(range(4))).tolist()}


def evaluate_staining(generated: str | Path, real: str | Path, *, mpp: float = MPP, thresholds: DabThresholds = DEFAULT_THRESHOLDS,
                      detectors: Sequence[str] | None = None, inception_weights: str | Path | None = None,
                      sigmas: Sequence[float] = BLUR_SIGMAS, n_boot: int = 200, seed: int = 0, device: str | None = None,
                      out: str | Path | None = None) -> dict[str, Any]:
    """Compare generated IHC images with the real IHC images of the same fields (paired by file name).

    Paired PSNR / SSIM per blur width, DAB quantification of both sides with its agreement
    (Pearson, Spearman, Bland-Altman) and tile-score agreement, and FD / KID in each detector's
    space (``detectors``: names for :func:`metrics.detectors.get_detector`; None = the offline
    defaults of :func:`metrics.detectors.default_detectors`; ``[]`` = none). With ``out``, writes
    ``report.json`` and ``report.md`` there. Returns the report.

    Example:
        >>> rep = evaluate_staining("generated_ihc/", "real_ihc/", mpp=0.5, detectors=[])   # doctest: +SKIP
        >>> rep["agreement"]["positive_fraction"]["pearson"]["value"]                      # doctest: +SKIP
    """
    from metrics.detectors import default_detectors
    from pixgen.io import load_rgb

    pairs, unpaired = _pairs(Path(generated), Path(real))
    gen = [load_rgb(g) for g, _ in pairs]
    ref = [load_rgb(r) for _, r in pairs]
    names = [g.stem for g, _ in pairs]
    per_pair = [{"name": n, **paired_image_metrics(a, b, sigmas)} for n, a, b in zip(names, gen, ref)]
    he = {"generated": _he_looking(gen, [f"generated {n}" for n in names]), "real": _he_looking(ref, [f"real {n}" for n in names])}
    for side, found in he.items():
        if found:
            warnings.warn(f"{len(found)} of {len(pairs)} {side} images look like H&E, not IHC (eosin share > {EOSIN_SHARE_HE}): "
                          f"{', '.join(found[:5])}{' ...' if len(found) > 5 else ''} (fix: pass IHC images)", StainWarning, stacklevel=2)
    with warnings.catch_warnings():  # reported once per side above
        warnings.simplefilter("ignore", StainWarning)
        quant = [(quantify_dab(a, mpp, thresholds), quantify_dab(b, mpp, thresholds)) for a, b in zip(gen, ref)]
    for row, (qg, qr) in zip(per_pair, quant):
        row["generated"], row["real"] = qg.summary(), qr.summary()
    if detectors is None:
        detectors, why = default_detectors(inception_weights)
    else:
        why = "chosen by the caller"
    report = {
        "config": {"generated": str(generated), "real": str(real), "mpp": mpp, "thresholds": asdict(thresholds), "blur_sigmas_px": list(sigmas),
                   "detectors": list(detectors), "detectors_why": why, "n_boot": n_boot, "seed": seed},
        "n_pairs": len(pairs), "unpaired": unpaired, "he_looking": he,
        "paired": {m: {s: mean_estimate(np.array([p[m][s] for p in per_pair]), n_boot, seed) for s in per_pair[0][m]} for m in ("psnr", "ssim")},
        "agreement": {k: agreement([p["generated"][k] for p in per_pair], [p["real"][k] for p in per_pair], n_boot, seed) for k in QUANTITIES},
        "score_agreement": _score_agreement([p["generated"]["score"] for p in per_pair], [p["real"]["score"] for p in per_pair]),
        "fidelity": _fidelity(gen, ref, detectors, inception_weights, n_boot, seed, device) if detectors else {},
        "pairs": per_pair,
    }
    if out is not None:
        from pixgen.io import write_json_atomic, write_text_atomic

        Path(out).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(out) / "report.json", _json_ready(report))
        _bland_altman_plot(report, Path(out) / "bland_altman.png")
        write_text_atomic(Path(out) / "report.md", _markdown(report))
    return report


def _bland_altman_plot(rep: dict[str, Any], path: Path) -> None:
    """Bland-Altman plots of the quantities: difference (generated - real) against their mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(QUANTITIES), figsize=(4 * len(QUANTITIES), 3.5))
    for ax, k in zip(axes, QUANTITIES):
        g = np.array([p["generated"][k] for p in rep["pairs"]], np.float64)
        r = np.array([p["real"][k] for p in rep["pairs"]], np.float64)
        ax.scatter((g + r) / 2, g - r, s=12, c="k")
        a = rep["agreement"][k]
        for key, style in (("bias", "-"), ("loa_low", "--"), ("loa_high", "--")):
            if np.isfinite(a[key]["value"]):
                ax.axhline(a[key]["value"], c="tab:red", ls=style, lw=1)
        ax.set(title=k, xlabel="mean of generated and real", ylabel="generated - real")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _json_ready(obj: Any) -> Any:
    """``obj`` with NaN / infinity as None (strict JSON) and numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj.item() if isinstance(obj, np.generic) else obj


def _fmt(e: Any, scale: float = 1.0) -> str:
    if not isinstance(e, dict) or not np.isfinite(e["value"]):
        return "n/a"
    lo, hi = e["ci"]
    return f"{e['value'] * scale:.3g}" + (f" [{lo * scale:.3g}, {hi * scale:.3g}]" if np.isfinite(lo) else "")


def _markdown(rep: dict[str, Any]) -> str:
    cfg = rep["config"]
    lines = ["# pixgen stain-eval report", "", (f"- generated: `{cfg['generated']}`; real: `{cfg['real']}`; {rep['n_pairs']} pairs matched by file name"
             f" ({len(rep['unpaired']['generated_only'])} generated and {len(rep['unpaired']['real_only'])} real files without a partner)"),
             f"- images at {cfg['mpp']} um/px; DAB thresholds {cfg['thresholds']}; bootstrap n={cfg['n_boot']} (95 % intervals in brackets)"]
    lines += [f"- **{len(v)} {k} images look like H&E**: {', '.join(v[:10])}" for k, v in rep["he_looking"].items() if v]
    lines += ["", "## Paired image metrics (generated vs real of the same field, both blurred)", "",
              "| blur sigma (px) | PSNR (dB) | SSIM |", "|---|---|---|"]
    lines += [f"| {s} | {_fmt(rep['paired']['psnr'][s])} | {_fmt(rep['paired']['ssim'][s])} |" for s in rep["paired"]["psnr"]]
    lines += ["", "## DAB quantification: agreement of generated with real", "",
              "| quantity | N | Pearson | Spearman | Bland-Altman bias (gen - real) | limits of agreement |", "|---|---|---|---|---|---|"]
    for k, a in rep["agreement"].items():
        lines.append(f"| {k} | {a['n']} | {_fmt(a['pearson'])} | {_fmt(a['spearman'])} | {_fmt(a['bias'])} | {_fmt(a['loa_low'])} to {_fmt(a['loa_high'])} |")
    s = rep["score_agreement"]
    lines += ["", "![Bland-Altman plots](bland_altman.png)", "", (f"Tile score (0/1+/2+/3+): exact agreement {s['exact']:.3g}, quadratic-weighted kappa {s['quadratic_kappa']:.3g}; "
              f"confusion (rows real, columns generated): {s['confusion_real_rows_generated_columns']}"), ""]
    if rep["fidelity"]:
        lines += ["## FD / KID to the real IHC set", "", f"Detectors: {', '.join(cfg['detectors'])} ({cfg['detectors_why']}). KID x1000.", "",
                  "| row | " + " | ".join(rep["fidelity"]["generated"]) + " |", "|---" * (1 + len(rep["fidelity"]["generated"])) + "|"]
        lines += [f"| {row} | " + " | ".join(_fmt(v, 1000.0 if k.startswith("KID") else 1.0) for k, v in vals.items()) + " |" for row, vals in rep["fidelity"].items()]
    lines += ["", "## Per pair", "", "| pair | PSNR (no blur) | SSIM (no blur) | positive fraction gen / real | area fraction gen / real | score gen / real |",
              "|---|---|---|---|---|---|"]
    first = next(iter(rep["paired"]["psnr"]))
    lines += [f"| {p['name']} | {p['psnr'][first]:.3g} | {p['ssim'][first]:.3g} | {p['generated']['positive_fraction']:.3g} / {p['real']['positive_fraction']:.3g} | "
              f"{p['generated']['positive_area_fraction']:.3g} / {p['real']['positive_area_fraction']:.3g} | {p['generated']['score']} / {p['real']['score']} |"
              for p in rep["pairs"]]
    return "\n".join(lines) + "\n"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pixgen stain-eval`` to the pixgen command line."""
    p = subparsers.add_parser(
        "stain-eval", help="compare generated IHC with real IHC of the same fields (PSNR/SSIM, DAB agreement, FD/KID)",
        description="Compare a folder of generated IHC images with the real IHC images of the same fields, paired by file name; "
                    "writes report.json and report.md.")
    p.add_argument("--generated", required=True, help="folder of generated IHC images")
    p.add_argument("--real", required=True, help="folder of the real IHC images, same file names (suffixes may differ)")
    p.add_argument("--out", required=True, help="output folder for report.json and report.md")
    p.add_argument("--mpp", type=float, default=MPP, help=f"um/px of the images (default {MPP}, the generator's scale)")
    p.add_argument("--detectors", help="comma list for FD/KID (inception, encoder:NAME, classifier:DIR, ...), or 'none' "
                   "(default: inception where its weights are on disk, else the bundled pixgen-ssl encoder and CNN)")
    p.add_argument("--inception-weights", metavar="PATH", help="local pt_inception-2015-12-05-6726825d.pth (offline use)")
    p.add_argument("--blur-sigmas", default=",".join(f"{s:g}" for s in BLUR_SIGMAS), help="Gaussian blur widths in px for PSNR/SSIM")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples per interval (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="torch device for the detectors (default cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``pixgen stain-eval``; prints a short summary and where the report is."""
    try:
        sigmas = [float(s) for s in args.blur_sigmas.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--blur-sigmas {args.blur_sigmas!r} is not a comma list of numbers", fix="e.g. --blur-sigmas 0,2,4,8") from None
    if not sigmas or min(sigmas) < 0:
        raise InputError(f"--blur-sigmas {args.blur_sigmas!r} needs non-negative widths", fix="e.g. --blur-sigmas 0,2,4,8")
    if args.mpp <= 0:
        raise InputError(f"--mpp {args.mpp} is not a positive um/px", fix="pass the images' scale, e.g. --mpp 0.5")
    detectors = None if args.detectors is None else [] if args.detectors == "none" else [d.strip() for d in args.detectors.split(",") if d.strip()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)  # small paired sets are the rule; the report gives every N
        rep = evaluate_staining(args.generated, args.real, mpp=args.mpp, detectors=detectors, inception_weights=args.inception_weights,
                                sigmas=sigmas, n_boot=args.n_boot, seed=args.seed, device=args.device, out=args.out)
    for s, e in rep["paired"]["ssim"].items():
        print(f"blur {s:>3s} px: PSNR {rep['paired']['psnr'][s]['value']:.3g} dB, SSIM {e['value']:.3g}")
    for k, a in rep["agreement"].items():
        print(f"{k}: Pearson {a['pearson']['value']:.3g}, Bland-Altman bias {a['bias']['value']:.3g} (N={a['n']})")
    print(f"report: {Path(args.out) / 'report.md'} ({rep['n_pairs']} pairs)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metrics.staining --deepliif DIR``: validate the DAB quantifier on DeepLIIF fields."""
    import os
    import platform

    import torch

    p = argparse.ArgumentParser(prog="python -m metrics.staining", description=main.__doc__)
    p.add_argument("--deepliif", required=True, help="the ihc-deepliif folder (tiles/*_ihc.jpg + *_seg.png)")
    p.add_argument("--mpp", type=float, default=0.25, help="um/px of the fields (DeepLIIF: 40x, about 0.25)")
    p.add_argument("--radius-um", type=float, default=MATCH_RADIUS_UM, help="centroid matching radius in um")
    p.add_argument("--out", help="folder for validation.json and the DAB overlay pictures")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    v = validate_quantifier(args.deepliif, args.mpp, args.radius_um, overlays=args.out)
    v["run"] = {"command": "python -m metrics.staining " + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"}
    if args.out:
        from pixgen.io import write_json_atomic

        write_json_atomic(Path(args.out) / "validation.json", _json_ready(v))
    print(f"matching radius {args.radius_um} um ({v['radius_px']:g} px); nucleus threshold tuned on all fields: {v['threshold_tuned_on_all']}")
    for key in ("given", "leave_one_out"):
        print(f"{key}: mean positive-nucleus F1 {v[key]['mean_positive_f1']:.3f} "
              f"(same rule on the true nuclei: {np.mean([r['true_nuclei']['f1'] for r in v[key]['fields']]):.3f})")
        for r in v[key]["fields"]:
            print(f"  {r['field']:9s} t={r['nucleus_threshold']:.3f} nuclei F1 {r['nuclei']['f1']:.3f}  positive F1 {r['positive']['f1']:.3f} "
                  f"(tp {r['positive']['tp']} fp {r['positive']['fp']} fn {r['positive']['fn']})  positive fraction {r['positive_fraction']:.3f} "
                  f"vs true {r['true_positive_fraction']:.3f}; on true nuclei F1 {r['true_nuclei']['f1']:.3f}, fraction {r['true_nuclei']['positive_fraction']:.3f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
