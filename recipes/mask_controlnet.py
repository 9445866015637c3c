"""Train the mask ControlNet for any base generator: one resumable command.

    nice -n 19 python -m recipes.mask_controlnet --data ../shared/data --base pixgen/weights/pixgen-default \\
        --work runs/masks --threads 1 [--export pixgen/weights/pixgen-masks]

Stages, each skipped when its output exists and resumed when interrupted:

1. ``cache``  CoNSeP + MoNuSeg *train* tiles as 64 um fields (256 px at 0.25 um/px -> 128 px at
              0.5 um/px: image LANCZOS, layout nearest-neighbour), latents + embeddings from the
              base's VAE and encoder, and the field ``mask`` = :func:`pixgen.masks.encode_masks`
              (6, 128, 128) uint8                                        -> WORK/cache
2. ``train``  ``pixgen train --task controlnet --init BASE`` (preset ``default-128``,
              ``controlnet_layers`` copied blocks; the pixel-grid field gives the ControlNet its
              conv mask encoder)                                         -> WORK/run/final
3. ``stats``  the mask sampler's statistics from the same training layouts -> WORK/mask_stats.json
4. ``export`` (with ``--export DIR``) fp16 (or ``--int8``: :mod:`pixgen.io.int8`, half the bytes)
              ``DIR/controlnet/``, ``DIR/mask_stats.json`` and ``DIR/base.json`` (the base
              transformer's weights digest, checked when attached, and ``--control-scale``: the
              scale `pixgen generate --mask` uses by default, calibrated with ``recipes.mask_eval
              --control-scale``; a rerun with a new value only re-exports).

Test splits never enter any stage. The cache is tied to the base's VAE and encoder: for a new base
use a new ``--work``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from pixgen.io import write_json_atomic
from pixgen.masks import downsample_layout, encode_masks

__all__ = ["main", "train_layouts", "MaskTiles"]

TILE, FACTOR = 128, 2  # 256 px at 0.25 um/px -> 128 px at 0.5 um/px


def train_layouts(data: Path, split: str = "train") -> Iterator[dict[str, Any]]:
    """CoNSeP tiles and MoNuSeg 256 px grid crops of one split at 0.25 um/px: ``image``, ``inst``,
    ``types`` (None for MoNuSeg), ``tissue``, ``path``, ``group`` (source image)."""
    from training.data.masks import CoNSePDataset, MoNuSegDataset

    for tissue, ds in (("consep", CoNSePDataset(data / "consep", split)),
                       ("monuseg", MoNuSegDataset(data / "monuseg", split, crop=256, crop_mode="grid", stride=256))):
        for s in ds:
            if s["image"].shape[:2] != (256, 256):
                continue
            yield {"image": s["image"], "inst": s["inst"], "types": s.get("types"), "tissue": tissue,
                   "path": f"{s['path']}@{s['origin'][0]},{s['origin'][1]}", "group": s["source_id"]}


class MaskTiles(torch.utils.data.Dataset):
    """Training tiles at 128 px / 0.5 um/px with the ``mask`` field, for ``build_feature_cache``."""

    def __init__(self, data: Path, split: str = "train"):
        self.items = list(train_layouts(Path(data), split))
        self.paths = [it["path"] for it in self.items]  # what build_feature_cache's resume check hashes
        self.size = TILE

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        it = self.items[index]
        image = np.asarray(Image.fromarray(it["image"]).resize((TILE, TILE), Image.LANCZOS))
        inst, types = downsample_layout(it["inst"], it["types"], FACTOR)
        return {"image": image, "mask": encode_masks(inst, types), "label": -1, "path": it["path"],
                "group": it["group"], "mpp": 0.5}


def _cache(data: Path, base: Path, work: Path) -> Path:
    from training.features import build_feature_cache, resolve_components

    cache = work / "cache"
    index = cache / "index.json"
    if not (index.is_file() and json.loads(index.read_text()).get("complete")):
        vae, encoder, local = resolve_components(model=str(base))
        build_feature_cache(MaskTiles(data), cache, vae, encoder, save_encoder=local, fields=("mask",))
    return cache


def _train(cache: Path, base: Path, work: Path, steps: int, batch: int, layers: int) -> Path:
    from training.trainer import resolve_config, train

    final = work / "run" / "final"
    if (final / "controlnet" / "config.json").is_file():
        return final
    resume = (work / "run" / "config.json").is_file()
    sets = [f"init={base}", "task=controlnet", f"controlnet_layers={layers}", "control_field=mask",
            "mixed_precision=no", "sample_every=0", "checkpoint_every=25", "warmup_steps=20", "lr=3e-4",
            "ema_decay=0.99", "cfg_dropout=0.1"]
    cfg = resolve_config("default-128", work / "run", resume, {"max_steps": steps, "batch_size": batch}, sets)
    return train(cfg, cache, work / "run", resume=resume)


def export(final: Path, base: Path, stats: Path, dest: Path, int8: bool = False, control_scale: float = 1.0) -> Path:
    """fp16 (or int8) ControlNet + sampler statistics + the base digest and default scale into ``dest``
    (replaced whole)."""
    from pixgen.io import atomic_dir
    from pixgen.io.int8 import save_int8
    from pixgen.masks import base_digest
    from pixgen.models.controlnet import PixgenControlNet

    with atomic_dir(dest) as tmp:
        controlnet = PixgenControlNet.from_pretrained(final / "controlnet")
        if int8:
            save_int8(controlnet, tmp / "controlnet")
        else:
            controlnet.to(torch.float16).save_pretrained(tmp / "controlnet")
        shutil.copyfile(stats, tmp / "mask_stats.json")
        write_json_atomic(tmp / "base.json", {"transformer_sha256": base_digest(base), "base": base.name,
                                              "control_scale": control_scale})
    return dest


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m recipes.mask_controlnet", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--base", type=Path, required=True, help="the Generator folder the ControlNet steers")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=2, help="base blocks the ControlNet copies")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--export", type=Path, default=None)
    p.add_argument("--control-scale", type=float, default=1.0, help="the exported model's default ControlNet scale")
    p.add_argument("--int8", action="store_true", help="export int8 weights (pixgen.io.int8; for bundled models)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cache = _cache(a.data, a.base, a.work)
    final = _train(cache, a.base, a.work, a.max_steps, a.batch_size, a.layers)
    from pixgen.mask_sampler import fit_stats

    stats = a.work / "mask_stats.json"
    if not stats.is_file():
        write_json_atomic(stats, fit_stats(train_layouts(a.data)))
    return export(final, a.base, stats, a.export, int8=a.int8, control_scale=a.control_scale) if a.export else final


if __name__ == "__main__":
    main()
