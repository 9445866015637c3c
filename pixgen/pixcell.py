"""Run the published PixCell checkpoints (Stony Brook CVLab, 2025) as pixgen Generators.

``Generator.from_pretrained`` routes a folder whose ``transformer/config.json`` names
``PixCellTransformer2DModel`` here (see :mod:`pixgen.formats`). What happens:

* the PixCell transformer config is translated field by field into a :class:`PixgenTransformer`
  config (:func:`pixcell_to_pixgen_config`; unknown fields or unsupported values are refused),
  and the safetensors are loaded strictly: every published key is consumed, none is missing
  (:func:`load_strict`);
* a ``controlnet/`` folder (``PixCell-256-Cell-ControlNet``) becomes a :class:`PixgenControlNet`;
* the scheduler is PixCell's own ``scheduler_config.json`` (DPM-Solver++, order 2, linear betas);
* the VAE is SD3.5's: ``vae_path``, else the checkpoint's own ``vae/`` when it holds weights (the
  published repos hold only ``vae/config.json``; their cards load the weights from Stability AI),
  else ``stabilityai/stable-diffusion-3.5-large`` (subfolder ``vae``);
* the encoder is the ``uni2-h`` registry entry (``encoder_path`` for local weights); PixCell-1024
  takes a 4x4 grid of UNI2-h tokens, one per 256-px tile of a 1024-px reference.

Guidance: pixgen's convention is ``pred = uncond + w * (cond - uncond)``. PixCell's scripts use
it too, except ``tools/sample_4k.py``, which forms ``(w + 1) * cond - w * uncond``; convert with
:func:`pixcell_guidance_to_pixgen`. The default is 2 for both sizes (``--guidance_strength``
default of ``tools/sample_256.py`` and ``tools/sample_1024.py``).

ControlNet and guidance: which CFG half receives the ControlNet residuals is the generator's
``controlnet_cfg`` option. PixCell's ControlNet pipeline (``StonyBrook-CVLab/PixCell-pipeline-
ControlNet``) could not be read here, so the default is diffusers' ControlNet convention,
``"both"`` (each half runs the ControlNet with its own condition tokens); ``"cond"`` gives the
residuals to the conditional half only.

Example:
    >>> gen = Generator.from_pretrained("StonyBrook-CVLab/PixCell-256", token="hf_...")   # doctest: +SKIP
    >>> gen = Generator.from_pretrained("/models/PixCell-1024", vae_path="/models/sd35/vae",
    ...                                 encoder_path="/models/UNI2-h")                     # doctest: +SKIP
    >>> gen.generate(reference=["tile_1024.png"], num_images=2).images                     # doctest: +SKIP
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import Timesteps
from diffusers.models.modeling_utils import ModelMixin
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from pixgen.errors import InputError, ModelLoadError
from pixgen.models.autoencoders import Autoencoder, load_autoencoder
from pixgen.models.controlnet import PixgenControlNet
from pixgen.models.transformer import PixgenTransformer

__all__ = [
    "load_pixcell",
    "pixcell_to_pixgen_config",
    "pixcell_controlnet_to_pixgen_config",
    "pixcell_guidance_to_pixgen",
    "load_strict",
    "SD35_VAE",
    "PixCellFlowMLP",
    "load_pixcell_flow_mlp",
    "load_stain_lora",
    "add_stain_lora",
    "read_state",
    "STAIN_REPO",
    "STAIN_NAMES",
]

SD35_VAE = ("stabilityai/stable-diffusion-3.5-large", "vae")  # PixCell does not host these weights
SD35_VAE_FACTORS = (1.5305, 0.0609)  # scaling_factor, shift_factor of the SD3.5 VAE config
ENCODER = "uni2-h"
MPP = 0.5  # PixCell trains on 20x tiles ("pixart_20x_*" configs)
NUM_INFERENCE_STEPS = 20
# pixgen convention (uncond + w (cond - uncond)), keyed by condition tokens: 1 -> PixCell-256
# (tools/sample_256.py --guidance_strength default 2), 16 -> PixCell-1024 (tools/sample_1024.py, 2).
DEFAULT_GUIDANCE = {1: 2.0, 16: 2.0}
CONTROLNET_CFG = "both"  # diffusers' ControlNet convention; PixCell's own pipeline was not readable
WEIGHTS = "diffusion_pytorch_model.safetensors"

# ---------------------------------------------------------------------------------------------
# Config translation: every PixCell field is copied, checked, or ignored for a stated reason.
# ---------------------------------------------------------------------------------------------
TRANSFORMER_CLASSES = ("PixCellTransformer2DModel", "PixCellTransformer2DModelControlNet")
PIPELINE_CLASSES = ("PixCellPipeline", "PixCellControlNetPipeline")
COMPONENTS = ("transformer", "scheduler", "vae", "controlnet")

# PixCellTransformer2DModel.__init__ defaults (used when a config omits a field).
PIXCELL_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "cross_attention_dim": 1152, "attention_bias": True, "sample_size": 128,
    "patch_size": 2, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6, "interpolation_scale": None,
    "use_additional_conditions": None, "caption_channels": None, "caption_num_tokens": 1, "attention_type": "default",
    # Transformer2DModel leftovers that PixCell's class ignores (present in its configs)
    "double_self_attention": False, "num_vector_embeds": None, "only_cross_attention": False,
    "use_linear_projection": False,
}
# Copied unchanged into PixgenTransformer (same meaning, same name).
COPIED = (
    "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers", "dropout",
    "attention_bias", "sample_size", "patch_size", "activation_fn", "num_embeds_ada_norm", "norm_eps",
    "interpolation_scale", "caption_channels", "caption_num_tokens",
)
# Accepted only with the value(s) pixgen's blocks implement.
FIXED = {
    "norm_type": ("ada_norm_single",),
    "norm_elementwise_affine": (False,),
    "upcast_attention": (False,),
    "attention_type": ("default", None),
    "double_self_attention": (False,),
    "num_vector_embeds": (None,),
    "only_cross_attention": (False,),
    "use_linear_projection": (False,),
}
# Checked against other fields (see _check_derived).
DERIVED = ("cross_attention_dim", "use_additional_conditions")
# Ignored, with the reason.
IGNORED = {"norm_num_groups": "only used by group-norm blocks; ada_norm_single blocks have none"}
CONTROLNET_ONLY = ("n_controlnet_blocks",)

# Buffers computed from the config; loaded and checked when a checkpoint carries them, recomputed
# when it does not.
DERIVED_BUFFERS = ("y_pos_embed.y_pos_embed",)

GUIDANCE_CONVENTIONS = {
    "w": "uncond + w * (cond - uncond): tools/sample_256.py and tools/sample_1024.py (DPM-Solver "
         "model_wrapper), PixArt forward_with_cfg, the diffusers PixCell pipelines",
    "w+1": "(w + 1) * cond - w * uncond: tools/sample_4k.py",
}


def pixcell_to_pixgen_config(published: dict[str, Any], encoder: str = ENCODER) -> dict[str, Any]:
    """Translate a PixCell transformer ``config.json`` into :class:`PixgenTransformer` arguments.

    Every field is copied (``COPIED``), required to hold a supported value (``FIXED``), checked
    against the others (``DERIVED``) or ignored for a stated reason (``IGNORED``); a field pixgen
    does not know raises :class:`ModelLoadError`. The result predicts epsilon with learned
    variance and conditions on ``encoder`` tokens.

    Example:
        >>> from pixgen.testing import PIXCELL_1024_TRANSFORMER
        >>> cfg = pixcell_to_pixgen_config(PIXCELL_1024_TRANSFORMER)
        >>> cfg["caption_num_tokens"], cfg["condition_pos_embed"], cfg["out_channels"]
        (16, True, 32)
    """
    _refuse_unknown(published, extra=())
    cfg = {**PIXCELL_DEFAULTS, **{k: v for k, v in published.items() if not k.startswith("_")}}
    for key, allowed in FIXED.items():
        if cfg[key] not in allowed:
            _refuse(f"{key}={cfg[key]!r}", f"pixgen implements only {key} in {allowed}")
    _check_derived(cfg)
    tokens = int(cfg["caption_num_tokens"])
    return {
        **{key: cfg[key] for key in COPIED},
        "condition_pos_embed": tokens > 1,  # PixCell: UNIPosEmbed exactly when there is a grid of tokens
        "prediction_type": "epsilon",
        "encoder_name": encoder,
    }


def pixcell_controlnet_to_pixgen_config(published: dict[str, Any], encoder: str = ENCODER) -> dict[str, Any]:
    """Translate PixCell's ``controlnet/config.json`` into :class:`PixgenControlNet` arguments:
    the transformer fields as :func:`pixcell_to_pixgen_config`, ``n_controlnet_blocks`` copied
    blocks, control latents with ``in_channels`` channels (PixCell's ``cond_pos_embed``)."""
    _refuse_unknown(published, extra=CONTROLNET_ONLY)
    base = pixcell_to_pixgen_config({k: v for k, v in published.items() if k not in CONTROLNET_ONLY}, encoder)
    blocks = published.get("n_controlnet_blocks")
    blocks = base["num_layers"] if blocks is None else min(int(blocks), base["num_layers"])
    return {**base, "num_layers": blocks, "conditioning_channels": base["in_channels"]}


def _check_derived(cfg: dict[str, Any]) -> None:
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if cfg["cross_attention_dim"] not in (None, width):
        _refuse(f"cross_attention_dim={cfg['cross_attention_dim']}", f"captions are projected to the width {width}")
    extra_cond = cfg["use_additional_conditions"]
    if extra_cond is None:  # PixCell's rule: resolution/aspect embedders exactly at sample_size 128
        extra_cond = cfg["sample_size"] == 128
    if extra_cond:
        _refuse("use_additional_conditions=True", "pixgen has no resolution/aspect-ratio embedders")
    if cfg["caption_channels"] is None:
        _refuse("caption_channels=None", "PixCell models condition on UNI2-h tokens")
    if cfg["out_channels"] != 2 * cfg["in_channels"]:
        _refuse(f"out_channels={cfg['out_channels']}", "PixCell predicts epsilon + variance (2 x in_channels)")
    side = round(int(cfg["caption_num_tokens"]) ** 0.5)
    if side * side != cfg["caption_num_tokens"]:
        _refuse(f"caption_num_tokens={cfg['caption_num_tokens']}", "tokens form a square grid")


def _refuse_unknown(published: dict[str, Any], extra: tuple[str, ...]) -> None:
    known = set(PIXCELL_DEFAULTS) | set(extra)
    unknown = sorted(k for k in published if not k.startswith("_") and k not in known)
    if unknown:
        _refuse(f"unknown config field(s) {unknown}", "this pixgen version knows the published PixCell configs only")


def _refuse(what: str, why: str) -> None:
    raise ModelLoadError(
        f"unsupported PixCell config: {what} ({why})",
        fix="use a published PixCell checkpoint, or convert the model with pixgen's own layout",
    )


def pixcell_guidance_to_pixgen(w: float, convention: str) -> float:
    """A PixCell guidance value in pixgen's convention ``pred = uncond + w (cond - uncond)``.

    ``"w"``: PixCell's DPM-Solver scripts and pipelines use pixgen's convention (unchanged).
    ``"w+1"``: ``tools/sample_4k.py`` forms ``(w + 1) cond - w uncond``, i.e. pixgen ``w + 1``.

    Example:
        >>> pixcell_guidance_to_pixgen(2.0, "w+1")
        3.0
    """
    if convention not in GUIDANCE_CONVENTIONS:
        raise InputError(f"unknown guidance convention {convention!r}", fix=f"use one of {list(GUIDANCE_CONVENTIONS)}")
    return float(w) + (1.0 if convention == "w+1" else 0.0)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def load_pixcell(
    root: str | Path,
    index: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    vae_path: str | Path | None = None,
    encoder_path: str | Path | None = None,
    local_files_only: bool | None = None,
):
    """A :class:`~pixgen.pipeline.Generator` from a PixCell checkpoint folder (Hub layout).

    Args:
        root: folder with ``transformer/``, ``scheduler/`` (and ``controlnet/``, ``vae/``).
        index: its ``model_index.json`` (read when None).
        token, local_files_only: for fetching the SD3.5 VAE from the Hub.
        vae_path: local SD3.5 VAE folder (``.../vae`` or the SD3.5 snapshot holding ``vae/``).
        encoder_path: local UNI2-h weights (registry name ``uni2-h``) or a saved pixgen encoder.

    Example:
        >>> gen = load_pixcell("/models/PixCell-256", vae_path="/models/sd35-vae")  # doctest: +SKIP
    """
    from pixgen.pipeline import Generator

    root = Path(root)
    index = _read_json(root / "model_index.json") if index is None else index
    _check_index(index, root)
    transformer = load_pixcell_transformer(root / "transformer")
    controlnet = load_pixcell_controlnet(root / "controlnet") if "controlnet" in index else None
    scheduler = load_pixcell_scheduler(root / "scheduler")
    vae = load_pixcell_vae(root, vae_path, token=token, local_files_only=local_files_only)
    _check_vae(vae, transformer)
    tokens = transformer.config.caption_num_tokens
    config = {
        "encoder": ENCODER,
        "encoder_path": None,  # UNI2-h lives on the Hub (gated), never inside the model folder
        "image_size": transformer.config.sample_size * vae.downsample_factor,
        "mpp": MPP,
        "num_inference_steps": NUM_INFERENCE_STEPS,
        "guidance_scale": DEFAULT_GUIDANCE.get(tokens, 2.0),
        "controlnet_cfg": CONTROLNET_CFG,
        "domain": "he",
        "origin": index.get("_class_name", "PixCellPipeline"),
    }
    gen = Generator(transformer, vae, scheduler, config=config, controlnet=controlnet)
    return gen.locate(root, encoder_path=encoder_path, token=token)  # local UNI2-h weights are not saved


def load_pixcell_transformer(directory: Path) -> PixgenTransformer:
    """PixCell ``transformer/`` -> :class:`PixgenTransformer`, weights loaded strictly."""
    published = _read_json(directory / "config.json")
    if published.get("_class_name") not in TRANSFORMER_CLASSES:
        raise ModelLoadError(
            f"{directory} holds {published.get('_class_name')!r}, not a PixCell transformer",
            fix=f"point at a checkpoint whose transformer is one of {TRANSFORMER_CLASSES}",
        )
    model = PixgenTransformer(**pixcell_to_pixgen_config(published))
    load_strict(model, read_weights(directory), directory)
    return model.eval()


def load_pixcell_controlnet(directory: Path) -> PixgenControlNet:
    """PixCell ``controlnet/`` -> :class:`PixgenControlNet`, weights loaded strictly."""
    published = _read_json(directory / "config.json")
    model = PixgenControlNet(**pixcell_controlnet_to_pixgen_config(published))
    load_strict(model, read_weights(directory), directory)
    return model.eval()


def load_pixcell_scheduler(directory: Path) -> DPMSolverMultistepScheduler:
    """PixCell's ``scheduler_config.json``; an epsilon DPM-Solver is required."""
    published = _read_json(directory / "scheduler_config.json")
    if published.get("_class_name") != "DPMSolverMultistepScheduler" or published.get("prediction_type") != "epsilon":
        raise ModelLoadError(
            f"{directory}: expected an epsilon DPMSolverMultistepScheduler, got "
            f"{published.get('_class_name')} / {published.get('prediction_type')}",
            fix="restore the published scheduler/scheduler_config.json",
        )
    return DPMSolverMultistepScheduler.from_config(published)


def load_pixcell_vae(
    root: Path, vae_path: str | Path | None, token: str | None = None, local_files_only: bool | None = None
) -> Autoencoder:
    """The SD3.5 VAE: ``vae_path``, else ``root/vae`` when it holds weights, else the Hub."""
    if vae_path is not None:
        path = Path(vae_path)
        nested = path / SD35_VAE[1]
        if not (path / "config.json").is_file() and (nested / "config.json").is_file():
            path = nested  # the SD3.5 snapshot folder was given
        return load_autoencoder(path)
    if _has_weights(root / "vae"):
        return load_autoencoder(root / "vae")
    return load_autoencoder(SD35_VAE[0], subfolder=SD35_VAE[1], token=token, local_files_only=local_files_only)


def _check_vae(vae: Autoencoder, transformer: PixgenTransformer) -> None:
    if vae.latent_channels != transformer.config.in_channels:
        raise ModelLoadError(
            f"the VAE has {vae.latent_channels} latent channels, PixCell expects {transformer.config.in_channels}",
            fix=f"use the SD3.5 VAE ({SD35_VAE[0]}, subfolder {SD35_VAE[1]})",
        )
    cfg = vae.model.config
    factors = (float(getattr(cfg, "scaling_factor", 0.0)), float(getattr(cfg, "shift_factor", None) or 0.0))
    if factors != SD35_VAE_FACTORS:
        warnings.warn(
            f"VAE scaling/shift {factors} differ from SD3.5's {SD35_VAE_FACTORS}; PixCell was trained with SD3.5's",
            stacklevel=3,
        )


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """``diffusion_pytorch_model.safetensors`` (or its sharded index) in ``directory``."""
    single, sharded = directory / WEIGHTS, directory / f"{WEIGHTS}.index.json"
    try:
        if single.is_file():
            return load_file(str(single))
        if sharded.is_file():
            shards = sorted(set(_read_json(sharded)["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(str(directory / shard)).items()}
    except (SafetensorError, OSError, KeyError) as err:
        raise ModelLoadError(f"cannot read the weights in {directory}: {err}", fix="re-download the checkpoint") from err
    raise ModelLoadError(f"no {WEIGHTS} in {directory}", fix="download the complete checkpoint (all subfolders)")


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load ``state`` so that every key is consumed and none is missing, or raise.

    The only key that may be absent is a buffer computed from the config (``DERIVED_BUFFERS``,
    PixCell-1024's fixed token position table); when present it must equal pixgen's own.

    Example:
        >>> load_strict(model, load_file("diffusion_pytorch_model.safetensors"), "ckpt")  # doctest: +SKIP
    """
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - set(DERIVED_BUFFERS))
    wrong = sorted(k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape))
    if unexpected or missing or wrong:
        details = "; ".join(
            f"{name} ({len(keys)}): {keys[:4]}" for name, keys in
            (("unexpected", unexpected), ("missing", missing), ("wrong shape", wrong)) if keys
        )
        raise ModelLoadError(f"{source}: weights do not match the config: {details}",
                             fix="the config.json and the safetensors must come from the same checkpoint")
    for key in DERIVED_BUFFERS:
        if key in state and not torch.allclose(state[key].float(), own[key].float(), atol=1e-3):
            raise ModelLoadError(f"{source}: {key} differs from the table computed from the config",
                                 fix="report this: pixgen's grid position embedding disagrees with the checkpoint")
    model.load_state_dict({**{k: own[k] for k in DERIVED_BUFFERS if k in own}, **state}, strict=True)


def _check_index(index: dict[str, Any], root: Path) -> None:
    name = index.get("_class_name")
    extra = sorted(k for k in index if not k.startswith("_") and k not in COMPONENTS)
    if name not in PIPELINE_CLASSES or extra:
        raise ModelLoadError(
            f"{root}/model_index.json describes {name!r} with components {extra or 'as expected'}",
            fix=f"pixgen runs {PIPELINE_CLASSES} with components {COMPONENTS}",
        )
    if "controlnet" in index and not (root / "controlnet" / "config.json").is_file():
        raise ModelLoadError(f"{root} lists a controlnet but has no controlnet/config.json",
                             fix="download the complete checkpoint")


def _has_weights(directory: Path) -> bool:
    return directory.is_dir() and any(directory.glob("*.safetensors")) and (directory / "config.json").is_file()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"missing {path}", fix="download the complete PixCell checkpoint")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"corrupt {path}: {err}", fix="re-download the file") from err


# ---------------------------------------------------------------------------------------------
# Virtual staining (``virtual_staining/`` of cvlab-stonybrook/PixCell; weights in the Hub repo
# StonyBrook-CVLab/pixcell-virtual-staining): a rectified-flow residual MLP from H&E to IHC UNI2-h
# embeddings (``resmlp.SimpleMLP`` as ``train_flow_mlp.py`` builds it) and a rank-4 LoRA on the
# cross-attention of PixCell-1024 (``train_lora.py``). Both are saved with ``torch.save(state_dict)``
# as ``ckpts/mlp/<name>_mlp.pth`` and ``ckpts/lora/<name>_lora.pth`` (names from public scripts
# that download them: mist_her2, mist_er, mist_pr, mist_ki67, her2match). The .pth files are read
# with ``torch.load(weights_only=True)``, which accepts tensors and plain containers only.
# ---------------------------------------------------------------------------------------------
STAIN_REPO = "StonyBrook-CVLab/pixcell-virtual-staining"
STAIN_BASE = "StonyBrook-CVLab/PixCell-1024"  # the LoRAs adapt PixCell-1024
STAIN_MLP_DIR, STAIN_LORA_DIR = "ckpts/mlp", "ckpts/lora"
STAIN_NAMES = ("mist_her2", "mist_er", "mist_pr", "mist_ki67", "her2match")
# train_flow_mlp.py: SimpleMLP(in 1536, time_embed_dim 1024, model 1024, bottleneck 1024, out 1536, 6 blocks)
STAIN_MLP_DEFAULTS = {"in_channels": 1536, "time_embed_dim": 1024, "model_channels": 1024,
                      "bottleneck_channels": 1024, "out_channels": 1536, "num_res_blocks": 6}
# train_lora.py: LoraConfig(r=4, lora_alpha=4, gaussian init) on these names; the add_* ones match no
# module of PixCell's cross-attention (peft skips them), so the adapters sit on to_q/to_k/to_v/to_out.0.
STAIN_LORA_RANK = 4
STAIN_LORA_TARGETS = ("attn2.add_k_proj", "attn2.add_q_proj", "attn2.add_v_proj", "attn2.to_add_out",
                      "attn2.to_k", "attn2.to_out.0", "attn2.to_q", "attn2.to_v")
STAIN_LORA_ADAPTER = "default"  # peft's adapter name in the published keys (``lora_A.default.weight``)
STAIN_GUIDANCE = 1.2  # --guidance_scale default of a public PixCell virtual-staining inference script


class _PixCellResBlock(nn.Module):
    """``resmlp.ResBlock`` (no context): LN -> SiLU -> Linear, plus SiLU -> Linear of the time
    embedding, then LN -> SiLU -> Dropout -> Linear, added back (published key names)."""

    def __init__(self, channels: int, mid_channels: int, emb_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.LayerNorm(channels), nn.SiLU(), nn.Linear(channels, mid_channels))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, mid_channels))
        self.out_layers = nn.Sequential(nn.LayerNorm(mid_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Linear(mid_channels, channels))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # (N, C), (N, E)
        return x + self.out_layers(self.in_layers(x) + self.emb_layers(emb))


class PixCellFlowMLP(ModelMixin, ConfigMixin):
    """PixCell's stain-flow MLP with its published module and key names (``time_embed.0``,
    ``input_proj``, ``res_blocks.i.in_layers.2``, ``out.2``, ...).

    Convention (PixCell's): ``x_t = t * ihc + (1 - t) * he``; ``forward(x_t, 999 * t)`` predicts
    ``ihc - he``. The time embedding is the sinusoidal ``[cos, sin]`` of ``timesteps`` over
    ``model_channels`` (diffusers' ``Timesteps`` with ``flip_sin_to_cos=True``, shift 0).

    Example:
        >>> mlp = PixCellFlowMLP(in_channels=8, time_embed_dim=16, model_channels=16, bottleneck_channels=16,
        ...                      out_channels=8, num_res_blocks=2)
        >>> mlp(torch.zeros(3, 8), torch.full((3,), 500.0)).shape
        torch.Size([3, 8])
    """

    @register_to_config
    def __init__(self, in_channels: int = 1536, time_embed_dim: int = 1024, model_channels: int = 1024,
                 bottleneck_channels: int = 1024, out_channels: int = 1536, num_res_blocks: int = 6):
        super().__init__()
        self.time_proj = Timesteps(model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)  # no weights
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(_PixCellResBlock(model_channels, bottleneck_channels, time_embed_dim)
                                        for _ in range(num_res_blocks))
        self.out = nn.Sequential(nn.LayerNorm(model_channels, eps=1e-6), nn.SiLU(),
                                 nn.Linear(model_channels, out_channels))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Velocity ``ihc - he`` (N, out) at ``x`` (N, in) and PixCell timesteps ``999 * t`` (N,)."""
        emb = self.time_embed(self.time_proj(timesteps.float()).to(x.dtype))  # (N, E)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, emb)
        return self.out(h)


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, or from a PyTorch ``.pth`` / ``.pt`` / ``.bin`` read with
    ``torch.load(weights_only=True)`` (tensors and plain containers only; nothing else is unpickled)."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no weights file at {path}", fix="download the file or pass the right path")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else \
            torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        if isinstance(err, pickle.UnpicklingError):
            reason = "it holds pickled Python objects besides tensors, which pixgen never unpickles"
        raise ModelLoadError(f"cannot read {path} as a state dict ({reason})",
                             fix="re-download it; pixgen reads safetensors or tensor-only .pth files") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} is not a state dict of tensors", fix="pass the published .pth / .safetensors")
    return state


def load_pixcell_flow_mlp(path: str | Path) -> PixCellFlowMLP:
    """PixCell's stain-flow MLP from ``ckpts/mlp/<name>_mlp.pth`` (or a safetensors copy), strictly:
    the sizes are read from the weights, and every key must be a published ``SimpleMLP`` key.

    Example:
        >>> mlp = load_pixcell_flow_mlp("pixcell-virtual-staining/ckpts/mlp/mist_her2_mlp.pth")  # doctest: +SKIP
    """
    state = read_state(path)
    try:
        blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("res_blocks."))
        config = {"in_channels": state["input_proj.weight"].shape[1],
                  "model_channels": state["input_proj.weight"].shape[0],
                  "time_embed_dim": state["time_embed.0.weight"].shape[0],
                  "bottleneck_channels": state["res_blocks.0.in_layers.2.weight"].shape[0],
                  "out_channels": state["out.2.weight"].shape[0], "num_res_blocks": blocks}
    except (KeyError, ValueError, IndexError) as err:
        raise ModelLoadError(f"{path} is not a PixCell flow MLP (missing {err})",
                             fix="pass a ckpts/mlp/*_mlp.pth file of StonyBrook-CVLab/pixcell-virtual-staining") from None
    model = PixCellFlowMLP(**{k: int(v) for k, v in config.items()})
    load_strict(model, state, path)
    return model.eval()


def add_stain_lora(transformer: PixgenTransformer, rank: int = STAIN_LORA_RANK) -> PixgenTransformer:
    """Wrap ``transformer``'s cross-attention projections with peft LoRA adapters as PixCell's
    ``train_lora.py`` does (rank = alpha, adapter name ``default``); returns the same module."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(STAIN_LORA_TARGETS))
    return inject_adapter_in_model(config, transformer, adapter_name=STAIN_LORA_ADAPTER)


def lora_key(key: str) -> str | None:
    """The published (peft, adapter ``default``) name of a LoRA key in any of the usual spellings:
    peft's ``...lora_A.default.weight``, diffusers' ``transformer.…lora_A.weight`` or peft's
    saved-adapter ``…lora_A.weight``; None for a key that is not a LoRA weight.

    Example:
        >>> lora_key("transformer.transformer_blocks.0.attn2.to_q.lora_A.weight")
        'transformer_blocks.0.attn2.to_q.lora_A.default.weight'
    """
    for part in ("lora_A", "lora_B"):
        if f".{part}." in key:
            key = key.removeprefix("transformer.").removeprefix("base_model.model.")
            head, tail = key.split(f".{part}.", 1)
            return f"{head}.{part}.{STAIN_LORA_ADAPTER}.weight" if tail in ("weight", f"{STAIN_LORA_ADAPTER}.weight") \
                else None
    return None


def load_stain_lora(transformer: PixgenTransformer, path: str | Path, merge: bool = True) -> PixgenTransformer:
    """Apply a virtual-staining LoRA file to a PixCell-1024 transformer, strictly.

    Two layouts are accepted: PixCell's published one (``ckpts/lora/<name>_lora.pth``: the whole
    LoRA-wrapped transformer's state dict, base weights as ``….base_layer.weight``), which replaces
    every weight; or an adapter-only file (diffusers' ``pytorch_lora_weights.safetensors`` or peft
    names), which must hold exactly the adapters. Anything missing, extra or misshapen is refused.
    ``merge`` folds the adapters into the base weights (same outputs, no LoRA cost per step).

    Example:
        >>> load_stain_lora(gen.transformer, "ckpts/lora/mist_her2_lora.pth")   # doctest: +SKIP
    """
    state = read_state(path)
    add_stain_lora(transformer)
    own = transformer.state_dict()
    wanted = {k for k in own if ".lora_" in k}
    if any(".base_layer." in k for k in state):  # PixCell's published layout: everything
        load_strict(transformer, state, path)
    else:
        renamed: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            name = lora_key(key)
            if name is None:
                raise ModelLoadError(f"{path}: {key!r} is neither a LoRA weight nor a published PixCell key",
                                     fix="pass PixCell's ckpts/lora/*_lora.pth or an adapter-only LoRA file")
            renamed[name] = value
        missing, extra = sorted(wanted - set(renamed)), sorted(set(renamed) - wanted)
        wrong = sorted(k for k in set(renamed) & wanted if renamed[k].shape != own[k].shape)
        if missing or extra or wrong:
            raise ModelLoadError(f"{path}: the adapters do not fit this transformer (missing {missing[:3]}, "
                                 f"unexpected {extra[:3]}, wrong shape {wrong[:3]})",
                                 fix=f"a rank-{STAIN_LORA_RANK} LoRA on PixCell-1024's cross-attention is expected")
        transformer.load_state_dict(renamed, strict=False)
    if merge:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in transformer.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
    return transformer.requires_grad_(False).eval()
