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
    "save_tiny_stain_model", "pixcell_flow_mlp_state", "pixcell_flow_mlp_reference", "pixcell_lora_state",
    "write_pixcell_stain_repo", "synthetic_he_ihc_pair", "write_bci_pairs", "write_mist_pairs",
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


# ---------------------------------------------------------------------------------------------
# Virtual staining (pixgen.staining): a tiny pixgen stain model, PixCell's published stain layouts
# written from an independent description of PixCell's virtual_staining/ code (resmlp.SimpleMLP,
# train_lora.py: peft LoRA rank 4 on attn2.{to_q,to_k,to_v,to_out.0}), and paired H&E / IHC folders
# in the BCI and MIST layouts (training.data.paired).
# ---------------------------------------------------------------------------------------------
def save_tiny_stain_model(directory: str | Path, markers: tuple[str, ...] = ("her2",), seed: int = 0) -> Path:
    """A pixgen stain model for :func:`tiny_generator` tiles (32 px): per marker a random
    translator (``EmbeddingFlow``, H&E -> ``ihc-<marker>``) and a tiny IHC generator, and
    ``stain_model.json`` naming them (what ``pixgen stain --model DIR`` reads)."""
    from pixgen.models.flow import EmbeddingFlow
    from pixgen.staining import ihc_domain, write_stain_model

    directory = Path(directory)
    stains = {}
    for k, marker in enumerate(markers):
        torch.manual_seed(seed + k)
        flow = EmbeddingFlow(dim=TINY_ENCODER_DIM, hidden=16, num_blocks=1, source="he", encoder="tiny-test",
                             domain=ihc_domain(marker))
        with torch.no_grad():  # not the zero-initialised identity: the translation must move embeddings
            for p in flow.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        flow.save_pretrained(directory / marker / "translator")
        gen = tiny_generator(seed + k)
        gen.config["domain"] = ihc_domain(marker)
        gen.save_pretrained(directory / marker / "generator")
        stains[marker] = {"translator": f"{marker}/translator", "generator": f"{marker}/generator", "marker": marker}
    write_stain_model(directory, stains)
    return directory


def pixcell_flow_mlp_state(in_channels: int = 1536, model_channels: int = 1024, time_embed_dim: int = 1024,
                           bottleneck: int = 1024, out_channels: int = 1536, blocks: int = 6,
                           seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the keys of PixCell's ``resmlp.SimpleMLP`` (no context): written from
    its module tree (``time_embed`` = Linear, SiLU, Linear; ``input_proj``; ``res_blocks.i`` with
    ``in_layers`` = LayerNorm, SiLU, Linear, ``emb_layers`` = SiLU, Linear, ``out_layers`` =
    LayerNorm, SiLU, Dropout, Linear; ``out`` = LayerNorm, SiLU, Linear), not from pixgen's class."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"time_embed.0.weight": (time_embed_dim, model_channels), "time_embed.0.bias": (time_embed_dim,),
              "time_embed.2.weight": (time_embed_dim, time_embed_dim), "time_embed.2.bias": (time_embed_dim,),
              "input_proj.weight": (model_channels, in_channels), "input_proj.bias": (model_channels,),
              "out.0.weight": (model_channels,), "out.0.bias": (model_channels,),
              "out.2.weight": (out_channels, model_channels), "out.2.bias": (out_channels,)}
    for i in range(blocks):
        b = f"res_blocks.{i}."
        shapes.update({b + "in_layers.0.weight": (model_channels,), b + "in_layers.0.bias": (model_channels,),
                       b + "in_layers.2.weight": (bottleneck, model_channels), b + "in_layers.2.bias": (bottleneck,),
                       b + "emb_layers.1.weight": (bottleneck, time_embed_dim), b + "emb_layers.1.bias": (bottleneck,),
                       b + "out_layers.0.weight": (bottleneck,), b + "out_layers.0.bias": (bottleneck,),
                       b + "out_layers.3.weight": (model_channels, bottleneck), b + "out_layers.3.bias": (model_channels,)})
    return {k: torch.randn(s, generator=g) * (0.2 if len(s) == 2 else 0.1) + (1.0 if k.endswith(".0.weight") and
            len(s) == 1 else 0.0) for k, s in shapes.items()}


def pixcell_flow_mlp_reference(state: dict[str, torch.Tensor], x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``SimpleMLP.forward`` written out with torch.nn.functional from PixCell's description: the
    timestep embedding is ``cat(cos(t f), sin(t f))`` with ``f_k = exp(-ln(10000) k / half)``."""
    import math

    import torch.nn.functional as F

    def lin(h, name):
        return F.linear(h, state[name + ".weight"], state[name + ".bias"])

    def ln(h, name, eps=1e-5):
        return F.layer_norm(h, h.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)

    width = state["input_proj.weight"].shape[0]
    half = width // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], -1), "time_embed.0")), "time_embed.2")
    h = lin(x, "input_proj")
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("res_blocks."))
    for i in range(blocks):
        b = f"res_blocks.{i}."
        inner = lin(F.silu(ln(h, b + "in_layers.0")), b + "in_layers.2") + lin(F.silu(emb), b + "emb_layers.1")
        h = h + lin(F.silu(ln(inner, b + "out_layers.0")), b + "out_layers.3")
    return lin(F.silu(ln(h, "out.0", eps=1e-6)), "out.2")


PIXCELL_LORA_MODULES = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")  # what train_lora.py's names match


def pixcell_lora_state(base: dict[str, torch.Tensor], rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A published ``ckpts/lora/<name>_lora.pth`` state from a PixCell transformer state ``base``:
    the LoRA-wrapped model's ``state_dict()`` after peft injection (adapter ``default``): each
    cross-attention projection ``P`` becomes ``P.base_layer.{weight,bias}`` + ``P.lora_A.default.weight``
    (rank, in) + ``P.lora_B.default.weight`` (out, rank); every other key stays as it is."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, value in base.items():
        module, _, kind = key.rpartition(".")
        if module.endswith(PIXCELL_LORA_MODULES) and ".attn2." in key:
            out[f"{module}.base_layer.{kind}"] = value
            if kind == "weight":
                fan_out, fan_in = value.shape
                out[f"{module}.lora_A.default.weight"] = torch.randn(rank, fan_in, generator=g) * 0.2
                out[f"{module}.lora_B.default.weight"] = torch.randn(fan_out, rank, generator=g) * 0.2
        else:
            out[key] = value
    return out


def write_pixcell_stain_repo(root: str | Path, base_state: dict[str, torch.Tensor], names: tuple[str, ...] = ("mist_her2",),
                             mlp_sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """``StonyBrook-CVLab/pixcell-virtual-staining`` as its files lie: ``ckpts/mlp/<name>_mlp.pth``
    and ``ckpts/lora/<name>_lora.pth``, saved with ``torch.save(state_dict)`` (random weights;
    ``mlp_sizes`` shrinks the MLP, e.g. ``in_channels``/``out_channels`` = the UNI width)."""
    root = Path(root)
    for d in ("ckpts/mlp", "ckpts/lora"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        torch.save(pixcell_flow_mlp_state(**(mlp_sizes or {}), seed=seed + k), root / "ckpts/mlp" / f"{name}_mlp.pth")
        torch.save(pixcell_lora_state(base_state, seed=seed + k), root / "ckpts/lora" / f"{name}_lora.pth")
    return root


def synthetic_he_ihc_pair(size: int = 64, seed: int = 0, positive: float = 0.5):
    """A roughly aligned (H&E, IHC) uint8 pair made by colour deconvolution's inverse (skimage
    ``hed2rgb``): the same random nuclei, hematoxylin + eosin in the H&E, hematoxylin + DAB on a
    ``positive`` share of them in the IHC."""
    import numpy as np
    from skimage.color import hed2rgb

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    nuclei = np.zeros((size, size))
    dab = np.zeros((size, size))
    for _ in range(max(4, size // 8)):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 32 + 1, size / 12 + 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
        nuclei += blob
        dab += blob * (rng.random() < positive)
    noise = rng.normal(0, 0.01, (size, size))
    he = hed2rgb(np.stack([0.6 * nuclei + 0.05 + noise, 0.25 + noise, np.zeros_like(nuclei)], -1))
    ihc = hed2rgb(np.stack([0.3 * nuclei + 0.1 + noise, np.zeros_like(nuclei), dab], -1))
    return tuple((np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in (he, ihc))


def _write_pairs(he_dir: Path, ihc_dir: Path, names: list[str], size: int, seed: int, suffix: str) -> None:
    from PIL import Image

    he_dir.mkdir(parents=True, exist_ok=True)
    ihc_dir.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        he, ihc = synthetic_he_ihc_pair(size, seed + k)
        Image.fromarray(he).save(he_dir / f"{name}{suffix}")
        Image.fromarray(ihc).save(ihc_dir / f"{name}{suffix}")


def write_bci_pairs(root: str | Path, n: int = 4, size: int = 64, splits: tuple[str, ...] = ("train", "test"),
                    seed: int = 0) -> Path:
    """A BCI-layout folder (``HE/{split}``, ``IHC/{split}``, names ``00000_train_1+.png``) of
    :func:`synthetic_he_ihc_pair` pairs."""
    root = Path(root)
    scores = ("0", "1+", "2+", "3+")
    for s, split in enumerate(splits):
        names = [f"{i:05d}_{split}_{scores[i % 4]}" for i in range(n)]
        _write_pairs(root / "HE" / split, root / "IHC" / split, names, size, seed + 100 * s, ".png")
    return root


def write_mist_pairs(root: str | Path, markers: tuple[str, ...] = ("HER2",), n: int = 4, size: int = 64,
                     splits: tuple[str, ...] = ("train", "val"), seed: int = 0) -> Path:
    """A MIST-layout folder (``{marker}/TrainValAB/{split}A`` H&E, ``{split}B`` IHC, JPEG)."""
    root = Path(root)
    for m, marker in enumerate(markers):
        for s, split in enumerate(splits):
            d = root / marker / "TrainValAB"
            _write_pairs(d / f"{split}A", d / f"{split}B", [f"{marker}_{i:04d}" for i in range(n)], size,
                         seed + 1000 * m + 100 * s, ".jpg")
    return root
