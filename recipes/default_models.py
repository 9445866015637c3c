"""Reproduce the bundled default models on a CPU: one resumable command.

    nice -n 19 python -m recipes.default_models --data ../shared/data --work runs/default
    python -m recipes.default_models --data ../shared/data --work runs/default --export pixgen/weights

Stages, each skipped when its output exists and resumed from its checkpoint when interrupted
(sizes and step counts: docs/compute-plan.md):

1. ``ae``        ``training.autoencoder`` (f4, 4 channels)         -> WORK/ae/export
2. ``ssl``       ``training.ssl`` (DINO ViT ``pixgen-ssl``)         -> WORK/ssl/export
3. ``tiles``     64 um fields as 128 px at 0.5 um/px, one folder per label (LC25000 grouped-train
                 classes, ``consep``, ``monuseg``)                    -> WORK/tiles/{label}/
4. ``features``  ``training.features.build_feature_cache`` (latents + pixgen-ssl embeddings;
                 what ``pixgen features`` runs)                      -> WORK/cache
5. ``generator`` ``training.trainer.train`` with preset ``default-128`` (``pixgen train``) -> WORK/gen/final
6. ``export``    (with ``--export DIR``) fp16 weights: DIR/pixgen-ssl (the registry's bundled
                 encoder) and DIR/pixgen-default (the Generator; its encoder is ``pixgen-ssl``;
                 ``--guidance W`` stores its default guidance scale)

Held-out data (LC25000 grouped val/test, CoNSeP test, MoNuSeg test) never enters any stage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from PIL import Image

from pixgen.io import atomic_dir, load_image, save_png, write_json_atomic

__all__ = ["main", "write_tiles"]

TILE = 128  # px at 0.5 um/px: a 64 um field, what pixgen-ssl embeds


def _train_stage(module: str, data: Path, out: Path, steps: int | None, split: Path, eval_limit: int) -> Path:
    """Run ``training.autoencoder`` / ``training.ssl`` to completion (resuming), then export."""
    import importlib

    from training.autoencoder import has_checkpoint

    export = out / "export"
    if (export / "config.json").is_file():
        return export
    main = importlib.import_module(module).main
    args = ["--data", str(data), "--out", str(out), "--threads", "1", "--lc-split", str(split)]
    args += ["--max-steps", str(steps)] if steps else []
    main(args + (["--resume"] if has_checkpoint(out) else []))
    main(["--out", str(out), "--eval-only", "--eval-limit", str(eval_limit), "--export", str(export)])
    return export


def _crop_center(img: Image.Image, size: int) -> Image.Image:
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def _sources(data: Path, split_cache: Path, limit: int | None, split: str = "train"):
    """(label, image) pairs of one split (``train`` or ``test``), as 64 um fields (128 px at 0.5 um/px)."""
    from training.data.splits import lc25000_grouped_split

    lc = lc25000_grouped_split(data / "lc25000-lung", cache=split_cache)
    for path in lc.files(split)[:limit]:  # ~0.5 um/px, 224 px: the central 64 um
        yield path.parent.name, _crop_center(load_image(path), TILE)
    for path in sorted((data / "consep" / split / "images").glob("*.jpg"))[:limit]:  # 0.25 um/px, 256 px
        yield "consep", load_image(path).resize((TILE, TILE), Image.LANCZOS)
    for path in sorted((data / "monuseg" / split / "images").glob("*.jpg"))[:limit]:  # 0.25 um/px, 1000 px
        img = load_image(path)
        for y in range(0, img.height - 255, 256):
            for x in range(0, img.width - 255, 256):
                yield "monuseg", img.crop((x, y, x + 256, y + 256)).resize((TILE, TILE), Image.LANCZOS)


def write_tiles(data: Path, out: Path, split_cache: Path, limit: int | None = None, split: str = "train") -> Path:
    """Write one split's tiles once, a folder per label; a partial folder is rebuilt (it is only
    renamed to ``out`` when complete)."""
    if out.is_dir():
        return out
    counts: dict[str, int] = {}
    with atomic_dir(out) as tmp:
        for label, img in _sources(data, split_cache, limit, split):
            save_png(img, tmp / label / f"{counts.get(label, 0):05d}.png")
            counts[label] = counts.get(label, 0) + 1
        write_json_atomic(tmp / "tiles.json", {"size": TILE, "mpp": 0.5, "split": split, "counts": counts})
    return out


def _generator_stage(work: Path, ae: Path, ssl: Path, tiles: Path, steps: int | None) -> Path:
    """Feature cache, then the generator's training run (each resumed when interrupted)."""
    from training.features import build_feature_cache, open_image_source, resolve_components
    from training.trainer import resolve_config, train

    final = work / "gen" / "final"
    if (final / "model_index.json").is_file():
        return final
    cache = work / "cache"
    if not (cache / "index.json").is_file() or not json.loads((cache / "index.json").read_text()).get("complete"):
        vae, encoder, local = resolve_components(vae=str(ae), encoder=str(ssl))
        build_feature_cache(open_image_source(tiles, mpp=0.5, size=TILE), cache, vae, encoder, save_encoder=local)
    resume = (work / "gen" / "config.json").is_file()
    cfg = resolve_config("default-128", work / "gen", resume, {"max_steps": steps}, [])
    return train(cfg, cache, work / "gen", resume=resume)


def export(final: Path, ssl: Path, dest: Path, guidance: float | None = None) -> Path:
    """fp16 copies: DIR/pixgen-ssl (bundled encoder) and DIR/pixgen-default (encoder by name),
    with ``guidance`` (if given) as the model's default guidance scale."""
    import torch

    from pixgen.encoders import load_encoder
    from pixgen.pipeline import Generator

    load_encoder(str(ssl)).to(torch.float16).save_pretrained(dest / "pixgen-ssl")
    gen = Generator.from_pretrained(final)
    gen.config.update(encoder="pixgen-ssl", encoder_path=None)  # the registry's bundled weights
    if guidance is not None:
        gen.config["guidance_scale"] = guidance
    gen.transformer.to(torch.float16)
    gen.vae.to(torch.float16)
    return gen.save_pretrained(dest / "pixgen-default")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recipes.default_models", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="the shared data folder (../shared/data)")
    ap.add_argument("--work", required=True, type=Path, help="run folder (outside the repository)")
    ap.add_argument("--export", type=Path, help="write the fp16 bundled weights here (e.g. pixgen/weights)")
    ap.add_argument("--guidance", type=float, help="default guidance scale stored with the export (chosen on validation tiles)")
    ap.add_argument("--ae-steps", type=int, help="the autoencoder's steps (bundled: 3200; default: its config's)")
    ap.add_argument("--ssl-steps", type=int, help="the SSL encoder's steps (bundled: 2300)")
    ap.add_argument("--gen-steps", type=int, help="the generator's steps (bundled: 3000)")
    ap.add_argument("--limit", type=int, help="at most N images per source (smoke runs)")
    ap.add_argument("--eval-limit", type=int, default=0, help="held-out images per source in the final evaluations (0: all)")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    split = args.work / "lc25000_split.json"
    ae = _train_stage("training.autoencoder", args.data, args.work / "ae", args.ae_steps, split, args.eval_limit)
    ssl = _train_stage("training.ssl", args.data, args.work / "ssl", args.ssl_steps, split, args.eval_limit)
    tiles = write_tiles(args.data, args.work / "tiles", args.work / "near-duplicates.json", args.limit)
    final = _generator_stage(args.work, ae, ssl, tiles, args.gen_steps)
    if args.export:
        print(f"exported {export(final, ssl, args.export, args.guidance)}")
    print(f"done: {final}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
