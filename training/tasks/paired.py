"""Paired H&E / IHC data for the staining tasks: one feature cache serves all three.

:func:`build_paired_cache` encodes a :class:`~training.data.paired.PairedStainDataset` (BCI, MIST
or the user's own pairs) with the H&E generator's autoencoder and encoder into a feature cache
whose tiles are the **IHC** images (``latents``, ``embeddings`` / ``grid``: what the IHC
generator learns) plus the paired **H&E** tiles as extra fields:

* ``he_embeddings`` (N, D) and, for grid models, ``he_grid`` (N, G*G, D): the translator's source
  and the direct baseline's condition;
* ``he_latents`` (N, C, h, w): the direct baseline's ControlNet input.

Tiles are ``crop`` x ``crop`` grid crops of each pair at the files' resolution (the same window in
both images), brought to the model's tile size; ``crop=None`` takes whole images. Building
resumes like any feature cache; the H&E fields are added once, at the end.

Example:
    >>> pairs = PairedData("bci", "BCI_dataset", mpp=0.5, crop=1024)                    # doctest: +SKIP
    >>> cache = build_paired_cache(pairs.dataset(), "runs/her2/cache", Generator.from_pretrained("PixCell-1024"))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixgen.errors import InputError

__all__ = ["run_main", "PairedData", "build_paired_cache", "open_paired_cache", "add_paired_flags", "paired_from_args",
           "register_in_stain_model", "HE_FIELDS"]

HE_FIELDS = ("he_embeddings", "he_grid", "he_latents")


@dataclass
class PairedData:
    """Where the pairs are: ``layout`` ``bci`` (``root/HE|IHC/{split}``) or ``mist``
    (``root/{marker}/TrainValAB/{split}A|B``), the files' ``mpp``, ``crop`` side (None: whole
    images), MIST ``markers``."""

    layout: str
    root: str
    mpp: float
    split: str = "train"
    crop: int | None = None
    markers: tuple[str, ...] | None = None

    def dataset(self):
        """The :class:`~training.data.paired.PairedStainDataset` (grid crops, deterministic)."""
        from training.data.paired import BCIDataset, MISTDataset

        kw: dict[str, Any] = {"mpp": self.mpp, "crop": self.crop, "crop_mode": "grid"}
        if self.layout == "bci":
            return BCIDataset(self.root, self.split, **kw)
        if self.layout == "mist":
            return MISTDataset(self.root, self.split, markers=list(self.markers) if self.markers else None, **kw)
        raise InputError(f"unknown paired layout {self.layout!r}", fix="use bci or mist")


class _Side(torch.utils.data.Dataset):
    """One side of the pairs as cache items (``image`` at the model's tile size)."""

    def __init__(self, pairs, side: str, size: int):
        self.pairs, self.side, self.size, self.fit = pairs, side, size, "resize"
        self.classes: list[str] = []
        column = 0 if side == "he" else 1
        # the cache's plan hashes one path per item: the file and the crop origin (grid crops)
        self.paths = [f"{pairs.pairs[k][column]}@{origin}" for k, origin in pairs._index]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from training.data.folders import fit_image

        item = self.pairs[index]
        image, scale = fit_image(item[self.side], (self.size, self.size), "resize")
        return {"image": image, "label": -1, "path": item[f"{self.side}_path"], "group": item["group"],
                "mpp": float(item["mpp"]) / scale}


def build_paired_cache(pairs, out: str | Path, gen, *, batch_size: int = 16, device: str = "cpu",
                       progress: bool = False):
    """The paired feature cache (module docstring) of ``pairs`` with ``gen``'s VAE and encoder."""
    from training.features import (
        FeatureCache,
        add_field,
        build_feature_cache,
        resolve_components,
    )

    out = Path(out)
    size = int(gen.config["image_size"])
    grid = round(gen.transformer.config.caption_num_tokens ** 0.5)
    vae, encoder, local = resolve_components(gen, device=device)
    cache = build_feature_cache(_Side(pairs, "ihc", size), out, vae, encoder, grid=grid, batch_size=batch_size,
                                device=device, save_encoder=local, progress=progress)
    if all(f in cache.fields for f in HE_FIELDS if grid > 1 or f != "he_grid"):
        return cache
    he = _Side(pairs, "he", size)
    lat, emb, tok = [], [], []
    with torch.no_grad():
        for lo in range(0, len(he), batch_size):
            images = torch.from_numpy(np.stack([he[i]["image"] for i in range(lo, min(lo + batch_size, len(he)))]))
            images = images.permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
            lat.append(vae.encode(images.to(device, torch.float32) / 127.5 - 1).float().cpu().numpy())
            emb.append(encoder.embed(images).float().cpu().numpy())
            if grid > 1:
                tok.append(encoder.embed_grid(images, grid=grid).float().cpu().numpy())
    add_field(out, "he_latents", np.concatenate(lat).astype(np.float32))
    add_field(out, "he_embeddings", np.concatenate(emb).astype(np.float32))
    if grid > 1:
        add_field(out, "he_grid", np.concatenate(tok).astype(np.float32))
    return FeatureCache(out)


def open_paired_cache(task, engine, pairs: PairedData, fields: tuple[str, ...] = ()):
    """``RUN/cache`` for a generator-type task: built from ``pairs`` with the task's initial model
    (rank 0), then opened with the task's condition tokens and ``fields``."""
    from training.features import FeatureCache

    if task.init_gen is None:
        raise InputError("the staining tasks start from an H&E generator", fix="pass --init MODEL")
    cache_dir = engine.out / "cache"
    if engine.accelerator.is_main_process:
        device = "cpu" if engine.cpu else str(engine.accelerator.device)
        check_pairs_mpp(pairs, task.init_gen)
        build_paired_cache(pairs.dataset(), cache_dir, task.init_gen, device=device)
    engine.accelerator.wait_for_everyone()
    return FeatureCache(cache_dir, tokens=task.cfg.condition_tokens, fields=fields)


def check_pairs_mpp(pairs: PairedData, gen) -> None:
    """Refuse pairs whose tiles would reach the model at another resolution than it was trained at."""
    want = gen.config.get("mpp")
    side = pairs.crop or None
    size = int(gen.config["image_size"])
    if want and side:
        got = pairs.mpp * side / size  # crops are resized to the model's tile size
        if abs(got / want - 1) > 0.25:
            raise InputError(f"{side} px crops at {pairs.mpp} um/px reach the model at {got:g} um/px, it works at "
                             f"{want} um/px", fix=f"pass --crop {round(size * want / pairs.mpp)} (or check --mpp)")


def add_paired_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--layout --root --mpp --split --crop --markers`` (the pairs) and ``--stain-model``; each
    command adds ``--marker`` (the IHC marker it learns; default her2 for bci, the one ``--markers``
    names for mist)."""
    p.add_argument("--layout", choices=["bci", "mist"], required=True, help="folder layout of the pairs")
    p.add_argument("--root", required=True, help="the dataset folder (BCI_dataset/ or MIST/)")
    p.add_argument("--mpp", type=float, required=True, help="microns per pixel of the files (not recorded in them)")
    p.add_argument("--split", default="train", help="bci: train/test; mist: train/val")
    p.add_argument("--crop", type=int, help="grid crops of this side, resized to the model's tile (default: whole images)")
    p.add_argument("--markers", nargs="+", help="mist: marker folders to use (default: every one present)")
    p.add_argument("--stain-model", help="also register RUN/final in this stain-model folder (stain_model.json)")
    return p


def paired_from_args(args: argparse.Namespace) -> tuple[PairedData, str]:
    """(the pairs, the marker) of the flags :func:`add_paired_flags` added."""
    pairs = PairedData(args.layout, args.root, args.mpp, args.split, args.crop,
                       tuple(args.markers) if args.markers else None)
    marker = getattr(args, "marker", None)
    if not marker and args.layout == "bci":
        marker = "her2"  # BCI is HER2
    elif not marker and args.markers and len(args.markers) == 1:
        marker = args.markers[0]
    if not marker:
        raise InputError("which marker does this model learn?", fix="pass --marker (e.g. --marker ki67)")
    return pairs, marker.lower()


def register_in_stain_model(folder: str | Path, marker: str, role: str, final: str | Path) -> Path:
    """Add (or replace) ``role`` (``translator`` / ``generator``) of stain ``marker`` in
    ``folder/stain_model.json``, as a path relative to ``folder``."""
    import json
    import os

    from pixgen.staining import STAIN_MODEL_FILE, write_stain_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STAIN_MODEL_FILE
    stains = json.loads(path.read_text())["stains"] if path.is_file() else {}
    entry = {**stains.get(marker, {}), role: os.path.relpath(Path(final).resolve(), folder.resolve()),
             "marker": marker}
    return write_stain_model(folder, {**stains, marker: entry})




def run_main(main, argv: list[str] | None = None) -> int:
    """Run a staining task's ``main`` as a command: a :class:`~pixgen.errors.PixgenError` is one
    line on stderr and exit 1, as in ``pixgen`` (``--debug`` anywhere in argv shows the traceback)."""
    import sys

    from pixgen.errors import PixgenError

    argv = sys.argv[1:] if argv is None else argv
    try:
        return main([a for a in argv if a != "--debug"])
    except PixgenError as err:
        if "--debug" in argv:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
