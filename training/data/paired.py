"""Paired H&E / IHC datasets for virtual staining, in their published folder layouts.

Layouts::

    BCI   root/HE/{train,test}/*.png   root/IHC/{train,test}/*.png   (same file names; 1024x1024)
          names such as ``00000_train_1+.png`` carry the HER2 score (0, 1+, 2+, 3+)
    MIST  root/{HER2,Ki67,ER,PR}/TrainValAB/{trainA,trainB,valA,valB}/*.jpg
          A = H&E, B = IHC, same file names (1024x1024)

The pairs are consecutive-section registrations, not pixel-identical: treat them as
roughly aligned. Neither dataset's files record their resolution, so ``mpp`` is required
(check the dataset paper for your copy).

Each sample: ``he`` and ``ihc`` uint8 (H, W, 3), ``name``, ``marker`` (e.g. "HER2"),
``score`` (BCI HER2 score or ""), ``group`` ("marker/name"), ``mpp``, ``he_path``, ``ihc_path``,
``origin`` (y, x) of the crop.

Example:
    >>> ds = BCIDataset("BCI_dataset", "train", mpp=0.5, crop=512)  # doctest: +SKIP
    >>> s = ds[0]; s["he"].shape, s["ihc"].shape, s["score"]          # doctest: +SKIP
    ((512, 512, 3), (512, 512, 3), '1+')
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pixgen.errors import InputError
from pixgen.io import list_images, load_rgb
from pixgen.io.slides import check_mpp
from training.data._images import crop_origins, random_origin
from training.data.masks import match_stems

__all__ = ["PairedStainDataset", "BCIDataset", "MISTDataset", "MIST_MARKERS", "bci_score"]

MIST_MARKERS = ("HER2", "Ki67", "ER", "PR")
_BCI_SCORE = re.compile(r"_(0|1\+|2\+|3\+)$")


def bci_score(name: str) -> str:
    """The HER2 score in a BCI file stem, or "" if it has none.

    Example:
        >>> bci_score("00012_test_2+"), bci_score("slide_a")
        ('2+', '')
    """
    m = _BCI_SCORE.search(name)
    return m.group(1) if m else ""


class PairedStainDataset(torch.utils.data.Dataset):
    """Pairs of (H&E, IHC) image files with matching names, whole or as aligned crops.

    Args:
        pairs: (he_path, ihc_path, marker) triples.
        mpp: microns per pixel of the files.
        crop: crop side in pixels (the same window in both images); ``None`` = whole images.
        crop_mode: ``"random"`` (``crops_per_image`` per pair, from seed, index and epoch;
            call ``set_epoch``) or ``"grid"`` (regular crops covering each image).

    Example:
        >>> ds = PairedStainDataset([("he/a.png", "ihc/a.png", "HER2")], mpp=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path, str]],
        mpp: float,
        crop: int | None = None,
        crop_mode: Literal["random", "grid"] = "random",
        crops_per_image: int = 1,
        seed: int = 0,
        image_size: tuple[int, int] | None = None,
    ):
        if not pairs:
            raise InputError("no image pairs in the dataset")
        if crop_mode not in ("random", "grid"):
            raise InputError(f"unknown crop_mode {crop_mode!r}", fix="use 'random' or 'grid'")
        self.pairs, self.mpp = list(pairs), check_mpp(mpp)
        self.crop, self.crop_mode, self.crops_per_image = crop, crop_mode, crops_per_image
        self.seed, self.epoch = seed, 0
        self._index: list[tuple[int, tuple[int, int] | None]] = []
        for k, (he, _, _) in enumerate(self.pairs):
            if crop is None:
                self._index.append((k, (0, 0)))
            elif crop_mode == "random":
                self._index += [(k, None)] * crops_per_image
            else:
                self._index += [(k, o) for o in crop_origins(image_size or _size(he), crop)]

    def set_epoch(self, epoch: int) -> None:
        """Draw a fresh set of random crops."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        k, origin = self._index[index]
        he_path, ihc_path, marker = self.pairs[k]
        he, ihc = load_rgb(he_path), load_rgb(ihc_path)
        if he.shape != ihc.shape:
            raise InputError(f"pair {he_path.name}: H&E is {he.shape[1]}x{he.shape[0]} but IHC is "
                             f"{ihc.shape[1]}x{ihc.shape[0]}", fix="pairs must have the same size")
        if self.crop is not None:
            if origin is None:
                origin = random_origin(he.shape[:2], self.crop, np.random.default_rng([self.seed, self.epoch, index]))
            (y, x), c = origin, self.crop
            he, ihc = he[y:y + c, x:x + c], ihc[y:y + c, x:x + c]
        return {
            "he": np.ascontiguousarray(he), "ihc": np.ascontiguousarray(ihc), "name": he_path.stem,
            "marker": marker, "score": bci_score(he_path.stem), "group": f"{marker}/{he_path.stem}", "mpp": self.mpp,
            "he_path": str(he_path), "ihc_path": str(ihc_path), "origin": tuple(int(v) for v in origin),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pairs={len(self.pairs)}, items={len(self)}, mpp={self.mpp}, crop={self.crop})"


def _size(path: Path) -> tuple[int, int]:
    from training.data.masks import _image_shape

    return _image_shape(path)


def _pairs(he_dir: Path, ihc_dir: Path, marker: str) -> list[tuple[Path, Path, str]]:
    for d in (he_dir, ihc_dir):
        if not d.is_dir():
            raise InputError(f"folder not found: {d}")
    return [(a, b, marker) for a, b in match_stems(list_images(he_dir), list_images(ihc_dir),
                                                   (str(he_dir), str(ihc_dir)))]


class BCIDataset(PairedStainDataset):
    """BCI (Breast Cancer Immunohistochemical, HER2): ``root/HE/{split}`` + ``root/IHC/{split}``.

    Example:
        >>> ds = BCIDataset("BCI_dataset", "test", mpp=0.5)  # doctest: +SKIP
    """

    def __init__(self, root: str | Path, split: str = "train", *, mpp: float, **kwargs: Any):
        root = Path(root)
        if not (root / "HE").is_dir() or not (root / "IHC").is_dir():
            raise InputError(f"{root} is not a BCI folder (no HE/ and IHC/ inside)",
                             fix="pass the folder that holds HE/{train,test} and IHC/{train,test}")
        super().__init__(_pairs(root / "HE" / split, root / "IHC" / split, "HER2"), mpp, **kwargs)


class MISTDataset(PairedStainDataset):
    """MIST: ``root/{marker}/TrainValAB/{split}A`` (H&E) + ``{split}B`` (IHC), split in train/val.

    ``markers`` selects one or more of HER2, Ki67, ER, PR (default: every marker folder present).

    Example:
        >>> ds = MISTDataset("MIST", "val", markers=["Ki67"], mpp=0.5, crop=256)  # doctest: +SKIP
    """

    def __init__(self, root: str | Path, split: str = "train", markers: Sequence[str] | str | None = None,
                 *, mpp: float, **kwargs: Any):
        root = Path(root)
        if split not in ("train", "val"):
            raise InputError(f"MIST split {split!r} does not exist", fix="use 'train' or 'val'")
        if isinstance(markers, str):
            markers = [markers]
        present = [m for m in MIST_MARKERS if (root / m / "TrainValAB").is_dir()]
        markers = list(markers) if markers is not None else present
        missing = [m for m in markers if m not in present]
        if missing or not markers:
            raise InputError(f"MIST marker folder(s) {', '.join(missing) or '(none)'} not found in {root}",
                             fix=f"expected {root}/{{{','.join(MIST_MARKERS)}}}/TrainValAB/; present: "
                                 f"{', '.join(present) or 'none'}")
        pairs = []
        for m in markers:
            d = root / m / "TrainValAB"
            pairs += _pairs(d / f"{split}A", d / f"{split}B", m)
        super().__init__(pairs, mpp, **kwargs)
