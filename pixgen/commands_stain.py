"""``pixgen stain``: H&E tiles, folders or slide regions -> virtual IHC (see :mod:`pixgen.staining`).

Outputs, all through :mod:`pixgen.io`'s atomic writers:

* tiles / folders / an embeddings file (a direct-baseline model, ``training.tasks.stain_controlnet``'s
  ``RUN/final``, takes tiles of its own size only): ``OUT/0000.png ...`` (provenance in each PNG), the set's
  ``manifest.json`` (model by content hash, sampler settings, each input's SHA-256),
  ``conditions.safetensors`` (the translated IHC embeddings), ``contact_sheet.png``, and
  ``side_by_side.png`` (one row per input: H&E | IHC) and ``stain.json`` (stain, marker, flow steps);
* a slide region (``--region``, or a slide file): ``OUT/ihc.ome.tiff`` (or ``ihc.png`` with
  ``--png``) through the large-image path, ``OUT/he.png`` (the region at the model's mpp),
  ``OUT/side_by_side.png`` (both, at most 2048 px wide) and ``OUT/stain.json``.

Example:
    $ pixgen stain he_tiles/ --model runs/bci-stain --to her2 --out her2/
    $ pixgen stain slide.svs --region 0,0,4096,4096 --model StonyBrook-CVLab/pixcell-virtual-staining \\
          --to mist_her2 --vae-path sd35/vae --encoder-path UNI2-h --out her2-region/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pixgen.errors import InputError

__all__ = ["EMBEDDING_SUFFIXES", "SLIDE_SUFFIXES", "add_parser", "run_stain"]

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
EMBEDDING_SUFFIXES = (".safetensors", ".npy", ".pt")
SIDE_BY_SIDE = "side_by_side.png"
STAIN_JSON = "stain.json"
SHEET_MAX_WIDTH = 2048


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``stain`` to the ``pixgen`` parser."""
    from pixgen.commands import TRUST_HELP

    p = sub.add_parser("stain", help="virtual IHC from H&E tiles, folders or slide regions",
                       description="H&E -> encoder -> stain translator -> IHC generator (docs/staining.md).")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="H&E image(s), folder(s) of images, a slide (with --region), or an H&E embeddings file")
    p.add_argument("--model", required=True, help="stain model folder (stain_model.json) or hub id "
                   "(StonyBrook-CVLab/pixcell-virtual-staining)")
    p.add_argument("--to", help="stain to make (a stain name or its marker, e.g. her2); see --list")
    p.add_argument("--out", help="output folder")
    p.add_argument("--list", action="store_true", help="print the model's stains and exit")
    p.add_argument("--overwrite", action="store_true", help="replace what is in --out")
    p.add_argument("--region", help="x,y,w,h in level-0 pixels of a slide INPUT (default: the whole slide)")
    p.add_argument("--mpp", "--slide-mpp", dest="mpp", type=float, help="tiles: their microns per pixel (checked "
                   "against the model's); slides: the level-0 mpp when the file does not record it")
    p.add_argument("--png", action="store_true", help="regions: write ihc.png instead of ihc.ome.tiff")
    p.add_argument("--steps", type=int, help="sampling steps of the IHC generator (default: the model's)")
    p.add_argument("--guidance", type=float, help="CFG scale of the IHC generator (default: the model's)")
    p.add_argument("--flow-steps", type=int, help="Euler steps of the translator (default 20)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--base", help="PixCell layout: the PixCell-1024 folder or hub id the LoRAs adapt")
    p.add_argument("--token", help="hub token for gated models (or set HF_TOKEN)")
    p.add_argument("--vae-path", help="local autoencoder folder (PixCell: the SD3.5 VAE)")
    p.add_argument("--encoder-path", help="local encoder weights (PixCell: UNI2-h)")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=run_stain)


def _kind(inputs: list[str], region: str | None) -> str:
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise InputError(f"no such input: {p}", fix="pass H&E image files, folders, a slide or an embeddings file")
    slide = region is not None or any(p.suffix.lower() in SLIDE_SUFFIXES for p in paths)
    emb = any(p.suffix.lower() in EMBEDDING_SUFFIXES for p in paths)
    if (slide or emb) and len(paths) > 1:
        raise InputError("a slide or an embeddings file is stained alone", fix="pass one slide (or one file) per run")
    if slide and paths[0].is_dir():
        raise InputError("--region needs a slide file, not a folder")
    return "slide" if slide else "embeddings" if emb else "tiles"


def _images(inputs: list[str]) -> list[Path]:
    from pixgen.io import list_images

    files: list[Path] = []
    for item in map(Path, inputs):
        found = list_images(item) if item.is_dir() else [item]
        if item.is_dir() and not found:
            raise InputError(f"no images in {item}", fix="pass a folder of H&E tiles (png, jpg, tif)")
        files += found
    return files


def run_stain(args: argparse.Namespace) -> int:
    import torch

    from pixgen.staining import StainPipeline

    kind = _kind(args.inputs, args.region)
    if not args.list and (not args.to or not args.out):
        raise InputError("pixgen stain needs --to STAIN and --out FOLDER", fix="see --list for the stains")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = StainPipeline.from_pretrained(args.model, base=args.base, token=args.token, vae_path=args.vae_path,
                                         encoder_path=args.encoder_path, device=args.device,
                                         flow_steps=args.flow_steps, trust_remote_code=args.trust_remote_code)
    if args.list:
        print(json.dumps(pipe.describe(), indent=1))
        return 0
    pipe.stain_name(args.to)  # an unknown stain is refused before anything is written
    if kind == "slide":
        return _run_region(args, pipe)
    return _run_tiles(args, pipe, kind)


def _run_tiles(args: argparse.Namespace, pipe, kind: str) -> int:
    from pixgen.embeddings import load_embeddings
    from pixgen.io import (
        Condition,
        ImageEntry,
        SamplerSettings,
        SetManifest,
        SetWriter,
        check_output_folder,
        sha256_file,
        write_json_atomic,
    )
    from pixgen.io.atomic import atomic_write
    from pixgen.io.manifest import FileHash, model_id
    from pixgen.staining import side_by_side

    out = check_output_folder(args.out, args.overwrite)
    t0 = time.perf_counter()
    _, gen = pipe.components(args.to)
    files = _images(args.inputs) if kind == "tiles" else []
    emb = load_embeddings(args.inputs[0]) if kind == "embeddings" else None
    steps = int(args.steps or gen.config["num_inference_steps"])
    guidance = float(gen.config["guidance_scale"] if args.guidance is None else args.guidance)
    manifest = SetManifest(
        model=model_id(args.model, gen.source, gen.config.get("encoder"),
                       {"vae_path": args.vae_path, "encoder_path": args.encoder_path}),
        sampler=SamplerSettings(steps=steps, guidance=guidance, scheduler=type(gen.scheduler).__name__,
                                batch_size=args.batch_size, n=1, seed=args.seed, device=args.device),
        embeddings=FileHash(args.inputs[0], sha256_file(args.inputs[0])) if emb is not None else None,
        references={str(f): sha256_file(f) for f in files},
    )
    with SetWriter.create(out, manifest, overwrite=args.overwrite) as writer:
        result = pipe.run([str(f) for f in files] if files else None, args.to, embeddings=emb, seed=args.seed,
                          num_inference_steps=steps, guidance_scale=guidance, mpp=args.mpp,
                          batch_size=args.batch_size, progress=False)
        stain = result.settings["stain"]
        ids = result.ihc_embeddings.ids or [f"embeddings[{i}]" for i in range(len(result.images))]
        for i, (img, seed, cid) in enumerate(zip(result.images, result.seeds, ids)):
            cond = Condition("reference" if files else "embeddings", cid, stain, manifest.references.get(cid))
            writer.add(img, ImageEntry(f"{i:04d}.png", seed, cond), provenance={"stain": result.settings})
        if result.he:
            with atomic_write(out / SIDE_BY_SIDE) as fh:
                side_by_side(result.he, result.images).save(fh, format="PNG")
        write_json_atomic(out / STAIN_JSON, {**result.settings, "inputs": [str(f) for f in files] or args.inputs,
                                             "model": args.model, "encoder": gen.config.get("encoder"),
                                             "side_by_side": SIDE_BY_SIDE if result.he else None})
        writer.finish(conditions=result.ihc_embeddings.values, encoder=gen.config.get("encoder"),
                      seconds=time.perf_counter() - t0)
    print(f"wrote {len(result.images)} {stain} image(s) to {out}")
    return 0


def _run_region(args: argparse.Namespace, pipe) -> int:
    import numpy as np
    from PIL import Image

    from pixgen.commands_large import parse_region
    from pixgen.io import check_output_folder, sha256_file, write_json_atomic
    from pixgen.io.atomic import atomic_write
    from pixgen.staining import side_by_side

    out = check_output_folder(args.out, args.overwrite)  # created by the large-image writer, once the region is read
    target = out / ("ihc.png" if args.png else "ihc.ome.tiff")
    region = parse_region(args.region) if args.region else None
    t0 = time.perf_counter()
    summary, real = pipe.stain_region(args.inputs[0], target, args.to, region=region, slide_mpp=args.mpp,
                                      seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                      batch_size=args.batch_size)
    h, w = summary["height"], summary["width"]
    he = Image.fromarray(np.ascontiguousarray(real[:h, :w]))
    with atomic_write(out / "he.png") as fh:
        he.save(fh, format="PNG")
    ihc = Image.open(target) if args.png else _tiff_level0(target)
    scale = min(1.0, SHEET_MAX_WIDTH / (2 * w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    with atomic_write(out / SIDE_BY_SIDE) as fh:
        side_by_side([he.resize(size)], [ihc.convert("RGB").resize(size)]).save(fh, format="PNG")
    _, gen = pipe.components(args.to)
    write_json_atomic(out / STAIN_JSON, {
        **summary, "input": args.inputs[0], "input_sha256": sha256_file(args.inputs[0]), "region": region,
        "model": args.model, "mpp": gen.config.get("mpp"), "seed": args.seed, "output": target.name,
        "he": "he.png", "side_by_side": SIDE_BY_SIDE, "seconds": round(time.perf_counter() - t0, 2)})
    print(f"wrote {target} ({w}x{h} px) and {out / SIDE_BY_SIDE}")
    return 0


def _tiff_level0(path: Path):
    import tifffile
    from PIL import Image

    return Image.fromarray(tifffile.imread(path, level=0))
