"""Feature cache: VAE latents + SSL embeddings per tile, in memory-mappable shards.

Training a latent diffusion transformer on a CPU or a GPU is dominated by the frozen VAE and
encoder if they run every step; so they run once, here. Layout of a cache directory::

    CACHE/index.json                  counts, dtypes, shapes, classes, encoder, VAE, mpp, shards
    CACHE/vae/                        the autoencoder that made the latents (decodes samples)
    CACHE/encoder/                    the encoder, when it was a local / bundled one
    CACHE/shard-00000/latents.npy     (n, C, h, w)   VAE latents (scaled, diffusion-ready)
                     /embeddings.npy  (n, D)         whole-tile embedding (one token)
                     /grid.npy        (n, G*G, D)    sub-tile embeddings (``grid`` > 1 only)
                     /labels.npy      (n,) int64     class index, -1 without classes
                     /<field>.npy     (n, ...)       optional extra fields declared by name
                                                     (masks, paired embeddings, text vectors ...)
                     /meta.json       source paths, group ids, mpp per tile (+ string fields,
                                                     e.g. captions)

Extra fields are listed in ``index.json`` under ``"fields"`` (name -> ``{"kind": "array", "dtype",
"shape"}`` or ``{"kind": "text"}``); they come from the dataset's items at build time
(``build_feature_cache(..., fields=("mask",))``) or are added to a finished cache with
:func:`add_field`. Caches without ``"fields"`` (older ones) have none.

A shard is written under a temporary name and renamed when complete, so a killed run leaves
only whole shards; running the same command again resumes at the first missing shard and
gives the same store as an uninterrupted run. ``index.json`` is rewritten (atomically) after
each shard and says ``"complete": true`` at the end.

Example:
    >>> ds = open_image_source("../shared/data/lc25000-lung", mpp=0.5, size=224)   # doctest: +SKIP
    >>> cache = build_feature_cache(ds, "cache/", vae, encoder, grid=2)             # doctest: +SKIP
    >>> cache[0]["latents"].shape, cache[0]["condition"].shape                     # doctest: +SKIP
    (torch.Size([16, 28, 28]), torch.Size([1, 1536]))
    $ pixgen features ../shared/data/lc25000-lung --model runs/a/final --mpp 0.5 --out cache/
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixgen.errors import InputError
from pixgen.io import atomic_dir, atomic_write, write_json_atomic

__all__ = [
    "FeatureCache", "build_feature_cache", "add_field", "open_image_source", "resolve_components",
    "add_parser", "run", "INDEX_FILE", "FORMAT",
]

INDEX_FILE = "index.json"
FORMAT = "pixgen-feature-cache"
VERSION = 1


# ----------------------------------------------------------------------------- reading
class FeatureCache(torch.utils.data.Dataset):
    """A feature cache as a torch Dataset (arrays memory-mapped, opened lazily per shard).

    Each item: ``latents`` float32 (C, h, w), ``condition`` float32 (T, D) with T = ``tokens``
    (1: the whole-tile embedding; grid**2: the sub-tile grid), ``label`` int, ``index`` int, plus
    each extra field named in ``fields`` (arrays as tensors, float32 when floating; text as str).

    Example:
        >>> cache = FeatureCache("cache/")                       # doctest: +SKIP
        >>> len(cache), cache.classes, cache.latent_shape        # doctest: +SKIP
        (14223, ['lung_aca', 'lung_n', 'lung_scc'], (16, 32, 32))
    """

    def __init__(self, root: str | Path, tokens: int = 1, allow_partial: bool = False,
                 fields: tuple[str, ...] | list[str] = ()):
        self.root = Path(root)
        path = self.root / INDEX_FILE
        if not path.is_file():
            raise InputError(f"{self.root} is not a feature cache (no {INDEX_FILE})",
                             fix="build one with `pixgen features DATA --out CACHE`")
        self.info: dict[str, Any] = json.loads(path.read_text())
        if self.info.get("format") != FORMAT:
            raise InputError(f"{path} is not a pixgen feature cache index")
        if not self.info["complete"] and not allow_partial:
            raise InputError(f"the feature cache {self.root} is incomplete ({self.info['count']} of "
                             f"{self.info['planned']} tiles)", fix="run the same `pixgen features` command again to resume")
        grid = self.info["grid"]
        if tokens not in (1, grid * grid):
            raise InputError(f"the cache has 1 or {grid * grid} condition tokens per tile, not {tokens}",
                             fix=f"rebuild it with --grid {round(tokens ** 0.5)}")
        missing = [f for f in fields if f not in self.fields]
        if missing:
            raise InputError(f"the feature cache {self.root} has no field {', '.join(map(repr, missing))} "
                             f"(it has: {', '.join(self.fields) or 'no extra fields'})",
                             fix="add it with training.features.add_field, or build the cache with it")
        self.tokens, self.extra = tokens, tuple(fields)
        self.shards = [s["name"] for s in self.info["shards"]]
        self._starts = np.cumsum([0] + [s["count"] for s in self.info["shards"]]).tolist()
        self._arrays: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def encoder_name(self) -> str | None:
        return self.info["encoder"]["name"]

    @property
    def dim(self) -> int:
        return int(self.info["encoder"]["dim"])

    @property
    def grid(self) -> int:
        return int(self.info["grid"])

    @property
    def fields(self) -> dict[str, dict[str, Any]]:
        """Extra fields stored in the cache: name -> ``{"kind": "array" | "text", ...}``."""
        return dict(self.info.get("fields", {}))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.info["arrays"]["latents"]["shape"])

    @property
    def mpp(self) -> float | None:
        return self.info.get("mpp")

    def _array(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        if key not in self._arrays:
            self._arrays[key] = np.load(self.root / self.shards[shard] / f"{name}.npy", mmap_mode="r")
        return self._arrays[key]

    def _locate(self, index: int) -> tuple[int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, i = self._locate(index)
        if self.tokens == 1:
            cond = self._array(shard, "embeddings")[i][None]  # (1, D)
        else:
            cond = self._array(shard, "grid")[i]  # (G*G, D)
        item = {
            "latents": torch.from_numpy(np.array(self._array(shard, "latents")[i], dtype=np.float32)),
            "condition": torch.from_numpy(np.array(cond, dtype=np.float32)),
            "label": int(self._array(shard, "labels")[i]),
            "index": int(index),
        }
        for name in self.extra:
            item[name] = self._field(shard, name, i)
        return item

    def _field(self, shard: int, name: str, i: int) -> Any:
        if self.fields[name]["kind"] == "text":
            return self._meta(shard)[name][i]
        value = np.array(self._array(shard, name)[i])
        return torch.from_numpy(value.astype(np.float32) if value.dtype.kind == "f" else value)

    def _meta(self, shard: int) -> dict[str, Any]:
        key = (shard, "meta.json")
        if key not in self._arrays:
            self._arrays[key] = json.loads((self.root / self.shards[shard] / "meta.json").read_text())
        return self._arrays[key]

    def array(self, name: str) -> np.ndarray:
        """One array over the whole cache (``latents``, ``embeddings``, ``grid``, ``labels`` or an
        extra array field), in memory."""
        return np.concatenate([np.asarray(self._array(k, name)) for k in range(len(self.shards))])

    def conditions(self) -> np.ndarray:
        """Every tile's condition tokens, (N, T, D) float32, for ``tokens`` as opened."""
        values = self.array("embeddings")[:, None] if self.tokens == 1 else self.array("grid")
        return values.astype(np.float32)

    def meta(self, key: str) -> list[Any]:
        """Per-tile metadata over the whole cache: ``paths``, ``groups``, ``mpp`` or a text field."""
        out: list[Any] = []
        for k in range(len(self.shards)):
            out += self._meta(k)[key]
        return out

    def load_vae(self):
        """The autoencoder stored with the cache (decodes generated latents)."""
        from pixgen.models.autoencoders import load_autoencoder

        return load_autoencoder(self.root / self.info["vae"]["path"])

    @property
    def encoder_path(self) -> Path | None:
        """The encoder saved in the cache (local / bundled encoders), else None (a registry name)."""
        rel = self.info["encoder"].get("path")
        return self.root / rel if rel else None


def add_field(root: str | Path, name: str, values: np.ndarray | Sequence[str]) -> FeatureCache:
    """Add an extra per-tile field to a complete cache: an array (N, ...) or N strings (captions).

    Each shard's part is written atomically (``.npy`` renamed into place, or ``meta.json``
    rewritten), then the index lists the field; adding a field again replaces it.

    Example:
        >>> add_field("cache/", "mask", masks)                    # doctest: +SKIP   (N, H, W) uint8
        >>> FeatureCache("cache/", fields=("mask",))[0]["mask"].shape   # doctest: +SKIP
        torch.Size([32, 32])
    """
    cache = FeatureCache(root)
    reserved = {"latents", "embeddings", "grid", "labels", "meta", "paths", "groups", "mpp", "condition", "label",
                "index"}
    if name in reserved or not name.replace("_", "").isalnum():
        raise InputError(f"{name!r} cannot name a cache field", fix="use a plain name such as mask or he_embeddings")
    if len(values) != len(cache):
        raise InputError(f"{len(values)} values for {len(cache)} cached tiles", fix="give one value per tile")
    text = not isinstance(values, np.ndarray)
    if text and not all(isinstance(v, str) for v in values):
        raise InputError(f"field {name!r} must be an array or a list of strings")
    for k, shard in enumerate(cache.shards):
        lo, hi = cache._starts[k], cache._starts[k + 1]
        folder = cache.root / shard
        if text:
            meta = json.loads((folder / "meta.json").read_text())
            meta[name] = list(values[lo:hi])
            write_json_atomic(folder / "meta.json", meta)
        else:
            with atomic_write(folder / f"{name}.npy") as fh:
                np.save(fh, np.ascontiguousarray(values[lo:hi]))
    entry = {"kind": "text"} if text else {"kind": "array", "dtype": str(values.dtype), "shape": list(values.shape[1:])}
    cache.info["fields"] = {**cache.fields, name: entry}
    write_json_atomic(cache.root / INDEX_FILE, cache.info)
    return FeatureCache(cache.root, fields=(name,))


# ----------------------------------------------------------------------------- sources
class _Fitted(torch.utils.data.Dataset):
    """Wraps a tile dataset: brings each image to ``size`` with ``fit_image`` and adds label -1."""

    def __init__(self, base: torch.utils.data.Dataset, size: int | None, fit: str):
        self.base, self.size, self.fit = base, size, fit
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from training.data.folders import fit_image

        item = dict(self.base[index])
        size = (self.size, self.size) if self.size else None
        item["image"], scale = fit_image(item["image"], size, self.fit)
        item["mpp"] = float(item["mpp"]) / scale
        item.setdefault("label", -1)
        return item


def open_image_source(data: str | Path, mpp: float | None = None, size: int | None = None,
                      fit: str = "crop") -> torch.utils.data.Dataset:
    """A dataset of tiles for the cache: an image folder (class sub-folders = labels; ``mpp``
    required) or the output of ``pixgen tile`` (one folder with ``tiling.json``, or a folder of
    such folders; mpp read from it).

    Example:
        >>> open_image_source("tiles/", size=256)                                     # doctest: +SKIP
        >>> open_image_source("../shared/data/lc25000-lung", mpp=0.5, size=224)       # doctest: +SKIP
    """
    root = Path(data)
    if not root.is_dir():
        raise InputError(f"no data folder at {root}", fix="pass an image folder or a `pixgen tile` output folder")
    tiled = [root] if (root / "tiling.json").is_file() else sorted(p.parent for p in root.glob("*/tiling.json"))
    if tiled:
        from training.data.slides import SlideTileDataset

        return _Fitted(SlideTileDataset(tiled), size, fit)
    if mpp is None:
        raise InputError(f"the resolution of the images in {root} is not known",
                         fix="pass --mpp (microns per pixel of the files, e.g. 0.5 for 20x)")
    from training.data.folders import ImageFolderDataset

    return ImageFolderDataset(root, mpp=mpp, size=size, fit=fit)


def resolve_components(model: Any = None, vae: str | None = None, encoder: str | None = None,
                       device: str = "cpu", token: str | None = None, encoder_path: str | None = None,
                       trust_remote_code: bool = False,
                       ) -> tuple[Any, Any, bool]:
    """(autoencoder, encoder, local) from a Generator (directory) and/or an explicit ``vae`` path /
    ``encoder`` name or directory (explicit ones win). ``local`` is True when the encoder is not
    reloadable by a registry name alone (a saved folder, a bundled or model-owned encoder): the
    cache then keeps a copy, and models trained on it carry it. ``encoder_path``: local weights for
    a registry name (offline clusters, gated hubs), e.g. ``encoder="uni2-h", encoder_path="/models/UNI2-h"``.
    ``trust_remote_code``: see :func:`pixgen.encoders.load_encoder` (the caller's flag, never a file's).

    Example:
        >>> vae, enc, src = resolve_components(model="runs/a/final")                  # doctest: +SKIP
        >>> vae, enc, src = resolve_components(vae="sd35/vae", encoder="uni2-h")       # doctest: +SKIP
    """
    from pixgen.encoders import load_encoder
    from pixgen.models.autoencoders import load_autoencoder

    gen = model if model is not None and not isinstance(model, (str, Path)) else None
    if gen is None and model:
        from pixgen.pipeline import Generator

        vae_path = vae if vae and Path(vae).is_dir() else None  # e.g. PixCell-256 ships no VAE weights
        gen = Generator.from_pretrained(model, token=token, vae_path=vae_path, encoder_path=encoder_path,
                                        trust_remote_code=trust_remote_code)
    if vae:
        autoencoder = load_autoencoder(vae, token=token)
    elif gen is not None:
        autoencoder = gen.vae
    else:
        raise InputError("no autoencoder given", fix="pass --model GENERATOR_DIR or --vae PATH")
    if encoder:
        enc = load_encoder(encoder, local_path=encoder_path, token=token, device=device,
                           trust_remote_code=trust_remote_code)
        local = Path(encoder).is_dir()
    elif gen is not None:
        enc, local = gen.encoder, bool(gen.config.get("encoder_path"))
    else:
        raise InputError("no encoder given", fix="pass --model GENERATOR_DIR or --encoder NAME_OR_DIR")
    local = local or getattr(enc.spec, "source", "") == "bundled"
    return autoencoder.to(device).eval(), enc.to(device).eval(), local


# ----------------------------------------------------------------------------- writing
def _plan(dataset: Any, vae: Any, encoder: Any, grid: int, dtype: str, shard_size: int,
          fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """What the cache will hold; its hash tells a resumable run from a different one."""
    paths = [str(p) for p in getattr(dataset, "paths", [])] or [str(dataset.base.rows[i]["path"])
                                                                for i in range(len(dataset))]
    labels = [int(x) for x in getattr(dataset, "labels", [-1] * len(paths))]
    vae_cfg = json.dumps(dict(vae.model.config), sort_keys=True, default=str)
    plan = {
        "files": hashlib.sha256("\n".join(f"{p}\t{lab}" for p, lab in zip(paths, labels)).encode()).hexdigest(),
        "count": len(paths), "grid": grid, "dtype": dtype, "shard_size": shard_size,
        "size": getattr(dataset, "size", None), "fit": getattr(dataset, "fit", None),
        "vae": hashlib.sha256(vae_cfg.encode()).hexdigest()[:16],
        "vae_weights": _weights_digest(vae.model), "encoder": encoder.spec.name,
        "encoder_weights": _weights_digest(encoder),
    }
    if fields:  # only when present, so that older caches keep their plan hash
        plan["fields"] = list(fields)
    return {**plan, "hash": hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:16]}


def _weights_digest(module: torch.nn.Module) -> str:
    """A cheap fingerprint of a module's weights (sums of a few tensors)."""
    h = hashlib.sha256()
    for i, p in enumerate(module.parameters()):
        if i % 7 == 0:
            h.update(np.float64(p.detach().double().sum().item()).tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def _encode_batch(items: list[dict[str, Any]], vae: Any, encoder: Any, grid: int, device: str
                  ) -> dict[str, np.ndarray]:
    """Latents and embeddings of one batch of tiles."""
    images = torch.from_numpy(np.stack([it["image"] for it in items])).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    pixels = images.to(device=device, dtype=torch.float32) / 127.5 - 1.0
    out = {
        "latents": vae.encode(pixels).float().cpu().numpy(),  # (B, C, h, w)
        "embeddings": encoder.embed(images).float().cpu().numpy(),  # (B, D)
    }
    if grid > 1:
        out["grid"] = encoder.embed_grid(images, grid=grid).float().cpu().numpy()  # (B, G*G, D)
    return out


def _write_shard(root: Path, name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write a shard to a temporary folder, then rename it: a shard either exists whole or not at all."""
    with atomic_dir(root / name) as tmp:
        for key, value in arrays.items():
            with atomic_write(tmp / f"{key}.npy", fsync=True) as fh:
                np.save(fh, value)
        write_json_atomic(tmp / "meta.json", meta)


def build_feature_cache(
    dataset: Any,
    out: str | Path,
    vae: Any,
    encoder: Any,
    *,
    grid: int = 1,
    batch_size: int = 16,
    shard_size: int = 1024,
    dtype: str = "float16",
    device: str = "cpu",
    save_encoder: bool = False,
    on_shard: Callable[[int], None] | None = None,
    progress: bool = True,
    fields: Sequence[str] = (),
) -> FeatureCache:
    """Encode every tile of ``dataset`` (see :func:`open_image_source`) into a cache at ``out``.

    Resumes an interrupted build with the same inputs; refuses to mix a different build into an
    existing cache. ``on_shard(k)`` is called after shard ``k`` is complete (progress, tests).

    Args:
        dataset: items with ``image`` uint8 (H, W, 3), ``label``, ``path``, ``group``, ``mpp``.
        vae: a :class:`pixgen.models.autoencoders.Autoencoder`. encoder: a pixgen encoder.
        grid: also store a grid x grid sub-tile embedding (multi-token models, e.g. 4 for 1024 px).
        dtype: storage dtype of latents and embeddings (``float16`` halves the size; ``float32``).
        save_encoder: keep a copy of the encoder in the cache (local / bundled encoders, see
            :func:`resolve_components`), so that models trained on it carry it.
        fields: extra item keys to store per tile (arrays, e.g. ``mask``, or strings, e.g. ``caption``).

    Example:
        >>> build_feature_cache(ds, "cache/", vae, enc, grid=2, shard_size=512)   # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if dtype not in ("float16", "float32"):
        raise InputError(f"dtype must be float16 or float32, got {dtype!r}")
    if len(dataset) == 0:
        raise InputError("no tiles to encode")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    plan = _plan(dataset, vae, encoder, grid, dtype, shard_size, tuple(fields))
    index = _start_index(root, plan, dataset, vae, encoder, grid, save_encoder)
    if index["complete"]:
        return FeatureCache(root, allow_partial=False)
    for stale in root.glob(".shard-*"):  # a killed run's unfinished shard (a hidden temporary folder)
        shutil.rmtree(stale, ignore_errors=True)
    n, num_shards = len(dataset), -(-len(dataset) // shard_size)
    done = {s["name"] for s in index["shards"]}
    bar = tqdm(total=n, initial=sum(s["count"] for s in index["shards"]), desc="features", unit="tile",
               disable=not progress)
    for k in range(num_shards):
        name = f"shard-{k:05d}"
        if name in done:
            continue
        lo, hi = k * shard_size, min((k + 1) * shard_size, n)
        arrays, meta = _encode_range(dataset, range(lo, hi), vae, encoder, grid, batch_size, device, dtype, fields)
        _write_shard(root, name, arrays, meta)
        index["shards"].append({"name": name, "count": hi - lo})
        index["shards"].sort(key=lambda s: s["name"])
        index["count"] = sum(s["count"] for s in index["shards"])
        index["complete"] = len(index["shards"]) == num_shards
        if k == 0 or "arrays" not in index or not index["arrays"]:
            index["arrays"] = {key: {"dtype": str(v.dtype), "shape": list(v.shape[1:])} for key, v in arrays.items()}
            if fields:
                index["fields"] = {f: ({"kind": "array", **index["arrays"][f]} if f in arrays else {"kind": "text"})
                                   for f in fields}
        write_json_atomic(root / INDEX_FILE, index)
        bar.update(hi - lo)
        if on_shard is not None:
            on_shard(k)
    bar.close()
    return FeatureCache(root)


def _encode_range(dataset: Any, indices: range, vae: Any, encoder: Any, grid: int, batch_size: int,
                  device: str, dtype: str, fields: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays + metadata of one shard (batches start at the shard start, so resuming is exact)."""
    parts: dict[str, list[np.ndarray]] = {}
    meta: dict[str, list[Any]] = {"paths": [], "groups": [], "mpp": []}
    extra: dict[str, list[Any]] = {f: [] for f in fields}
    labels = []
    for start in range(indices.start, indices.stop, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, indices.stop))]
        for key, value in _encode_batch(items, vae, encoder, grid, device).items():
            parts.setdefault(key, []).append(value.astype(dtype))
        labels += [int(it.get("label", -1)) for it in items]
        meta["paths"] += [str(it["path"]) for it in items]
        meta["groups"] += [str(it.get("group", it["path"])) for it in items]
        meta["mpp"] += [float(it["mpp"]) for it in items]
        for name in fields:
            if any(name not in it for it in items):
                raise InputError(f"the data has no {name!r} for some tiles", fix=f"give every item a {name!r}")
            extra[name] += [it[name] for it in items]
    arrays = {key: np.concatenate(v) for key, v in parts.items()}
    arrays["labels"] = np.asarray(labels, dtype=np.int64)
    for name, values in extra.items():
        if all(isinstance(v, str) for v in values):
            meta[name] = values
        else:
            arrays[name] = np.stack([np.asarray(v) for v in values])
    return arrays, {"count": len(labels), **meta}


def _start_index(root: Path, plan: dict[str, Any], dataset: Any, vae: Any, encoder: Any, grid: int,
                 save_encoder: bool) -> dict[str, Any]:
    """Read the index of a resumable build, or write a fresh one (with the VAE / encoder copies)."""
    path = root / INDEX_FILE
    if path.is_file():
        index = json.loads(path.read_text())
        if index.get("plan", {}).get("hash") != plan["hash"]:
            raise InputError(f"{root} holds a feature cache built from other data or settings",
                             fix="pass another --out folder, or delete the old cache")
        present = {s["name"] for s in index["shards"]}
        missing = [s for s in present if not (root / s).is_dir()]
        if missing:
            raise InputError(f"cache {root} lists shards that are missing: {', '.join(sorted(missing)[:3])}",
                             fix="delete the cache folder and build it again")
        return index
    if any(root.iterdir()):
        raise InputError(f"{root} is not empty and holds no feature cache", fix="pass an empty or new --out folder")
    with atomic_dir(root / "vae") as tmp:
        vae.save_pretrained(tmp)
    enc_rel = None
    if save_encoder:
        with atomic_dir(root / "encoder") as tmp:
            encoder.save_pretrained(tmp)
        enc_rel = "encoder"
    mpps = sorted({round(float(dataset[i]["mpp"]), 6) for i in {0, len(dataset) - 1}})
    spec = encoder.spec
    side = np.asarray(dataset[0]["image"]).shape[0] // max(grid, 1)  # pixels the encoder sees per (sub-)tile
    seen_mpp = mpps[0] * side / spec.input_size  # the encoder resizes its input to input_size
    if abs(spec.mpp - seen_mpp) / spec.mpp > 0.25:
        warnings.warn(f"the encoder sees {seen_mpp:.3g} um/px ({side} px tiles at {mpps[0]} um/px resized to "
                      f"{spec.input_size} px) but {spec.name!r} was trained at {spec.mpp} um/px",
                      stacklevel=3)
    index = {
        "format": FORMAT, "version": VERSION, "complete": False, "count": 0, "planned": plan["count"],
        "shard_size": plan["shard_size"], "shards": [], "arrays": {},
        "classes": list(getattr(dataset, "classes", [])), "grid": grid,
        "mpp": mpps[0] if len(mpps) == 1 else None, "image_size": int(dataset[0]["image"].shape[0]),
        "encoder": {"name": spec.name, "dim": int(encoder.dim), "mpp": spec.mpp, "path": enc_rel},
        "vae": {"kind": vae.kind, "latent_channels": vae.latent_channels,
                "downsample_factor": vae.downsample_factor, "path": "vae"},
        "source": str(getattr(dataset, "root", "")), "plan": plan,
    }
    write_json_atomic(path, index)
    return index


# ----------------------------------------------------------------------------- CLI
def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``pixgen features DATA --model M --out CACHE``: the training feature cache."""
    p = subparsers.add_parser(
        "features", help="encode tiles into a training feature cache (VAE latents + SSL embeddings)",
        description="Encode an image folder (class sub-folders = labels) or `pixgen tile` output into a "
                    "sharded, resumable feature cache for `pixgen train`.")
    p.add_argument("data", help="image folder or `pixgen tile` output folder")
    p.add_argument("--out", required=True, help="cache folder (re-run the same command to resume)")
    p.add_argument("--model", help="Generator directory whose VAE and encoder to use")
    p.add_argument("--vae", help="autoencoder folder or hub id (overrides the model's)")
    p.add_argument("--encoder", help="encoder registry name or saved-encoder folder (overrides the model's)")
    p.add_argument("--encoder-path", help="local weights for the encoder (registry name; gated / offline)")
    p.add_argument("--mpp", type=float, help="microns per pixel of the image files (image folders)")
    p.add_argument("--size", type=int, help="tile side in pixels (default: the images' own)")
    p.add_argument("--fit", choices=["crop", "resize"], default="crop", help="how to reach --size")
    p.add_argument("--grid", type=int, default=1, help="also store a GxG sub-tile embedding grid")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=1024, help="tiles per shard")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--token", help="hub token for gated encoders / VAEs")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run a pinned registry encoder's own hub code (never code found in a folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dataset = open_image_source(args.data, mpp=args.mpp, size=args.size, fit=args.fit)
    vae, encoder, local = resolve_components(args.model, args.vae, args.encoder, device=args.device, token=args.token,
                                             encoder_path=args.encoder_path, trust_remote_code=args.trust_remote_code)
    cache = build_feature_cache(dataset, args.out, vae, encoder, grid=args.grid, batch_size=args.batch_size,
                                shard_size=args.shard_size, dtype=args.dtype, device=args.device,
                                save_encoder=local)
    print(f"feature cache {args.out}: {len(cache)} tiles, latents {cache.latent_shape}, "
          f"{cache.encoder_name} dim {cache.dim}, grid {cache.grid}, classes {cache.classes or 'none'}")
    return 0
