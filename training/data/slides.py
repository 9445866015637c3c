"""Whole-slide images: open, find tissue, and cut tiles at a requested resolution.

Slides open through OpenSlide (wheels ``openslide-bin`` + ``openslide-python``) or, when that is
missing or cannot read the file, through tiffslide. Resolution is always explicit: the slide's
mpp comes from its metadata (``openslide.mpp-x`` / ``tiffslide.mpp-x`` / ``aperio.MPP`` / TIFF
resolution in cm) or from ``slide_mpp=`` (``--slide-mpp``); a slide without either is an error.

Tiling at a target mpp: the pyramid level whose mpp is the closest below or equal to the target
is read (finer, never coarser) and resized (Lanczos) to the tile size. Tiles lie on a regular
grid in level-0 pixels; edge tiles that would cross the slide border are dropped. A tile is kept
when its tissue fraction (from a low-resolution tissue mask) is at least ``min_tissue``.

Output of `tile_slide` / ``pixgen tile SLIDE --mpp 0.5 --size 256 --out DIR``::

    DIR/tiles/{slide}_x{X}_y{Y}.png   tiles (X, Y = level-0 top-left corner)
    DIR/tiles.csv                     file, x, y, size0 (tile side in level-0 px), level, tissue, mpp
    DIR/tiling.json                   resolved settings, slide metadata, counts, versions, date
    DIR/tissue.png                    QC: thumbnail, tissue mask overlay and kept tiles

Example:
    >>> result = tile_slide("slide.svs", "out/slide", TilingConfig(mpp=0.5, size=256))  # doctest: +SKIP
    >>> ds = SlideTileDataset(["out/slide"])                                           # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from pixgen.errors import InputError, PixgenError
from pixgen.io import atomic_write, load_rgb, save_png, write_json_atomic
from pixgen.io.slides import Backend, Slide, check_mpp, choose_level, open_slide, read_region

__all__ = [
    "Slide", "open_slide", "TilingConfig", "TileInfo", "TissueMask", "TilingResult",
    "tissue_mask", "plan_tiles", "iter_tiles", "tile_slide", "SlideTileDataset", "add_parser",
]


@dataclass
class TilingConfig:
    """Settings of a tiling run (written, resolved, to ``tiling.json``).

    Attributes:
        mpp: target microns per pixel of the tiles.
        size: tile side in pixels at the target mpp.
        min_tissue: keep tiles whose tissue fraction is >= this (0 keeps every tile).
        max_tiles: keep at most this many tissue tiles, a seeded random sample (in grid order).
        slide_mpp: level-0 mpp to use instead of the metadata (required when the slide lacks it).
        overlap: pixels (at the target mpp) shared by neighbouring tiles.
        seed: for the ``max_tiles`` sample.
        workers: threads reading and writing tiles.
        backend: ``auto``, ``openslide`` or ``tiffslide``.
        mask_mpp: resolution (um/px) of the image the tissue mask is computed on.
        png_compression: zlib level for tile PNGs (0-9; 1 is fast, files ~10% larger than 6).
    """

    mpp: float = 0.5
    size: int = 256
    min_tissue: float = 0.5
    max_tiles: int | None = None
    slide_mpp: float | None = None
    overlap: int = 0
    seed: int = 0
    workers: int = 2
    backend: Backend = "auto"
    mask_mpp: float = 4.0
    png_compression: int = 1

    def __post_init__(self) -> None:
        self.mpp = check_mpp(self.mpp)
        if self.size < 8:
            raise InputError(f"tile size {self.size} is too small", fix="use e.g. --size 256")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise InputError(f"min_tissue={self.min_tissue} must be in [0, 1]")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise InputError(f"max_tiles={self.max_tiles} must be >= 1")
        if not 0 <= self.overlap < self.size:
            raise InputError(f"overlap={self.overlap} must be in [0, size)")


@dataclass(frozen=True)
class TileInfo:
    """One tile: level-0 top-left (x, y) and side ``size0``; read from ``level`` at ``read_size`` px."""

    x: int
    y: int
    size0: int
    level: int
    read_size: int
    tissue: float


@dataclass
class TissueMask:
    """A boolean tissue mask over the whole slide; ``scale`` = level-0 px per mask px (x, y)."""

    mask: np.ndarray
    scale: tuple[float, float]
    thumbnail: np.ndarray
    threshold: float
    level: int

    def fraction(self, x: int, y: int, size0: int) -> float:
        """Tissue fraction inside the level-0 box (x, y, size0, size0)."""
        sx, sy = self.scale
        x0, y0 = int(x / sx), int(y / sy)
        x1 = max(x0 + 1, int(math.ceil((x + size0) / sx)))
        y1 = max(y0 + 1, int(math.ceil((y + size0) / sy)))
        box = self.mask[y0:y1, x0:x1]
        return float(box.mean()) if box.size else 0.0


def tissue_mask(slide: Slide, base_mpp: float, mask_mpp: float = 4.0) -> TissueMask:
    """Find tissue on a low-resolution image of the slide (about ``mask_mpp`` um/px).

    The image is the coarsest pyramid level at least as fine as ``mask_mpp``, shrunk to
    ``mask_mpp`` (long side kept within 512..2048 px, never above level 0). Tissue = HSV
    saturation above Otsu's threshold (capped to [0.03, 0.10], so pale stroma stays tissue and
    a slide that is all tissue is not cut in two) and optical density > 0.05 (not near-white);
    then a closing (16 um disk) and removal of objects and holes smaller than 0.01 mm^2.

    Example:
        >>> with open_slide("slide.svs") as s:   # doctest: +SKIP
        ...     tm = tissue_mask(s, s.mpp()); tm.mask.mean()
        0.41
    """
    from skimage.filters import threshold_otsu

    level, thumb = _low_res_image(slide, base_mpp, mask_mpp)
    scale = (slide.dimensions[0] / thumb.shape[1], slide.dimensions[1] / thumb.shape[0])
    rgb = thumb.astype(np.float32)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    sat = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1.0), 0.0)          # HSV saturation
    od = -np.log((rgb + 1.0) / 256.0).mean(axis=-1)                        # optical density
    thr = float(np.clip(threshold_otsu(sat), 0.03, 0.10)) if np.ptp(sat) > 0 else 0.03
    px_mpp = base_mpp * (scale[0] + scale[1]) / 2
    radius = int(np.clip(round(16.0 / px_mpp), 1, 10))
    min_area = max(4, round(1e4 / px_mpp**2))
    mask = _clean_mask((sat > thr) & (od > 0.05), radius, min_area)
    return TissueMask(mask, scale, thumb, thr, level)


def _clean_mask(mask: np.ndarray, radius: int, min_area: int) -> np.ndarray:
    """Closing with a disk, then drop objects and fill holes smaller than ``min_area`` px."""
    import inspect

    from scipy import ndimage as ndi
    from skimage import morphology as morph

    pad = radius + 1  # closing near the border must not eat tissue that touches the edge
    mask = ndi.binary_closing(np.pad(mask, pad, mode="edge"), morph.disk(radius))[pad:-pad, pad:-pad]
    # scikit-image 0.26 renamed min_size / area_threshold to max_size
    new_api = "max_size" in inspect.signature(morph.remove_small_objects).parameters
    objects = {"max_size": min_area} if new_api else {"min_size": min_area}
    holes = {"max_size": min_area} if new_api else {"area_threshold": min_area}
    return morph.remove_small_holes(morph.remove_small_objects(mask, **objects), **holes)


def _low_res_image(slide: Slide, base_mpp: float, mask_mpp: float, block: int = 4096) -> tuple[int, np.ndarray]:
    """(level, RGB image of the whole slide at about ``mask_mpp``, long side 512..2048 px).

    The level is read in ``block``-px pieces, each shrunk on its own, so a slide without a
    pyramid never has to fit in memory at full resolution.
    """
    w0, h0 = slide.dimensions
    long0 = max(w0, h0)
    target = int(min(long0, np.clip(long0 * base_mpp / mask_mpp, 512, 2048)))
    level = max((i for i, d in enumerate(slide.level_dimensions) if max(d) >= target),
                key=lambda i: slide.level_downsamples[i])
    w, h = slide.level_dimensions[level]
    k = max(1, int(max(w, h) // target))                       # exact integer box reduction first
    block = max(k, block - block % k)
    ds = slide.level_downsamples[level]                         # read() takes level-0 coordinates
    out = Image.new("RGB", (math.ceil(w / k), math.ceil(h / k)), "white")
    for y in range(0, h, block):
        for x in range(0, w, block):
            piece = Image.fromarray(slide.read(round(x * ds), round(y * ds), level,
                                               min(block, w - x), min(block, h - y)))
            out.paste(piece.reduce(k) if k > 1 else piece, (x // k, y // k))
    if max(out.size) > target:
        f = target / max(w, h)
        out = out.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BOX)
    return level, np.asarray(out)


def plan_tiles(slide: Slide, config: TilingConfig, tissue: TissueMask | None = None) -> list[TileInfo]:
    """The tiles to cut: a level-0 grid, filtered by tissue fraction and ``max_tiles``.

    Example:
        >>> with open_slide("slide.svs") as s:                              # doctest: +SKIP
        ...     tiles = plan_tiles(s, TilingConfig(mpp=1.0, size=256, slide_mpp=0.5))
    """
    base = slide.mpp(config.slide_mpp)
    level = choose_level(slide, base, config.mpp)
    down = config.mpp / base                              # level-0 px per output px
    size0 = max(1, round(config.size * down))
    stride0 = max(1, round((config.size - config.overlap) * down))
    read_size = max(1, round(size0 / slide.level_downsamples[level]))
    w0, h0 = slide.dimensions
    if tissue is None and config.min_tissue > 0:
        tissue = tissue_mask(slide, base, config.mask_mpp)
    tiles = []
    for y in range(0, h0 - size0 + 1, stride0):
        for x in range(0, w0 - size0 + 1, stride0):
            frac = tissue.fraction(x, y, size0) if tissue is not None else 1.0
            if frac >= config.min_tissue:
                tiles.append(TileInfo(x, y, size0, level, read_size, round(frac, 4)))
    if config.max_tiles is not None and len(tiles) > config.max_tiles:
        keep = np.random.default_rng(config.seed).choice(len(tiles), config.max_tiles, replace=False)
        tiles = [tiles[i] for i in sorted(keep)]
    return tiles


def read_tile(slide: Slide, tile: TileInfo, size: int) -> np.ndarray:
    """Read one tile and resize it to ``size`` x ``size`` (Lanczos) when the level differs."""
    return read_region(slide, tile.x, tile.y, tile.level, tile.read_size, size)


def iter_tiles(slide: Slide, config: TilingConfig, tiles: Sequence[TileInfo] | None = None
               ) -> Iterator[tuple[TileInfo, np.ndarray]]:
    """Yield (tile, uint8 (size, size, 3) image) without writing files (e.g. for feature caching).

    Example:
        >>> with open_slide("slide.svs") as s:                            # doctest: +SKIP
        ...     for info, img in iter_tiles(s, TilingConfig(mpp=0.5)): ...
    """
    for tile in tiles if tiles is not None else plan_tiles(slide, config):
        yield tile, read_tile(slide, tile, config.size)


@dataclass
class TilingResult:
    """What `tile_slide` wrote."""

    out_dir: Path
    n_tiles: int
    n_candidates: int
    level: int
    slide_mpp: float
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tiles_per_second(self) -> float:
        """Tiles written per second, end to end (opening, tissue mask and writing)."""
        return self.n_tiles / self.seconds if self.seconds > 0 else float("nan")


def tile_slide(slide_path: str | Path, out_dir: str | Path, config: TilingConfig | None = None,
               overwrite: bool = False, progress: bool = True) -> TilingResult:
    """Cut a slide into PNG tiles at ``config.mpp`` and write ``tiles.csv`` + ``tiling.json``.

    Example:
        >>> r = tile_slide("cmu-1-small-region.svs", "out/cmu1", TilingConfig(mpp=0.5, size=256))  # doctest: +SKIP
        >>> r.n_tiles                                                                              # doctest: +SKIP
        40
    """
    from tqdm.auto import tqdm

    config = config or TilingConfig()
    out_dir, t0 = Path(out_dir), time.perf_counter()
    with open_slide(slide_path, config.backend) as slide:
        base, base_src = slide.mpp_with_source(config.slide_mpp)
        level = choose_level(slide, base, config.mpp)
        tile_dir = _prepare_out(out_dir, overwrite)
        tissue = tissue_mask(slide, base, config.mask_mpp)
        n_grid = len(plan_tiles(slide, replace(config, min_tissue=0.0, max_tiles=None), tissue))
        tiles = plan_tiles(slide, config, tissue)
        stem = Path(slide_path).stem
        names = [f"{stem}_x{t.x}_y{t.y}.png" for t in tiles]
        t1 = time.perf_counter()

        def work(item: tuple[TileInfo, str]) -> None:
            save_png(read_tile(slide, item[0], config.size), tile_dir / item[1], compress_level=config.png_compression)

        with ThreadPoolExecutor(max(1, config.workers)) as pool, \
                tqdm(total=len(tiles), desc=stem, unit="tile", disable=not progress) as bar:
            for _ in pool.map(work, zip(tiles, names)):
                bar.update()
        _write_csv(out_dir / "tiles.csv", tiles, names, config.mpp)
        t2 = time.perf_counter()
        timing = {"seconds_total": round(t2 - t0, 3), "seconds_mask": round(t1 - t0, 3),
                  "seconds_tiles": round(t2 - t1, 3), "tiles_per_second": round(len(tiles) / max(t2 - t1, 1e-9), 2)}
        settings = _settings(slide, config, base, base_src, level, tissue, n_grid, len(tiles), timing)
        _save_qc(out_dir / "tissue.png", tissue, tiles)
    write_json_atomic(out_dir / "tiling.json", settings)
    if not tiles:
        warnings.warn(f"no tiles with tissue >= {config.min_tissue} in {stem}", stacklevel=2)
    seconds = t2 - t0
    return TilingResult(out_dir, len(tiles), n_grid, level, base, seconds, settings)


def _prepare_out(out_dir: Path, overwrite: bool) -> Path:
    tile_dir = out_dir / "tiles"
    old = list(tile_dir.glob("*.png")) if tile_dir.is_dir() else []
    if (old or (out_dir / "tiles.csv").exists()) and not overwrite:
        raise InputError(f"{out_dir} already holds tiles", fix="choose another --out or pass --overwrite")
    for p in old:
        p.unlink()
    tile_dir.mkdir(parents=True, exist_ok=True)
    return tile_dir


def _write_csv(path: Path, tiles: Sequence[TileInfo], names: Sequence[str], mpp: float) -> None:
    with atomic_write(path, "w") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "x", "y", "size0", "level", "tissue", "mpp"])
        for t, name in zip(tiles, names):
            w.writerow([f"tiles/{name}", t.x, t.y, t.size0, t.level, t.tissue, mpp])


def _settings(slide: Slide, config: TilingConfig, base: float, base_src: str, level: int,
              tissue: TissueMask, n_grid: int, n_tiles: int, timing: dict[str, float]) -> dict[str, Any]:
    from pixgen import __version__

    backend_mod = __import__(slide.backend)
    return {
        "slide": str(slide.path.resolve()),
        "slide_name": slide.path.stem,
        "slide_dimensions": list(slide.dimensions),
        "level_dimensions": [list(d) for d in slide.level_dimensions],
        "level_downsamples": list(slide.level_downsamples),
        "slide_mpp": base,
        "slide_mpp_source": base_src,
        "config": asdict(config),
        "level": level,
        "level_mpp": base * slide.level_downsamples[level],
        "tile_size0": round(config.size * config.mpp / base),
        "tissue_detection": {"method": "otsu-saturation+od", "threshold": tissue.threshold,
                             "mask_mpp": round(base * (tissue.scale[0] + tissue.scale[1]) / 2, 4),
                             "mask_level": tissue.level, "mask_shape": list(tissue.mask.shape),
                             "tissue_fraction": float(tissue.mask.mean())},
        "grid_tiles": n_grid,
        "tiles": n_tiles,
        "timing": timing,
        "backend": f"{slide.backend} {getattr(backend_mod, '__version__', '?')}",
        "pixgen": __version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
    }


def _save_qc(path: Path, tissue: TissueMask, tiles: Sequence[TileInfo]) -> None:
    """Thumbnail with non-tissue dimmed blue and kept tiles outlined in green."""
    thumb = tissue.thumbnail.astype(np.float32)
    thumb[~tissue.mask] = thumb[~tissue.mask] * 0.5 + np.array([0, 0, 96])
    img = Image.fromarray(thumb.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    sx, sy = tissue.scale
    for t in tiles:
        draw.rectangle([t.x / sx, t.y / sy, (t.x + t.size0) / sx, (t.y + t.size0) / sy], outline=(0, 200, 0))
    with atomic_write(path) as fh:
        img.save(fh, format="PNG")


class SlideTileDataset(torch.utils.data.Dataset):
    """Tiles written by `tile_slide` (one or more output folders), grouped by slide.

    Each sample: ``image`` uint8 (H, W, 3), ``slide`` and ``group`` (slide name: split by it),
    ``x``, ``y``, ``size0`` (level-0 box), ``tissue``, ``mpp``, ``path``.

    Example:
        >>> ds = SlideTileDataset(["tiles/cmu1", "tiles/tcga"])  # doctest: +SKIP
        >>> ds[0]["mpp"], ds[0]["group"]                          # doctest: +SKIP
        (0.5, 'cmu-1-small-region')
    """

    def __init__(self, dirs: Sequence[str | Path] | str | Path):
        dirs = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
        self.rows: list[dict[str, Any]] = []
        for d in map(Path, dirs):
            info_path, csv_path = d / "tiling.json", d / "tiles.csv"
            if not info_path.is_file() or not csv_path.is_file():
                raise InputError(f"{d} is not a tiling output (no tiling.json / tiles.csv)",
                                 fix="run `pixgen tile SLIDE --out DIR` first")
            info = json.loads(info_path.read_text())
            with csv_path.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    self.rows.append({"path": str(d / row["file"]), "slide": info["slide_name"],
                                      "x": int(row["x"]), "y": int(row["y"]), "size0": int(row["size0"]),
                                      "tissue": float(row["tissue"]), "mpp": float(row["mpp"])})
        mpps = {r["mpp"] for r in self.rows}
        if len(mpps) > 1:
            warnings.warn(f"tiles at different resolutions mixed: mpp {sorted(mpps)}", stacklevel=2)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        return {"image": load_rgb(row["path"]), "group": row["slide"], **row}


# ----------------------------------------------------------------------------- CLI
def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pixgen tile`` (entry point of the ``pixgen.commands`` group)."""
    p = subparsers.add_parser(
        "tile", help="cut a whole-slide image into tissue tiles at a given mpp",
        description="Cut a whole-slide image into PNG tiles at a target resolution; writes "
                    "DIR/tiles/*.png, DIR/tiles.csv (level-0 coordinates) and DIR/tiling.json.")
    p.add_argument("slide", help="whole-slide image (.svs, .ndpi, .mrxs, .tif, ...)")
    p.add_argument("--mpp", type=float, required=True, help="target microns per pixel of the tiles")
    p.add_argument("--size", type=int, default=256, help="tile side in pixels (default 256)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction (default 0.5)")
    p.add_argument("--max-tiles", type=int, default=None, help="keep at most N tiles (seeded sample)")
    p.add_argument("--slide-mpp", type=float, default=None, help="level-0 mpp when the slide lacks it")
    p.add_argument("--overlap", type=int, default=0, help="overlap between tiles in pixels (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-tiles sample")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="reader threads")
    p.add_argument("--backend", choices=["auto", "openslide", "tiffslide"], default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace tiles already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``pixgen tile``."""
    try:
        config = TilingConfig(mpp=args.mpp, size=args.size, min_tissue=args.min_tissue,
                              max_tiles=args.max_tiles, slide_mpp=args.slide_mpp, overlap=args.overlap,
                              seed=args.seed, workers=args.workers, backend=args.backend)
        r = tile_slide(args.slide, args.out, config, overwrite=args.overwrite, progress=not args.quiet)
    except PixgenError:
        raise
    except OSError as err:
        raise InputError(f"tiling failed: {' '.join(str(err).split())}") from None
    print(f"wrote {r.n_tiles} of {r.n_candidates} tiles ({config.size} px at {config.mpp} um/px, "
          f"level {r.level}, slide {r.slide_mpp:.4g} um/px) to {r.out_dir / 'tiles'} in {r.seconds:.1f} s "
          f"({r.tiles_per_second:.1f} tiles/s); index {r.out_dir / 'tiles.csv'}")
    return 0
