"""Make a trained generator the bundled default: replace only its transformer, stored as int8.

    python -m recipes.bundle_generator --model /work/runs/gen-v2/run/final \\
        --dest pixgen/weights/pixgen-default --guidance W [--steps N]

The weights budget (60 MB) counts every blob ever committed, so only what changed is rewritten:
``DEST/transformer/`` becomes the model's transformer in int8 (:mod:`pixgen.io.int8`, half the
bytes of fp16) and ``DEST/model_index.json`` gets the default guidance (choose it on validation
tiles) and steps; the VAE, encoder, embedding bank and prior of ``DEST`` stay byte-identical.
That is only right when the model was trained on ``DEST``'s VAE latents and encoder embeddings:
both are checked (weights equal at fp16), and a mismatch is refused with the fix.

The bundled mask model (``pixgen-masks``) is tied to the old transformer by its ``base.json``
digest and is refused for the new one until it is retrained (``python -m recipes.mask_controlnet
--base DEST --int8 --export ...``); the command prints that reminder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch

from pixgen.errors import ModelLoadError
from pixgen.io import atomic_dir, write_json_atomic

__all__ = ["bundle_transformer", "main"]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Equal state dicts once both are rounded to fp16 (the bundled components are stored in fp16)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].half(), sb[k].half()) for k in sa)


def bundle_transformer(model: str | Path, dest: str | Path, guidance: float, steps: int | None = None) -> Path:
    """Replace ``dest``'s transformer by ``model``'s (int8) and set its default guidance / steps.

    Example:
        >>> bundle_transformer("runs/gen-v2/run/final", "pixgen/weights/pixgen-default", guidance=2.0)  # doctest: +SKIP
    """
    from pixgen.io.int8 import save_int8
    from pixgen.pipeline import INDEX_FILE, Generator

    model, dest = Path(model), Path(dest)
    new, old = Generator.from_pretrained(model), Generator.from_pretrained(dest)
    for part, a, b in (("VAE", new.vae, old.vae), ("encoder", new.encoder, old.encoder)):
        if not _same_weights(a, b):
            raise ModelLoadError(f"{model} was trained with another {part} than {dest}'s",
                                 fix="bundle a model trained on the bundled VAE latents and encoder embeddings "
                                     "(a feature cache built with them), or export a whole new bundle")
    with atomic_dir(dest / "transformer") as tmp:
        save_int8(new.transformer, tmp)
    index = json.loads((dest / INDEX_FILE).read_text())
    index["guidance_scale"] = float(guidance)
    if steps:
        index["num_inference_steps"] = int(steps)
    write_json_atomic(dest / INDEX_FILE, index)
    return dest


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m recipes.bundle_generator", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="the trained Generator folder (pixgen train's final/)")
    p.add_argument("--dest", type=Path, required=True, help="the bundled Generator folder to update")
    p.add_argument("--guidance", type=float, required=True, help="default guidance scale, chosen on validation tiles")
    p.add_argument("--steps", type=int, help="default sampling steps (kept when omitted)")
    a = p.parse_args(argv)
    dest = bundle_transformer(a.model, a.dest, a.guidance, a.steps)
    print(f"bundled {a.model} into {dest}/transformer (int8); retrain the mask model for it: "
          f"python -m recipes.mask_controlnet --base {dest} --int8 --export DIR")
    return dest


if __name__ == "__main__":
    main()
