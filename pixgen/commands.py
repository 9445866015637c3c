"""The library's own subcommands: ``generate``, ``info``, ``encoders``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pixgen.errors import ModelLoadError
from pixgen.sets import MAX_SEED, check_device, check_request, request_condition, set_manifest, write_set

__all__ = ["add_parsers", "check_device", "DEFAULT_MODEL", "TRUST_HELP", "MAX_SEED"]

# The bundled default model (committed inside the package); `--model` overrides it.
DEFAULT_MODEL = Path(__file__).parent / "weights" / "pixgen-default"
TRUST_HELP = ("run the encoder's own Python code from its hub repository; only for registry entries pinned to a "
              "commit (never code found in a model or encoder folder)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``generate``, ``info``, ``encoders`` and ``large`` to the ``pixgen`` parser."""
    gen = sub.add_parser("generate", help="generate H&E tiles from references, embeddings or a label")
    gen.add_argument("--model", default=str(DEFAULT_MODEL), help="model dir or hub id (default: the bundled model)")
    gen.add_argument("--n", type=int, default=4, help="images per condition (per label with --label)")
    gen.add_argument("--out", required=True, help="output folder: images, contact_sheet.png and manifest.json")
    gen.add_argument("--overwrite", action="store_true", help="replace the set already in --out")
    gen.add_argument("--reference", nargs="+", help="reference image(s): variations of each; each should show the model's field of view "
                     "(`pixgen info`: image_size px at mpp um/px)")
    gen.add_argument("--embeddings", help="embeddings file (.safetensors from pixgen, .npy or .pt)")
    gen.add_argument("--label", help="a label (see `pixgen info`): new embeddings from the model's prior when it has "
                     "one, else bank draws")
    gen.add_argument("--prompt", help="a prompt in the prior's vocabulary, e.g. 'colon, inflammatory-rich, dense' "
                     "(see `pixgen info`)")
    gen.add_argument("--from-bank", action="store_true", help="with --label: draw real training-tile embeddings "
                     "from the bank instead of sampling the prior")
    gen.add_argument("--interpolate", nargs=2, metavar=("A", "B"), help="--n images along a path in embedding space "
                     "from label / prompt A to B (one seed, the same noise at every point)")
    gen.add_argument("--control-image", nargs="+", help="binary cell mask(s) for a ControlNet model (non-zero = cell)")
    gen.add_argument("--control-scale", type=float, help="ControlNet strength (0 = off; default: a mask model's "
                     "calibrated scale, else 1)")
    gen.add_argument("--mask", help="nuclei mask file or folder (CoNSeP/MoNuSeg inst/ + types/): a paired set out")
    gen.add_argument("--mask-format", choices=["instance", "types", "colour", "binary"],
                     help="how to read --mask files (default: guessed; docs/masks.md)")
    gen.add_argument("--sample-masks", type=int, help="generate N random nuclei layouts and their images")
    gen.add_argument("--tissue", default="consep", help="layout statistics for --sample-masks (consep, monuseg)")
    gen.add_argument("--mask-model", help="mask ControlNet folder (default: the bundled pixgen-masks)")
    gen.add_argument("--no-mask-terms", action="store_true", help="--mask / --sample-masks with the prior: do not "
                     "add each mask's density / composition terms to its image's condition (docs/masks.md)")
    # names checked at run time (pixgen.sampling.QUALITY_PRESETS / SAMPLERS): building the parser imports no torch
    gen.add_argument("--quality", help="fast, balanced or best: a flow-matching model's measured sampler, steps, "
                     "guidance interval and dtype (docs/benchmarks.md; default balanced, but the model's own sampler for "
                     "--mask / --sample-masks sets); other models keep their own")
    gen.add_argument("--sampler", help="euler, heun, dpm++2m or unipc, replacing the preset's (or the model's) solver")
    gen.add_argument("--steps", type=int, help="sampling steps (default: the preset's, or the model's)")
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

    from pixgen.commands_large import add_parser as add_large  # `pixgen large` lives in its own module
    from pixgen.synth import add_parser as add_synth

    add_large(sub)
    add_synth(sub)


def _check_default_model(model: str) -> None:
    """A clear message when the bundled default model is missing (a partial checkout or copy)."""
    if Path(model) == DEFAULT_MODEL and not (DEFAULT_MODEL / "model_index.json").is_file():
        raise ModelLoadError(
            f"the bundled default model is missing from {DEFAULT_MODEL}",
            fix="reinstall pixgen from a complete checkout (the weights are committed under pixgen/weights), "
            "or pass --model DIR (e.g. RUN/final from `pixgen train`, or a PixCell checkpoint folder)",
        )


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from pixgen.io import SetManifest, check_output_folder
    from pixgen.pipeline import Generator

    check_request(args)
    request_condition(args)  # conflicting condition flags are refused before anything loads
    _check_default_model(args.model)
    if args.mask or args.sample_masks:  # paired (image, mask) sets: pixgen.masks
        from pixgen.masks import run_mask_generate

        return run_mask_generate(args, set_manifest)
    check_output_folder(args.out, args.overwrite)  # before any loading or compute
    t0 = time.perf_counter()
    gen = Generator.from_pretrained(
        args.model, token=args.token, vae_path=args.vae_path, encoder_path=args.encoder_path, device=args.device,
        dtype=getattr(torch, args.dtype), trust_remote_code=args.trust_remote_code,
    )
    gen.use_sampling(args.quality, args.sampler)
    out = write_set(gen, args, started=t0)  # the set is written batch by batch (pixgen.sets)
    print(f"wrote {len(SetManifest.load(out).files)} images, contact_sheet.png and manifest.json to {out}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from pixgen.pipeline import Generator

    _check_default_model(args.model)
    gen = Generator.from_pretrained(args.model, token=args.token, vae_path=args.vae_path, encoder_path=args.encoder_path,
                                    trust_remote_code=args.trust_remote_code)
    desc = {"model": str(args.model), **gen.describe()}
    if args.json:
        print(json.dumps(desc, indent=2))
        return 0
    prior = desc.pop("prior", None)
    width = max(map(len, desc))
    for key, value in desc.items():
        print(f"{key:<{width}}  {value}")
    if prior:
        print(f"prior: --label samples new embeddings ({prior['steps']} flow steps, temperature {prior['temperature']} "
              "unless a label sets its own); labels and what they mean:")
        for name, terms in prior["labels"].items():
            print(f"  {name:<24}  {terms}")
        print("prompt vocabulary (--prompt, comma-separated):")
        for name, meaning in prior["terms"].items():
            print(f"  {name:<24}  {meaning}")
        print(f"  ignored words: {', '.join(prior['stop_words'])}; any other word is an error")
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
