"""Train pixgen's bundled H&E autoencoder: a small diffusers ``AutoencoderKL`` (f4, 4 channels, 2.6 M).

Loss: L1 + (1 - SSIM) + image-gradient L1 (a download-free perceptual proxy; no VGG-LPIPS)
+ a small KL term; an optional patch-GAN (off by default). Crops come from the LC25000,
CoNSeP and MoNuSeg training splits; reconstruction PSNR / SSIM is reported per source on the
held-out splits (CoNSeP test, MoNuSeg test, LC25000 grouped test split). After training, the
latent scaling factor (1 / std) and shift (mean) are written into the model config (SD3
convention: ``latents = (z - shift) * scale``), so `pixgen.models.autoencoders.Autoencoder`
uses them as is. Sizes and step counts come from ``docs/compute-plan.md``.

The module also holds the pieces `training.ssl` shares: data sources and the LC25000 grouped
split, reading pre-engine checkpoints safely, and the learning-rate schedule. Both train on the
engine (:class:`training.engine.Engine`): one checkpoint format, one log writer.

Example:
    $ nice -n 19 python -m training.autoencoder --data /work/shared/data --out /work/runs/ae-f4c4 \\
          --max-steps 4000 --threads 1
    $ python -m training.autoencoder --data /work/shared/data --out /work/runs/ae-f4c4 --resume
    $ python -m training.autoencoder --data /work/shared/data --out /work/runs/ae-f4c4 --eval-only \\
          --eval-limit 0 --export pixgen/weights/pixgen-ae-f4c4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pixgen.errors import InputError
from pixgen.io import load_rgb, write_text_atomic
from training.dataclass_cli import add_dataclass_flags, add_run_flags, saved_config
from training.engine import CsvLog, Engine, EngineConfig, Task, list_checkpoints

__all__ = [
    "AEConfig",
    "CropSampler",
    "SOURCES",
    "build_autoencoder",
    "evaluate_autoencoder",
    "latent_stats",
    "lc25000_split",
    "load_checkpoint",
    "main",
    "has_checkpoint",
    "latest_weights",
    "source_files",
    "train_autoencoder",
]

# Source -> microns per pixel. CoNSeP and MoNuSeg are 40x scans (~0.25 um/px). LC25000 states
# no resolution; nuclei measure ~15-20 px across in its 224 px images, i.e. ~0.5 um/px (assumed).
SOURCES: dict[str, float] = {"lc25000": 0.5, "consep": 0.25, "monuseg": 0.25}
LC_CLASSES = ("lung_aca", "lung_n", "lung_scc")


# --- data ---------------------------------------------------------------------------------------
def lc25000_split(root: str | Path, cache: str | Path | None = None, seed: int = 0) -> dict[str, Any]:
    """LC25000 split into train / test with near-duplicates kept on one side.

    Uses ``training.data.splits.lc25000_grouped_split`` (train / val / test, 70/15/15, grouped
    by near-duplicate detection) when that module exists; otherwise
    (``method`` = ``"fallback-kmeans-colour-radial"``) groups images per class by k-means on
    a rotation- and flip-insensitive descriptor (colour histograms + radial colour profile of
    a 56 px thumbnail, which puts LC25000's rotated/flipped copies of one original together)
    and assigns whole clusters, ~20 % of images, to test. ``cache`` (a JSON file) is read if it
    exists and written otherwise, so that every run uses the same split.

    Returns ``{"method", "train": [[path, label], ...], "test": [...], ...}`` (plus ``"val"`` from
    the project split, ``"leakage"`` from the fallback).

    Example:
        >>> split = lc25000_split("../shared/data/lc25000-lung", cache="runs/lc_split.json")  # doctest: +SKIP
        >>> len(split["train"]), len(split["test"])                                          # doctest: +SKIP
        (11376, 2847)
    """
    if cache is not None and Path(cache).is_file():
        return json.loads(Path(cache).read_text())
    split = _colleague_split(Path(root)) or _fallback_split(Path(root), seed)
    if cache is not None:
        write_text_atomic(Path(cache), json.dumps(split))
    return split


def _colleague_split(root: Path) -> dict[str, Any] | None:
    """The project's grouped split (`training.data.splits.lc25000_grouped_split`), or None if absent."""
    try:
        from training.data.splits import lc25000_grouped_split
    except ImportError:
        return None
    try:
        gs = lc25000_grouped_split(root)
        split: dict[str, Any] = {"method": "training.data.splits.lc25000_grouped_split",
                                 "info": {k: str(v) for k, v in gs.info.items()}}
        for name, idx in gs.splits.items():
            split[name] = [[str(gs.paths[i]), LC_CLASSES.index(gs.class_names[gs.labels[i]])] for i in idx]
        return split
    except Exception as err:  # an interface change there must not stop training: say so, fall back
        warnings.warn(f"lc25000_grouped_split could not be used ({err}); using the k-means fallback", stacklevel=2)
        return None


def _thumb_descriptor(path: Path) -> np.ndarray:
    """66 numbers per image: 16-bin RGB histograms + 6-ring radial RGB means of a 56 px thumbnail."""
    with Image.open(path) as img:
        img.draft("RGB", (56, 56))  # JPEG DCT scaling: fast decode
        a = np.asarray(img.convert("RGB").resize((56, 56)), np.float32) / 255.0
    yy, xx = np.mgrid[:56, :56]
    ring = np.minimum((np.hypot(yy - 27.5, xx - 27.5) / 28 * 6).astype(int), 6).ravel()
    counts = np.bincount(ring, minlength=7)[:6]
    hist = [np.histogram(a[..., c], 16, (0, 1))[0] / (56 * 56) for c in range(3)]
    radial = [np.bincount(ring, a[..., c].ravel(), 7)[:6] / counts for c in range(3)]
    return np.concatenate(hist + radial)


def _fallback_split(root: Path, seed: int, test_fraction: float = 0.2, per_cluster: int = 80) -> dict[str, Any]:
    from sklearn.cluster import KMeans
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(seed)
    split: dict[str, Any] = {"method": "fallback-kmeans-colour-radial", "train": [], "test": []}
    descs, sides = [], []
    for label, cls in enumerate(LC_CLASSES):
        paths = sorted((root / cls).glob("*.jp*g"))
        d = np.stack([_thumb_descriptor(p) for p in paths])
        z = (d - d.mean(0)) / (d.std(0) + 1e-6)
        k = max(2, len(paths) // per_cluster)
        groups = KMeans(k, n_init=3, random_state=seed).fit_predict(z)
        order = rng.permutation(k)
        sizes = np.bincount(groups, minlength=k)[order]
        test_groups = set(order[: int(np.searchsorted(np.cumsum(sizes), test_fraction * len(paths))) + 1])
        for p, g, zi in zip(paths, groups, z):
            side = "test" if g in test_groups else "train"
            split[side].append([str(p), label])
            descs.append(zi)
            sides.append(side == "test")
    # leakage check: how often is a test image's nearest neighbour (descriptor) a train image?
    z, is_test = np.stack(descs), np.array(sides)
    _, idx = NearestNeighbors(n_neighbors=2).fit(z).kneighbors(z[is_test])
    split["leakage"] = {
        "test_nn_in_train": float((~is_test[idx[:, 1]]).mean()),
        "expected_if_random": float((~is_test).mean()),
    }
    return split


def source_files(data: str | Path, split: str, lc_split: dict[str, Any] | None = None) -> dict[str, list[Path]]:
    """Image files per source for ``split`` ("train" or "test").

    Example:
        >>> files = source_files("../shared/data", "test", lc25000_split(...))  # doctest: +SKIP
        >>> sorted(files)                                                     # doctest: +SKIP
        ['consep', 'lc25000', 'monuseg']
    """
    data = Path(data)
    files = {
        "consep": sorted((data / "consep" / split / "images").glob("*.jpg")),
        "monuseg": sorted((data / "monuseg" / split / "images").glob("*.jpg")),
    }
    if lc_split is not None:
        files["lc25000"] = [Path(p) for p, _ in lc_split[split]]
    return files


def augment_d4(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flip and 90-degree rotation of an (H, W, C) array (one of the 8 symmetries).

    Example:
        >>> augment_d4(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0)).shape
        (8, 8, 3)
    """
    img = np.rot90(img, int(rng.integers(4)))
    return np.ascontiguousarray(img[:, ::-1] if rng.random() < 0.5 else img)


class CropSampler:
    """Random square crops from several sources, with flips and 90-degree rotations.

    Small sources are held in memory; sources with more than ``preload_limit`` files are decoded
    on the fly (a 224 px JPEG decodes in ~2 ms, nothing next to a training step).

    Example:
        >>> sampler = CropSampler({"consep": consep_files}, crop=128)  # doctest: +SKIP
        >>> sampler.batch(4, np.random.default_rng(0)).shape          # doctest: +SKIP
        (4, 128, 128, 3)
    """

    def __init__(self, files: dict[str, Sequence[Path]], crop: int, weights: dict[str, float] | None = None,
                 preload_limit: int = 1000):
        self.files = {k: list(v) for k, v in files.items() if len(v)}
        if not self.files:
            raise ValueError("no training images found")
        self.crop = crop
        w = np.array([(weights or {}).get(k, 1.0) for k in self.files], dtype=float)
        self.names, self.probs = list(self.files), w / w.sum()
        self.cache = {k: [load_rgb(p) for p in v] for k, v in self.files.items() if len(v) <= preload_limit}

    def image(self, source: str, rng: np.random.Generator) -> np.ndarray:
        """One random whole image of ``source`` (uint8 HWC)."""
        i = int(rng.integers(len(self.files[source])))
        return self.cache[source][i] if source in self.cache else load_rgb(self.files[source][i])

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One augmented crop (uint8 (crop, crop, 3)) from a random source."""
        img = self.image(self.names[int(rng.choice(len(self.names), p=self.probs))], rng)
        h, w = img.shape[:2]
        if min(h, w) < self.crop:
            img = np.asarray(Image.fromarray(img).resize((max(w, self.crop), max(h, self.crop)), Image.BICUBIC))
            h, w = img.shape[:2]
        y, x = int(rng.integers(h - self.crop + 1)), int(rng.integers(w - self.crop + 1))
        return augment_d4(img[y : y + self.crop, x : x + self.crop], rng)

    def batch(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, crop, crop, 3) uint8."""
        return np.stack([self.sample(rng) for _ in range(n)])


def to_model(batch: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# --- run bookkeeping (shared with training.ssl) --------------------------------------------------
def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """A pre-engine ``RUN/checkpoint.pt``, or None when there is none. Read with
    ``torch.load(weights_only=True)``, which refuses pickled objects (tensors, numbers, strings
    and containers only): a planted object is an error, never run."""
    legacy = Path(run_dir) / "checkpoint.pt"
    if not legacy.is_file():
        return None
    try:
        return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for anything but tensors and plain containers
        raise InputError(f"cannot read {legacy} safely ({type(err).__name__})",
                         fix="start a new run (--out elsewhere)") from None


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint: the engine's, or a pre-engine ``checkpoint.pt``."""
    return bool(list_checkpoints(run_dir)) or (Path(run_dir) / "checkpoint.pt").is_file()


def latest_weights(run_dir: str | Path, module: str, ema: bool) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """(step, weights of ``module``, saved config) of a run's latest checkpoint: the engine's (EMA
    weights when ``ema``, else the raw ones, prefix ``module.`` removed), else a pre-engine
    ``checkpoint.pt`` (its ``module`` entry, read safely by :func:`load_checkpoint`)."""
    from training.engine import load_tensors_and_state

    run_dir = Path(run_dir)
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        tensors, state = load_tensors_and_state(checkpoints[-1])
        weights = tensors["ema"] if ema and "ema" in tensors else tensors["model"]
        prefix = module + "."
        picked = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        return int(state["step"]), picked, json.loads((run_dir / "config.json").read_text())
    ckpt = load_checkpoint(run_dir)
    if ckpt is None:
        raise InputError(f"no checkpoint in {run_dir}", fix="train first (same --out)")
    return int(ckpt["step"]), ckpt[module if module != "vae" else "ema"], ckpt["config"]


def warmup_cosine(step: int, total: int, warmup: int, final: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``final``.

    Example:
        >>> warmup_cosine(0, 100, 10), warmup_cosine(100, 100, 10)
        (0.1, 0.1)
    """
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))


# --- model and losses ------------------------------------------------------------------------------
@dataclass
class AEConfig:
    """Autoencoder training run; CLI flags override these fields (see ``docs/compute-plan.md``).

    Example:
        >>> AEConfig(data="../shared/data", out="runs/ae", max_steps=10).crop
        128
    """

    data: str = "../shared/data"
    out: str = "runs/autoencoder"
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 16
    mid_attention: bool = False
    crop: int = 128
    batch_size: int = 8
    max_steps: int = 4000
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    ssim_weight: float = 0.2
    grad_weight: float = 0.5
    kl_weight: float = 1e-6  # per image, on KL summed over latents / pixels summed (LDM convention)
    gan_weight: float = 0.0  # > 0 turns the patch-GAN on (from gan_start)
    gan_start: int = 1000
    source_weights: dict[str, float] = field(default_factory=lambda: {"lc25000": 1.0, "consep": 1.0, "monuseg": 1.0})
    bf16: bool = True  # autocast; 1.6x faster than fp32 on this CPU (avx512_bf16)
    threads: int = 1
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 250  # steps
    eval_every: int = 500
    eval_limit: int = 16  # images per source in periodic evaluations (0 = all)
    lc_split: str | None = None  # a split JSON; default <out>/lc25000_split.json, computed once


def build_autoencoder(cfg: AEConfig) -> nn.Module:
    """A diffusers ``AutoencoderKL`` sized by ``cfg`` (downsampling factor 2**(levels-1)).

    Example:
        >>> ae = build_autoencoder(AEConfig())
        >>> round(sum(p.numel() for p in ae.parameters()) / 1e6, 2)
        2.57
    """
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_attention,
        sample_size=cfg.crop,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Differentiable SSIM map (Gaussian window) for images in [-1, 1], shape (N, C, H', W').

    Example:
        >>> x = torch.rand(1, 3, 16, 16)
        >>> float(ssim_map(x, x).mean())
        1.0
    """
    g = torch.exp(-((torch.arange(window, dtype=x.dtype) - window // 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    k = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, k, groups=x.shape[1])

    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2  # data range 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences (edge / texture sharpness).

    Example:
        >>> float(gradient_l1(torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)))
        0.0
    """
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(x) - dx(y)).abs().mean() + (dy(x) - dy(y)).abs().mean()


class PatchDiscriminator(nn.Sequential):
    """Small PatchGAN (70 px receptive field style, 3 strided convs); optional, off by default."""

    def __init__(self, width: int = 32):
        super().__init__(
            nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.GroupNorm(8, 2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.GroupNorm(8, 4 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * width, 1, 3, 1, 1),
        )


def reconstruction_loss(model: nn.Module, x: torch.Tensor, cfg: AEConfig, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Forward pass and loss terms: returns (loss, named terms as 0-d tensors, reconstruction).
    The posterior sample draws from ``generator`` (the global RNG when None)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        post = model.encode(x).latent_dist
        rec = model.decode(post.sample(generator)).sample.float()
    l1 = (rec - x).abs().mean()
    ssim = ssim_map(rec, x).mean()
    grad = gradient_l1(rec, x)
    kl = post.kl().float().sum() / x.numel()  # KL summed per image, over pixels summed per image
    loss = l1 + cfg.ssim_weight * (1 - ssim) + cfg.grad_weight * grad + cfg.kl_weight * kl
    terms = {"loss": loss.detach(), "l1": l1.detach(), "ssim": ssim.detach(), "grad": grad.detach(), "kl": kl.detach()}
    return loss, terms, rec


# --- evaluation ----------------------------------------------------------------------------------
def eval_images(files: dict[str, list[Path]], limit: int, size: int = 256) -> dict[str, list[np.ndarray]]:
    """Held-out images per source: whole LC25000 (224 px) and CoNSeP (256 px) tiles, MoNuSeg
    (1000 px) cut into non-overlapping ``size`` tiles. ``limit`` > 0 takes an even subset."""
    out: dict[str, list[np.ndarray]] = {}
    for name, paths in files.items():
        if limit and len(paths) > limit:
            paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
        images = [load_rgb(p) for p in paths]
        if name == "monuseg":
            images = [im[y : y + size, x : x + size] for im in images
                      for y in range(0, im.shape[0] - size + 1, size) for x in range(0, im.shape[1] - size + 1, size)]
            if limit and len(images) > limit:
                images = [images[i] for i in np.linspace(0, len(images) - 1, limit).round().astype(int)]
        out[name] = images
    return out


@torch.no_grad()
def evaluate_autoencoder(model: nn.Module, images: dict[str, list[np.ndarray]], batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Reconstruction PSNR (dB) and SSIM (skimage.metrics, uint8) per source.

    The encoder's posterior mode is decoded, as `pixgen.models.autoencoders.Autoencoder` does.

    Example:
        >>> evaluate_autoencoder(ae, {"consep": [tile]})  # doctest: +SKIP
        {'consep': {'psnr': 29.1, 'ssim': 0.87, 'n': 1}}
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    model.eval()
    results = {}
    for name, ims in images.items():
        psnr, ssim = [], []
        for i in range(0, len(ims), batch_size):
            batch = np.stack(ims[i : i + batch_size])
            rec = to_uint8(model.decode(model.encode(to_model(batch)).latent_dist.mode()).sample)
            for a, b in zip(batch, rec):
                psnr.append(peak_signal_noise_ratio(a, b, data_range=255))
                ssim.append(structural_similarity(a, b, data_range=255, channel_axis=-1))
        results[name] = {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "n": len(ims)}
    return results


@torch.no_grad()
def latent_stats(model: nn.Module, sampler: CropSampler, n: int = 256, batch_size: int = 16, seed: int = 1) -> tuple[float, float]:
    """(scaling_factor, shift_factor) = (1 / std, mean) of posterior-mode latents of training crops.

    Example:
        >>> scale, shift = latent_stats(ae, sampler, n=64)  # doctest: +SKIP
    """
    rng = np.random.default_rng(seed)
    zs = [model.encode(to_model(sampler.batch(min(batch_size, n - i), rng))).latent_dist.mode()
          for i in range(0, n, batch_size)]
    z = torch.cat(zs).double()
    return float(1.0 / z.std()), float(z.mean())


# --- training ------------------------------------------------------------------------------------
class _Crops(torch.utils.data.Dataset):
    """Random augmented training crops as a dataset: item ``i`` is drawn with its own seed
    ``(seed, i)``, so the data is a pure function of the index (the engine shuffles the indices)."""

    LENGTH = 1 << 20  # more crops per "epoch" than a run draws

    def __init__(self, sampler: CropSampler, seed: int):
        self.sampler, self.seed = sampler, seed

    def __len__(self) -> int:
        return self.LENGTH

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_model(self.sampler.sample(np.random.default_rng([self.seed, index]))[None])[0]  # (3, crop, crop)


class _AutoencoderGAN(nn.Module):
    """The autoencoder (+ the optional patch discriminator) as one module whose forward returns the
    loss, so that accelerate's wrappers (DDP) see every parameter used."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        self.vae = build_autoencoder(cfg)
        self.disc = PatchDiscriminator() if cfg.gan_weight > 0 else None

    def forward(self, x: torch.Tensor, generator: torch.Generator, use_gan: bool) -> tuple[torch.Tensor, dict[str, float]]:
        loss, tensors, rec = reconstruction_loss(self.vae, x, self.cfg, generator)
        terms = {k: float(v) for k, v in tensors.items()}
        if use_gan:
            # the generator term reaches the autoencoder only (the discriminator's weights are
            # detached for it); the hinge term trains the discriminator on detached reconstructions
            frozen = {k: v.detach() for k, v in self.disc.named_parameters()}
            g_loss = -torch.func.functional_call(self.disc, frozen, (rec,)).mean()
            d_loss = F.relu(1 - self.disc(x)).mean() + F.relu(1 + self.disc(rec.detach())).mean()
            loss = loss + self.cfg.gan_weight * g_loss + d_loss
            terms.update(g=float(g_loss.detach()), d=float(d_loss.detach()))
        return loss, terms


class AutoencoderTask(Task):
    """The autoencoder on the training engine: random crops, L1 + SSIM + gradient + KL (+ patch-GAN),
    warm-up + cosine LR, EMA; ``sample_every`` = ``eval_every`` logs held-out PSNR / SSIM to eval.csv.

    Example:
        >>> Engine(AutoencoderTask(AEConfig(out="runs/ae", max_steps=10)), "runs/ae").fit()   # doctest: +SKIP
    """

    log_fields = ("l1", "ssim", "grad", "kl")

    def __init__(self, cfg: AEConfig):
        self.ae = cfg
        self.cfg = EngineConfig(
            lr=cfg.lr, weight_decay=cfg.weight_decay, adam_betas=(0.9, 0.99), max_grad_norm=1.0,
            batch_size=cfg.batch_size, max_steps=cfg.max_steps, mixed_precision="no",  # bf16: the loss's own autocast
            ema_decay=cfg.ema_decay, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every, keep_checkpoints=2,
            sample_every=cfg.eval_every, log_every=cfg.log_every, tensorboard=False, warmup_steps=cfg.warmup)
        self.lr_lambda = lambda step: warmup_cosine(step, cfg.max_steps, cfg.warmup)
        self.first_loss = self.last_loss = None

    def configure(self, engine) -> None:
        self.split = lc25000_split(Path(self.ae.data) / "lc25000-lung",
                                   cache=self.ae.lc_split or Path(engine.out) / "lc25000_split.json")

    def setup(self, engine) -> None:
        self.engine = engine
        cfg = self.ae
        self.crops = _Crops(CropSampler(source_files(cfg.data, "train", self.split), cfg.crop, cfg.source_weights), cfg.seed)
        self.held_out = eval_images(source_files(cfg.data, "test", self.split), cfg.eval_limit) if cfg.eval_every else {}
        self.eval_log = None  # opened at the first evaluation, when the resumed step is known
        self._model = _AutoencoderGAN(cfg)

    def model(self) -> nn.Module:
        return self._model

    def dataset(self) -> torch.utils.data.Dataset:
        return self.crops

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        groups = [{"params": list(model.vae.parameters())}]
        if model.disc is not None:
            groups.append({"params": list(model.disc.parameters()), "betas": (0.5, 0.9)})
        return groups

    def loss(self, model, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        use_gan = self.ae.gan_weight > 0 and self.engine.step >= self.ae.gan_start
        loss, terms = model(batch, generator, use_gan)
        self.first_loss = terms["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = terms["loss"]
        return loss, {k: v for k, v in terms.items() if k != "loss"}

    def sample(self, engine, model):
        """Held-out PSNR / SSIM of the EMA weights -> eval.csv (no image grid)."""
        if self.eval_log is None and engine.accelerator.is_main_process:
            self.eval_log = CsvLog(engine.out / "eval.csv", ["step"], engine.start_step if engine.resume else None)
        results = evaluate_autoencoder(model.vae, self.held_out)
        model.vae.train()
        if self.eval_log is not None:
            _log_eval(self.eval_log, engine.step, results)
        return None

    def export(self, engine, state: dict[str, torch.Tensor], folder: Path) -> None:
        """RUN/final: the EMA autoencoder (fp32; ``--eval-only --export`` sets its latent scale)."""
        vae = build_autoencoder(self.ae)
        vae.load_state_dict({k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")})
        vae.save_pretrained(folder, safe_serialization=True)

    def run_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.ae)

    @property
    def resumable(self) -> frozenset[str]:
        return frozenset({"max_steps", "log_every", "checkpoint_every", "eval_every", "eval_limit", "threads",
                          "data", "lc_split"})


def train_autoencoder(cfg: AEConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or continue) a run in ``cfg.out`` on the training engine: ``log.csv``, ``eval.csv``,
    ``checkpoints/``, ``final/`` (EMA weights).

    Returns ``{"step", "first_loss", "last_loss", "final"}``. With ``resume`` the run continues
    from its latest checkpoint (same config; ``max_steps`` may be raised).

    Example:
        >>> train_autoencoder(AEConfig(data="../shared/data", out="runs/ae", max_steps=3000))  # doctest: +SKIP
    """
    torch.set_num_threads(cfg.threads)
    if resume and not list_checkpoints(cfg.out) and has_checkpoint(cfg.out):
        raise InputError(f"{cfg.out} holds a checkpoint of the pre-engine trainer, which cannot be continued",
                         fix=f"export its weights: python -m training.autoencoder --out {cfg.out} --eval-only --export DIR")
    task = AutoencoderTask(cfg)
    final = Engine(task, cfg.out, resume=resume).fit()
    return {"step": cfg.max_steps, "first_loss": task.first_loss, "last_loss": task.last_loss, "final": final}


def _log_eval(log: CsvLog, step: int, results: dict[str, dict[str, float]]) -> None:
    row: dict[str, Any] = {"step": step}
    for name, r in sorted(results.items()):
        row.update({f"{name}_psnr": round(r["psnr"], 3), f"{name}_ssim": round(r["ssim"], 4), f"{name}_n": r["n"]})
    log.append(row)
    print(json.dumps(row), file=sys.stderr)


def finalize(cfg: AEConfig, export: str | None, eval_limit: int) -> dict[str, Any]:
    """Evaluate the EMA weights of ``cfg.out``'s checkpoint, set the latent scale / shift and
    optionally export the model (fp16 safetensors + config.json) for `load_autoencoder`.

    Example:
        >>> finalize(AEConfig(out="runs/ae"), export="pixgen/weights/pixgen-ae-f4c4", eval_limit=0)  # doctest: +SKIP
    """
    torch.set_num_threads(cfg.threads)
    step, ema, saved = latest_weights(cfg.out, "vae", ema=True)
    cfg = _config_from_dict({**saved, "out": cfg.out, "data": cfg.data})
    model = build_autoencoder(cfg)
    model.load_state_dict(ema)
    model.eval()
    split = lc25000_split(Path(cfg.data) / "lc25000-lung", cache=cfg.lc_split or Path(cfg.out) / "lc25000_split.json")
    sampler = CropSampler(source_files(cfg.data, "train", split), 256, cfg.source_weights)
    scale, shift = latent_stats(model, sampler)
    model.register_to_config(scaling_factor=scale, shift_factor=shift)
    results = evaluate_autoencoder(model, eval_images(source_files(cfg.data, "test", split), eval_limit))
    report = {"step": step, "scaling_factor": scale, "shift_factor": shift, "eval": results,
              "split_method": split["method"], "split_leakage": split.get("leakage")}
    write_text_atomic(Path(cfg.out) / "final_metrics.json", json.dumps(report, indent=2) + "\n")
    if export:
        model.to(torch.float16).save_pretrained(export, safe_serialization=True)
    return report


# --- CLI -------------------------------------------------------------------------------------------
def _config_from_dict(data: dict[str, Any]) -> AEConfig:
    known = {f.name for f in dataclasses.fields(AEConfig)}
    data = {k: v for k, v in data.items() if k in known}
    if "block_out_channels" in data:
        data["block_out_channels"] = tuple(data["block_out_channels"])
    return AEConfig(**data)


def build_parser() -> argparse.ArgumentParser:
    """CLI: every `AEConfig` field is a ``--flag``; plus ``--resume``, ``--eval-only``, ``--export``."""
    p = argparse.ArgumentParser(prog="python -m training.autoencoder", description=__doc__.split("\n")[0])
    add_dataclass_flags(p, AEConfig, int_lists=("block_out_channels",))
    add_run_flags(p, ", set latent scale/shift", "model")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m training.autoencoder``."""
    args = vars(build_parser().parse_args(argv))
    resume, eval_only, export = args.pop("resume"), args.pop("eval_only"), args.pop("export")
    base = saved_config(args["out"] or AEConfig.out, resume or eval_only)
    cfg = _config_from_dict({**base, **{k: v for k, v in args.items() if v is not None}})
    if eval_only:
        print(json.dumps(finalize(cfg, export, cfg.eval_limit), indent=2))
        return 0
    result = train_autoencoder(cfg, resume=resume)
    print(json.dumps({k: result[k] for k in ("step", "first_loss", "last_loss")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
