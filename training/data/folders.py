"""A dataset over a folder of images, with optional class sub-folders.

Layouts::

    root/*.png                      flat: no labels (label -1, class_name "")
    root/{class}/*.png              one sub-folder per class (sorted names -> labels 0..K-1)
    root/{class}/{group}/**/*.png   deeper folders: the first folder below the class is the group
                                    (e.g. one folder per slide), so splits keep a slide together

Resolution is declared, never guessed: ``mpp`` (microns per pixel of the files) is required and
every sample carries the mpp of the image it returns (which changes when ``fit="resize"`` scales).

Example:
    >>> ds = ImageFolderDataset("../shared/data/lc25000-lung", mpp=0.5, size=224)  # doctest: +SKIP
    >>> s = ds[0]; s["image"].shape, s["label"], s["class_name"], s["mpp"]          # doctest: +SKIP
    ((224, 224, 3), 0, 'lung_aca', 0.5)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from pixgen.errors import InputError
from pixgen.io import IMAGE_SUFFIXES, list_images, load_rgb
from pixgen.io.slides import check_mpp
from training.data._images import check_readable, warn_bad

__all__ = ["ImageFolderDataset", "scan_image_folder", "fit_image"]

Fit = Literal["crop", "resize"]


def scan_image_folder(
    root: str | Path, classes: Sequence[str] | None = None, extensions: Sequence[str] = IMAGE_SUFFIXES
) -> tuple[list[Path], list[int], list[str]]:
    """List the images of a folder: (paths, labels, class_names), in a stable sorted order.

    Class mode when ``root`` has sub-folders (or ``classes`` is given): images are searched
    recursively inside each class folder. Otherwise the images directly in ``root``, label -1.

    Example:
        >>> paths, labels, names = scan_image_folder("../shared/data/lc25000-lung")  # doctest: +SKIP
        >>> names                                                                   # doctest: +SKIP
        ['lung_aca', 'lung_n', 'lung_scc']
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    exts = {e.lower() for e in extensions}
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None and not subdirs:
        paths = list_images(root, extensions)
        if not paths:
            raise InputError(f"no images ({', '.join(sorted(exts))}) in {root}")
        return paths, [-1] * len(paths), []
    names = list(classes) if classes is not None else subdirs
    missing = [c for c in names if not (root / c).is_dir()]
    if missing:
        raise InputError(f"class folder(s) missing in {root}: {', '.join(missing[:5])}",
                         fix=f"existing folders: {', '.join(subdirs[:10]) or 'none'}")
    paths, labels = [], []
    for label, name in enumerate(names):
        found = sorted(p for p in (root / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in exts
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not found:
            raise InputError(f"class folder {root / name} has no images",
                             fix="remove the empty folder or pass classes=[...] explicitly")
        paths += found
        labels += [label] * len(found)
    loose = list_images(root, extensions)
    if loose:
        warnings.warn(f"{len(loose)} image(s) directly in {root} are ignored: with class "
                      "sub-folders every image must be inside one", stacklevel=2)
    return paths, labels, names


def fit_image(image: np.ndarray, size: tuple[int, int] | None, fit: Fit) -> tuple[np.ndarray, float]:
    """Bring an image to ``size`` = (H, W); returns (image, scale) where scale = new px / old px.

    - ``fit="crop"``: centre crop, no resampling (scale 1); an image smaller than ``size``
      is an error, since padding or upscaling would silently change the data.
    - ``fit="resize"``: scale so the image covers ``size`` (Lanczos, antialiased), then centre crop.
      The resolution changes: mpp_out = mpp_in / scale.

    Example:
        >>> img = np.zeros((300, 400, 3), np.uint8)
        >>> fit_image(img, (200, 200), "resize")[0].shape, round(fit_image(img, (200, 200), "resize")[1], 3)
        ((200, 200, 3), 0.667)
    """
    if size is None:
        return image, 1.0
    th, tw = size
    h, w = image.shape[:2]
    scale = 1.0
    if fit == "resize":
        scale = max(th / h, tw / w)
        if scale != 1.0:
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
            image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.LANCZOS))
            h, w = nh, nw
    elif fit != "crop":
        raise InputError(f"unknown fit {fit!r}", fix="use 'crop' or 'resize'")
    if h < th or w < tw:
        raise InputError(f"image of {h}x{w} px is smaller than the target size {th}x{tw}",
                         fix="use fit='resize' (changes the mpp) or a smaller size")
    y, x = (h - th) // 2, (w - tw) // 2
    return image[y:y + th, x:x + tw], scale


def _default_group(path: Path, root: Path, class_mode: bool) -> str:
    """The first folder below the class folder, else the file's own path relative to root."""
    rel = path.relative_to(root)
    parts = rel.parts[1:] if class_mode else rel.parts
    return str(Path(rel.parts[0], parts[0])) if class_mode and len(parts) > 1 else str(rel.with_suffix(""))


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images from a folder (optionally one sub-folder per class) at a declared resolution.

    Each sample is a dict: ``image`` (uint8 (H, W, 3) numpy, or uint8 (3, H, W) tensor with
    ``as_tensor=True``), ``label`` (int, -1 without classes), ``class_name``, ``path``,
    ``group`` (what a split must keep together), ``mpp`` (float, of the returned image).

    Args:
        root: the folder.
        mpp: microns per pixel of the image files (required: resolution is never implied).
        size: target (H, W) or int; ``None`` returns images at their own size.
        fit: ``"crop"`` (centre crop, no resampling) or ``"resize"`` (cover + centre crop).
        classes: class folder names in label order (default: all sub-folders, sorted).
        groups: a function path -> group id, or a mapping {path or file name: group id}.
            Default: the first folder below the class folder (e.g. the slide), else the file.
        skip_bad: skip unreadable files with a warning instead of raising `InputError`.
        transform: optional function applied to the image (after fitting).
        files: restrict to these paths (e.g. one split); they must lie under ``root``.

    Example:
        >>> ds = ImageFolderDataset("tiles/", mpp=0.5, size=256)                  # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | Path,
        mpp: float,
        size: int | tuple[int, int] | None = None,
        fit: Fit = "crop",
        classes: Sequence[str] | None = None,
        groups: Callable[[Path], str] | Mapping[str, str] | None = None,
        skip_bad: bool = False,
        transform: Callable[[Any], Any] | None = None,
        files: Sequence[str | Path] | None = None,
        as_tensor: bool = False,
        extensions: Sequence[str] = IMAGE_SUFFIXES,
    ):
        self.root = Path(root)
        self.mpp = check_mpp(mpp)
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
        if fit not in ("crop", "resize"):
            raise InputError(f"unknown fit {fit!r}", fix="use 'crop' or 'resize'")
        self.fit, self.transform, self.skip_bad, self.as_tensor = fit, transform, skip_bad, as_tensor
        paths, labels, self.classes = scan_image_folder(self.root, classes, extensions)
        if files is not None:
            paths, labels = _restrict(paths, labels, files, self.root)
        if skip_bad:
            good, bad = check_readable(paths)
            warn_bad(bad)
            keep = set(good)
            labels = [lab for p, lab in zip(paths, labels) if p in keep]
            paths = good
        self.paths, self.labels = paths, labels
        self.groups = [self._group(p, groups) for p in paths]
        self.bad_files: list[Path] = []

    def _group(self, path: Path, groups: Callable[[Path], str] | Mapping[str, str] | None) -> str:
        if groups is None:
            return _default_group(path, self.root, bool(self.classes))
        if callable(groups):
            return str(groups(path))
        for key in (str(path), path.name, str(path.relative_to(self.root))):
            if key in groups:
                return str(groups[key])
        raise InputError(f"no group given for {path}", fix="the groups mapping must cover every file")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self) if self.skip_bad else 1):
            i = (index + attempt) % len(self)
            try:
                return self._load(i)
            except InputError as err:
                if "cannot read image" not in err.message:
                    raise
                if not self.skip_bad:
                    raise InputError(err.message, fix=f"{err.fix}; or pass skip_bad=True to skip such files") from None
                self.bad_files.append(self.paths[i])
                warnings.warn(f"skipping unreadable image {self.paths[i]}: {err.message}", stacklevel=2)
        raise InputError(f"no readable image in {self.root}")

    def _load(self, i: int) -> dict[str, Any]:
        image, scale = fit_image(load_rgb(self.paths[i]), self.size, self.fit)
        if self.transform is not None:
            image = self.transform(image)
        if self.as_tensor and isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        label = self.labels[i]
        return {
            "image": image,
            "label": label,
            "class_name": self.classes[label] if label >= 0 else "",
            "path": str(self.paths[i]),
            "group": self.groups[i],
            "mpp": self.mpp / scale,
        }

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({str(self.root)!r}, n={len(self)}, classes={self.classes}, "
                f"mpp={self.mpp}, size={self.size}, fit={self.fit!r})")


def _restrict(paths: list[Path], labels: list[int], files: Sequence[str | Path], root: Path
              ) -> tuple[list[Path], list[int]]:
    """Keep only ``files`` (in the folder's order); unknown files are an error."""
    wanted = {Path(f).resolve() for f in files}
    index = {p.resolve(): k for k, p in enumerate(paths)}
    unknown = [str(f) for f in wanted if f not in index]
    if unknown:
        raise InputError(f"{len(unknown)} file(s) are not images of {root}: {', '.join(unknown[:3])}")
    keep = sorted(index[f] for f in wanted)
    return [paths[k] for k in keep], [labels[k] for k in keep]
