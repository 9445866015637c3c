"""Training configuration: one dataclass, named presets, ``key=value`` overrides.

A run is fully described by a :class:`TrainConfig`. Presets are named instances; the CLI
starts from one and overrides fields (``--set lr=2e-4`` or explicit flags); the resolved
config is written as ``RUN/config.json``.

Example:
    >>> cfg = apply_overrides(get_preset("tiny"), ["lr=3e-4", "mixed_precision=bf16"])
    >>> cfg.lr, cfg.mixed_precision, cfg.model
    (0.0003, 'bf16', 'pixgen-tiny')
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

from pixgen.errors import InputError
from training.engine import EngineConfig

__all__ = ["TrainConfig", "PRESETS", "get_preset", "apply_overrides", "RESUMABLE_FIELDS", "LORA_TARGETS"]

# Attention projections and the MLP of every BasicTransformerBlock (self- and cross-attention).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


@dataclass
class TrainConfig(EngineConfig):
    """Everything a generator or ControlNet training run needs, besides the data and output paths.

    The loop's own settings (optimizer, lr, batch size, mixed precision, EMA, checkpoints, ...)
    are :class:`training.engine.EngineConfig`'s; below are the generator task's.

    Task:
        task: ``"generator"`` (train or fine-tune the transformer) or ``"controlnet"`` (a
            ControlNet over the frozen ``init`` model, steered by the cache field ``control_field``).
        controlnet_layers: blocks the ControlNet copies (0: all of the base model's).
        control_field: the feature-cache field holding control inputs: masks (H, W) at the tile
            size (encoded once by the cache's VAE, PixCell's way) or ready latents (C, h, w).

    Model (new runs; ``init`` replaces all of these with the initial model's):
        model: transformer size preset (``pixgen.models.transformer.PRESETS``).
        patch_size: latent pixels per token side.
        objective: ``"flow"`` (rectified flow, velocity target) or ``"epsilon"`` (DDPM noise target).
        learned_sigma: epsilon only: predict the variance too (IDDPM hybrid loss, as PixCell).
        condition_grid: condition tokens per image = grid**2 (1: one CLS embedding per tile).
    Fine-tuning:
        init: a Generator directory to start from (full fine-tuning, or LoRA with ``lora_rank``).
        lora_rank: 0 = train all weights; > 0 = LoRA on ``lora_targets`` (merged into final/).
    Features (when the data is an image folder, the cache is built into RUN/cache first):
        image_size, mpp, fit, vae, encoder, encoder_path: see ``pixgen features``. ``vae`` and
        ``encoder_path`` also complete an ``init`` model that ships without them (PixCell-256).
        With neither ``init`` nor ``vae`` / ``encoder``, the bundled autoencoder
        (``pixgen/weights/pixgen-default/vae``) and the bundled ``pixgen-ssl`` encoder are used.
    Objective:
        timestep_sampling: flow only: ``"logit-normal"`` (SD3) or ``"uniform"``.
        cfg_dropout: probability that a sample's condition is replaced by the null embedding.
    Optimisation:
        optimizer: ``"adamw"`` or ``"came"`` (needs ``came-pytorch``).
        batch_size: per process; the global batch is batch_size x processes x grad_accum.
        mixed_precision: ``"no"``, ``"bf16"`` (CPU and GPU) or ``"fp16"`` (GPU only).
        ema_decay: 0 disables EMA; final/ holds the EMA weights otherwise.
    Bookkeeping:
        checkpoint_every / keep_checkpoints: ``accelerate`` states, written atomically.
        sample_every: sample grid PNG every N steps (0: never); sample_steps: sampler steps.
    """

    task: str = "generator"
    controlnet_layers: int = 0
    control_field: str = "mask"
    model: str = "pixgen-S/2"
    patch_size: int = 2
    objective: str = "flow"
    learned_sigma: bool = False
    condition_grid: int = 1
    init: str | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = LORA_TARGETS
    image_size: int = 256
    mpp: float | None = None
    fit: str = "crop"
    vae: str | None = None
    encoder: str | None = None
    encoder_path: str | None = None
    timestep_sampling: str = "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cfg_dropout: float = 0.1
    gradient_checkpointing: bool = False
    num_samples: int = 8
    sample_steps: int = 20
    bank_size: int = 1000

    RESUMABLE = EngineConfig.RESUMABLE | {"num_samples", "sample_steps", "bank_size"}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `InputError` naming every inconsistent field."""
        problems = self.engine_problems()
        if self.task not in ("generator", "controlnet"):
            problems.append(f"task must be 'generator' or 'controlnet', got {self.task!r}")
        if self.task == "controlnet" and not self.init:
            problems.append("task=controlnet trains over an existing model: pass --init MODEL")
        if self.task == "controlnet" and self.lora_rank:
            problems.append("task=controlnet trains a ControlNet, not LoRA: set lora_rank=0")
        if self.controlnet_layers < 0:
            problems.append(f"controlnet_layers must be >= 0, got {self.controlnet_layers}")
        if self.objective not in ("flow", "epsilon"):
            problems.append(f"objective must be 'flow' or 'epsilon', got {self.objective!r}")
        if self.learned_sigma and self.objective != "epsilon":
            problems.append("learned_sigma needs objective=epsilon")
        if self.timestep_sampling not in ("logit-normal", "uniform"):
            problems.append(f"timestep_sampling must be 'logit-normal' or 'uniform', got {self.timestep_sampling!r}")
        if not 0 <= self.cfg_dropout < 1:
            problems.append(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        for name in ("condition_grid", "sample_steps", "image_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lora_rank < 0:
            problems.append(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_rank and not self.init:
            problems.append("LoRA (lora_rank > 0) fine-tunes an existing model: pass --init MODEL")
        if problems:
            raise InputError("invalid training config: " + "; ".join(problems))

    @property
    def condition_tokens(self) -> int:
        return self.condition_grid**2

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict` (unknown keys are an error; lists become tuples)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise InputError(f"unknown training config field(s): {', '.join(unknown)}")
        return cls(**{k: _parse(known[k], v) for k, v in data.items()})


PRESETS: dict[str, TrainConfig] = {
    # Seconds on a laptop CPU: a 2-layer model, for tests and smoke runs.
    "tiny": TrainConfig(
        model="pixgen-tiny", image_size=32, lr=1e-3, warmup_steps=0, batch_size=8, max_steps=100,
        ema_decay=0.99, checkpoint_every=50, keep_checkpoints=2, sample_every=0, num_samples=4,
        sample_steps=4, log_every=10, bank_size=64, tensorboard=False,
    ),
    # The bundled default generator, sized to train in ~2 CPU-hours (docs/compute-plan.md):
    # 8 x 256, patch 4 on the bundled f4 autoencoder's 32x32 latents of 128 px tiles at 0.5 um/px
    # (64 tokens), conditioned on one pixgen-ssl token. Pass the autoencoder with --set vae=PATH.
    "default-128": TrainConfig(
        model="pixgen-XS", patch_size=4, image_size=128, mpp=0.5, encoder="pixgen-ssl", lr=3e-4,
        batch_size=64, warmup_steps=200, max_steps=4000, mixed_precision="bf16", ema_decay=0.999,
        checkpoint_every=250, sample_every=500, bank_size=2000,
    ),
    # Generator v2 (docs/generator-v2.md): the same data, encoder and schedule as default-128 on the
    # hourglass pixgen-XS-H (conv stages at 32x32 and 16x16 latents, 6 blocks on 8x8 tokens):
    # ~the same CPU time per sample as pixgen-XS at patch 4, for a long, resumable CPU run.
    "default-128-v2": TrainConfig(
        model="pixgen-XS-H", patch_size=2, image_size=128, mpp=0.5, encoder="pixgen-ssl", lr=3e-4,
        batch_size=64, warmup_steps=200, max_steps=30000, mixed_precision="bf16", ema_decay=0.999,
        checkpoint_every=100, keep_checkpoints=3, sample_every=1000, bank_size=2000,
    ),
    # pixgen-S/2 on 256 px tiles through an f8 VAE (32x32 latents): a GPU-sized model.
    "S-256": TrainConfig(model="pixgen-S/2", image_size=256, lr=2e-4, batch_size=32, warmup_steps=1000),
    "B-256": TrainConfig(model="pixgen-B/2", image_size=256, lr=1e-4, batch_size=32, warmup_steps=1000),
    # PixCell-style fine-tuning: epsilon + learned variance, LoRA on an existing XL/2 model.
    "pixcell-finetune": TrainConfig(
        model="pixgen-XL/2", objective="epsilon", learned_sigma=True, lora_rank=16, image_size=256,
        lr=1e-4, batch_size=8, warmup_steps=100, max_steps=5000, ema_decay=0.999, mixed_precision="bf16",
        gradient_checkpointing=True, init="StonyBrook-CVLab/PixCell-256", checkpoint_every=500, sample_every=500,
    ),
    # Virtual staining (docs/staining.md), PixCell's recipe (virtual_staining/train_lora.py): rank-4 LoRA
    # (alpha 4) on PixCell-1024's cross-attention, lr 1e-4, condition dropout 0.1, on the IHC tiles of the
    # pairs (python -m training.tasks.lora); and the direct baseline, a ControlNet over the same base (27
    # copied blocks, as PixCell's cell ControlNet) with the H&E latents as its control input
    # (python -m training.tasks.stain_controlnet).
    "pixcell-stain-lora": TrainConfig(
        model="pixgen-XL/2", objective="epsilon", learned_sigma=True, condition_grid=4, image_size=1024,
        init="StonyBrook-CVLab/PixCell-1024", lora_rank=4, lora_alpha=4.0,
        lora_targets=("attn2.add_k_proj", "attn2.add_q_proj", "attn2.add_v_proj", "attn2.to_add_out", "attn2.to_k",
                      "attn2.to_out.0", "attn2.to_q", "attn2.to_v"),
        lr=1e-4, batch_size=4, warmup_steps=500, max_steps=20000, mixed_precision="bf16", ema_decay=0.0,
        gradient_checkpointing=True, checkpoint_every=500, sample_every=0,
    ),
    "pixcell-stain-controlnet": TrainConfig(
        task="controlnet", control_field="he_latents", model="pixgen-XL/2", objective="epsilon", learned_sigma=True,
        condition_grid=4, image_size=1024, init="StonyBrook-CVLab/PixCell-1024", controlnet_layers=27, lr=1e-5,
        batch_size=4, warmup_steps=500, max_steps=20000, mixed_precision="bf16", ema_decay=0.0,
        gradient_checkpointing=True, checkpoint_every=500, sample_every=0,
    ),
}

# Presets that only their own command runs (it tags the export with the IHC stain and registers it).
OWN_COMMAND = {"pixcell-stain-lora": "python -m training.tasks.lora",
               "pixcell-stain-controlnet": "python -m training.tasks.stain_controlnet"}

# Fields that may differ between an interrupted run and its resumption.
RESUMABLE_FIELDS = TrainConfig.RESUMABLE


def get_preset(name: str) -> TrainConfig:
    """A fresh copy of a named preset.

    Example:
        >>> get_preset("S-256").model
        'pixgen-S/2'
    """
    if name not in PRESETS:
        raise InputError(f"unknown training preset {name!r}", fix=f"use one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def apply_overrides(cfg: TrainConfig, overrides: list[str] | dict[str, Any]) -> TrainConfig:
    """Return ``cfg`` with fields replaced from ``key=value`` strings (parsed by field type) or a dict.

    Example:
        >>> apply_overrides(get_preset("tiny"), ["adam_betas=0.9,0.95", "init=none"]).adam_betas
        (0.9, 0.95)
    """
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise InputError(f"override {item!r} is not key=value", fix="e.g. --set lr=2e-4")
            items.append((key.strip().replace("-", "_"), value.strip()))
    changes = {}
    for key, value in items:
        if key not in known:
            raise InputError(f"unknown training config field {key!r}", fix=f"fields: {', '.join(known)}")
        changes[key] = _parse(known[key], value)
    return dataclasses.replace(cfg, **changes)


def _parse(f: dataclasses.Field, value: Any) -> Any:
    """Convert a string (or JSON value) to the type declared for field ``f``."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if optional and len(args) == 1 else hint
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    origin = typing.get_origin(base)
    try:
        if origin is tuple:
            parts = value.split(",") if isinstance(value, str) else list(value)
            elem = typing.get_args(base)[0]
            return tuple(elem(p.strip()) if isinstance(p, str) else elem(p) for p in parts if p != "")
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base in (int, float, str):
            return base(float(value)) if base is int and isinstance(value, str) and "e" in value.lower() else base(value)
        if isinstance(base, types.UnionType):  # e.g. float | None handled above; keep value
            return value
    except (TypeError, ValueError):
        raise InputError(f"bad value {value!r} for {f.name} (expects {hint})") from None
    return value
