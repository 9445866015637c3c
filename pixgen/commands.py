"""The library's own subcommands: ``generate``, ``info``, ``encoders``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pixgen.errors import InputError, ModelLoadError

__all__ = ["add_parsers", "DEFAULT_MODEL", "TRUST_HELP"]

# The bundled default model (committed inside the package); `--model` overrides it.
DEFAULT_MODEL = Path(__file__).parent / "weights" / "pixgen-default"
TRUST_HELP = ("run the encoder's own Python code from its hub repository; only for registry entries pinned to a "
              "commit (never code found in a model or encoder folder)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``generate``, ``info`` and ``encoders`` to the ``pixgen`` parser."""
    gen = sub.add_parser("generate", help="generate H&E tiles from references, embeddings or a label")
    gen.add_argument("--model", default=str(DEFAULT_MODEL), help="model dir or hub id (default: the bundled model)")
    gen.add_argument("--n", type=int, default=4, help="images per condition (per label with --label)")
    gen.add_argument("--out", required=True, help="output folder: images, contact_sheet.png and manifest.json")
    gen.add_argument("--overwrite", action="store_true", help="replace the set already in --out")
    gen.add_argument("--reference", nargs="+", help="reference image(s): variations of each")
    gen.add_argument("--embeddings", help="embeddings file (.safetensors from pixgen, .npy or .pt)")
    gen.add_argument("--label", help="a label of the model's embedding bank (see `pixgen info`)")
    gen.add_argument("--control-image", nargs="+", help="binary cell mask(s) for a ControlNet model (non-zero = cell)")
    gen.add_argument("--control-scale", type=float, default=1.0, help="ControlNet strength (0 = off)")
    gen.add_argument("--mask", help="nuclei mask file or folder (CoNSeP/MoNuSeg inst/ + types/): a paired set out")
    gen.add_argument("--mask-format", choices=["instance", "types", "colour", "binary"],
                     help="how to read --mask files (default: guessed; docs/masks.md)")
    gen.add_argument("--sample-masks", type=int, help="generate N random nuclei layouts and their images")
    gen.add_argument("--tissue", default="consep", help="layout statistics for --sample-masks (consep, monuseg)")
    gen.add_argument("--mask-model", help="mask ControlNet folder (default: the bundled pixgen-masks)")
    gen.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    gen.add_argument("--guidance", type=float, help="CFG scale w, pred = uncond + w(cond-uncond); 1 = off")
    gen.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--token", help="hub token for gated models (or set HF_TOKEN)")
    gen.add_argument("--vae-path", help="local autoencoder folder (overrides the model's)")
    gen.add_argument("--encoder-path", help="local encoder weights folder (offline / gated hubs)")
    gen.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    gen.set_defaults(func=run_generate)

    info = sub.add_parser("info", help="describe a model")
    info.add_argument("model", nargs="?", default=str(DEFAULT_MODEL), help="model dir or hub id")
    info.add_argument("--token", help="hub token for gated models")
    info.add_argument("--vae-path", help="local autoencoder folder (for models whose VAE lives elsewhere)")
    info.add_argument("--encoder-path", help="local encoder weights folder")
    info.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=run_info)

    enc = sub.add_parser("encoders", help="list the SSL encoder registry")
    enc.add_argument("--json", action="store_true", help="print JSON")
    enc.set_defaults(func=run_encoders)


def _check_default_model(model: str) -> None:
    """A clear message when the bundled default model is missing (a partial checkout or copy)."""
    if Path(model) == DEFAULT_MODEL and not (DEFAULT_MODEL / "model_index.json").is_file():
        raise ModelLoadError(
            f"the bundled default model is missing from {DEFAULT_MODEL}",
            fix="reinstall pixgen from a complete checkout (the weights are committed under pixgen/weights), "
            "or pass --model DIR (e.g. RUN/final from `pixgen train`, or a PixCell checkpoint folder)",
        )


def run_generate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from pixgen.io import SetWriter, check_output_folder, load_image
    from pixgen.pipeline import Generator

    from pixgen.sampling import check_sampling_args

    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}")
    check_sampling_args(1 if args.steps is None else args.steps, 1.0 if args.guidance is None else args.guidance)
    _check_default_model(args.model)
    if args.mask or args.sample_masks:  # paired (image, mask) sets: pixgen.masks
        from pixgen.masks import run_mask_generate

        return run_mask_generate(args, _set_manifest)
    out = check_output_folder(args.out, args.overwrite)  # before any loading or compute
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    gen = Generator.from_pretrained(
        args.model, token=args.token, vae_path=args.vae_path, encoder_path=args.encoder_path, device=args.device, dtype=dtype,
        trust_remote_code=args.trust_remote_code,
    )
    masks = [np.array(load_image(p).convert("L")) for p in args.control_image] if args.control_image else None
    # a refused request leaves nothing behind; a set broken off stays on disk marked incomplete
    with SetWriter.create(out, _set_manifest(args, gen), overwrite=args.overwrite) as writer:
        result = _generate(args, gen, masks)
        _write_images(writer, args, result)
        writer.finish(conditions=result.conditions.values, encoder=result.conditions.encoder,
                      seconds=time.perf_counter() - t0)
    print(f"wrote {len(result.images)} images, contact_sheet.png and manifest.json to {out}")
    return 0


def _generate(args: argparse.Namespace, gen, masks):
    from pixgen.embeddings import load_embeddings

    embeddings = load_embeddings(args.embeddings) if args.embeddings else None
    return gen.generate(
        embeddings=embeddings,
        reference=args.reference,
        label=args.label,
        num_images=args.n,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        control_image=masks,
        controlnet_conditioning_scale=args.control_scale,
    )


def _set_manifest(args: argparse.Namespace, gen):
    """The manifest of the set about to be generated: the model by content hash, the sampler
    settings, and the hashes of the reference and embeddings files."""
    from pixgen.io import SamplerSettings, SetManifest, sha256_file
    from pixgen.io.manifest import FileHash, model_id

    steps = int(args.steps or gen.config["num_inference_steps"])
    guidance = float(gen.config["guidance_scale"] if args.guidance is None else args.guidance)
    return SetManifest(
        model=model_id(args.model, gen.source, gen.config.get("encoder"),
                       {"vae_path": args.vae_path, "encoder_path": args.encoder_path}),
        sampler=SamplerSettings(steps=steps, guidance=guidance, scheduler=type(gen.scheduler).__name__,
                                batch_size=args.batch_size, n=args.n, seed=args.seed, device=args.device,
                                dtype=args.dtype, control_scale=args.control_scale if args.control_image else None),
        embeddings=FileHash(args.embeddings, sha256_file(args.embeddings))
        if args.embeddings and Path(args.embeddings).is_file() else None,
        references={r: sha256_file(r) for r in args.reference or [] if Path(r).is_file()},
    )


def _write_images(writer, args: argparse.Namespace, result) -> None:
    """Save each image with its seed and condition; the per-image record of the manifest."""
    from pixgen.io import Condition, ImageEntry

    kind = "reference" if args.reference else "embeddings" if args.embeddings else "label" if args.label else "bank"
    masks = args.control_image or []
    n = len(result.images)
    for i, (img, seed, cid) in enumerate(zip(result.images, result.seeds, result.condition_ids)):
        label = cid.rsplit("[", 1)[0] if kind in ("label", "bank") else None
        cond = Condition(kind, cid, label, writer.manifest.references.get(cid))
        # masks: one for all images, one per condition (n per condition) or one per image
        mask = masks[0] if len(masks) == 1 else masks[i] if len(masks) == n else masks[i // args.n] if masks else None
        writer.add(img, ImageEntry(f"{i:04d}.png", seed, cond, mask))


def run_info(args: argparse.Namespace) -> int:
    from pixgen.pipeline import Generator

    _check_default_model(args.model)
    gen = Generator.from_pretrained(args.model, token=args.token, vae_path=args.vae_path, encoder_path=args.encoder_path,
                                    trust_remote_code=args.trust_remote_code)
    desc = {"model": str(args.model), **gen.describe()}
    if args.json:
        print(json.dumps(desc, indent=2))
    else:
        width = max(map(len, desc))
        for key, value in desc.items():
            print(f"{key:<{width}}  {value}")
    return 0


def run_encoders(args: argparse.Namespace) -> int:
    from pixgen.encoders import list_encoders

    specs = list_encoders()
    rows = [
        {"name": s.name, "dim": s.dim, "input_px": s.input_size, "mpp": s.mpp, "output": s.output,
         "source": s.source, "gated": s.gated, "licence": s.licence}
        for s in specs
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = list(rows[0]) if rows else []
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    return 0
