"""Autoencoders behind one small interface: images in [-1, 1] <-> scaled latents.

Three kinds: diffusers ``AutoencoderKL`` (SD / SD3.5 VAEs; scaling and shift factors read from
its config), diffusers ``AutoencoderTiny`` (TAESD-style; its own latent scaling), and
``PixelSpace`` (identity, for pixel-space diffusion and tests).

Example:
    >>> ae = Autoencoder(PixelSpace())
    >>> ae.encode(torch.zeros(1, 3, 8, 8)).shape
    torch.Size([1, 3, 8, 8])
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from pixgen.errors import ModelLoadError

__all__ = ["Autoencoder", "PixelSpace", "load_autoencoder", "AUTOENCODER_CLASSES"]


class PixelSpace(ModelMixin, ConfigMixin):
    """Identity autoencoder: the "latents" are the pixels (3 channels, factor 1)."""

    @register_to_config
    def __init__(self, channels: int = 3):
        super().__init__()
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)


AUTOENCODER_CLASSES: dict[str, type] = {
    "AutoencoderKL": AutoencoderKL,
    "AutoencoderTiny": AutoencoderTiny,
    "PixelSpace": PixelSpace,
}


class Autoencoder(nn.Module):
    """Uniform wrapper: ``encode`` gives diffusion-ready latents, ``decode`` inverts it.

    For ``AutoencoderKL`` latents are ``(z - shift_factor) * scaling_factor`` (shift 0 when the
    config has none), the SD3 convention. ``encode`` takes the posterior mode unless
    ``sample=True``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def kind(self) -> str:
        return type(self.model).__name__

    @property
    def latent_channels(self) -> int:
        cfg = self.model.config
        return cfg.channels if isinstance(self.model, PixelSpace) else cfg.latent_channels

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along one side."""
        if isinstance(self.model, PixelSpace):
            return 1
        cfg = self.model.config
        blocks = cfg.encoder_block_out_channels if isinstance(self.model, AutoencoderTiny) else cfg.block_out_channels
        return 2 ** (len(blocks) - 1)  # one stride-2 stage between consecutive blocks

    def _factors(self) -> tuple[float, float]:
        cfg = self.model.config
        if isinstance(self.model, AutoencoderKL):
            return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)
        return 1.0, 0.0

    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) scaled latents."""
        if isinstance(self.model, PixelSpace):
            return images
        if isinstance(self.model, AutoencoderTiny):
            return self.model.encode(images).latents
        dist = self.model.encode(images).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        scale, shift = self._factors()
        return (z - shift) * scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, H, W) images in about [-1, 1]."""
        if isinstance(self.model, PixelSpace):
            return latents
        if isinstance(self.model, AutoencoderTiny):
            return self.model.decode(latents).sample
        scale, shift = self._factors()
        return self.model.decode(latents / scale + shift).sample

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` + safetensors, loadable by :func:`load_autoencoder`."""
        self.model.save_pretrained(directory)


def _class_name(directory: Path) -> str:
    config = directory / "config.json"
    if not config.is_file():
        raise ModelLoadError(
            f"no autoencoder config at {config}",
            fix="pass the folder that holds the VAE's config.json and weights (e.g. .../vae)",
        )
    name = json.loads(config.read_text()).get("_class_name", "AutoencoderKL")
    if name not in AUTOENCODER_CLASSES:
        raise ModelLoadError(
            f"unsupported autoencoder class {name!r} in {config}",
            fix=f"use one of {', '.join(AUTOENCODER_CLASSES)}",
        )
    return name


def load_autoencoder(
    path_or_id: str | Path,
    subfolder: str | None = None,
    token: str | None = None,
    local_files_only: bool | None = None,
) -> Autoencoder:
    """Load an autoencoder from a local folder or a hub id (``subfolder`` e.g. ``"vae"``).

    Example:
        >>> load_autoencoder("stabilityai/stable-diffusion-3.5-large", subfolder="vae", token="hf_...")  # doctest: +SKIP
    """
    local = Path(path_or_id) / (subfolder or "")
    if local.is_dir():
        cls = AUTOENCODER_CLASSES[_class_name(local)]
        if cls is PixelSpace:  # no weights: the config is the whole model
            return Autoencoder(PixelSpace.from_config(PixelSpace.load_config(local)))
        return Autoencoder(cls.from_pretrained(local))
    if Path(path_or_id).exists() or str(path_or_id).startswith((".", "/")):
        raise ModelLoadError(f"no autoencoder folder at {local}", fix="check the path (it must hold config.json)")
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(
            str(path_or_id),
            allow_patterns=[f"{subfolder}/*.json", f"{subfolder}/*.safetensors"] if subfolder else ["*.json", "*.safetensors"],
            token=token,
            local_files_only=bool(local_files_only),
        )
    except Exception as err:  # hub errors have many types; the message is what matters
        raise ModelLoadError(
            f"could not fetch autoencoder {path_or_id!r}{f' ({subfolder})' if subfolder else ''}: {type(err).__name__}",
            fix="accept the model's licence on the hub and pass a token (HF_TOKEN), or pass a local folder (--vae-path)",
        ) from err
    return load_autoencoder(root, subfolder)
