"""The library's own subcommands: ``generate``, ``info``, ``encoders``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pixgen.errors import InputError, ModelLoadError

__all__ = ["add_parsers", "check_device", "DEFAULT_MODEL", "TRUST_HELP", "MAX_SEED"]

# The bundled default model (committed inside the package); `--model` overrides it.
DEFAULT_MODEL = Path(__file__).parent / "weights" / "pixgen-default"
MAX_SEED = 2**63 - 1  # seed + i must fit torch.Generator.manual_seed (64 bits)
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
    gen.add_argument("--control-scale", type=float, default=1.0, help="ControlNet strength (0 = off)")
    gen.add_argument("--mask", help="nuclei mask file or folder (CoNSeP/MoNuSeg inst/ + types/): a paired set out")
    gen.add_argument("--mask-format", choices=["instance", "types", "colour", "binary"],
                     help="how to read --mask files (default: guessed; docs/masks.md)")
    gen.add_argument("--sample-masks", type=int, help="generate N random nuclei layouts and their images")
    gen.add_argument("--tissue", default="consep", help="layout statistics for --sample-masks (consep, monuseg)")
    gen.add_argument("--mask-model", help="mask ControlNet folder (default: the bundled pixgen-masks)")
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
    import numpy as np
    import torch

    from pixgen.io import SetWriter, check_output_folder, load_image
    from pixgen.pipeline import Generator

    _check_generate_args(args)
    condition = _prior_condition(args)  # conflicting condition flags are refused before anything loads
    _check_default_model(args.model)
    if args.mask or args.sample_masks:  # paired (image, mask) sets: pixgen.masks
        from pixgen.masks import run_mask_generate

        return run_mask_generate(args, _set_manifest)
    out = check_output_folder(args.out, args.overwrite)  # before any loading or compute
    t0 = time.perf_counter()
    gen = Generator.from_pretrained(
        args.model, token=args.token, vae_path=args.vae_path, encoder_path=args.encoder_path, device=args.device,
        dtype=getattr(torch, args.dtype), trust_remote_code=args.trust_remote_code,
    )
    gen.use_sampling(args.quality, args.sampler)
    masks = [np.array(load_image(p).convert("L")) for p in args.control_image] if args.control_image else None
    embeddings = _load_embeddings(args.embeddings)
    # each batch is written as it finishes: a refused request leaves nothing behind, a set broken
    # off (interrupt, full disk, a failing batch) keeps its finished images, marked incomplete
    with SetWriter.create(out, _set_manifest(args, gen), overwrite=args.overwrite) as writer:
        path = args.interpolate is not None  # one seed: the same image noise at every point of the path
        conditions = []
        for batch in gen.generate_batches(
            condition, embeddings=embeddings, reference=args.reference,
            label=None if condition is not None else args.label,
            latents=gen.initial_noise([args.seed]).repeat(args.n, 1, 1, 1) if path else None,
            num_images=1 if path else args.n, num_inference_steps=args.steps, guidance_scale=args.guidance,
            seed=args.seed, batch_size=args.batch_size, control_image=masks,
            controlnet_conditioning_scale=args.control_scale,
        ):
            _write_batch(writer, args, batch, _count_conditions(args, embeddings),
                         prior=gen.prior is not None and not args.from_bank)
            conditions.append(batch.conditions)
        writer.finish(conditions=torch.cat([c.values for c in conditions]), encoder=conditions[0].encoder,
                      seconds=time.perf_counter() - t0)
    print(f"wrote {len(writer.manifest.files)} images, contact_sheet.png and manifest.json to {out}")
    return 0


def _check_generate_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers and devices before anything is loaded or written."""
    from pixgen.sampling import check_sampling_args, check_sampling_choice

    check_sampling_choice(args.quality, args.sampler)
    for name in ("n", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}",
                             fix=f"pass --{name.replace('_', '-')} 1 or more")
    if not 0 <= args.seed <= MAX_SEED:  # torch.Generator.manual_seed takes 64-bit seeds; image i uses seed + i
        raise InputError(f"--seed must be in 0..2**63-1, got {args.seed}", fix="pass a smaller non-negative --seed")
    check_sampling_args(1 if args.steps is None else args.steps, 1.0 if args.guidance is None else args.guidance)
    check_device(args.device)


def check_device(device: str) -> None:
    """Refuse a device string torch does not know, or a GPU this machine does not have (one line,
    before any model is loaded).

    Example:
        >>> check_device("cpu")
    """
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}", fix="pass --device cpu, cuda, cuda:1, mps ...") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU is visible to torch (torch.cuda.is_available() is False)",
                         fix="pass --device cpu, or run where a GPU and a CUDA build of torch are installed")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible",
                         fix=f"pass --device cuda:0 .. cuda:{torch.cuda.device_count() - 1} (or check CUDA_VISIBLE_DEVICES)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: Apple MPS is not available here", fix="pass --device cpu")


def _load_embeddings(path: str | None):
    from pixgen.embeddings import load_embeddings

    return load_embeddings(path) if path else None


def _count_conditions(args: argparse.Namespace, embeddings) -> int:
    """Distinct conditions in the request (each gets --n images)."""
    return len(args.reference) if args.reference else len(embeddings) if embeddings is not None else 1


def _prior_condition(args: argparse.Namespace):
    """The condition that --prompt, --interpolate or --label --from-bank ask for (None: the keywords)."""
    from pixgen.conditioning import BankDraw, PriorPath, PriorSample

    given = [x for x in ("reference", "embeddings", "label", "prompt", "interpolate") if getattr(args, x)]
    if len(given) > 1:
        raise InputError(f"give only one of --{', --'.join(given)}")
    if args.from_bank and not args.label:
        raise InputError("--from-bank needs --label", fix="e.g. --label lung_scc --from-bank")
    if args.interpolate:
        return PriorPath(*args.interpolate, points=args.n)
    if args.prompt:
        return PriorSample(prompt=args.prompt)
    return BankDraw(args.label) if args.from_bank else None


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
                                dtype=str(gen.compute_dtype).removeprefix("torch."),
                                control_scale=args.control_scale if args.control_image else None),
        embeddings=FileHash(args.embeddings, sha256_file(args.embeddings))
        if args.embeddings and Path(args.embeddings).is_file() else None,
        references={r: sha256_file(r) for r in args.reference or [] if Path(r).is_file()},
    )


def _write_batch(writer, args: argparse.Namespace, batch, num_conditions: int, prior: bool = False) -> None:
    """Save one batch's images with their seeds and conditions: the per-image record of the manifest."""
    from pixgen.io import Condition, ImageEntry

    kind = ("reference" if args.reference else "embeddings" if args.embeddings else "prompt" if args.prompt
            else "path" if args.interpolate else "prior" if args.label and prior else "label" if args.label else "bank")
    masks = args.control_image or []
    for k, (img, seed, cid) in enumerate(zip(batch.images, batch.seeds, batch.condition_ids)):
        i = batch.extra["batch_start"] + k
        label = cid.rsplit("[", 1)[0] if kind in ("label", "bank", "prior") else None
        cond = Condition(kind, cid, label, writer.manifest.references.get(cid))
        # masks: one for all images, one per condition (--n images each) or one per image
        mask = masks[0] if len(masks) == 1 else masks[i // args.n] if len(masks) == num_conditions else masks[i] if masks else None
        seed = args.seed if kind == "path" else seed  # every point of a path starts from --seed's noise
        writer.add(img, ImageEntry(f"{i:04d}.png", seed, cond, mask))


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
        print(f"prior: --label samples new embeddings ({prior['steps']} flow steps, temperature {prior['temperature']}); "
              "labels and what they mean:")
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
