"""Reading and writing images: one reader (RGB uint8, with errors that name the file and the
fix), one list of image suffixes, PNGs that carry their provenance, and contact sheets.

Conversions, so that no image is silently wrong:

- 16-bit greyscale (PNG/TIFF mode ``I;16``, or ``I`` holding values above 255) is scaled by
  ``255 / 65535``, not clipped (clipping made such images almost all white); 16-bit colour is
  read by Pillow at 8 bits per channel (the high byte).
- palette, greyscale, CMYK and YCbCr images become RGB;
- transparency (RGBA, LA, palette with a transparent colour) is composited on white, the
  colour of empty glass, as slide readers do;
- floating-point images are refused (their range is unknown).

Example:
    >>> img = load_image("tile.png")                                  # doctest: +SKIP
    >>> arr = load_rgb("tile.png"); arr.dtype, arr.shape[-1]          # doctest: +SKIP
    (dtype('uint8'), 3)
    >>> save_png(img, "out/0000.png", provenance={"seed": 0})         # doctest: +SKIP
    >>> read_provenance("out/0000.png")["seed"]                        # doctest: +SKIP
    0
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from pixgen.errors import InputError
from pixgen.io.atomic import atomic_write

__all__ = [
    "IMAGE_SUFFIXES",
    "READ_ERRORS",
    "list_images",
    "load_image",
    "load_rgb",
    "to_rgb",
    "save_png",
    "read_provenance",
    "contact_sheet",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
PROVENANCE_KEY = "pixgen"
# What Pillow raises for unreadable, truncated or hostile files (decoders use all of these).
READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
               Image.DecompressionBombError)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def list_images(folder: str | Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files directly inside ``folder`` (no recursion), sorted by name; hidden files skipped.

    Example:
        >>> list_images("consep/train/images")[:1]  # doctest: +SKIP
        [PosixPath('consep/train/images/train_10_000.jpg')]
    """
    exts = {e.lower() for e in suffixes}
    return sorted(
        p for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts
    )


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see the module docstring for the rules).

    Example:
        >>> to_rgb(Image.new("I;16", (2, 2), 65535)).getpixel((0, 0))
        (255, 255, 255)
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "I" or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "F":
        raise InputError(f"{name}: floating-point images are not supported",
                         fix="save the image as 8-bit (or 16-bit) RGB or greyscale, PNG or TIFF")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image.

    A missing, corrupt, truncated, unsupported or oversized (decompression-bomb) file raises
    :class:`InputError` naming the file and the fix.

    Example:
        >>> load_image("tile.png").mode  # doctest: +SKIP
        'RGB'
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}", fix="check the path")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img, str(path))
    except Image.DecompressionBombError as err:
        raise InputError(
            f"cannot read image {path}: {err}",
            fix="pass a smaller image; cut whole-slide images into tiles with `pixgen tile` "
                "(or pixgen.io.slides); raise PIL.Image.MAX_IMAGE_PIXELS only for files you trust",
        ) from None
    except READ_ERRORS as err:
        raise InputError(
            f"cannot read image {path}: {' '.join(str(err).split()) or type(err).__name__}",
            fix=f"pass a valid image ({', '.join(IMAGE_SUFFIXES)}); re-export it if it is truncated or corrupt",
        ) from None


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as a writable uint8 (H, W, 3) RGB array (:func:`load_image`'s rules and errors).

    Example:
        >>> load_rgb("he.png").shape  # doctest: +SKIP
        (256, 256, 3)
    """
    return np.array(load_image(path), dtype=np.uint8)  # a copy: np.asarray of a PIL image is read-only


def save_png(image: Image.Image | np.ndarray, path: str | Path, provenance: dict[str, Any] | None = None,
             compress_level: int = 6) -> Path:
    """Save a PNG with ``provenance`` as JSON in its ``pixgen`` text chunk; written atomically.

    Example:
        >>> save_png(np.zeros((8, 8, 3), np.uint8), "out/a.png", {"seed": 1})  # doctest: +SKIP
    """
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    info = PngImagePlugin.PngInfo()
    if provenance is not None:
        info.add_text(PROVENANCE_KEY, json.dumps(provenance, sort_keys=True, allow_nan=False))
    with atomic_write(path) as fh:
        img.save(fh, format="PNG", pnginfo=info, compress_level=compress_level)
    return Path(path)


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance dict stored by :func:`save_png` (empty if none)."""
    with Image.open(path) as img:
        text = img.text.get(PROVENANCE_KEY) if hasattr(img, "text") else None
    return json.loads(text) if text else {}


def contact_sheet(images: Sequence[Image.Image], columns: int | None = None, pad: int = 2) -> Image.Image:
    """Tile equally sized images into one grid image (white padding).

    Example:
        >>> contact_sheet([Image.new("RGB", (8, 8))] * 4).size
        (22, 22)
    """
    if not images:
        raise InputError("a contact sheet needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        sheet.paste(img.convert("RGB").resize((w, h)), (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet
