"""Large RGB images on disk: a raw row-band canvas and a tiled, pyramidal OME-TIFF built from it
with flat memory.

* :class:`RawCanvas`: a ``(height, width, 3)`` uint8 file written and read in bands of rows
  (the large-image path writes rows as they are decoded; a killed run keeps them).
* :func:`write_pyramid_tiff`: the canvas as a tiled pyramidal OME-TIFF with its physical pixel
  size, band by band. One OME image whose reduced levels are SubIFDs (the OME convention: QuPath,
  Bio-Formats, tiffslide) and, repeated as top-level reduced-resolution pages, the same levels for
  OpenSlide, whose generic-TIFF reader ignores SubIFDs. The repeat costs about a third of the
  level-0 size (the reduced levels only).
* :func:`write_png`: the canvas as a PNG (whole image in memory: small sizes only).

Outputs are written under a temporary ``.part`` name and renamed when complete: a full disk or an interrupt leaves no
file under the final name.

Example:
    >>> canvas = RawCanvas.create("work/level0.raw", 512, 768)             # doctest: +SKIP
    >>> canvas.write_rows(0, rows_uint8)                                    # doctest: +SKIP
    >>> write_pyramid_tiff(canvas, "twin.ome.tiff", mpp=0.5)                # doctest: +SKIP
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pixgen.errors import InputError
from pixgen.io.atomic import PART_SUFFIX, atomic_write

__all__ = ["RawCanvas", "write_pyramid_tiff", "write_png", "pyramid_shapes", "tiff_bytes_estimate"]

COMPRESSIONS = ("jpeg", "zlib", "none")


class RawCanvas:
    """A uint8 RGB image stored row-major in a plain file, read and written by bands of rows."""

    def __init__(self, path: str | Path, height: int, width: int):
        self.path, self.height, self.width = Path(path), int(height), int(width)
        expected = self.height * self.width * 3
        if not self.path.is_file() or self.path.stat().st_size != expected:
            raise InputError(f"{self.path} is not a {self.height}x{self.width} RGB canvas")

    @classmethod
    def create(cls, path: str | Path, height: int, width: int) -> RawCanvas:
        """A zero-filled (sparse) canvas file; an existing one of the right size is kept (resume)."""
        path = Path(path)
        size = int(height) * int(width) * 3
        if not path.is_file() or path.stat().st_size != size:
            with open(path, "wb") as fh:
                fh.truncate(size)
        return cls(path, height, width)

    def write_rows(self, top: int, rows: np.ndarray) -> None:
        """Write ``rows`` (n, width, 3) uint8 at row ``top`` and flush them to the file."""
        if rows.shape[1:] != (self.width, 3) or rows.dtype != np.uint8 or top + len(rows) > self.height:
            raise ValueError(f"rows {rows.shape} {rows.dtype} do not fit at row {top} of {self.height}x{self.width}")
        with open(self.path, "r+b") as fh:
            fh.seek(top * self.width * 3)
            fh.write(np.ascontiguousarray(rows).tobytes())
            fh.flush()
            os.fsync(fh.fileno())

    def read_rows(self, top: int, count: int) -> np.ndarray:
        """Rows ``top .. top + count`` (clipped at the bottom) as (n, width, 3) uint8."""
        count = max(0, min(count, self.height - top))
        data = np.fromfile(self.path, dtype=np.uint8, count=count * self.width * 3, offset=top * self.width * 3)
        return data.reshape(count, self.width, 3)

    def bands(self, rows: int) -> Iterator[np.ndarray]:
        """The canvas in bands of ``rows`` rows, top to bottom."""
        for top in range(0, self.height, rows):
            yield self.read_rows(top, rows)

    def half(self, path: str | Path) -> RawCanvas:
        """A canvas of half the size (2x2 means; an odd last row / column is kept), band by band."""
        h, w = -(-self.height // 2), -(-self.width // 2)
        out = RawCanvas.create(path, h, w)
        for i, band in enumerate(self.bands(256)):
            out.write_rows(i * 128, _half(band))
        return out


def _half(band: np.ndarray) -> np.ndarray:
    """2x2 mean of a band (edge rows / columns repeated to an even size)."""
    pad = ((0, band.shape[0] % 2), (0, band.shape[1] % 2), (0, 0))
    x = np.pad(band, pad, mode="edge").astype(np.uint16)
    return ((x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2] + 2) // 4).astype(np.uint8)


def pyramid_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """(height, width) of every level: halved until the larger side fits in one tile.

    Example:
        >>> pyramid_shapes(1000, 600, 256)
        [(1000, 600), (500, 300), (250, 150)]
    """
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def tiff_bytes_estimate(height: int, width: int, compression: str) -> int:
    """An upper bound of the OME-TIFF's size (levels written twice, see the module docstring)."""
    raw = height * width * 3 * (1 + 2 / 3)
    return int(raw / (4 if compression == "jpeg" else 1)) + (1 << 20)


def _tiles(canvas: RawCanvas, tile: int) -> Iterator[np.ndarray]:
    """Tiles row-major, each band of ``tile`` rows read once (tifffile pads edge tiles)."""
    for band in canvas.bands(tile):
        for x in range(0, canvas.width, tile):
            yield band[:, x : x + tile]


def _ome_xml(height: int, width: int, mpp: float, name: str) -> str:
    """One OME image with its physical pixel size (ASCII: TIFF strings are 7-bit)."""
    import tifffile

    ome = tifffile.OmeXml()
    ome.addimage(np.uint8, (height, width, 3), (1, 1, 1, height, width, 3), axes="YXS", Name=name,
                 PhysicalSizeX=mpp, PhysicalSizeY=mpp, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    return ome.tostring().replace("µ", "&#181;")


def write_pyramid_tiff(canvas: RawCanvas, out: str | Path, mpp: float, *, tile: int = 256,
                       compression: str = "jpeg", work_dir: str | Path | None = None, name: str = "pixgen") -> Path:
    """Write ``canvas`` as a tiled pyramidal OME-TIFF at ``out`` (see the module docstring).

    Args:
        mpp: microns per pixel of level 0 (OME PhysicalSize and TIFF resolution in cm).
        tile: tile side in pixels, a multiple of 16.
        compression: ``"jpeg"`` (quality 90, as scanners), ``"zlib"`` (lossless) or ``"none"``.
        work_dir: where the reduced levels' raw files go (default: beside ``canvas``); removed after.

    Example:
        >>> write_pyramid_tiff(canvas, "twin.ome.tiff", mpp=0.5, tile=256)  # doctest: +SKIP
    """
    import tifffile

    if tile % 16 or tile < 16:
        raise InputError(f"TIFF tile size must be a multiple of 16, got {tile}")
    if compression not in COMPRESSIONS:
        raise InputError(f"unknown compression {compression!r}", fix=f"use one of {', '.join(COMPRESSIONS)}")
    work = Path(work_dir or canvas.path.parent)
    levels = [canvas]
    for k in range(1, len(pyramid_shapes(canvas.height, canvas.width, tile))):
        levels.append(levels[-1].half(work / f"level{k}.raw"))
    codec, level = {"jpeg": ("jpeg", 90), "zlib": ("zlib", 6), "none": (None, None)}[compression]
    out = Path(out)
    tmp = out.with_name(f"{out.name}.{secrets.token_hex(4)}{PART_SUFFIX}")  # tifffile wants a named file, so not atomic_write's handle
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            def put(k: int, **kw) -> None:
                lv = levels[k]
                res = 1e4 / (mpp * 2**k)  # pixels per cm
                tif.write(_tiles(lv, tile), shape=(lv.height, lv.width, 3), dtype=np.uint8, tile=(tile, tile),
                          photometric="rgb", compression=codec,
                          compressionargs=None if level is None else {"level": level}, resolution=(res, res), resolutionunit="CENTIMETER",
                          metadata=None, **kw)

            put(0, subifds=len(levels) - 1, description=_ome_xml(canvas.height, canvas.width, mpp, name))
            for k in range(1, len(levels)):  # the OME SubIFDs
                put(k, subfiletype=1)
            for k in range(1, len(levels)):  # the same levels as top-level pages, for OpenSlide
                put(k, subfiletype=1)
        os.replace(tmp, out)
    except OSError as err:
        raise InputError(f"could not write {out}: {err.strerror or err}",
                         fix="free disk space or write elsewhere (nothing was left under that name)") from err
    finally:
        tmp.unlink(missing_ok=True)
        for lv in levels[1:]:
            lv.path.unlink(missing_ok=True)
    return Path(out)


def write_png(canvas: RawCanvas, out: str | Path) -> Path:
    """Write ``canvas`` as a PNG (the whole image is held in memory)."""
    from PIL import Image

    try:
        with atomic_write(out) as fh:
            Image.fromarray(canvas.read_rows(0, canvas.height)).save(fh, format="PNG")
    except OSError as err:
        raise InputError(f"could not write {out}: {err.strerror or err}",
                         fix="free disk space or write elsewhere (nothing was left under that name)") from err
    return Path(out)
