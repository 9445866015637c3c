"""Image sets for evaluation: folders (optionally with class subfolders), subsets, crops and
the trivial baselines (colour-matched noise, blurred real images).

Images are kept as a list of HWC uint8 numpy arrays, so a set may hold images of different
sizes; detectors resize each batch to their own input size.

Example:
    >>> s = load_image_folder("tiles/", max_images=200, seed=0)      # doctest: +SKIP
    >>> s.classes, len(s), s.images[0].shape                          # doctest: +SKIP
    (['lung_aca', 'lung_n', 'lung_scc'], 200, (224, 224, 3))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from pixgen.errors import InputError
from pixgen.io import IMAGE_SUFFIXES, SetManifest, list_images, load_rgb

__all__ = [
    "ImageSet",
    "load_image_folder",
    "image_files",
    "stratified_subsample",
    "image_crops",
    "colour_matched_noise",
    "blurred",
    "to_nchw",
]


@dataclass
class ImageSet:
    """Images (HWC uint8), optional integer labels into ``classes``, and where each came from."""

    images: list[np.ndarray]
    labels: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: Sequence[int] | np.ndarray) -> "ImageSet":
        """The images at ``index`` (labels and paths follow)."""
        index = [int(i) for i in index]
        return ImageSet(
            images=[self.images[i] for i in index],
            labels=None if self.labels is None else self.labels[index],
            classes=list(self.classes),
            paths=[self.paths[i] for i in index] if self.paths else [],
        )

    def concat(self, other: "ImageSet") -> "ImageSet":
        """This set followed by ``other`` (both must have labels over the same classes, or neither)."""
        if (self.labels is None) != (other.labels is None) or (
            self.labels is not None and self.classes != other.classes
        ):
            raise InputError("cannot join a labelled and an unlabelled set, or sets with other classes")
        labels = None if self.labels is None else np.concatenate([self.labels, other.labels])
        return ImageSet(self.images + other.images, labels, list(self.classes), self.paths + other.paths)


def image_files(folder: Path) -> list[Path]:
    """The images of a folder: a synthetic set's declared files when it holds a ``manifest.json``
    (written by ``pixgen generate``; an incomplete set is refused), else every image file.

    Example:
        >>> [p.name for p in image_files(Path("out"))][:2]  # doctest: +SKIP
        ['0000.png', '0001.png']
    """
    return SetManifest.load(folder).image_paths(folder) if SetManifest.exists(folder) else list_images(folder)


def load_image_folder(
    root: str | Path,
    max_images: int | None = None,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> ImageSet:
    """Read a folder of images, or a folder of class subfolders (labels = subfolder names).

    Files are listed in sorted order; with ``max_images`` a seeded, class-stratified subset is
    kept. ``classes`` fixes the label order (so several sets share one mapping); subfolders not
    in it are an error.

    Example:
        >>> s = load_image_folder("real/", classes=["lung_aca", "lung_n"])   # doctest: +SKIP
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}", fix="pass an existing folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and image_files(p))
    if subdirs:
        names = [p.name for p in subdirs]
        classes = list(classes) if classes is not None else names
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise InputError(f"{root} has class folders {unknown} that are not among {classes}")
        files, labels = [], []
        for p in subdirs:
            found = image_files(p)
            files += found
            labels += [classes.index(p.name)] * len(found)
        label_arr: np.ndarray | None = np.asarray(labels, dtype=np.int64)
    else:
        files, label_arr, classes = image_files(root), None, []
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    keep = np.arange(len(files))
    if max_images is not None and len(files) > max_images:
        keep = stratified_subsample(label_arr if label_arr is not None else np.zeros(len(files), int), max_images, seed)
    return ImageSet(
        images=[load_rgb(files[i]) for i in keep],
        labels=None if label_arr is None else label_arr[keep],
        classes=list(classes),
        paths=[str(files[i]) for i in keep],
    )


def stratified_subsample(labels: np.ndarray, size: int | float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded subset keeping class proportions (at least one per class).

    ``size`` is a count (int) or a fraction of ``len(labels)`` (float in (0, 1]).

    Example:
        >>> stratified_subsample(np.array([0, 0, 0, 0, 1, 1]), 0.5, seed=0).size
        3
    """
    labels = np.asarray(labels)
    n_total = len(labels)
    n_keep = int(round(size * n_total)) if isinstance(size, float) else int(size)
    n_keep = max(1, min(n_keep, n_total))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    # largest-remainder allocation: the total is exactly n_keep, every class keeps >= 1
    quota = n_keep * counts / n_total
    take = np.maximum(1, np.floor(quota).astype(int))
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    for i in order[: max(0, n_keep - take.sum())]:
        take[i] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=min(k, n), replace=False)
        for c, k, n in zip(classes, take, counts)
    ]
    return np.sort(np.concatenate(chosen))


def image_crops(
    images: Sequence[np.ndarray], size: int, mode: str = "grid", per_image: int = 4, seed: int = 0
) -> list[np.ndarray]:
    """Square crops of ``size`` px from large images, for crop-FD.

    ``mode="grid"``: every non-overlapping crop on a regular grid from the top-left corner.
    ``mode="random"``: ``per_image`` seeded random crops per image. Images smaller than
    ``size`` are an error.

    Example:
        >>> len(image_crops([np.zeros((512, 512, 3), np.uint8)], 256))
        4
    """
    rng = np.random.default_rng(seed)
    out = []
    for im in images:
        h, w = im.shape[:2]
        if h < size or w < size:
            raise InputError(f"image of {h}x{w} px is smaller than the crop size {size}")
        if mode == "grid":
            out += [im[y : y + size, x : x + size] for y in range(0, h - size + 1, size) for x in range(0, w - size + 1, size)]
        elif mode == "random":
            for _ in range(per_image):
                y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
                out.append(im[y : y + size, x : x + size])
        else:
            raise InputError(f"unknown crop mode {mode!r}", fix="use 'grid' or 'random'")
    return out


def colour_matched_noise(images: Sequence[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """A trivial "generator": Gaussian noise with each image's per-channel mean and std.

    It has the right colours and nothing else; every metric should call it bad.

    Example:
        >>> float(colour_matched_noise([np.full((8, 8, 3), 100, np.uint8)])[0].mean())
        100.0
    """
    rng = np.random.default_rng(seed)
    out = []
    for im in images:
        x = im.astype(np.float64)
        mean, std = x.mean(axis=(0, 1)), x.std(axis=(0, 1))
        noise = rng.standard_normal(x.shape) * std + mean
        out.append(np.clip(np.rint(noise), 0, 255).astype(np.uint8))
    return out


def blurred(images: Sequence[np.ndarray], sigma_fraction: float = 1 / 32) -> list[np.ndarray]:
    """A trivial "generator": real images under a strong Gaussian blur.

    ``sigma = sigma_fraction * min(H, W)`` px (7 px on a 224 px tile): layout and colour kept,
    cells and texture gone.

    Example:
        >>> blurred([np.zeros((64, 64, 3), np.uint8)])[0].shape
        (64, 64, 3)
    """
    out = []
    for im in images:
        sigma = sigma_fraction * min(im.shape[:2])
        b = gaussian_filter(im.astype(np.float32), sigma=(sigma, sigma, 0), mode="reflect")
        out.append(np.clip(np.rint(b), 0, 255).astype(np.uint8))
    return out


def to_nchw(images: Sequence[np.ndarray]):
    """Stack same-size HWC uint8 images into a uint8 NCHW torch tensor."""
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
