"""Nuclear statistics: segment nuclei in real and synthetic tiles, compare their distributions.

A blob generator can match colours and layout and still draw no nucleus. This section of
``pixgen eval`` segments nuclei with a bundled segmenter trained on real data (CoNSeP +
MoNuSeg train, at the generator's 0.5 um/px) and compares, per feature, the real held-out
distribution with each row's (synthetic, floor, baselines):

- per tile: nuclei per 64 x 64 um field, nuclear area fraction;
- per nucleus: area (um^2), eccentricity, solidity (scikit-image ``regionprops``), mean
  hematoxylin optical density (colour deconvolution, ``skimage.color.rgb2hed``), its standard
  deviation inside the nucleus (chromatin texture) and the nucleus's hematoxylin minus that of
  a 1 um ring around it (edge contrast: a crisp nucleus against a blurred blob).

Distance per feature: Wasserstein-1 divided by the reference's standard deviation (0 = same
distribution; 1 = shifted by one real spread); the aggregate is their mean. Intervals
resample tiles (a tile's nuclei move together). Read every number against the real-vs-real
floor row and the noise / blur baselines, as the rest of the report.

The segmenter (``metrics/weights/nuclei-seg``) is :class:`metrics.segmentation.TinyUNet` with
two outputs, nuclear foreground and nuclear boundary; instances are a watershed of the
boundary map from the foreground-minus-boundary cores. Reproduce it and its test scores with:

    nice -n 19 python -m metrics.nuclei --data ../shared/data --out metrics/weights/nuclei-seg

The typed segmenter (``metrics/weights/nuclei-types``, :data:`TYPED`) adds a type head for
CoNSeP's 4 nucleus types (trained on CoNSeP train tiles: ``--types``); :meth:`NucleiSegmenter.classify`
gives (instance map, class map) pairs and :func:`typed_scores` HoVer-Net's per-class F1.

Example:
    >>> seg = NucleiSegmenter.load()                                          # doctest: +SKIP
    >>> stats = nuclear_features(real_tiles, seg)                             # doctest: +SKIP
    >>> nuclear_distances(stats, nuclear_features(synthetic_tiles, seg))      # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from metrics.segmentation import MaskSet, TinyUNet, aji, dice, load_mask_folder, train_segmenter
from metrics.stats import Estimate
from pixgen.errors import InputError, ModelLoadError, PixgenError

__all__ = [
    "BUNDLED",
    "TYPED",
    "TYPE_NAMES",
    "TILE_FEATURES",
    "NUCLEUS_FEATURES",
    "NucleiSegmenter",
    "NuclearFeatures",
    "nuclear_features",
    "nuclear_distances",
    "nuclear_statistics",
    "instances_from_maps",
    "match_f1",
    "load_training_tiles",
    "train_nuclei_segmenter",
    "score_segmenter",
    "typed_counts",
    "typed_scores",
    "typed_difference",
    "main",
]

BUNDLED = Path(__file__).parent / "weights" / "nuclei-seg"
TYPED = Path(__file__).parent / "weights" / "nuclei-types"  # with a type head: CoNSeP's 4 nucleus types
TYPE_NAMES = ("other", "inflammatory", "epithelial", "spindle-shaped")  # classes 1..4, as pixgen.masks.CLASSES
WEIGHTS, CONFIG = "model.safetensors", "config.json"
MPP = 0.5  # um/px the segmenter works at: the generator's scale
TILE = 128  # px: a 64 um field
FIELD_PX = TILE * TILE  # pixels of a 64 x 64 um field at MPP
TILE_FEATURES = ("nuclei_per_field", "nuclear_fraction")
NUCLEUS_FEATURES = ("area_um2", "eccentricity", "solidity", "hematoxylin", "chromatin_sd", "edge_contrast")
RING = 2  # px (1 um) around a nucleus: its surroundings for edge_contrast
MATCH_RADIUS = 6.0  # px (3 um): centroid pairing radius for type F1, HoVer-Net's 12 px at 0.25 um/px
_RECIPE = "python -m metrics.nuclei --data ../shared/data --out DIR"


# ---------------------------------------------------------------------------------------------
# Instances from the segmenter's maps
# ---------------------------------------------------------------------------------------------


def instances_from_maps(foreground: np.ndarray, boundary: np.ndarray, threshold: float = 0.5, min_size: int = 8) -> np.ndarray:
    """Instance map (0 = background) from foreground and boundary probabilities.

    Cores (foreground and not boundary) seed a watershed of the boundary map inside the
    foreground, so touching nuclei separated by a predicted boundary become two instances;
    foreground without a core becomes an instance of its own; instances under ``min_size`` px
    are dropped.

    Example (two squares touching along a boundary column):
        >>> fg = np.zeros((8, 12)); fg[2:6, 1:11] = 1
        >>> bd = np.zeros((8, 12)); bd[2:6, 5:7] = 1
        >>> int(instances_from_maps(fg, bd, min_size=4).max())
        2
    """
    from skimage.measure import label
    from skimage.segmentation import watershed

    mask = foreground > threshold
    markers = label(mask & (boundary <= threshold), connectivity=1)
    inst = watershed(boundary, markers, mask=mask)
    orphans = label(mask & (inst == 0), connectivity=1)  # foreground no core reached
    inst = np.where(orphans > 0, orphans + inst.max(), inst)
    sizes = np.bincount(inst.ravel())
    inst[sizes[inst] < min_size] = 0
    return label(inst, connectivity=1, background=0) if inst.any() else inst


def match_f1(gt: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> float:
    """Object-level F1: a predicted and a true nucleus match when their IoU exceeds ``iou``
    (unique for ``iou >= 0.5``). 1.0 when both maps are empty.

    Example:
        >>> gt = np.zeros((6, 6), int); gt[0:3, 0:3] = 1; gt[4:6, 4:6] = 2
        >>> pr = np.zeros((6, 6), int); pr[0:3, 0:3] = 5
        >>> match_f1(gt, pr)   # one of two found, no false positive
        0.6666666666666666
    """
    gt_ids, gi = np.unique(gt, return_inverse=True)
    pr_ids, pi = np.unique(pred, return_inverse=True)
    table = np.bincount(gi.ravel() * len(pr_ids) + pi.ravel(), minlength=len(gt_ids) * len(pr_ids)).reshape(len(gt_ids), len(pr_ids))
    inter = table[np.ix_(gt_ids != 0, pr_ids != 0)]
    n_gt, n_pr = inter.shape
    if n_gt + n_pr == 0:
        return 1.0
    union = table[gt_ids != 0].sum(1)[:, None] + table[:, pr_ids != 0].sum(0)[None, :] - inter
    tp = int((inter / np.maximum(union, 1) > iou).sum())
    return 2 * tp / (n_gt + n_pr)


# ---------------------------------------------------------------------------------------------
# The segmenter
# ---------------------------------------------------------------------------------------------


def _rescale(image: np.ndarray, factor: float, resample: int = Image.LANCZOS) -> np.ndarray:
    """Resize an HWC uint8 image (or an HW instance map with ``Image.NEAREST``) by ``factor``."""
    if factor == 1:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if image.ndim == 2:  # instance ids: int32 mode, nearest neighbour
        return np.asarray(Image.fromarray(image.astype(np.int32)).resize(size, Image.NEAREST)).astype(np.int64)
    return np.asarray(Image.fromarray(image).resize(size, resample))


@dataclass
class NucleiSegmenter:
    """A :class:`TinyUNet` with outputs foreground, boundary and, for a typed segmenter, one
    logit per nucleus type (``n_types``), working at ``mpp`` um/px.

    Example:
        >>> seg = NucleiSegmenter(TinyUNet(out_channels=2))
        >>> seg.instances([np.zeros((64, 64, 3), np.uint8)])[0].shape
        (64, 64)
        >>> typed = NucleiSegmenter.load(TYPED)                                  # doctest: +SKIP
        >>> inst, classes = typed.classify([tile])[0]   # classes: 0 background, 1..4 TYPE_NAMES  # doctest: +SKIP
    """

    model: TinyUNet
    mpp: float = MPP
    threshold: float = 0.5
    min_size: int = 8
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: str | Path = BUNDLED) -> "NucleiSegmenter":
        """Load a segmenter saved by :meth:`save` (by default the bundled one)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
            raise ModelLoadError(f"no nuclei segmenter in {folder} (needs {WEIGHTS} and {CONFIG})", fix=f"train one: {_RECIPE}")
        try:
            info = json.loads((folder / CONFIG).read_text())
            model = TinyUNet(int(info["width"]), out_channels=len(info.get("outputs", "ab")))
            model.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()})
        except Exception as err:  # bad JSON, missing keys, other shapes, corrupt file
            raise ModelLoadError(f"unreadable nuclei segmenter in {folder}: {type(err).__name__}: {str(err)[:200]}", fix=f"retrain it: {_RECIPE}") from err
        return cls(model.eval(), float(info["mpp"]), float(info["threshold"]), int(info["min_size"]), info)

    def save(self, folder: str | Path, **info: Any) -> Path:
        """Write fp16 ``model.safetensors`` and ``config.json`` (architecture, scale, post-processing, ``info``)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(folder / WEIGHTS))
        types = [f"type:{n}" for n in TYPE_NAMES[: self.n_types]]
        config = {"architecture": "metrics.segmentation.TinyUNet", "width": self.model.enc1[0].out_channels,
                  "outputs": ["foreground", "boundary", *types], "mpp": self.mpp, "threshold": self.threshold, "min_size": self.min_size, **info}
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        self.info = config
        return folder

    @property
    def n_types(self) -> int:
        """Nucleus types of the type head (0: an untyped segmenter)."""
        return self.model.head.out_channels - 2

    @torch.no_grad()
    def probabilities(self, images: Sequence[np.ndarray], batch_size: int = 32) -> list[np.ndarray]:
        """(2, H, W) foreground and boundary probabilities per HWC uint8 image (at the segmenter's
        scale), then, for a typed segmenter, the type head's raw logits (n_types, H, W)."""
        from metrics.segmentation import _to_input

        out: list[np.ndarray] = []
        model = self.model.eval()
        i = 0
        while i < len(images):
            j = i + 1  # a batch of consecutive same-size images
            while j < len(images) and j - i < batch_size and images[j].shape == images[i].shape:
                j += 1
            h, w = images[i].shape[:2]
            x = torch.nn.functional.pad(_to_input(images[i:j]), (0, -w % 4, 0, -h % 4), mode="reflect")
            logit = model(x)[:, :, :h, :w]
            out += list(torch.cat([torch.sigmoid(logit[:, :2]), logit[:, 2:]], 1).numpy())
            i = j
        return out

    def instances(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Instance maps of HWC uint8 images already at the segmenter's ``mpp``."""
        return [instances_from_maps(p[0], p[1], self.threshold, self.min_size) for p in self.probabilities(images)]

    def classify(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(instance map, class map) per HWC uint8 image at the segmenter's ``mpp``: every nucleus
        takes the type most of its pixels vote for (HoVer-Net's rule); classes 1..``n_types``
        (:data:`TYPE_NAMES`), 0 = background."""
        from metrics.segmentation import instance_classes

        if not self.n_types:
            raise InputError("this nuclei segmenter has no type head", fix=f"load the typed one: NucleiSegmenter.load(TYPED) ({TYPED})")
        out = []
        for p in self.probabilities(images):
            inst = instances_from_maps(p[0], p[1], self.threshold, self.min_size)
            _, classes = instance_classes(inst, np.where(inst > 0, p[2:].argmax(0) + 1, 0))
            out.append((inst, np.concatenate([[0], classes])[inst]))  # instance ids are 1..K in order
        return out


# ---------------------------------------------------------------------------------------------
# Features and distances
# ---------------------------------------------------------------------------------------------


@dataclass
class NuclearFeatures:
    """Per-tile and per-nucleus feature arrays of one image set; ``tile`` = tile index of each nucleus."""

    per_tile: dict[str, np.ndarray]
    per_nucleus: dict[str, np.ndarray]
    tile: np.ndarray

    def __len__(self) -> int:
        return len(self.tile_index)

    @property
    def tile_index(self) -> np.ndarray:
        return np.arange(len(next(iter(self.per_tile.values()))))

    def take(self, tiles: np.ndarray) -> "NuclearFeatures":
        """The features of the given tiles (repeats allowed: bootstrap resampling)."""
        tiles = np.asarray(tiles, dtype=np.int64)
        order = np.argsort(self.tile, kind="stable")
        start = np.searchsorted(self.tile[order], np.arange(len(self) + 1))
        lens = np.diff(start)[tiles]
        first = np.repeat(start[tiles] - (np.cumsum(lens) - lens), lens)  # vectorised concatenation of ranges
        rows = order[first + np.arange(lens.sum())]
        new_tile = np.repeat(np.arange(len(tiles)), lens)
        return NuclearFeatures({k: v[tiles] for k, v in self.per_tile.items()}, {k: v[rows] for k, v in self.per_nucleus.items()}, new_tile)

    def summary(self) -> dict[str, float]:
        """Medians of every feature (NaN for per-nucleus features of a set without nuclei)."""
        out = {k: float(np.median(v)) for k, v in self.per_tile.items()}
        out.update({k: float(np.median(v)) if len(v) else float("nan") for k, v in self.per_nucleus.items()})
        out["n_nuclei"] = len(self.tile)
        return out


def nuclear_features(images: Sequence[np.ndarray], segmenter: NucleiSegmenter, mpp: float = MPP) -> NuclearFeatures:
    """Segment HWC uint8 images taken at ``mpp`` um/px and measure their nuclei.

    Example:
        >>> f = nuclear_features([np.full((64, 64, 3), 230, np.uint8)], NucleiSegmenter(TinyUNet(out_channels=2)))
        >>> sorted(f.per_tile)
        ['nuclear_fraction', 'nuclei_per_field']
    """
    from skimage.color import rgb2hed
    from skimage.measure import regionprops_table
    from skimage.segmentation import expand_labels

    scaled = [_rescale(np.asarray(im, np.uint8), mpp / segmenter.mpp) for im in images]
    per_tile: dict[str, list[float]] = {k: [] for k in TILE_FEATURES}
    per_nucleus: dict[str, list[np.ndarray]] = {k: [] for k in NUCLEUS_FEATURES}
    tiles = []
    for t, (im, inst) in enumerate(zip(scaled, segmenter.instances(scaled))):
        hema = rgb2hed(im)[..., 0]
        props = regionprops_table(inst, intensity_image=hema, properties=("label", "area", "eccentricity", "solidity", "intensity_mean", "intensity_std"))
        ring = expand_labels(inst, RING)
        ring[inst > 0] = 0
        around = dict(zip(*regionprops_table(ring, intensity_image=hema, properties=("label", "intensity_mean")).values()))
        n = len(props["area"])
        per_tile["nuclei_per_field"].append(n * FIELD_PX / inst.size)
        per_tile["nuclear_fraction"].append(float((inst > 0).mean()))
        per_nucleus["area_um2"].append(props["area"] * segmenter.mpp**2)
        per_nucleus["eccentricity"].append(props["eccentricity"])
        per_nucleus["solidity"].append(props["solidity"])
        per_nucleus["hematoxylin"].append(props["intensity_mean"])
        per_nucleus["chromatin_sd"].append(props["intensity_std"])
        inside = props["intensity_mean"]  # a nucleus enclosed by others has no ring: contrast 0
        per_nucleus["edge_contrast"].append(inside - np.array([around.get(lab, m) for lab, m in zip(props["label"], inside)]))
        tiles.append(np.full(n, t))
    return NuclearFeatures(
        {k: np.asarray(v, np.float64) for k, v in per_tile.items()},
        {k: np.concatenate(v).astype(np.float64) if v else np.zeros(0) for k, v in per_nucleus.items()},
        np.concatenate(tiles).astype(np.int64) if tiles else np.zeros(0, np.int64),
    )


def _w1(a: np.ndarray, b: np.ndarray) -> float:
    """1-D Wasserstein-1, the integral of |CDF_a - CDF_b|. Written here because scipy 1.17's
    ``wasserstein_distance`` takes 13x the CPU (8 vs 0.6 ms at 9000 vs 3000 values), which the
    bootstrap multiplies by thousands; equal to it to rounding (tested)."""
    a, b = np.sort(a), np.sort(b)
    v = np.sort(np.concatenate([a, b]))
    cdf_a, cdf_b = np.searchsorted(a, v[:-1], side="right") / len(a), np.searchsorted(b, v[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(v)))


def _distances(ref: NuclearFeatures, cand: NuclearFeatures, spread: dict[str, float]) -> dict[str, float]:
    """Wasserstein-1 / reference spread per feature, and their mean (NaN where a side has no nucleus)."""
    out = {}
    for k in TILE_FEATURES:
        out[k] = _w1(ref.per_tile[k], cand.per_tile[k]) / spread[k]
    for k in NUCLEUS_FEATURES:
        a, b = ref.per_nucleus[k], cand.per_nucleus[k]
        out[k] = _w1(a, b) / spread[k] if len(a) and len(b) else float("nan")
    out["aggregate"] = float(np.mean(list(out.values())))
    return out


def nuclear_distances(ref: NuclearFeatures, cand: NuclearFeatures, n_boot: int = 200, seed: int = 0) -> dict[str, Estimate]:
    """Per-feature distances (Wasserstein-1 in units of the reference's standard deviation) and
    their mean ``aggregate``, each with a 95 % normal bootstrap interval (value +- 1.96 SD of
    replicates resampling the tiles of both sets, clipped at 0).

    Example:
        >>> f = NuclearFeatures({"nuclei_per_field": np.arange(5.0), "nuclear_fraction": np.arange(5.0)},
        ...                     {k: np.arange(5.0) for k in NUCLEUS_FEATURES}, np.arange(5))
        >>> nuclear_distances(f, f, n_boot=0)["aggregate"]["value"]
        0.0
    """
    spread = {k: float(np.std(v)) or 1.0 for k, v in (*ref.per_tile.items(), *ref.per_nucleus.items())}
    value = _distances(ref, cand, spread)
    reps: dict[str, list[float]] = {k: [] for k in value}
    rng = np.random.default_rng(seed)
    for _ in range(n_boot if len(ref) and len(cand) else 0):
        d = _distances(ref.take(rng.integers(0, len(ref), len(ref))), cand.take(rng.integers(0, len(cand), len(cand))), spread)
        for k, v in d.items():
            reps[k].append(v)
    # resampling duplicates tiles, which shifts W1 upward: a normal interval around the value (as for FD)
    half = {k: 1.96 * float(np.nanstd(r, ddof=1)) if len(r) > 1 and not np.all(np.isnan(r)) else float("nan") for k, r in reps.items()}
    return {k: {"value": float(v), "ci": [max(v - half[k], 0.0), v + half[k]], "n_boot": n_boot} for k, v in value.items()}


def nuclear_statistics(
    real: Sequence[np.ndarray],
    rows: dict[str, tuple[Sequence[np.ndarray], Sequence[np.ndarray]]],
    segmenter: NucleiSegmenter | None = None,
    mpp: float = MPP,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """The report section: for each row ``name -> (candidate images, reference images)``, the
    distances of the candidate's nuclear statistics to the reference's, and every set's medians.
    Images are measured once (a reference that is a subset of ``real`` reuses its tiles).

    Example:
        >>> sec = nuclear_statistics(real, {"synthetic": (syn, real)})            # doctest: +SKIP
        >>> sec["rows"]["synthetic"]["distance"]["aggregate"]["value"]           # doctest: +SKIP
    """
    segmenter = segmenter or NucleiSegmenter.load()
    real_f = nuclear_features(real, segmenter, mpp)
    where = {id(im): i for i, im in enumerate(real)}
    out: dict[str, Any] = {
        "segmenter": segmenter.info.get("name", "nuclei-seg"), "mpp": mpp, "segmenter_mpp": segmenter.mpp,
        "features": {"per_tile": list(TILE_FEATURES), "per_nucleus": list(NUCLEUS_FEATURES)},
        "distance": "Wasserstein-1 / reference standard deviation; aggregate = mean over features",
        "real": real_f.summary(), "rows": {},
    }
    for name, (cand, ref) in rows.items():
        idx = [where.get(id(im)) for im in ref]
        ref_f = real_f if len(ref) == len(real) and idx == list(range(len(real))) else (
            real_f.take(np.asarray(idx)) if None not in idx else nuclear_features(ref, segmenter, mpp))
        cand_f = nuclear_features(cand, segmenter, mpp)
        out["rows"][name] = {"n_tiles": len(cand_f), "summary": cand_f.summary(), "distance": nuclear_distances(ref_f, cand_f, n_boot, seed)}
    return out


# ---------------------------------------------------------------------------------------------
# Training data, training and test scores
# ---------------------------------------------------------------------------------------------


def _tiles_of(ms: MaskSet) -> MaskSet:
    """Cut images larger than a tile into an overlapping grid of ``TILE`` px tiles covering them."""
    out = MaskSet([], [], [], None if ms.types is None else [])
    for k, (im, inst, path) in enumerate(zip(ms.images, ms.instances, ms.paths)):
        h, w = inst.shape
        ys = np.linspace(0, h - TILE, max(1, int(np.ceil(h / TILE)))).round().astype(int) if h > TILE else [0]
        xs = np.linspace(0, w - TILE, max(1, int(np.ceil(w / TILE)))).round().astype(int) if w > TILE else [0]
        for y in ys:
            for x in xs:
                out.images.append(np.ascontiguousarray(im[y : y + TILE, x : x + TILE]))
                out.instances.append(np.ascontiguousarray(inst[y : y + TILE, x : x + TILE]))
                out.paths.append(f"{path}@{y},{x}")
                if out.types is not None:
                    out.types.append(np.ascontiguousarray(ms.types[k][y : y + TILE, x : x + TILE]))
    return out


def load_training_tiles(data: str | Path, split: str = "train", source_mpp: float = 0.25, tile: bool = True,
                        sources: Sequence[str] = ("consep", "monuseg")) -> dict[str, MaskSet]:
    """CoNSeP and MoNuSeg ``split`` images with instance maps (and CoNSeP's class maps), rescaled
    from ``source_mpp`` to the segmenter's 0.5 um/px (LANCZOS images, nearest-neighbour instance
    ids and classes) and, with ``tile``, cut into 128 px tiles. MoNuSeg images whose instances are
    merged connected components (``index.json``: ``binary-components``) are left out: they would
    teach merged nuclei.

    Example:
        >>> sets = load_training_tiles("../shared/data")         # doctest: +SKIP
        >>> len(sets["consep"]), len(sets["monuseg"])            # doctest: +SKIP
        (432, 208)
    """
    data = Path(data)
    index = data / "monuseg" / "index.json"
    merged = {e["id"] for e in json.loads(index.read_text()) if e["instances"] != "xml"} if index.is_file() else set()
    out = {}
    for source in sources:
        ms = load_mask_folder(data / source / split)
        keep = [i for i, p in enumerate(ms.paths) if Path(p).stem not in merged]
        factor = source_mpp / MPP
        ms = MaskSet([_rescale(ms.images[i], factor) for i in keep], [_rescale(ms.instances[i], factor) for i in keep],
                     [ms.paths[i] for i in keep], None if ms.types is None else [_rescale(ms.types[i], factor) for i in keep])
        out[source] = _tiles_of(ms) if tile else ms
    return out


def foreground_boundary_target(instances: np.ndarray) -> np.ndarray:
    """(2, H, W) target: nuclear foreground, and each nucleus's inner boundary ring (which
    separates touching nuclei)."""
    from skimage.segmentation import find_boundaries

    return np.stack([instances > 0, find_boundaries(instances, mode="inner")])


def train_nuclei_segmenter(
    data: str | Path, steps: int = 1000, width: int = 16, crop: int = 64, batch_size: int = 16, seed: int = 0,
    log: Callable[[str], None] | None = None, typed: bool = False,
) -> NucleiSegmenter:
    """Train the segmenter on CoNSeP + MoNuSeg train tiles (:func:`load_training_tiles`) with
    :func:`metrics.segmentation.train_segmenter` on foreground + boundary targets, ``crop`` px crops.
    ``typed``: on CoNSeP train tiles only (the typed dataset), with a type head for its 4 types.

    Example:
        >>> seg = train_nuclei_segmenter("../shared/data")   # doctest: +SKIP
    """
    sets = load_training_tiles(data, "train", sources=("consep",) if typed else ("consep", "monuseg"))
    both = sets["consep"] if typed else sets["consep"].concat(sets["monuseg"])
    model = train_segmenter(both, steps=steps, crop=crop, batch_size=batch_size, seed=seed, targets=foreground_boundary_target,
                            n_types=len(TYPE_NAMES) if typed else 0, width=width, log=log)
    seg = NucleiSegmenter(model)
    seg.info = {"n_train_tiles": {k: len(v) for k, v in sets.items()}}
    return seg


def score_segmenter(segmenter: NucleiSegmenter, test: MaskSet) -> dict[str, Any]:
    """Mean per-image foreground Dice, AJI and F1 at IoU 0.5, and the Pearson correlation and
    mean absolute error of per-image nucleus counts, on images at the segmenter's scale; for a
    typed segmenter on a set with class maps also ``type_f1`` (:func:`typed_scores`)."""
    typed = segmenter.n_types > 0 and test.types is not None
    out = segmenter.classify(test.images) if typed else None
    pred = [o[0] for o in out] if typed else segmenter.instances(test.images)
    d = [dice(p > 0, g > 0) for p, g in zip(pred, test.instances)]
    a = [aji(g, p) for p, g in zip(pred, test.instances)]
    f = [match_f1(g, p) for p, g in zip(pred, test.instances)]
    n_pred = np.array([len(np.unique(p)) - 1 for p in pred])
    n_true = np.array([len(np.unique(g)) - 1 for g in test.instances])
    scores: dict[str, Any] = {
        "n_images": len(pred), "dice": float(np.mean(d)), "aji": float(np.nanmean(a)), "f1_iou50": float(np.mean(f)),
        "count_pearson": float(np.corrcoef(n_true, n_pred)[0, 1]) if min(n_true.std(), n_pred.std()) > 0 else None,
        "count_mae": float(np.abs(n_true - n_pred).mean()), "count_true_mean": float(n_true.mean()), "count_pred_mean": float(n_pred.mean()),
    }
    if typed:
        scores["type_f1"] = typed_scores(out, test.instances, test.types, segmenter.n_types, n_boot=200)
    return scores


def typed_counts(predicted: Sequence[tuple[np.ndarray, np.ndarray]], instances: Sequence[np.ndarray], types: Sequence[np.ndarray],
                 n_types: int = len(TYPE_NAMES), radius: float = MATCH_RADIUS) -> np.ndarray:
    """Per-image pairing counts ``(N, n_types + 1, 5)`` (:func:`metrics.segmentation.type_counts`)
    of predicted ``(instance map, class map)`` pairs against true instance and class maps."""
    from metrics.segmentation import type_counts

    return np.stack([type_counts(g, t, p, c, n_types, radius) for (p, c), g, t in zip(predicted, instances, types)])


def _names(n_types: int) -> dict[str, str]:
    return {"detection": "detection", **{str(k): TYPE_NAMES[k - 1] for k in range(1, n_types + 1)}}


def typed_scores(predicted: Sequence[tuple[np.ndarray, np.ndarray]] | np.ndarray, instances: Sequence[np.ndarray] = (),
                 types: Sequence[np.ndarray] = (), n_types: int = len(TYPE_NAMES), radius: float = MATCH_RADIUS,
                 n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Detection F1 and per-class type F1 (:func:`metrics.segmentation.typed_f1`, pooled over the
    images as HoVer-Net / CoNSeP practice; nuclei paired by centroid within ``radius`` px) of
    predicted ``(instance map, class map)`` pairs against true ones (or of ready
    :func:`typed_counts`), each with a 95 % bootstrap interval over images (``None`` for a class
    neither present nor predicted), plus the true nuclei per class.

    Example:
        >>> s = typed_scores(seg.classify(images), insts, types)    # doctest: +SKIP
        >>> s["f1"]["inflammatory"]["value"]                        # doctest: +SKIP
    """
    from metrics.segmentation import typed_f1
    from metrics.stats import estimate

    counts = predicted if isinstance(predicted, np.ndarray) else typed_counts(predicted, instances, types, n_types, radius)
    names = _names(counts.shape[1] - 1)
    value = typed_f1(counts.sum(0))
    f1 = {names[k]: estimate(v, lambda i, k=k: typed_f1(counts[i].sum(0))[k], [len(counts)], n_boot, seed) if np.isfinite(v) else None
          for k, v in value.items()}  # None: a class neither present nor predicted (F1 undefined)
    true_per_class = counts[:, 1:, 0].sum(0) + counts[:, 1:, 2].sum(0) + counts[:, 1:, 4].sum(0)  # tp_c + fn_c + fn_d
    return {"f1": f1, "n_true": {names[str(k)]: int(n) for k, n in enumerate(true_per_class, 1)},
            "radius_px": radius, "radius_um": radius * MPP, "n_images": len(counts)}


def typed_difference(counts_a: np.ndarray, counts_b: np.ndarray, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """F1 of set A minus F1 of set B per class (detection too), for two :func:`typed_counts` of
    the same true masks in the same order (e.g. generated with and without the mask): a paired
    bootstrap resamples the same images for both. ``None`` where either F1 is undefined.

    Example:
        >>> typed_difference(typed_counts(gen, insts, types), typed_counts(floor, insts, types))  # doctest: +SKIP
    """
    from metrics.segmentation import typed_f1
    from metrics.stats import estimate

    if counts_a.shape != counts_b.shape:
        raise InputError(f"paired counts differ in shape: {counts_a.shape} vs {counts_b.shape}", fix="score the same masks in both sets")
    a, b = typed_f1(counts_a.sum(0)), typed_f1(counts_b.sum(0))
    names = _names(counts_a.shape[1] - 1)

    def diff(i: np.ndarray, k: str) -> float:
        return typed_f1(counts_a[i].sum(0))[k] - typed_f1(counts_b[i].sum(0))[k]

    return {names[k]: estimate(a[k] - b[k], lambda i, k=k: diff(i, k), [len(counts_a)], n_boot, seed)
            if np.isfinite(a[k] - b[k]) else None for k in a}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: train the nuclei segmenter (unless ``--test-only``), score it on the CoNSeP and MoNuSeg
    test splits, save it with its scores; print the config as JSON."""
    ap = argparse.ArgumentParser(prog="python -m metrics.nuclei", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="the shared data folder (consep/, monuseg/)")
    ap.add_argument("--out", required=True, type=Path, help="output folder (model.safetensors, config.json)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--width", type=int, default=16, help="U-Net base width")
    ap.add_argument("--crop", type=int, default=64, help="training crop, px")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-only", action="store_true", help="only score the segmenter already in --out")
    ap.add_argument("--types", action="store_true", help="with a type head for CoNSeP's 4 nucleus types, trained on "
                    "CoNSeP train only (the bundled metrics/weights/nuclei-types)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        t0 = time.perf_counter()
        if args.test_only:
            seg = NucleiSegmenter.load(args.out)
            info = {k: v for k, v in seg.info.items() if k not in ("architecture", "width", "outputs", "mpp", "threshold", "min_size")}
        else:
            seg = train_nuclei_segmenter(args.data, args.steps, args.width, args.crop, args.batch_size, args.seed,
                                         log=lambda s: print(s, file=sys.stderr, flush=True), typed=args.types)
            info = {**seg.info, "steps": args.steps, "crop": args.crop, "batch_size": args.batch_size, "seed": args.seed,
                    "train_seconds": round(time.perf_counter() - t0, 1),
                    "recipe": f"python -m metrics.nuclei --data DATA --out DIR --steps {args.steps} --width {args.width} "
                              f"--crop {args.crop} --batch-size {args.batch_size} --seed {args.seed} --threads {args.threads}"
                              + (" --types" if args.types else "")}
        tests = load_training_tiles(args.data, "test", tile=False)  # whole images: CoNSeP tiles, MoNuSeg 500 px
        info["test"] = {name: score_segmenter(seg, ms) for name, ms in tests.items()}
        info["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        seg.save(args.out, name=info.pop("name", "nuclei-types" if seg.n_types else "nuclei-seg"), **info)
    except PixgenError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(seg.info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
