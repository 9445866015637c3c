"""The work the pages start, each a short composition of library calls with a model the session
already holds (the CLI's own parser, validation and manifest code; a step callback for progress).

Example:
    >>> args = cli_args(["generate", "--out", "out", "--label", "lung_aca", "--n", "2"])
    >>> args.n, args.label
    (2, 'lung_aca')
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "class_folders",
    "cli_args",
    "interpolated_embeddings",
    "large_model_calls",
    "layout_image",
    "mask_pairs",
    "pick_originals",
    "save_layout",
    "synth_spec_text",
    "synth_steps",
]


def cli_args(argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed by ``pixgen``'s own subcommand parsers (the CLI's defaults and types)."""
    from pixgen import commands

    parser = argparse.ArgumentParser(prog="pixgen", exit_on_error=False)
    commands.add_parsers(parser.add_subparsers(dest="command"))
    return parser.parse_args([str(a) for a in argv])


def mask_pairs(gen: Any, args: argparse.Namespace, layouts: list[Any], label: str | None,
               callback: Any = None) -> Path:
    """``pixgen generate --mask`` with an already loaded ``gen``: a paired set (images/, inst/,
    types/, manifest) of ``args.n`` images per layout, written by :func:`pixgen.masks.write_pair_set`
    (``callback``: the sampler's per-step callback, returning False to cancel)."""
    from pixgen.masks import BUNDLED_MASK_MODEL, attach_mask_model, default_control_scale, write_pair_set
    from pixgen.sets import set_manifest

    if gen.controlnet is None or gen.controlnet.mask_encoder is None:
        attach_mask_model(gen, args.mask_model or BUNDLED_MASK_MODEL)
    args.control_scale = default_control_scale(gen, args.control_scale)
    write_pair_set(gen, layouts, args.out, set_manifest(args, gen), overwrite=args.overwrite, label=label, n=args.n,
                   seed=args.seed, control_scale=args.control_scale, steps=args.steps, guidance=args.guidance,
                   batch_size=args.batch_size, callback=callback)
    return Path(args.out)


def save_layout(layout: Any, folder: Path) -> Path:
    """Write a layout as ``folder/inst/NAME.png`` (+ ``types/``), the CoNSeP layout that
    :func:`pixgen.masks.load_layouts` reads back; returns ``folder``."""
    from pixgen.io import save_png

    for sub in ("inst", "types"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    save_png(layout.inst.astype(np.uint16), folder / "inst" / f"{layout.name}.png")
    types = layout.types if layout.types is not None else np.zeros(layout.shape, np.uint8)
    save_png(types.astype(np.uint8), folder / "types" / f"{layout.name}.png")
    return folder


def layout_image(layout: Any) -> np.ndarray:
    """A layout in the mask palette (``pixgen.masks.PALETTE``; unknown class white), nuclei
    boundaries darkened, as uint8 RGB for display."""
    from skimage.segmentation import find_boundaries

    from pixgen.masks import PALETTE, UNKNOWN_CLASS_COLOUR

    colours = np.array([PALETTE[k] for k in sorted(PALETTE)], np.uint8)
    types = layout.types if layout.types is not None else np.zeros(layout.shape, np.uint8)
    rgb = colours[types]
    rgb[(layout.inst > 0) & (types == 0)] = UNKNOWN_CLASS_COLOUR
    rgb[find_boundaries(layout.inst, mode="inner")] //= 2
    return rgb


def interpolated_embeddings(gen: Any, images: Sequence[Path], count: int, mix: float, seed: int, out: Path) -> Path:
    """``count`` embeddings between random pairs of ``images`` (same class): the slerp at ``mix``
    (0 = the first image's embedding, 0.5 = half way), saved as an embeddings file for a synth spec."""
    import torch

    from pixgen.embeddings import Embeddings, save_embeddings
    from pixgen.large import slerp

    emb = gen.embed_references(list(images))
    rng = np.random.default_rng(seed)
    pairs = [rng.choice(len(images), 2, replace=len(images) < 2) for _ in range(count)]
    values = torch.stack([slerp(emb.values[a], emb.values[b], mix) for a, b in pairs])
    save_embeddings(out, Embeddings(values, encoder=emb.encoder, domain=emb.domain,
                                    ids=[f"{Path(images[a]).stem}~{Path(images[b]).stem}@{mix:g}" for a, b in pairs]))
    return out


def class_folders(folder: Path) -> dict[str, list[Path]]:
    """A labelled folder's classes: sub-folder name -> its images (sub-folders without images skipped)."""
    from pixgen.errors import InputError
    from pixgen.io import list_images

    classes = {p.name: list_images(p) for p in sorted(folder.iterdir()) if p.is_dir()}
    classes = {k: v for k, v in classes.items() if v}
    if not classes:
        raise InputError(f"{folder} has no class sub-folders with images",
                         fix="choose a folder laid out as CLASS/image.png (e.g. lc25000-lung)")
    return classes


def pick_originals(images: Sequence[Path], k: int, seed: int, dest: Path) -> Path:
    """A seeded choice of ``k`` of ``images`` as links in ``dest`` (no copies): the originals a
    ``reference`` class of a synth spec varies."""
    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    for i in sorted(rng.choice(len(images), min(k, len(images)), replace=False)):
        (dest / Path(images[i]).name).symlink_to(Path(images[i]).resolve())
    return dest


def synth_spec_text(model: str, classes: dict[str, dict[str, Any]], *, seed: int, steps: int | None,
                    guidance: float | None, batch_size: int = 8) -> str:
    """A ``pixgen synth`` spec (TOML) for ``classes`` (name -> keys such as ``count``, ``label``,
    ``reference``, ``embeddings``); string values are JSON-quoted, which TOML reads alike."""
    lines = [f"model = {json.dumps(model)}", f"seed = {int(seed)}", "", "[sampler]", f"batch_size = {int(batch_size)}"]
    lines += [f"steps = {int(steps)}"] if steps else []
    lines += [f"guidance = {float(guidance)}"] if guidance is not None else []
    for name, keys in classes.items():
        lines += ["", f"[classes.{name}]"]
        lines += [f"{k} = {json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                  for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def synth_steps(spec: Any, steps: int) -> int:
    """How many times :func:`pixgen.synth.build_set` calls its step callback for ``spec`` with
    ``steps`` sampler steps: every batch of a class runs them all, or only its img2img share for a
    ``strength`` < 1 class (no near-copy rejection): the total of its progress bar."""
    from pixgen.sampling import start_step_for_strength

    def class_steps(c: Any) -> int:
        return steps - (start_step_for_strength(steps, c.strength) if c.strength and c.strength < 1 else 0)

    return sum(-(-c.count // spec.sampler.batch_size) * class_steps(c) for c in spec.classes)


def large_model_calls(gen: Any, height: int, width: int, steps: int, batch_size: int | None = None,
                      overlap: int | None = None) -> int:
    """How many times :func:`pixgen.large.generate_large` calls its step callback (once per window
    batch of ``batch_size``, default its own, per step): the total of its progress bar."""
    import inspect

    from pixgen.large import canvas_size, generate_large, window_starts

    batch_size = batch_size or inspect.signature(generate_large).parameters["batch_size"].default
    f = gen.vae.downsample_factor
    win = gen.transformer.config.sample_size
    overlap = win // 4 if overlap is None else overlap
    ch, cw = canvas_size(gen, height, width)
    windows = len(window_starts(ch // f, win, win - overlap)) * len(window_starts(cw // f, win, win - overlap))
    return -(-windows // batch_size) * steps
