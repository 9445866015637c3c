"""Tiny, seeded components for tests and examples (diffusers style): seconds on a CPU.

Example:
    >>> gen = tiny_generator()
    >>> gen.generate(embeddings=torch.randn(1, 32), num_inference_steps=2, progress=False).images[0].size
    (32, 32)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from pixgen.embeddings import EmbeddingBank
from pixgen.models.autoencoders import Autoencoder
from pixgen.models.transformer import PixgenTransformer
from pixgen.pipeline import Generator

__all__ = [
    "tiny_transformer", "tiny_autoencoder", "tiny_encoder", "tiny_generator", "save_tiny_model", "save_tiny_mask_model",
    "TINY_ENCODER_DIM",
    "PIXCELL_256_TRANSFORMER", "PIXCELL_1024_TRANSFORMER", "PIXCELL_CONTROLNET_TRANSFORMER", "PIXCELL_CONTROLNET",
    "PIXCELL_SCHEDULER", "PIXCELL_MODEL_INDEX", "PIXCELL_CONTROLNET_MODEL_INDEX",
]

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


def save_tiny_mask_model(directory: str | Path, layouts: list[dict[str, Any]], factor: int = 1, mpp: float = 2.0,
                         seed: int = 0) -> Path:
    """A mask model for :func:`tiny_generator` in ``directory`` (what ``--mask-model`` and a synth
    spec's ``mask_model`` read): a mask ControlNet whose input weights are not zero, so the masks
    reach the images, and ``mask_stats.json`` fitted on ``layouts`` (dicts with ``inst``,
    ``types``, ``tissue``) downsampled by ``factor`` to the tiny image size (32 px).

    Example:
        >>> inst = np.zeros((32, 32), np.uint16); inst[4:12, 4:12] = 1                             # doctest: +SKIP
        >>> save_tiny_mask_model(tmp / "mm", [{"inst": inst, "types": None, "tissue": "consep"}])  # doctest: +SKIP
    """
    from pixgen.io import write_json_atomic
    from pixgen.mask_sampler import fit_stats
    from pixgen.models.controlnet import PixgenControlNet

    directory = Path(directory)
    torch.manual_seed(seed)
    cn = PixgenControlNet.from_transformer(tiny_generator(seed).transformer, 1, conditioning_channels=6,
                                           conditioning_downsample=4)
    for p in (cn.cond_pos_embed.proj.weight, cn.controlnet_blocks[0].weight):
        torch.nn.init.normal_(p, std=0.05)  # not zero: the masks must reach the images
    cn.save_pretrained(directory / "controlnet")
    write_json_atomic(directory / "mask_stats.json", fit_stats(layouts, factor=factor, size=32, mpp=mpp))
    return directory


# ---------------------------------------------------------------------------------------------
# PixCell's published files, as data, for writing offline test checkpoints (tests/test_pixcell.py);
# pixgen.pixcell reads the real files and never needs these. Sources: the Hub file listings of the three repos (file sizes), the
# config dicts copied into public scripts that load PixCell-1024 (cvlab-stonybrook/PixCell
# virtual_staining/*.py), configs/pan_cancer/pixart_20x_256.py and pixart_20x_1024_pos_embed.py
# (pe_interpolation 0.5 / 2.0, 1 / 16 tokens) and controlnet/*.py (class and argument names). Values not visible
# in those sources were chosen so that the JSON diffusers writes has exactly the published byte
# size (transformer 862 B for PixCell-256, scheduler 828 B, model_index 285 B / 386 B); the
# `_name_or_path` strings only matter for that size.
# ---------------------------------------------------------------------------------------------
PIXCELL_1024_TRANSFORMER: dict[str, Any] = {
    "_class_name": "PixCellTransformer2DModel",
    "_diffusers_version": "0.32.2",
    "_name_or_path": "pixart_1024/transformer",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 1536,
    "caption_num_tokens": 16,
    "cross_attention_dim": 1152,
    "double_self_attention": False,
    "dropout": 0.0,
    "in_channels": 16,
    "interpolation_scale": 2,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "out_channels": 32,
    "patch_size": 2,
    "sample_size": 128,
    "upcast_attention": False,
    "use_additional_conditions": False,
    "use_linear_projection": False,
}
PIXCELL_256_TRANSFORMER: dict[str, Any] = {
    **PIXCELL_1024_TRANSFORMER,
    "_name_or_path": "pixart_256/transformer",
    "caption_num_tokens": 1,
    "interpolation_scale": 0.5,
    "sample_size": 32,
}
# transformer/config.json of PixCell-256-Cell-ControlNet (class from its model_index.json).
PIXCELL_CONTROLNET_TRANSFORMER: dict[str, Any] = {
    **{k: v for k, v in PIXCELL_256_TRANSFORMER.items() if k not in ("double_self_attention", "num_vector_embeds",
                                                                      "only_cross_attention", "use_linear_projection")},
    "_class_name": "PixCellTransformer2DModelControlNet",
}
# controlnet/config.json: PixCellControlNet's arguments; 27 blocks as in PixCell's controlnet/train.py
# (27 copied blocks + 27 zero linears make the ~622 M parameters quoted for it).
PIXCELL_CONTROLNET: dict[str, Any] = {
    **PIXCELL_CONTROLNET_TRANSFORMER,
    "_class_name": "PixCellControlNet",
    "n_controlnet_blocks": 27,
}
PIXCELL_SCHEDULER: dict[str, Any] = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": "0.32.2",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "flow_shift": 1.0,
    "lambda_min_clipped": float("-inf"),
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": False,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}
PIXCELL_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "PixCellPipeline",
    "_diffusers_version": "0.32.2",
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "transformer": ["pixcell_transformer_2d", "PixCellTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
PIXCELL_CONTROLNET_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "PixCellControlNetPipeline",
    "_diffusers_version": "0.32.2",
    "controlnet": ["pixcell_controlnet", "PixCellControlNet"],
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "transformer": ["pixcell_controlnet_transformer", "PixCellTransformer2DModelControlNet"],
    "vae": ["diffusers", "AutoencoderKL"],
}
