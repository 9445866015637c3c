"""Generated sets as ``pixgen generate`` writes them, for any caller holding a loaded model.

A *request* is the ``pixgen generate`` options as its parser returns them (an
``argparse.Namespace``; any object with the same attributes will do): ``out``, ``n``, ``seed``,
``steps``, ``guidance``, ``batch_size``, one condition (``reference``, ``embeddings``,
``label`` [+ ``from_bank``], ``prompt`` or ``interpolate``), ``control_image`` /
``control_scale``, and what identifies the model (``model``, ``vae_path``, ``encoder_path``,
``device``). The command (:mod:`pixgen.commands`) and the studio both call :func:`write_set`, so
a set made in the browser is the command's set: the same checks, files, manifest and per-image
records.

Example:
    >>> import argparse
    >>> from pixgen.commands import add_parsers
    >>> parser = argparse.ArgumentParser(prog="pixgen")
    >>> add_parsers(parser.add_subparsers())
    >>> args = parser.parse_args(["generate", "--label", "lung_aca", "--n", "2", "--out", "out"])
    >>> check_request(args)
    >>> write_set(gen, args, callback=lambda *step: True)          # doctest: +SKIP
    PosixPath('out')
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pixgen.errors import InputError

__all__ = ["MAX_SEED", "check_device", "check_request", "count_conditions", "request_condition", "set_manifest",
           "write_batch", "write_set"]

MAX_SEED = 2**63 - 1  # seed + i must fit torch.Generator.manual_seed (64 bits)


def check_request(args: argparse.Namespace) -> None:
    """Refuse bad numbers, sampler names and devices before anything is loaded or written.

    Example:
        >>> check_request(argparse.Namespace(quality=None, sampler=None, n=0, batch_size=8, seed=0, steps=None,
        ...                                  guidance=None, device="cpu"))
        Traceback (most recent call last):
        pixgen.errors.InputError: --n must be >= 1, got 0 (fix: pass --n 1 or more)
    """
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


def request_condition(args: argparse.Namespace) -> Any:
    """The condition that ``--prompt``, ``--interpolate`` or ``--label --from-bank`` ask for
    (None: the other keywords say it); conflicting condition options are refused.

    Example:
        >>> request_condition(argparse.Namespace(reference=None, embeddings=None, label="lung_aca", prompt=None,
        ...                                      interpolate=None, from_bank=True, n=4))
        BankDraw(label='lung_aca')
    """
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


def count_conditions(args: argparse.Namespace, embeddings: Any) -> int:
    """Distinct conditions in the request (each gets ``n`` images): references, embedding rows, else one."""
    return len(args.reference) if args.reference else len(embeddings) if embeddings is not None else 1


def set_manifest(args: argparse.Namespace, gen: Any) -> Any:
    """The manifest of the set about to be generated (a :class:`pixgen.io.SetManifest`): the model
    by content hash, the sampler settings, and the hashes of the reference and embeddings files."""
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
                                control_scale=(1.0 if args.control_scale is None else args.control_scale)
                                if args.control_image else None),
        embeddings=FileHash(args.embeddings, sha256_file(args.embeddings))
        if args.embeddings and Path(args.embeddings).is_file() else None,
        references={r: sha256_file(r) for r in args.reference or [] if Path(r).is_file()},
    )


def write_batch(writer: Any, args: argparse.Namespace, batch: Any, num_conditions: int, prior: bool = False) -> None:
    """Save one batch of :meth:`pixgen.pipeline.Generator.generate_batches` through ``writer`` (a
    :class:`pixgen.io.SetWriter`) with each image's seed and condition: the manifest's per-image record."""
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


def write_set(gen: Any, args: argparse.Namespace, *, callback: Callable[..., Any] | None = None,
              progress: bool = True, started: float | None = None) -> Path:
    """Generate the request with the loaded ``gen`` into ``args.out``: images, ``manifest.json``,
    ``conditions.safetensors`` and the contact sheet, exactly as ``pixgen generate`` writes them.

    Each batch is written as it finishes: a refused request leaves nothing behind, a set broken
    off (a ``callback`` returning False, an interrupt, a full disk) keeps its finished images and
    is marked incomplete. ``callback`` is the sampler's per-step callback
    (:meth:`~pixgen.pipeline.Generator.generate_batches`); ``started`` (``time.perf_counter()``)
    is when the work began, for the manifest's seconds (default: now). Returns the folder.

    Example:
        >>> write_set(gen, args, progress=False)                     # doctest: +SKIP
        PosixPath('out')
    """
    import numpy as np
    import torch

    from pixgen.embeddings import load_embeddings
    from pixgen.io import SetWriter, load_image

    started = time.perf_counter() if started is None else started
    check_request(args)
    condition = request_condition(args)
    masks = [np.array(load_image(p).convert("L")) for p in args.control_image] if args.control_image else None
    embeddings = load_embeddings(args.embeddings) if args.embeddings else None
    path = args.interpolate is not None  # one seed: the same image noise at every point of the path
    with SetWriter.create(args.out, set_manifest(args, gen), overwrite=args.overwrite) as writer:
        conditions = []
        for batch in gen.generate_batches(
            condition, embeddings=embeddings, reference=args.reference,
            label=None if condition is not None else args.label,
            latents=gen.initial_noise([args.seed]).repeat(args.n, 1, 1, 1) if path else None,
            num_images=1 if path else args.n, num_inference_steps=args.steps, guidance_scale=args.guidance,
            seed=args.seed, batch_size=args.batch_size, control_image=masks,
            controlnet_conditioning_scale=1.0 if args.control_scale is None else args.control_scale, progress=progress, callback=callback,
        ):
            write_batch(writer, args, batch, count_conditions(args, embeddings),
                        prior=gen.prior is not None and not args.from_bank)
            conditions.append(batch.conditions)
        writer.finish(conditions=torch.cat([c.values for c in conditions]), encoder=conditions[0].encoder,
                      seconds=time.perf_counter() - started)
    return writer.out
