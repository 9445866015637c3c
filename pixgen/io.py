"""Image I/O with clear errors, PNGs that carry their provenance, and contact sheets.

Example:
    >>> img = load_image("tile.png")                                  # doctest: +SKIP
    >>> save_png(img, "out/0000.png", provenance={"seed": 0})         # doctest: +SKIP
    >>> read_provenance("out/0000.png")["seed"]                        # doctest: +SKIP
    0
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from pixgen.errors import InputError

__all__ = ["load_image", "save_png", "read_provenance", "contact_sheet", "write_json_atomic", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
PROVENANCE_KEY = "pixgen"


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB; a missing, corrupt or unsupported file raises :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}", fix="check the path")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(
            f"cannot read image {path}: {err}",
            fix=f"pass a valid image ({', '.join(IMAGE_SUFFIXES)}); re-export it if it is truncated",
        ) from err


def save_png(image: Image.Image | np.ndarray, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Save a PNG with ``provenance`` as JSON in its ``pixgen`` text chunk; written atomically."""
    path = Path(path)
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    info = PngImagePlugin.PngInfo()
    if provenance is not None:
        info.add_text(PROVENANCE_KEY, json.dumps(provenance, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png.part", delete=False) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp.name, path)
    return path


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance dict stored by :func:`save_png` (empty if none)."""
    with Image.open(path) as img:
        text = img.text.get(PROVENANCE_KEY) if hasattr(img, "text") else None
    return json.loads(text) if text else {}


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON so that a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".part", delete=False) as tmp:
        json.dump(data, tmp, indent=2, sort_keys=True, default=str)
    os.replace(tmp.name, path)
    return path


def contact_sheet(images: list[Image.Image], columns: int | None = None, pad: int = 2) -> Image.Image:
    """Tile equally sized images into one grid image (white padding)."""
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
