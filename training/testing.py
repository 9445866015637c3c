"""Tiny, seeded training inputs for tests, benchmarks and smoke runs (seconds on a CPU).

Example:
    >>> folder = tiny_image_folder("../shared/data/lc25000-lung", "tmp/images", per_class=4)  # doctest: +SKIP
    >>> enc_dir = save_tiny_encoder("tmp/encoder")                                          # doctest: +SKIP
    $ pixgen features tmp/images --mpp 2.0 --vae tmp/vae --encoder tmp/encoder --out tmp/cache
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixgen.errors import InputError

__all__ = ["tiny_encoder", "save_tiny_encoder", "tiny_image_folder", "tiny_inputs", "tiny_cache", "synthetic_cache"]

TINY_DIM = 32


def tiny_encoder(size: int = 32, dim: int = TINY_DIM, seed: int = 0, name: str = "tiny-ssl"):
    """A random 1-block timm ViT behind pixgen's `Encoder` interface (dim 32, 32 px input).

    Example:
        >>> tiny_encoder().embed(np.zeros((2, 32, 32, 3), np.uint8)).shape
        torch.Size([2, 32])
    """
    import timm

    from pixgen.encoders import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, TimmEncoder

    args = {"img_size": size, "patch_size": 16, "embed_dim": dim, "depth": 1, "num_heads": 2}
    torch.manual_seed(seed)
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    spec = EncoderSpec(name=name, dim=dim, input_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=3.5,
                       source="bundled", library="timm", description="random test encoder")
    hub_config = {"architecture": "vit_tiny_patch16_224", "num_classes": 0, "num_features": dim, "model_args": args}
    return TimmEncoder(spec, backbone, hub_config).eval()


def save_tiny_encoder(directory: str | Path, **kwargs) -> Path:
    """Save :func:`tiny_encoder` so that ``load_encoder(directory)`` (and ``--encoder DIR``) loads it."""
    return tiny_encoder(**kwargs).save_pretrained(directory)


def tiny_image_folder(source: str | Path, out: str | Path, per_class: int = 8, size: int = 32,
                      classes: list[str] | None = None) -> Path:
    """Copy the first ``per_class`` images of each class folder of ``source``, resized to ``size``.

    224 px LC25000 tiles at 0.5 um/px become 32 px tiles at 3.5 um/px (the folder records it in
    ``mpp.json``; pass ``--mpp 3.5``).
    """
    source, out = Path(source), Path(out)
    names = classes or sorted(p.name for p in source.iterdir() if p.is_dir())
    if not names:
        raise InputError(f"no class folders in {source}")
    scales = set()
    for name in names:
        files = sorted(p for p in (source / name).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        (out / name).mkdir(parents=True, exist_ok=True)
        for f in files[:per_class]:
            with Image.open(f) as img:
                scales.add(size / min(img.size))
                img.convert("RGB").resize((size, size), Image.Resampling.LANCZOS).save(out / name / f"{f.stem}.png")
    if len(scales) != 1:
        raise InputError(f"expected square source tiles of one size in {source}, found scales {sorted(scales)}")
    scale = scales.pop()
    (out / "mpp.json").write_text(json.dumps({"mpp_source": 0.5, "scale": scale, "mpp": round(0.5 / scale, 4)}))
    return out


def tiny_inputs(root: str | Path, source: str | Path, per_class: int = 16) -> dict[str, Path]:
    """Everything ``pixgen features`` needs, tiny: 32 px real tiles, an f4 VAE and an encoder folder.

    Returns ``{"images", "vae", "encoder"}`` paths under ``root`` (tiles at 3.5 um/px).
    """
    from pixgen.testing import tiny_autoencoder

    root = Path(root)
    paths = {"images": root / "images", "vae": root / "vae", "encoder": root / "encoder"}
    tiny_image_folder(source, paths["images"], per_class=per_class)
    tiny_autoencoder().save_pretrained(paths["vae"])
    save_tiny_encoder(paths["encoder"])
    return paths


def tiny_cache(root: str | Path, source: str | Path, per_class: int = 16, grid: int = 1, shard_size: int = 1024):
    """A feature cache of :func:`tiny_inputs` (latents 4 x 8 x 8, embeddings 32-d); returns its path."""
    from training.features import build_feature_cache, open_image_source, resolve_components

    paths = tiny_inputs(root, source, per_class)
    vae, enc, local = resolve_components(vae=str(paths["vae"]), encoder=str(paths["encoder"]))
    dataset = open_image_source(paths["images"], mpp=3.5)
    build_feature_cache(dataset, Path(root) / "cache", vae, enc, grid=grid, shard_size=shard_size,
                        save_encoder=local, progress=False)
    return Path(root) / "cache"


def synthetic_cache(out: str | Path, n: int = 64, latent: tuple[int, int, int] = (4, 8, 8), dim: int = TINY_DIM,
                    classes: tuple[str, ...] = ("a", "b"), grid: int = 1, seed: int = 0) -> Path:
    """A feature cache of random latents and embeddings (benchmarks; no images needed).

    Written by the real writer: each "image" carries its row number in its pixels, and a
    pass-through "VAE" and "encoder" look the row's random arrays up. The stored VAE is
    ``PixelSpace(C)``, so samples cannot be decoded to RGB unless C = 3.
    """
    from pixgen.models.autoencoders import Autoencoder, PixelSpace
    from training.features import build_feature_cache

    channels, h, w = latent
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((n, channels, h, w)).astype(np.float32)
    emb = rng.standard_normal((n, grid * grid, dim)).astype(np.float32)

    def rows(images: torch.Tensor) -> np.ndarray:  # uint8 (B, 3, H, W) -> row numbers
        px = images[:, :2, 0, 0].long()
        return (px[:, 0] * 256 + px[:, 1]).numpy()

    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            self.classes = list(classes)
            self.paths = [f"row{i}" for i in range(n)]
            self.labels = [i % len(classes) for i in range(n)]

        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict:
            image = np.zeros((h, w, 3), np.uint8)
            image[..., 0], image[..., 1] = i // 256, i % 256
            return {"image": image, "label": self.labels[i], "path": self.paths[i], "mpp": 0.5}

    class Vae(Autoencoder):
        def encode(self, images: torch.Tensor) -> torch.Tensor:  # images in [-1, 1]
            return torch.from_numpy(latents[rows(((images + 1) * 127.5).round().to(torch.uint8))])

    class Enc(torch.nn.Module):
        spec = type("Spec", (), {"name": "synthetic", "mpp": 0.5, "source": "synthetic", "input_size": h})()

        def __init__(self):
            super().__init__()
            self.dim = dim

        def embed(self, images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(emb[rows(images)].mean(1))

        def embed_grid(self, images: torch.Tensor, grid: int) -> torch.Tensor:
            return torch.from_numpy(emb[rows(images)])

    build_feature_cache(Rows(), out, Vae(PixelSpace(channels)), Enc(), grid=grid, batch_size=64,
                        dtype="float32", progress=False)
    return Path(out)
