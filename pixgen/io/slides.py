"""Whole-slide images for the library: open a slide with OpenSlide or tiffslide, know its
resolution, and read regions at a requested resolution (microns per pixel).

Slides open through OpenSlide (wheels ``openslide-bin`` + ``openslide-python``) or, when that is
missing or cannot read the file, through tiffslide (``pip install 'pixgen[slides]'``). Resolution
is always explicit: the slide's mpp comes from its metadata (``openslide.mpp-x`` /
``tiffslide.mpp-x`` / ``aperio.MPP`` / TIFF resolution in cm) or from an override; a slide without
either is an error. A region at a target mpp is read from the pyramid level whose mpp is the
closest below or equal to the target (finer, never coarser) and resized (Lanczos). Tiling,
tissue detection and datasets build on this in ``training.data.slides``.

Example:
    >>> with open_slide("cmu-1-small-region.svs") as s:                      # doctest: +SKIP
    ...     tile = region_at_mpp(s, x=1000, y=1000, size=256, mpp=0.5)
    >>> tile.shape                                                            # doctest: +SKIP
    (256, 256, 3)
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from pixgen.errors import InputError

__all__ = ["Slide", "open_slide", "check_mpp", "choose_level", "read_region", "region_at_mpp", "Backend"]

Backend = Literal["auto", "openslide", "tiffslide"]


def check_mpp(mpp: float) -> float:
    """A declared resolution as a float, or :class:`InputError` when it is not a plausible mpp.

    Example:
        >>> check_mpp("0.5")
        0.5
    """
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise InputError(f"mpp must be a number (microns per pixel), got {mpp!r}") from None
    if not (0.01 <= value <= 100.0):
        raise InputError(f"mpp={value} is not a plausible resolution in microns per pixel",
                         fix="typical values: 0.25 (40x), 0.5 (20x), 1.0 (10x)")
    return value


class Slide:
    """A whole-slide image behind one small interface, whichever library reads it.

    Use `open_slide` to make one. Coordinates are (x, y) in level-0 pixels, as in OpenSlide.

    Example:
        >>> with open_slide("cmu-1-small-region.svs") as s:  # doctest: +SKIP
        ...     s.mpp(), s.dimensions
        (0.499, (2220, 2967))
    """

    def __init__(self, handle: Any, path: Path, backend: str):
        self._h, self.path, self.backend = handle, path, backend
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(handle.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in handle.level_downsamples)
        self.properties: dict[str, Any] = dict(handle.properties)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Read a region as uint8 (height, width, 3) RGB; transparent (no-data) pixels become white."""
        try:
            img = self._h.read_region((int(x), int(y)), int(level), (int(width), int(height)))
        except Exception as err:  # noqa: BLE001 - backends raise many types; report them all alike
            raise InputError(f"cannot read region x={x} y={y} level={level} of {self.path.name}: "
                             f"{_one_line(err)}", fix="the slide file may be truncated or corrupt") from None
        arr = np.asarray(img)
        if arr.shape[-1] == 4:
            alpha = arr[..., 3:4].astype(np.float32) / 255.0
            arr = (arr[..., :3] * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
        return arr

    def mpp(self, override: float | None = None) -> float:
        """Level-0 microns per pixel: ``override`` if given, else from the metadata.

        Raises `InputError` (fix: pass ``--slide-mpp``) when the slide does not record it.
        """
        return self.mpp_with_source(override)[0]

    def mpp_with_source(self, override: float | None = None) -> tuple[float, str]:
        """(mpp, where it came from)."""
        if override is not None:
            return check_mpp(override), "given (--slide-mpp)"
        for kx, ky in (("openslide.mpp-x", "openslide.mpp-y"), ("tiffslide.mpp-x", "tiffslide.mpp-y"),
                       ("aperio.MPP", "aperio.MPP")):
            x, y = _float(self.properties.get(kx)), _float(self.properties.get(ky))
            if x and y:
                if abs(x - y) > 0.01 * max(x, y):
                    warnings.warn(f"{self.path.name}: non-square pixels ({x} x {y} um); using the mean",
                                  stacklevel=2)
                return check_mpp((x + y) / 2), f"metadata ({kx})"
        res = _tiff_resolution_mpp(self.properties)
        if res:
            return check_mpp(res), "metadata (TIFF resolution)"
        raise InputError(f"slide {self.path.name} does not record its resolution (mpp)",
                         fix="pass --slide-mpp (slide_mpp=...), e.g. 0.25 for a 40x scan, 0.5 for 20x")

    def level_mpps(self, base_mpp: float) -> list[float]:
        """The mpp of every pyramid level."""
        return [base_mpp * d for d in self.level_downsamples]

    def close(self) -> None:
        """Release the file."""
        self._h.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({self.path.name!r}, backend={self.backend!r}, levels={self.level_dimensions})"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _tiff_resolution_mpp(props: dict[str, Any]) -> float | None:
    """mpp from TIFF XResolution when its unit is centimetre (inch-based values are often a 72 dpi default)."""
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    xres = _float(props.get("tiff.XResolution"))
    if xres and unit in ("centimeter", "centimetre", "3"):
        return 1e4 / xres
    return None


def open_slide(path: str | Path, backend: Backend = "auto") -> Slide:
    """Open a whole-slide image; `InputError` with a one-line reason when it cannot be read.

    ``backend="auto"`` tries OpenSlide, then tiffslide.

    Example:
        >>> open_slide("broken.svs")  # doctest: +SKIP
        InputError: cannot open slide broken.svs: not a whole-slide image ... (fix: ...)
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"slide not found: {path}")
    order = ["openslide", "tiffslide"] if backend == "auto" else [backend]
    if any(b not in ("openslide", "tiffslide") for b in order):
        raise InputError(f"unknown slide backend {backend!r}", fix="use auto, openslide or tiffslide")
    reasons = []
    for name in order:
        try:
            if name == "openslide":
                import openslide

                return Slide(openslide.OpenSlide(str(path)), path, "openslide")
            import tiffslide

            return Slide(tiffslide.TiffSlide(str(path)), path, "tiffslide")
        except ImportError:
            reasons.append(f"{name}: not installed")
        except Exception as err:  # noqa: BLE001 - each backend has its own error types
            reasons.append(f"{name}: {_one_line(err)}")
    raise InputError(f"cannot open slide {path.name}: not a whole-slide image that can be read "
                     f"({'; '.join(reasons)})",
                     fix="check that the file is complete and in a format OpenSlide reads (.svs, .ndpi, "
                         ".mrxs, .tif, ...); pip install 'pixgen[slides]' for the readers")


def choose_level(slide: Slide, base_mpp: float, target_mpp: float) -> int:
    """The level whose mpp is the closest below or equal to ``target_mpp``.

    Level mpps within 1% above the target count as equal (pyramid downsamples such as 2.0005
    are rounded by the scanner). A target up to 2.5% finer than level 0 (0.25 on a 0.2527 scan)
    reads level 0 and upsamples slightly; a finer target is an error.

    Example:
        >>> # levels at 0.25, 1.0, 4.0 um/px: target 0.5 -> level 0; 1.0 -> level 1; 8.0 -> level 2
    """
    if target_mpp < base_mpp * 0.975:
        raise InputError(f"target mpp {target_mpp} is finer than the slide's {base_mpp:.4g} um/px "
                         "(tiles would be upsampled)",
                         fix=f"use --mpp >= {base_mpp:.4g}, or check --slide-mpp")
    ok = [i for i, m in enumerate(slide.level_mpps(base_mpp)) if m <= target_mpp * 1.01] or [0]
    return max(ok, key=lambda i: slide.level_downsamples[i])


def read_region(slide: Slide, x: int, y: int, level: int, read_size: int, size: int) -> np.ndarray:
    """Read a ``read_size`` square at level-0 (x, y) from ``level``, resized (Lanczos) to ``size``."""
    arr = slide.read(x, y, level, read_size, read_size)
    if read_size != size:
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.LANCZOS))
    return arr


def region_at_mpp(slide: Slide, x: int, y: int, size: int, mpp: float, slide_mpp: float | None = None) -> np.ndarray:
    """A uint8 (size, size, 3) region at ``mpp`` um/px whose top-left corner is level-0 (x, y).

    ``slide_mpp`` overrides the slide's recorded level-0 resolution.

    Example:
        >>> with open_slide("slide.svs") as s:                            # doctest: +SKIP
        ...     region_at_mpp(s, 0, 0, size=1024, mpp=0.5).shape
        (1024, 1024, 3)
    """
    base = slide.mpp(slide_mpp)
    level = choose_level(slide, base, mpp)
    size0 = max(1, round(size * mpp / base))
    return read_region(slide, x, y, level, max(1, round(size0 / slide.level_downsamples[level])), size)
