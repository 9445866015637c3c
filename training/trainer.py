"""``pixgen train``: the generator and ControlNet tasks on the training engine, from one CPU to many GPUs.

The loop (seeding, accumulation, bf16, EMA, safe checkpoints, exact resume, log, sample grids,
export) is :class:`training.engine.Engine`'s; what is trained is :mod:`training.tasks`'
(:class:`~training.tasks.GeneratorTask`, :class:`~training.tasks.ControlNetTask` with
``--task controlnet``). See :mod:`training.engine` for the run folder and checkpoint format.

Run directory (besides the engine's)::

    RUN/cache/               feature cache, when DATA was an image folder (bundled VAE + pixgen-ssl
                             unless --init or --set vae=... encoder=... name others)
    RUN/final/               Generator directory (EMA weights, LoRA merged; a ControlNet run adds
                             controlnet/): ``pixgen generate --model RUN/final``

Example:
    $ pixgen train --preset tiny --data cache/ --out runs/t --max-steps 100
    $ accelerate launch --multi_gpu --num_processes 2 -m pixgen.cli train --preset S-256 --data cache/ --out runs/s
    >>> Trainer(get_preset("tiny"), "cache/", "runs/t").fit()     # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from pixgen.errors import InputError
from training.engine import Engine, list_checkpoints, step_seed
from training.presets import OWN_COMMAND, PRESETS, TrainConfig, apply_overrides, get_preset
from training.tasks import ControlNetTask, GeneratorTask
from training.tasks.generator import build_transformer

__all__ = [
    "Trainer", "train", "resolve_config", "dry_run_report", "list_checkpoints", "step_seed",
    "build_transformer", "add_parser", "run",
]


class Trainer(Engine):
    """Train (or fine-tune) a generator, or a ControlNet (``cfg.task``), on a feature cache or an
    image folder: the :class:`~training.engine.Engine` with a generator or ControlNet task.

    Args:
        cfg: the resolved :class:`~training.presets.TrainConfig`.
        data: a feature cache directory, or an image / tile folder (cached into ``out/cache``).
        out: the run directory.
        resume: continue from the latest checkpoint in ``out`` (a fresh start when there is none).
        cpu: force the CPU even when a GPU is present.
        trust_remote_code: the user's flag for a pinned registry encoder's own code (never saved in
            the run, so a run folder cannot turn it on).

    Example:
        >>> final = Trainer(get_preset("tiny"), "cache/", "runs/t").fit()   # doctest: +SKIP
        >>> Generator.from_pretrained(final).generate(label="lung_aca")     # doctest: +SKIP
    """

    def __init__(self, cfg: TrainConfig, data: str | Path, out: str | Path, resume: bool = False,
                 cpu: bool | None = None, trust_remote_code: bool = False):
        kind = ControlNetTask if cfg.task == "controlnet" else GeneratorTask
        task = kind(cfg, data, trust_remote_code=trust_remote_code)
        super().__init__(task, out, resume=resume, cpu=cpu)
        self.data = Path(data)


def train(cfg: TrainConfig, data: str | Path, out: str | Path, resume: bool = False) -> Path:
    """Convenience wrapper: ``Trainer(cfg, data, out, resume).fit()``."""
    return Trainer(cfg, data, out, resume=resume).fit()


# ----------------------------------------------------------------------------- dry run
def _geometry(cfg: TrainConfig, data: Path) -> tuple[dict[str, Any], str]:
    """Latent shape, condition dim and tokens: from the cache if DATA is one, else from the
    VAE / encoder configs named in ``cfg``, else assumed (f8, 16 channels, 1536-d: SD3.5 VAE + UNI2-h)."""
    from training.features import INDEX_FILE

    if (data / INDEX_FILE).is_file():
        info = json.loads((data / INDEX_FILE).read_text())
        c, h, _ = info["arrays"]["latents"]["shape"]
        return {"channels": c, "side": h, "dim": info["encoder"]["dim"], "encoder": info["encoder"]["name"]}, "cache"
    from training.tasks.generator import DEFAULT_ENCODER, DEFAULT_VAE

    vae, encoder_name = cfg.vae, cfg.encoder
    if not cfg.init and not (vae and encoder_name):  # the run will cache with the bundled components
        vae, encoder_name = vae or str(DEFAULT_VAE), encoder_name or DEFAULT_ENCODER
    factor, channels, dim, encoder, source = 8, 16, 1536, encoder_name, "assumed"
    if vae and (Path(vae) / "config.json").is_file():
        vc = json.loads((Path(vae) / "config.json").read_text())
        factor = 2 ** (len(vc.get("block_out_channels", [0] * 4)) - 1) if vc.get("_class_name") != "PixelSpace" else 1
        channels, source = vc.get("latent_channels", vc.get("channels", channels)), "vae config"
    if encoder_name:
        try:
            from pixgen.encoders import get_encoder_spec, read_saved_spec

            spec = read_saved_spec(encoder_name) if Path(encoder_name).is_dir() else get_encoder_spec(encoder_name)
            dim, encoder = spec.dim, spec.name
        except Exception:  # an unknown name: the assumption stands, the real run will say why
            pass
    return {"channels": channels, "side": cfg.image_size // factor, "dim": dim, "encoder": encoder}, source


def _dry_run_model(cfg: TrainConfig, geo: dict[str, Any]):
    """The model the run would train, on the meta device (no memory): its config and parameters.
    A hub ``init`` is not downloaded for a dry run: the preset's size stands in for it."""
    from pixgen.models.transformer import PixgenTransformer

    path = Path(cfg.init or "") / "transformer" / "config.json"
    if cfg.init and path.is_file():  # a local model: its own size (pixgen or PixCell layout)
        config = json.loads(path.read_text())
        if config.get("_class_name", "").startswith("PixCell"):
            from pixgen.pixcell import pixcell_to_pixgen_config

            config = pixcell_to_pixgen_config(config)
        with torch.device("meta"):
            return PixgenTransformer.from_config(config)
    return build_transformer(cfg, (geo["channels"], geo["side"], geo["side"]), geo["dim"], geo["encoder"], "meta")


def dry_run_report(cfg: TrainConfig, data: str | Path, processes: int = 1, measure_seconds: float = 0.5) -> str:
    """The resolved config and the arithmetic of the run: parameters, FLOPs per step, and the time
    it would take at this machine's measured matmul rate (fp32 and bf16).

    Example:
        >>> print(dry_run_report(get_preset("S-256"), "cache/"))    # doctest: +SKIP
    """
    from training.flops import measure_matmul_rate, model_flops, token_count, train_step_flops

    geo, source = _geometry(cfg, Path(data))
    model = _dry_run_model(cfg, geo)
    params = sum(p.numel() for p in model.parameters())
    lora = sum(cfg.lora_rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if cfg.lora_rank and isinstance(m, torch.nn.Linear) and any(
                   name == t or name.endswith("." + t) for t in cfg.lora_targets))
    fwd = model_flops(model.config)
    global_batch = cfg.batch_size * cfg.grad_accum * processes
    step_flops = train_step_flops(fwd["total"], global_batch, cfg.gradient_checkpointing)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rates = {"fp32": measure_matmul_rate(torch.float32, seconds=measure_seconds, device=device),
             "bf16": measure_matmul_rate(torch.bfloat16, seconds=measure_seconds, device=device)}
    mc = model.config
    lines = [
        "config:", cfg.to_json(), "",
        f"model: {cfg.model if not cfg.init else cfg.init} -> layers {mc.num_layers}, width "
        f"{mc.num_attention_heads * mc.attention_head_dim}, patch {mc.patch_size}",
        f"latents: {geo['channels']} x {geo['side']} x {geo['side']} ({source}); tokens "
        f"{token_count(mc, geo['side'])}; condition {mc.caption_num_tokens} x {mc.caption_channels} "
        f"({geo['encoder'] or 'encoder unknown'})",
        f"parameters: {params:,} ({params / 1e6:.1f} M)" + (f"; LoRA trainable ~{lora:,}" if lora else ""),
        f"forward FLOPs per sample: {fwd['total'] / 1e9:.3f} GFLOP "
        f"(attention {(fwd['self_attention'] + fwd['cross_attention']) / fwd['total']:.0%}, "
        f"MLP {fwd['mlp'] / fwd['total']:.0%})",
        f"training FLOPs per step: {step_flops / 1e12:.4f} TFLOP "
        f"({'4' if cfg.gradient_checkpointing else '3'} x forward x global batch {global_batch})",
        f"total for {cfg.max_steps:,} steps: {step_flops * cfg.max_steps / 1e15:.3f} PFLOP",
    ]
    for name, rate in rates.items():
        per_step = step_flops / (rate * processes)
        lines.append(f"matmul peak {name} on this {device} (measured now): {rate / 1e9:,.0f} GFLOP/s per process -> "
                     f">= {per_step:.3g} s/step, >= {_duration(per_step * cfg.max_steps)} for {cfg.max_steps:,} steps")
    lines.append("(lower bounds at the matmul peak; the CPU trainer reaches ~30-60% of it, see docs/training.md)")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


# ----------------------------------------------------------------------------- CLI
def resolve_config(preset: str | None, out: str | Path, resume: bool, overrides: dict[str, Any],
                   sets: list[str]) -> TrainConfig:
    """Preset (or, with ``resume``, the run's saved config) + explicit options + ``--set`` items.

    Example:
        >>> resolve_config("tiny", "runs/x", False, {"max_steps": 5}, ["lr=1e-3"]).max_steps   # doctest: +SKIP
        5
    """
    saved = Path(out) / "config.json"
    if resume and saved.is_file():
        base = TrainConfig.from_dict(json.loads(saved.read_text()))
    else:
        base = get_preset(preset or "S-256")
    return apply_overrides(apply_overrides(base, {k: v for k, v in overrides.items() if v is not None}), sets)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``pixgen train``: train or fine-tune a generator (see ``docs/training.md``)."""
    p = subparsers.add_parser(
        "train", help="train or fine-tune a generator on a feature cache or an image folder",
        description="Train a pixgen generator with accelerate (also under `accelerate launch`). "
                    "RUN/final is a model directory for `pixgen generate --model RUN/final`.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named config (default S-256; with --resume: the run's)")
    p.add_argument("--task", choices=["generator", "controlnet"],
                   help="what to train (default generator; controlnet: over the frozen --init model)")
    p.add_argument("--data", required=True, help="feature cache (pixgen features) or image / tile folder "
                   "(cached with the bundled autoencoder and pixgen-ssl unless --init or --set vae/encoder)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"])
    p.add_argument("--gradient-checkpointing", action="store_const", const=True, default=None)
    p.add_argument("--init", help="Generator directory or hub id to fine-tune")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--mpp", type=float, help="microns per pixel of an image-folder DATA")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig field")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--dry-run", action="store_true", help="print the config and the arithmetic, train nothing")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run a pinned registry encoder's own hub code (never code found in a folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {"task": args.task, "max_steps": args.max_steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                 "lr": args.lr, "mixed_precision": args.mixed_precision, "init": args.init,
                 "lora_rank": args.lora_rank, "mpp": args.mpp, "gradient_checkpointing": args.gradient_checkpointing}
    if args.preset in OWN_COMMAND:
        raise InputError(f"preset {args.preset!r} trains an IHC model, which pixgen train would export tagged as H&E",
                         fix=f"run it with its own command: {OWN_COMMAND[args.preset]} --help (docs/staining.md)")
    cfg = resolve_config(args.preset, args.out, args.resume, overrides, args.set)
    if args.dry_run:
        print(dry_run_report(cfg, args.data, processes=int(os.environ.get("WORLD_SIZE", 1))))
        return 0
    final = Trainer(cfg, args.data, args.out, resume=args.resume, cpu=True if args.cpu else None,
                    trust_remote_code=args.trust_remote_code).fit()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done: pixgen generate --model {final} --label ... --out samples/")
    return 0
