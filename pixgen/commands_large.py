"""``pixgen large``: one large image (any size, seamless) into a pyramidal OME-TIFF or a PNG.

A command of its own rather than options on ``generate``: ``generate`` writes a set of tiles with
a manifest, this writes one slide-like file from a layout. The layout is one of
``--from-slide`` (the synthetic twin of a slide region), ``--label-map`` (painted regions) or
``--label`` / ``--prompt`` / ``--reference`` (one condition varying smoothly).

Example:
    $ pixgen large --from-slide slide.svs --region 0,0,2000,2000 --out twin.ome.tiff --steps 10
    $ pixgen large --label lung_aca --size 2048 --out big.ome.tiff
    $ pixgen large --prompt "colon, inflammatory-rich" --size 1024 --out infl.ome.tiff
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pixgen.errors import InputError

__all__ = ["add_parser", "run_large", "parse_region", "parse_size", "parse_colours"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``large`` to the ``pixgen`` parser."""
    from pixgen.commands import DEFAULT_MODEL

    p = sub.add_parser("large", help="one large seamless image (a slide's synthetic twin, a label map, a label) "
                                     "into a pyramidal OME-TIFF")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model dir or hub id (default: the bundled model)")
    p.add_argument("--out", required=True, help="output .ome.tiff (tiled, pyramidal, with mpp) or .png (small sizes)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-slide", help="a whole-slide image: generate the synthetic twin of --region")
    src.add_argument("--label", help="a label of the model (its prior, else its bank), varying smoothly over the canvas")
    src.add_argument("--prompt", help="a prompt in the prior's vocabulary (`pixgen info`), varying smoothly over the canvas")
    src.add_argument("--reference", help="a reference image (the same condition everywhere; only the noise varies)")
    src.add_argument("--label-map", help="a small image whose colours name labels or prompts (see --colours)")
    p.add_argument("--region", help="x,y,w,h in level-0 pixels of --from-slide (default: the whole slide)")
    p.add_argument("--slide-mpp", "--mpp", dest="mpp", type=float,
                   help="the slide's level-0 microns per pixel, when its file does not record it")
    p.add_argument("--size", help="output size N or WxH in pixels (default: the layout's; needed for --label/--prompt/--reference)")
    p.add_argument("--colours", nargs="+", default=[],
                   help="label-map colours: 'R,G,B=label' or 'R,G,B=prompt' (e.g. '255,0,0=colon, inflammatory-rich') ...")
    p.add_argument("--cells-per-pixel", type=int, default=1, help="label map: model windows per map pixel (per side)")
    p.add_argument("--period", type=int, default=4,
                   help="--label / --prompt: windows between independent draws (slerp between)")
    p.add_argument("--overlap", type=int, help="window overlap in latents (default: a quarter of the window; 0 = naive tiling)")
    p.add_argument("--quality", help="fast, balanced or best: a measured sampler preset (docs/benchmarks.md; "
                   "default: the model's own sampler, as the seam measurements in docs/large-images.md)")
    p.add_argument("--sampler", help="euler, heun, dpm++2m or unipc, replacing the preset's (or the model's) solver")
    p.add_argument("--steps", type=int, help="sampling steps (default: the preset's, or the model's)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward (memory only)")
    p.add_argument("--tile", type=int, default=256, help="OME-TIFF tile size (multiple of 16)")
    p.add_argument("--compression", choices=["jpeg", "zlib", "none"], default="jpeg")
    p.add_argument("--save-real", help="--from-slide: also write the real region at the model's mpp (PNG), to compare")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=run_large)


def parse_region(text: str) -> tuple[int, int, int, int]:
    """``"x,y,w,h"`` -> ints.

    Example:
        >>> parse_region("10, 20,300,400")
        (10, 20, 300, 400)
    """
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--region must be x,y,w,h (four integers), got {text!r}") from None
    return x, y, w, h


def parse_size(text: str) -> tuple[int, int]:
    """``"N"`` or ``"WxH"`` -> (height, width).

    Example:
        >>> parse_size("2048"), parse_size("1024x512")
        ((2048, 2048), (512, 1024))
    """
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise InputError(f"--size must be N or WxH in pixels, got {text!r}")
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[1], parts[0])


def parse_colours(items: list[str]) -> dict[tuple[int, int, int], str]:
    """``["255,0,0=tumour", ...]`` -> {(255, 0, 0): "tumour"}.

    Example:
        >>> parse_colours(["255,0,0=tumour"])
        {(255, 0, 0): 'tumour'}
    """
    out = {}
    for item in items:
        try:
            rgb, label = item.split("=", 1)
            r, g, b = (int(v) for v in rgb.split(","))
        except ValueError:
            raise InputError(f"--colours entries are 'R,G,B=label', got {item!r}") from None
        out[(r, g, b)] = label
    return out


def run_large(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from pixgen.commands import _check_default_model
    from pixgen.large import build_layout, generate_large
    from pixgen.pipeline import Generator

    from pixgen.sampling import check_sampling_choice

    check_sampling_choice(args.quality, args.sampler)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InputError(f"{out} exists", fix="pass --overwrite, or choose another --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    _check_default_model(args.model)
    gen = Generator.from_pretrained(args.model, device=args.device)
    if args.quality or args.sampler:
        gen.use_sampling(args.quality, args.sampler)
    t0 = time.perf_counter()
    size = parse_size(args.size) if args.size else None
    region = parse_region(args.region) if args.from_slide and args.region else None
    layout, real = build_layout(gen, slide=args.from_slide, region=region, slide_mpp=args.mpp, label_map=args.label_map,
                                colours=parse_colours(args.colours) if args.label_map else None,
                                cells_per_pixel=args.cells_per_pixel, label=args.label, reference=args.reference,
                                prompt=args.prompt, size=size, period=args.period, seed=args.seed)
    height, width = size or layout.size
    if height % layout.cell or width % layout.cell or (height, width) != layout.size:
        print(f"note: {width}x{height} px is not the layout's {layout.size[1]}x{layout.size[0]} px; windows past the "
              "layout repeat its edge, and sizes that are not multiples of the latent unit are sampled rounded up "
              "and cropped")
    if real is not None and args.save_real:
        Image.fromarray(real[:height, :width]).save(args.save_real)
    summary = generate_large(gen, layout, out, height=height, width=width, num_inference_steps=args.steps,
                             guidance_scale=args.guidance, seed=args.seed, overlap=args.overlap,
                             batch_size=args.batch_size, tile=args.tile, compression=args.compression)
    summary["total_s"] = time.perf_counter() - t0
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in summary.items()}))
    print(f"wrote {out} ({width}x{height} px)")
    return 0
