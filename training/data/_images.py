"""Small shared helpers for datasets: label maps, readability checks, crops.

Images themselves are read by the library's one reader (:func:`pixgen.io.load_rgb`: uint8
(H, W, 3) RGB); label maps keep their stored integer type.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pixgen.errors import InputError
from pixgen.io import READ_ERRORS


def load_label_map(path: str | Path, dtype: type | None = None) -> np.ndarray:
    """Read a single-channel label map (instance ids or classes) without changing its values.

    Raises `InputError` for unreadable files and for colour (multi-channel) maps.

    Example:
        >>> load_label_map("inst/train_10_000.png", np.uint16).dtype  # doctest: +SKIP
        dtype('uint16')
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img)
    except FileNotFoundError:
        raise InputError(f"label map not found: {path}") from None
    except READ_ERRORS as err:
        raise InputError(f"cannot read label map {path}: {err}") from None
    if arr.ndim == 3:
        if arr.shape[2] >= 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            arr = arr[..., 0]
        else:
            raise InputError(f"label map {path} has {arr.shape[2]} channels; expected one",
                             fix="save instance/class maps as single-channel PNG (uint8 or uint16)")
    if dtype is not None and arr.dtype != dtype:
        if arr.size and (arr.min() < np.iinfo(dtype).min or arr.max() > np.iinfo(dtype).max):
            raise InputError(f"label map {path} has values {arr.min()}..{arr.max()} outside {np.dtype(dtype).name}")
        arr = arr.astype(dtype)
    return arr


def check_readable(paths: Iterable[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Open each file's header (cheap, no full decode): returns (good, [(bad, reason), ...]).

    A file whose header is fine can still fail at full decode (truncated data); datasets
    handle that when they load it.
    """
    good, bad = [], []
    for p in paths:
        try:
            with Image.open(p) as img:
                img.verify()
            good.append(p)
        except READ_ERRORS as err:
            bad.append((p, str(err)))
    return good, bad


def warn_bad(bad: Sequence[tuple[Path, str]], what: str = "image") -> None:
    """One warning that lists (a few of) the skipped files."""
    if bad:
        shown = "; ".join(f"{p.name}: {why}" for p, why in bad[:5])
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        warnings.warn(f"skipped {len(bad)} unreadable {what} file(s): {shown}{more}", stacklevel=3)


def crop_origins(shape: tuple[int, int], size: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of a regular grid of ``size`` crops covering an (H, W) image.

    The last row/column is shifted to end exactly at the image edge, so the whole image is
    covered and every crop is full size (neighbouring crops may then overlap a little).

    Example:
        >>> crop_origins((1000, 1000), 256)[:5]
        [(0, 0), (0, 256), (0, 512), (0, 744), (256, 0)]
    """
    h, w = shape
    if size > h or size > w:
        raise InputError(f"crop size {size} is larger than the image ({h}x{w})",
                         fix="use a smaller crop size or no crop")
    stride = stride or size

    def starts(n: int) -> list[int]:
        s = list(range(0, n - size + 1, stride))
        return s + [n - size] if s[-1] != n - size else s

    return [(y, x) for y in starts(h) for x in starts(w)]


def random_origin(shape: tuple[int, int], size: int, rng: np.random.Generator) -> tuple[int, int]:
    """A uniformly random top-left corner (y, x) for a ``size`` crop inside an (H, W) image."""
    h, w = shape
    if size > h or size > w:
        raise InputError(f"crop size {size} is larger than the image ({h}x{w})",
                         fix="use a smaller crop size or no crop")
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
