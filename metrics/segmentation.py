"""Nuclei segmentation for the mask-utility test: a tiny U-Net, Dice and AJI.

Instance maps are integer arrays (0 = background, 1..K = nuclei). Predicted instances are
the connected components (4-connectivity, scikit-image) of the thresholded probability map.

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
    """Images (HWC uint8) with their instance maps (HW int, 0 = background)."""

    images: list[np.ndarray]
    instances: list[np.ndarray]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def concat(self, other: "MaskSet") -> "MaskSet":
        return MaskSet(self.images + other.images, self.instances + other.instances, self.paths + other.paths)


def is_mask_folder(root: str | Path) -> bool:
    """True for a folder laid out as ``images/`` + ``inst/`` (or ``masks/``), like CoNSeP."""
    root = Path(root)
    return (root / "images").is_dir() and any((root / d).is_dir() for d in MASK_DIRS)


def load_mask_folder(root: str | Path, max_images: int | None = None, seed: int = 0) -> MaskSet:
    """Read ``images/`` and the same-stem files of ``inst/`` (uint16 instance maps) or ``masks/``
    (binary masks; instances = connected components, so touching nuclei merge).

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
    return MaskSet(images, instances, [str(f) for f in files])


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
    width: int = 16,
    lr: float = 2e-3,
    log: Callable[[str], None] | None = None,
) -> TinyUNet:
    """Train a :class:`TinyUNet` on random ``crop`` px crops (with flips) for a fixed number of
    steps (so real-only and real+synthetic runs get the same budget); BCE + soft-Dice loss per
    target channel. ``targets`` maps an instance-map crop to the (C, H, W) target (C = the
    model's output channels); ``log`` receives a progress line every 100 steps."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = TinyUNet(width, out_channels=len(targets(np.zeros((4, 4), np.int64))))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        ims, insts = [], []
        for i in rng.integers(0, len(data), batch_size):
            im, inst = data.images[i], data.instances[i]
            h, w = inst.shape
            c = min(crop, h, w) // 4 * 4
            y, x = rng.integers(0, h - c + 1), rng.integers(0, w - c + 1)
            im, inst = im[y : y + c, x : x + c], inst[y : y + c, x : x + c]
            if rng.random() < 0.5:
                im, inst = im[:, ::-1], inst[:, ::-1]
            if rng.random() < 0.5:
                im, inst = im[::-1], inst[::-1]
            ims.append(np.ascontiguousarray(im))
            insts.append(np.ascontiguousarray(inst))
        if len({m.shape for m in insts}) > 1:  # images of mixed small sizes: crop to the smallest
            s = min(min(m.shape) for m in insts)
            ims, insts = [m[:s, :s] for m in ims], [m[:s, :s] for m in insts]
        x = _to_input(ims)
        target = torch.from_numpy(np.stack([targets(m) for m in insts])).float()  # (B, C, H, W)
        logit = model(x)
        prob = torch.sigmoid(logit)
        inter, total = (prob * target).sum(dim=(0, 2, 3)), (prob + target).sum(dim=(0, 2, 3))
        soft_dice = (1 - (2 * inter + 1) / (total + 1)).mean()
        loss = F.binary_cross_entropy_with_logits(logit, target) + soft_dice
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
