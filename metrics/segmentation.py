"""Nuclei segmentation for the mask-utility test: a tiny U-Net (optionally with a nucleus-type
head), Dice, AJI and per-class F1 of nucleus types.

Instance maps are integer arrays (0 = background, 1..K = nuclei); class maps give each pixel
a nucleus type (0 = background, 1..T, as CoNSeP's ``types/``). Predicted instances are the
connected components (4-connectivity, scikit-image) of the thresholded probability map.

Example:
    >>> gt = np.zeros((8, 8), int); gt[1:4, 1:4] = 1; gt[5:8, 5:8] = 2
    >>> aji(gt, gt), dice(gt > 0, gt > 0)
    (1.0, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.measure import label as connected_components
from torch import nn

from pixgen.errors import InputError

__all__ = [
    "MaskSet",
    "load_mask_folder",
    "is_mask_folder",
    "dice",
    "aji",
    "instance_classes",
    "type_counts",
    "typed_f1",
    "instances_from_probability",
    "TinyUNet",
    "foreground_target",
    "train_segmenter",
    "predict_probability",
]

MASK_DIRS = ("inst", "masks")


# ---------------------------------------------------------------------------------------------
# Data: <root>/images/*.{png,jpg} with <root>/inst/*.png (instance ids) or <root>/masks/*.png
# ---------------------------------------------------------------------------------------------


@dataclass
class MaskSet:
    """Images (HWC uint8) with their instance maps (HW int, 0 = background) and, where known,
    their class maps (HW int, 0 = background, 1..T nucleus types; ``None`` for binary datasets)."""

    images: list[np.ndarray]
    instances: list[np.ndarray]
    paths: list[str]
    types: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def concat(self, other: "MaskSet") -> "MaskSet":
        """Both sets in one; class maps are kept only when both sets have them."""
        types = self.types + other.types if self.types is not None and other.types is not None else None
        return MaskSet(self.images + other.images, self.instances + other.instances, self.paths + other.paths, types)

    def subset(self, index: Sequence[int]) -> "MaskSet":
        """The items at ``index``, in that order.

        Example:
            >>> s = MaskSet([np.zeros((4, 4, 3))] * 3, [np.zeros((4, 4))] * 3, ["a", "b", "c"])
            >>> s.subset([2, 0]).paths
            ['c', 'a']
        """
        pick = lambda xs: [xs[i] for i in index]
        return MaskSet(pick(self.images), pick(self.instances), pick(self.paths), None if self.types is None else pick(self.types))


def is_mask_folder(root: str | Path) -> bool:
    """True for a folder laid out as ``images/`` + ``inst/`` (or ``masks/``), like CoNSeP."""
    root = Path(root)
    return (root / "images").is_dir() and any((root / d).is_dir() for d in MASK_DIRS)


def load_mask_folder(root: str | Path, max_images: int | None = None, seed: int = 0) -> MaskSet:
    """Read ``images/`` and the same-stem files of ``inst/`` (uint16 instance maps) or ``masks/``
    (binary masks; instances = connected components, so touching nuclei merge), and of
    ``types/`` (class maps) when every image has one there.

    Example:
        >>> s = load_mask_folder("/data/consep/test", max_images=20)     # doctest: +SKIP
    """
    root = Path(root)
    mask_dir = next((root / d for d in MASK_DIRS if (root / d).is_dir()), None)
    if not (root / "images").is_dir() or mask_dir is None:
        raise InputError(f"{root} is not a mask folder", fix="lay it out as images/ and inst/ (or masks/)")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff")}
    files = sorted(p for p in (root / "images").iterdir() if p.stem in masks)
    if not files:
        raise InputError(f"no image in {root / 'images'} has a mask of the same name in {mask_dir}")
    if max_images is not None and len(files) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(files), max_images, replace=False))
        files = [files[i] for i in keep]
    images, instances = [], []
    for f in files:
        images.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8))
        m = np.asarray(Image.open(masks[f.stem]))
        m = m[..., 0] if m.ndim == 3 else m
        instances.append(m.astype(np.int64) if mask_dir.name == "inst" else connected_components(m > 0, connectivity=1))
    type_files = [root / "types" / f"{f.stem}.png" for f in files]
    types = [np.asarray(Image.open(t)).astype(np.int64) for t in type_files] if all(t.is_file() for t in type_files) else None
    return MaskSet(images, instances, [str(f) for f in files], types)


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Binary Dice ``2|P & G| / (|P| + |G|)``; 1.0 when both are empty.

    Example:
        >>> dice(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
        0.6666666666666666
    """
    p, g = np.asarray(pred) > 0, np.asarray(gt) > 0
    total = p.sum() + g.sum()
    return 1.0 if total == 0 else float(2 * (p & g).sum() / total)


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017) of two instance maps.

    For every ground-truth nucleus G, the predicted nucleus S of highest IoU with it adds
    ``|G & S|`` to C and ``|G | S|`` to U (a prediction may serve several G, as in the paper);
    a G that touches no prediction adds ``|G|`` to U only; every prediction used by no G adds
    its area to U. AJI = C / U. NaN when both maps are empty.

    Written here by hand because no maintained library provides it (scikit-image, torchmetrics
    and MONAI have Dice / IoU / panoptic quality, not AJI); the research repos that carry a copy
    are unpackaged scripts.

    Example (one exact match, one nucleus shifted by one column, one false positive):
        >>> gt = np.zeros((10, 10), int); gt[0:4, 0:4] = 1; gt[5:9, 5:9] = 2
        >>> pr = np.zeros((10, 10), int); pr[0:4, 0:4] = 1; pr[5:9, 6:10] = 2; pr[0:2, 8:10] = 3
        >>> aji(gt, pr)   # (16 + 12) / (16 + 20 + 4)
        0.7
    """
    gt = np.asarray(gt, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    if gt.shape != pred.shape:
        raise InputError(f"instance maps differ in shape: {gt.shape} vs {pred.shape}")
    gt_ids, gt_inv = np.unique(gt, return_inverse=True)
    pr_ids, pr_inv = np.unique(pred, return_inverse=True)
    # contingency table: overlap[g, p] = pixels with gt label g and predicted label p
    overlap = np.bincount(gt_inv.ravel() * len(pr_ids) + pr_inv.ravel(), minlength=len(gt_ids) * len(pr_ids))
    overlap = overlap.reshape(len(gt_ids), len(pr_ids))
    gt_fg, pr_fg = gt_ids != 0, pr_ids != 0
    inter = overlap[np.ix_(gt_fg, pr_fg)]  # (n_gt, n_pred), background dropped
    area_gt, area_pr = overlap[gt_fg].sum(axis=1), overlap[:, pr_fg].sum(axis=0)
    if inter.shape[0] == 0 and inter.shape[1] == 0:
        return float("nan")
    union = area_gt[:, None] + area_pr[None, :] - inter
    c = u = 0
    used = np.zeros(len(area_pr), dtype=bool)
    for g in range(len(area_gt)):
        if inter.shape[1] == 0 or inter[g].max() == 0:
            u += area_gt[g]
            continue
        best = int(np.argmax(inter[g] / union[g]))
        c += inter[g, best]
        u += union[g, best]
        used[best] = True
    u += area_pr[~used].sum()
    return float(c / u)


def instance_classes(inst: np.ndarray, class_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroids ``(K, 2)`` (row, column) and classes ``(K,)`` of the nuclei of an instance map;
    a nucleus's class is the most frequent non-zero class of its pixels (0 when it has none), as
    HoVer-Net assigns a type to an instance.

    Example:
        >>> inst = np.array([[1, 1, 0, 2]]); cls = np.array([[3, 3, 0, 1]])
        >>> xy, c = instance_classes(inst, cls); xy.tolist(), c.tolist()
        ([[0.0, 0.5], [0.0, 3.0]], [3, 1])
    """
    from skimage.measure import regionprops_table

    inst = np.asarray(inst, np.int64)
    props = regionprops_table(inst, properties=("label", "centroid"))
    xy = np.stack([props["centroid-0"], props["centroid-1"]], 1) if len(props["label"]) else np.zeros((0, 2))
    k, c = inst.ravel(), np.asarray(class_map, np.int64).ravel()
    n_cls = int(c.max(initial=0)) + 1
    votes = np.bincount(k * n_cls + c, minlength=(int(k.max(initial=0)) + 1) * n_cls).reshape(-1, n_cls)[props["label"]]  # (K, classes)
    votes[:, 0] = 0  # background pixels of an instance do not vote
    return xy, np.where(votes.max(1, initial=0) > 0, votes.argmax(1), 0)


def type_counts(gt_inst: np.ndarray, gt_classes: np.ndarray, pred_inst: np.ndarray, pred_classes: np.ndarray,
                n_types: int, radius: float) -> np.ndarray:
    """Per-image counts for :func:`typed_f1`: nuclei are paired one-to-one by centroid (Hungarian
    assignment on distance, pairs farther than ``radius`` px dropped), as HoVer-Net's evaluation.

    Returns an int array ``(n_types + 1, 5)``: row 0 = detection ``[tp, fp, fn, 0, 0]``; row c =
    class c ``[tp_c, fp_c, fn_c, fp_d, fn_d]`` where among the pairs tp_c = both c, fp_c = predicted
    c but truly another class, fn_c = truly c but predicted another, and fp_d / fn_d = unpaired
    predicted / true nuclei of class c.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    g_xy, g_c = instance_classes(gt_inst, gt_classes)
    p_xy, p_c = instance_classes(pred_inst, pred_classes)
    gi = pi = np.zeros(0, np.int64)
    if len(g_xy) and len(p_xy):
        dist = cdist(g_xy, p_xy)
        gi, pi = linear_sum_assignment(dist)
        keep = dist[gi, pi] <= radius
        gi, pi = gi[keep], pi[keep]
    out = np.zeros((n_types + 1, 5), np.int64)
    out[0, :3] = len(gi), len(p_xy) - len(pi), len(g_xy) - len(gi)
    g_un, p_un = np.delete(g_c, gi), np.delete(p_c, pi)
    for c in range(1, n_types + 1):
        tg, tp = g_c[gi] == c, p_c[pi] == c
        out[c] = [(tg & tp).sum(), (~tg & tp).sum(), (tg & ~tp).sum(), (p_un == c).sum(), (g_un == c).sum()]
    return out


def typed_f1(counts: np.ndarray) -> dict[str, float]:
    """Detection F1 and per-class type F1 from summed :func:`type_counts` (pooled over images, as
    HoVer-Net / CoNSeP practice): ``F_d = 2 tp / (2 tp + fp + fn)`` and
    ``F_c = 2 tp_c / (2 tp_c + 2 fp_c + 2 fn_c + fp_d + fn_d)``, so a class is penalised both for
    wrong types among the paired nuclei and for its unpaired ones. NaN where a class never occurs.
    Keys: ``detection``, ``1`` .. ``T``.

    Example (two true nuclei of classes 1 and 2; one found and typed right, one missed):
        >>> typed_f1(np.array([[1, 0, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 1]]))
        {'detection': 0.6666666666666666, '1': 1.0, '2': 0.0}
    """
    counts = np.asarray(counts, np.float64)
    ratio = lambda num, den: float(num / den) if den > 0 else float("nan")
    tp, fp, fn = counts[0, :3]
    out = {"detection": ratio(2 * tp, 2 * tp + fp + fn)}
    for c in range(1, len(counts)):
        tp_c, fp_c, fn_c, fp_d, fn_d = counts[c]
        out[str(c)] = ratio(2 * tp_c, 2 * (tp_c + fp_c + fn_c) + fp_d + fn_d)
    return out


def instances_from_probability(prob: np.ndarray, threshold: float = 0.5, min_size: int = 10) -> np.ndarray:
    """Instance map from a nuclei probability map: threshold, drop specks, connected components."""
    inst = connected_components(prob > threshold, connectivity=1)
    small = np.flatnonzero(np.bincount(inst.ravel()) < min_size)
    inst[np.isin(inst, small[small > 0])] = 0
    return connected_components(inst > 0, connectivity=1)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class TinyUNet(nn.Module):
    """A 3-level U-Net (16-32-64 channels, ~0.1 M parameters) giving ``out_channels`` logits per
    pixel (one for binary nuclei; foreground + boundary for :mod:`metrics.nuclei`).

    Input sides must be multiples of 4.

    Example:
        >>> TinyUNet()(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 1, 32, 32])
        >>> TinyUNet(out_channels=2)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 2, 32, 32])
    """

    def __init__(self, width: int = 16, out_channels: int = 1):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.mid = _block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), _block(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), _block(2 * w, w)
        self.head = nn.Conv2d(w, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)  # (B, w, H, W)
        e2 = self.enc2(F.max_pool2d(e1, 2))  # (B, 2w, H/2, W/2)
        m = self.mid(F.max_pool2d(e2, 2))  # (B, 4w, H/4, W/4)
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))  # (B, 2w, H/2, W/2)
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))  # (B, w, H, W)
        return self.head(d1)  # (B, out_channels, H, W)


def _to_input(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def foreground_target(instances: np.ndarray) -> np.ndarray:
    """The binary nuclei target (1, H, W) of an instance map."""
    return (instances > 0)[None]


def train_segmenter(
    data: MaskSet,
    steps: int = 300,
    crop: int = 96,
    batch_size: int = 16,
    seed: int = 0,
    *,
    targets: Callable[[np.ndarray], np.ndarray] = foreground_target,
    n_types: int = 0,
    width: int = 16,
    lr: float = 2e-3,
    log: Callable[[str], None] | None = None,
) -> TinyUNet:
    """Train a :class:`TinyUNet` on random ``crop`` px crops (with flips) for a fixed number of
    steps (so real-only and real+synthetic runs get the same budget); BCE + soft-Dice loss per
    target channel. ``targets`` maps an instance-map crop to the (C, H, W) target (C = the
    model's first output channels); ``log`` receives a progress line every 100 steps.

    With ``n_types`` > 0 (``data.types`` needed) the model has ``n_types`` more outputs, a type
    head: logits of classes 1..n_types, trained by cross-entropy on nucleus pixels only (as
    HoVer-Net's type branch; background is the foreground output's job).

    Example:
        >>> s = MaskSet([np.zeros((16, 16, 3), np.uint8)], [np.ones((16, 16), int)], ["a"], [np.full((16, 16), 2)])
        >>> train_segmenter(s, steps=1, crop=16, batch_size=1, n_types=4).head.out_channels
        5
    """
    if n_types and data.types is None:
        raise InputError("a type head needs class maps, and this training set has none",
                         fix="train on folders with types/ (CoNSeP layout), or pass n_types=0")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_out = len(targets(np.zeros((4, 4), np.int64)))
    model = TinyUNet(width, out_channels=n_out + n_types)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        ims, labels = [], []
        for i in rng.integers(0, len(data), batch_size):
            im = data.images[i]
            lab = np.stack([data.instances[i], data.types[i]]) if n_types else data.instances[i][None]  # (1 or 2, H, W)
            h, w = lab.shape[1:]
            c = min(crop, h, w) // 4 * 4
            y, x = rng.integers(0, h - c + 1), rng.integers(0, w - c + 1)
            im, lab = im[y : y + c, x : x + c], lab[:, y : y + c, x : x + c]
            if rng.random() < 0.5:
                im, lab = im[:, ::-1], lab[:, :, ::-1]
            if rng.random() < 0.5:
                im, lab = im[::-1], lab[:, ::-1]
            ims.append(np.ascontiguousarray(im))
            labels.append(np.ascontiguousarray(lab))
        if len({m.shape for m in labels}) > 1:  # images of mixed small sizes: crop to the smallest
            s = min(min(m.shape[1:]) for m in labels)
            ims, labels = [m[:s, :s] for m in ims], [m[:, :s, :s] for m in labels]
        x = _to_input(ims)
        target = torch.from_numpy(np.stack([targets(m[0]) for m in labels])).float()  # (B, C, H, W)
        logit = model(x)
        prob = torch.sigmoid(logit[:, :n_out])
        inter, total = (prob * target).sum(dim=(0, 2, 3)), (prob + target).sum(dim=(0, 2, 3))
        soft_dice = (1 - (2 * inter + 1) / (total + 1)).mean()
        loss = F.binary_cross_entropy_with_logits(logit[:, :n_out], target) + soft_dice
        if n_types:
            cls = torch.from_numpy(np.stack([m[1] for m in labels])) - 1  # (B, H, W); -1 = background, ignored
            if (cls >= 0).any():
                loss = loss + F.cross_entropy(logit[:, n_out:], cls, ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log and (step % 100 == 0 or step == steps):
            log(f"step {step}/{steps} loss {np.mean(losses[-100:]):.4f}")
    return model.eval()


@torch.no_grad()
def predict_probability(model: TinyUNet, image: np.ndarray) -> np.ndarray:
    """Probabilities for one HWC uint8 image (reflect-padded to a multiple of 4): (H, W) for a
    one-channel model, else (C, H, W).

    Example:
        >>> predict_probability(TinyUNet(), np.zeros((30, 30, 3), np.uint8)).shape
        (30, 30)
    """
    h, w = image.shape[:2]
    x = _to_input([image])
    x = F.pad(x, (0, -w % 4, 0, -h % 4), mode="reflect")
    prob = torch.sigmoid(model.eval()(x))[0, :, :h, :w].numpy()
    return prob[0] if len(prob) == 1 else prob
