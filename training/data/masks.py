"""Nuclei segmentation datasets: H&E images with instance maps (and class maps where given).

Layouts::

    CoNSeP   root/{train,test}/images/{split}_{image}_{tile}.jpg   256x256 tiles, ~0.25 um/px (40x)
             root/{split}/inst/*.png   uint16 instance ids (0 = background)
             root/{split}/types/*.png  uint8 classes: 0 bg, 1 other, 2 inflammatory, 3 epithelial, 4 spindle
    MoNuSeg  root/{train,test}/images/*.jpg   1000x1000, ~0.25 um/px (40x)
             root/{split}/inst/*.png   uint16 instance ids;  root/index.json  per-image provenance
    generic  root/images/*, root/masks/*  (same stems; instance map, or a binary mask that is split
             into instances by connected components), optional root/types/* class maps

Every sample is a dict: ``image`` uint8 (H, W, 3), ``inst`` uint16 (H, W) with ids 1..N,
``mask`` bool (H, W) = inst > 0, ``types`` uint8 (H, W) when the dataset has classes,
``image_id`` (file stem), ``source_id`` (the original image a tile came from: split by this),
``group`` (= source_id), ``mpp``, ``path``, ``origin`` (y, x) of the crop in the file.

Example:
    >>> ds = MoNuSegDataset("../shared/data/monuseg", "train", crop=256, crop_mode="random")  # doctest: +SKIP
    >>> s = ds[0]; s["image"].shape, s["inst"].dtype, s["mpp"]                              # doctest: +SKIP
    ((256, 256, 3), dtype('uint16'), 0.25)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from skimage.measure import label as connected_components
from skimage.segmentation import relabel_sequential

from pixgen.errors import InputError
from pixgen.io import list_images, load_rgb
from pixgen.io.slides import check_mpp
from training.data._images import crop_origins, load_label_map, random_origin

__all__ = [
    "NucleiRecord", "NucleiMaskDataset", "CoNSePDataset", "MoNuSegDataset", "ImageMaskDataset",
    "CONSEP_CLASSES", "match_stems",
]

CONSEP_CLASSES = ("background", "other", "inflammatory", "epithelial", "spindle-shaped")
CropMode = Literal["random", "grid"]


@dataclass(frozen=True)
class NucleiRecord:
    """One image file with its label maps, and the original image it belongs to."""

    image: Path
    inst: Path
    types: Path | None
    source_id: str
    meta: tuple[tuple[str, Any], ...] = ()


def match_stems(a: Sequence[Path], b: Sequence[Path], what: tuple[str, str]) -> list[tuple[Path, Path]]:
    """Pair files of two folders by stem; an `InputError` lists a few unmatched names of each side.

    Example:
        >>> match_stems([Path("i/a.jpg")], [Path("m/a.png")], ("images", "masks"))
        [(PosixPath('i/a.jpg'), PosixPath('m/a.png'))]
    """
    sa, sb = {p.stem: p for p in a}, {p.stem: p for p in b}
    only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
    if only_a or only_b:
        def show(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

        parts = [f"{len(only_a)} in {what[0]} without {what[1]}: {show(only_a)}" if only_a else "",
                 f"{len(only_b)} in {what[1]} without {what[0]}: {show(only_b)}" if only_b else ""]
        raise InputError("unmatched file names: " + "; ".join(p for p in parts if p),
                         fix=f"every file in {what[0]} needs one with the same name in {what[1]}")
    if not sa:
        raise InputError(f"no images found in {what[0]}")
    return [(sa[k], sb[k]) for k in sorted(sa)]


class NucleiMaskDataset(torch.utils.data.Dataset):
    """Images + instance maps (+ class maps), whole or as crops of a requested size.

    Args:
        records: the files (see the layout-specific subclasses).
        mpp: microns per pixel of the files.
        crop: crop size in pixels; ``None`` returns whole images.
        crop_mode: ``"grid"``: a regular grid of crops covering each image (the last row/column
            is moved back to the image edge), len = sum of crops; ``"random"``:
            ``crops_per_image`` uniformly random crops per image, drawn from ``seed``, the item
            index and the epoch (call ``set_epoch`` each epoch to get new crops).
        stride: grid step (default: ``crop``).
        relabel: renumber instance ids 1..N inside each returned crop.
        binary_masks: ``"auto"`` treats a mask file with only values {0, 1} or {0, 255} as a
            binary mask and splits it into instances by 8-connected components; ``False``
            reads every mask as an instance map.

    Example:
        >>> ds = CoNSePDataset("../shared/data/consep", "train")  # doctest: +SKIP
        >>> ds[0]["source_id"]                                       # doctest: +SKIP
        'train_1'
    """

    has_types = False

    def __init__(
        self,
        records: Sequence[NucleiRecord],
        mpp: float,
        crop: int | None = None,
        crop_mode: CropMode = "grid",
        stride: int | None = None,
        crops_per_image: int = 1,
        seed: int = 0,
        relabel: bool = True,
        binary_masks: Literal["auto"] | bool = False,
    ):
        if not records:
            raise InputError("no images in the dataset")
        if crop_mode not in ("random", "grid"):
            raise InputError(f"unknown crop_mode {crop_mode!r}", fix="use 'random' or 'grid'")
        self.records, self.mpp = list(records), check_mpp(mpp)
        self.crop, self.crop_mode, self.stride = crop, crop_mode, stride
        self.crops_per_image, self.seed, self.epoch = crops_per_image, seed, 0
        self.relabel, self.binary_masks = relabel, binary_masks
        self.has_types = all(r.types is not None for r in self.records)
        self._index = self._build_index()

    def _build_index(self) -> list[tuple[int, tuple[int, int] | None]]:
        """(record, crop origin or None) for every item."""
        if self.crop is None:
            return [(k, (0, 0)) for k in range(len(self.records))]
        if self.crop_mode == "random":
            return [(k, None) for k in range(len(self.records)) for _ in range(self.crops_per_image)]
        index = []
        for k, rec in enumerate(self.records):
            index += [(k, o) for o in crop_origins(_image_shape(rec.image), self.crop, self.stride)]
        return index

    def set_epoch(self, epoch: int) -> None:
        """Draw a fresh set of random crops (``crop_mode="random"``)."""
        self.epoch = int(epoch)

    @property
    def source_ids(self) -> list[str]:
        """The source image of every item, in item order (for `training.data.splits.group_split`)."""
        return [self.records[k].source_id for k, _ in self._index]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        k, origin = self._index[index]
        rec = self.records[k]
        image = load_rgb(rec.image)
        inst = self._instances(rec.inst)
        types = load_label_map(rec.types, np.uint8) if rec.types is not None else None
        for name, arr in (("instance map", inst), ("class map", types)):
            if arr is not None and arr.shape != image.shape[:2]:
                raise InputError(f"{name} of {rec.image.name} is {arr.shape}, image is {image.shape[:2]}")
        if self.crop is not None:
            if origin is None:
                rng = np.random.default_rng([self.seed, self.epoch, index])
                origin = random_origin(image.shape[:2], self.crop, rng)
            (y, x), c = origin, self.crop
            image, inst = image[y:y + c, x:x + c], inst[y:y + c, x:x + c]
            types = types[y:y + c, x:x + c] if types is not None else None
        if self.relabel:
            inst = relabel_sequential(inst)[0].astype(np.uint16)
        sample = {
            "image": np.ascontiguousarray(image), "inst": np.ascontiguousarray(inst), "mask": inst > 0,
            "image_id": rec.image.stem, "source_id": rec.source_id, "group": rec.source_id,
            "mpp": self.mpp, "path": str(rec.image), "origin": tuple(int(v) for v in origin),
        }
        if types is not None:
            sample["types"] = np.ascontiguousarray(types)
        sample.update(dict(rec.meta))
        return sample

    def _instances(self, path: Path) -> np.ndarray:
        """Read an instance map; binary masks become connected-component instances."""
        arr = load_label_map(path)
        if arr.dtype.kind not in "ub" and not (arr.dtype.kind == "i" and arr.min() >= 0):
            raise InputError(f"instance map {path} has dtype {arr.dtype}; expected non-negative integers")
        if self.binary_masks and (arr.dtype == bool or set(np.unique(arr).tolist()) <= {0, 1, 255}):
            arr = connected_components(arr > 0, connectivity=2)
        if arr.size and arr.max() > np.iinfo(np.uint16).max:
            raise InputError(f"instance map {path} has more than 65535 instances")
        return arr.astype(np.uint16)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(images={len(self.records)}, items={len(self)}, mpp={self.mpp}, "
                f"crop={self.crop}, crop_mode={self.crop_mode!r}, types={self.has_types})")


def _image_shape(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.height, img.width
    except OSError as err:
        raise InputError(f"cannot read image {path}: {err}") from None


def _split_dir(root: str | Path, split: str) -> Path:
    path = Path(root) / split
    if not (path / "images").is_dir():
        raise InputError(f"no {split}/images folder in {root}",
                         fix="pass the dataset root (the folder holding train/ and test/)")
    return path


class CoNSePDataset(NucleiMaskDataset):
    """CoNSeP tiles (HoVer-Net layout): 256x256 at ~0.25 um/px with instance and class maps.

    ``source_id`` is the original 1000x1000 image: tile ``train_10_003`` -> ``train_10``.

    Example:
        >>> ds = CoNSePDataset("../shared/data/consep", "test")  # doctest: +SKIP
        >>> len(ds), ds[0]["types"].max() <= 4                    # doctest: +SKIP
        (224, True)
    """

    def __init__(self, root: str | Path, split: str = "train", mpp: float = 0.25, **kwargs: Any):
        d = _split_dir(root, split)
        images = list_images(d / "images")
        pairs = match_stems(images, list_images(d / "inst"), (f"{d}/images", f"{d}/inst"))
        types = {p.stem: p for p in list_images(d / "types")} if (d / "types").is_dir() else {}
        records = [NucleiRecord(img, inst, types.get(img.stem), consep_source_id(img.stem))
                   for img, inst in pairs]
        super().__init__(records, mpp, **kwargs)


def consep_source_id(tile_name: str) -> str:
    """The CoNSeP image a tile comes from.

    Example:
        >>> consep_source_id("train_10_003")
        'train_10'
    """
    head, sep, tail = tile_name.rpartition("_")
    if not sep or not tail.isdigit():
        raise InputError(f"CoNSeP tile name {tile_name!r} is not '{{split}}_{{image}}_{{tile}}'")
    return head


class MoNuSegDataset(NucleiMaskDataset):
    """MoNuSeg 2018: 1000x1000 TCGA images at ~0.25 um/px with instance maps.

    Samples carry ``instances`` ("xml" = expert polygons, or "binary-components" = connected
    components of the binary mask, where touching nuclei may be merged) from ``index.json``.
    Use ``crop=256`` with ``crop_mode="random"`` or ``"grid"`` to get training-size patches.

    Example:
        >>> ds = MoNuSegDataset("../shared/data/monuseg", "train", crop=256)  # doctest: +SKIP
        >>> len(ds)                                                            # doctest: +SKIP
        480
    """

    def __init__(self, root: str | Path, split: str = "train", mpp: float = 0.25, **kwargs: Any):
        d = _split_dir(root, split)
        pairs = match_stems(list_images(d / "images"), list_images(d / "inst"), (f"{d}/images", f"{d}/inst"))
        index = _monuseg_index(Path(root))
        records = [NucleiRecord(img, inst, None, img.stem,
                                (("instances", index.get(img.stem, {}).get("instances", "unknown")),))
                   for img, inst in pairs]
        super().__init__(records, mpp, **kwargs)


def _monuseg_index(root: Path) -> dict[str, dict[str, Any]]:
    path = root / "index.json"
    if not path.is_file():
        return {}
    try:
        return {entry["id"]: entry for entry in json.loads(path.read_text())}
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"cannot read {path}: {err}") from None


class ImageMaskDataset(NucleiMaskDataset):
    """A generic layout: ``root/images/*`` and ``root/masks/*`` with the same stems.

    Masks may be instance maps (integer ids) or binary masks (0/1 or 0/255), which are split
    into instances by connected components (touching nuclei then merge). An optional
    ``root/types/*`` folder gives class maps. ``source_id`` is the stem unless ``source_id``
    (a function stem -> id) says which original image a file comes from.

    Example:
        >>> ds = ImageMaskDataset("my_nuclei", mpp=0.5, crop=128)  # doctest: +SKIP
    """

    def __init__(self, root: str | Path, mpp: float, source_id: Any = None, **kwargs: Any):
        root = Path(root)
        for sub in ("images", "masks"):
            if not (root / sub).is_dir():
                raise InputError(f"no {sub}/ folder in {root}", fix="expected root/images and root/masks")
        pairs = match_stems(list_images(root / "images"), list_images(root / "masks"),
                            (f"{root}/images", f"{root}/masks"))
        types = {}
        if (root / "types").is_dir():
            types = {p.stem: p for p in list_images(root / "types")}
            match_stems([i for i, _ in pairs], list(types.values()), (f"{root}/images", f"{root}/types"))
        records = [NucleiRecord(img, m, types.get(img.stem), source_id(img.stem) if source_id else img.stem)
                   for img, m in pairs]
        kwargs.setdefault("binary_masks", "auto")
        super().__init__(records, mpp, **kwargs)
