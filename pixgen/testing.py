"""Tiny, seeded components for tests and examples (diffusers style): seconds on a CPU.

Example:
    >>> gen = tiny_generator()
    >>> gen.generate(embeddings=torch.randn(1, 32), num_inference_steps=2, progress=False).images[0].size
    (32, 32)
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from pixgen.embeddings import EmbeddingBank
from pixgen.models.autoencoders import Autoencoder
from pixgen.models.transformer import PixgenTransformer
from pixgen.pipeline import Generator

__all__ = ["tiny_transformer", "tiny_autoencoder", "tiny_encoder", "tiny_generator", "save_tiny_model", "TINY_ENCODER_DIM"]

TINY_ENCODER_DIM = 32


def tiny_encoder(seed: int = 0):
    """A random 1-layer timm ViT (32-d CLS, 32 px input) named ``tiny-test``, not registered."""
    import timm

    from pixgen.encoders import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, TimmEncoder

    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=TINY_ENCODER_DIM, depth=1, num_heads=2, num_classes=0)
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    spec = EncoderSpec(name="tiny-test", dim=TINY_ENCODER_DIM, input_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       mpp=0.5, source="local", library="timm", description="random weights, for tests only")
    hub_config = {"architecture": "vit_tiny_patch16_224", "num_classes": 0, "model_args": args}
    return TimmEncoder(spec, backbone, hub_config).eval()


def tiny_transformer(seed: int = 0, **overrides) -> PixgenTransformer:
    """``pixgen-tiny`` on 8x8x4 latents with random (not zero-initialised) weights."""
    torch.manual_seed(seed)
    config = dict(in_channels=4, sample_size=8, caption_channels=TINY_ENCODER_DIM, encoder_name="tiny-test")
    model = PixgenTransformer.from_preset("pixgen-tiny", **{**config, **overrides})
    with torch.no_grad():  # leave the zero-init identities behind so outputs depend on inputs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_autoencoder(seed: int = 0) -> Autoencoder:
    """An f4 AutoencoderKL with 4 latent channels and SD3-style scaling/shift factors."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=1.5,
        shift_factor=0.1,
    )
    return Autoencoder(vae.eval())


def tiny_generator(seed: int = 0, encoder: bool = True, bank: bool = True, **transformer_overrides) -> Generator:
    """A complete 32x32-pixel Generator: tiny transformer, f4 VAE, tiny encoder (saved with the
    model), and an embedding bank with labels ``tumour`` and ``stroma``."""
    transformer = tiny_transformer(seed, **transformer_overrides)
    dim = transformer.config.caption_channels
    gen_bank = None
    if bank:
        g = torch.Generator().manual_seed(seed)
        gen_bank = EmbeddingBank(
            {"tumour": torch.randn(6, 1, dim, generator=g), "stroma": torch.randn(6, 1, dim, generator=g)},
            encoder=transformer.config.encoder_name,
        )
    config = {"guidance_scale": 2.0, "num_inference_steps": 3, "mpp": 0.5, "encoder_path": "encoder" if encoder else None}
    return Generator(transformer, tiny_autoencoder(seed), encoder=tiny_encoder(seed) if encoder else None,
                     embedding_bank=gen_bank, config=config)


def save_tiny_model(directory: str | Path, seed: int = 0, **kwargs) -> Path:
    """Write a tiny Generator directory that ``pixgen generate --model DIR`` loads."""
    return tiny_generator(seed, **kwargs).save_pretrained(directory)
