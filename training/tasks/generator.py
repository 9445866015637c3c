"""The generator task: a :class:`~pixgen.models.transformer.PixgenTransformer` on a feature cache.

One micro-batch = cached latents + condition tokens, CFG condition dropout through the model's
``drop_condition``, and the objective of :mod:`training.losses` (rectified flow or epsilon
[+ learned variance]). New models are sized by ``cfg.model``; ``cfg.init`` fine-tunes a Generator
(all weights, or LoRA with ``cfg.lora_rank``, merged into the export). The export is a Generator
folder (EMA weights, the cache's VAE, the encoder when it is a local one, an embedding bank).

Example:
    >>> Engine(GeneratorTask(get_preset("tiny"), "cache/"), "runs/t").fit()     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixgen.errors import InputError
from training.engine import Task
from training.presets import TrainConfig

__all__ = [
    "GeneratorTask", "build_transformer", "adopt_init_model", "check_cache_fits", "add_lora", "build_bank",
    "DEFAULT_VAE", "DEFAULT_ENCODER",
]

# The components an image folder is cached with when the run names none (bundled, offline).
DEFAULT_VAE = Path(__file__).resolve().parents[2] / "pixgen" / "weights" / "pixgen-default" / "vae"
DEFAULT_ENCODER = "pixgen-ssl"


def build_transformer(cfg: TrainConfig, latent_shape: tuple[int, int, int], cond_dim: int,
                      encoder_name: str | None, device: str | torch.device | None = None):
    """A new ``PixgenTransformer`` sized by ``cfg.model`` for the cache's latents and encoder.

    Example:
        >>> from training.presets import get_preset
        >>> build_transformer(get_preset("tiny"), (4, 8, 8), 32, "tiny-ssl").config.sample_size
        8
    """
    from pixgen.models.transformer import PixgenTransformer

    channels, height, width = latent_shape
    if height != width:
        raise InputError(f"latents must be square, got {height}x{width}", fix="cache square tiles (--size)")
    if height % cfg.patch_size:
        raise InputError(f"latent side {height} is not a multiple of patch_size {cfg.patch_size}")
    with torch.device(device or "cpu"):
        return PixgenTransformer.from_preset(
            cfg.model, in_channels=channels, out_channels=2 * channels if cfg.learned_sigma else channels,
            sample_size=height, patch_size=cfg.patch_size, caption_channels=cond_dim,
            caption_num_tokens=cfg.condition_tokens, prediction_type=cfg.objective, encoder_name=encoder_name,
        )


def adopt_init_model(cfg: TrainConfig, transformer) -> TrainConfig:
    """An initial model fixes the objective, variance and condition grid: take them from it."""
    mc = transformer.config
    grid = round(mc.caption_num_tokens**0.5)
    return dataclasses.replace(cfg, objective=mc.prediction_type, learned_sigma=transformer.learned_sigma,
                               condition_grid=grid, patch_size=mc.patch_size)


def check_cache_fits(transformer, cache) -> None:
    """Refuse a cache whose latents or embeddings the (initial) model cannot take."""
    mc = transformer.config
    problems = []
    if (mc.in_channels, mc.sample_size) != cache.latent_shape[:2]:
        problems.append(f"latents {cache.latent_shape} vs model ({mc.in_channels}, {mc.sample_size}, {mc.sample_size})")
    if mc.caption_channels != cache.dim:
        problems.append(f"embedding dim {cache.dim} vs model {mc.caption_channels}")
    if mc.encoder_name and cache.encoder_name and mc.encoder_name != cache.encoder_name:
        problems.append(f"encoder {cache.encoder_name!r} vs model {mc.encoder_name!r}")
    if problems:
        raise InputError("the feature cache does not fit the initial model: " + "; ".join(problems),
                         fix="build the cache with the model's own VAE and encoder: pixgen features DATA --model INIT")


def add_lora(model, cfg: TrainConfig):
    """Freeze ``model`` and wrap it with peft LoRA adapters on ``cfg.lora_targets``."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                        target_modules=list(cfg.lora_targets), init_lora_weights=True)
    return get_peft_model(model, config)


def build_bank(cache, per_label: int, seed: int):
    """An :class:`~pixgen.embeddings.EmbeddingBank` of up to ``per_label`` cached tiles per label."""
    from pixgen.embeddings import EmbeddingBank

    values, labels, paths = cache.conditions(), cache.array("labels"), cache.meta("paths")
    names = cache.classes or ["all"]
    rng = np.random.default_rng(seed)
    entries, sources = {}, {}
    for k, name in enumerate(names):
        rows = np.flatnonzero(labels == (k if cache.classes else -1))
        if len(rows) == 0:
            continue
        rows = np.sort(rng.choice(rows, size=min(per_label, len(rows)), replace=False))
        entries[name] = torch.from_numpy(values[rows])
        sources[name] = [paths[i] for i in rows]
    return EmbeddingBank(entries, encoder=cache.encoder_name, sources=sources)


class GeneratorTask(Task):
    """Train or fine-tune a generator (see the module docstring).

    Args:
        cfg: the run's :class:`~training.presets.TrainConfig`.
        data: a feature cache folder, or an image / tile folder (cached into ``RUN/cache`` first,
            with ``cfg.init``'s or ``cfg.vae`` / ``cfg.encoder``'s components, else the bundled ones).
    """

    log_fields = ("mse", "vb")
    cache_fields: tuple[str, ...] = ()

    def __init__(self, cfg: TrainConfig, data: str | Path, trust_remote_code: bool = False):
        self.cfg, self.data = cfg, Path(data)
        self.trust_remote_code = trust_remote_code  # the user's flag, never saved with the run
        self.init_gen = self.cache = self.vae = None
        self._model = None

    # -- the Task interface -------------------------------------------------------------------
    def configure(self, engine) -> None:
        from training.features import INDEX_FILE

        if not (self.data / INDEX_FILE).is_file() and not self.data.is_dir():
            raise InputError(f"no data folder or feature cache at {self.data}",
                             fix="pass a feature cache (pixgen features) or an image / tile folder")
        if self.cfg.init:
            from pixgen.pipeline import Generator

            vae_path = self.cfg.vae if self.cfg.vae and Path(self.cfg.vae).is_dir() else None
            self.init_gen = Generator.from_pretrained(self.cfg.init, vae_path=vae_path,
                                                      encoder_path=self.cfg.encoder_path,
                                                      trust_remote_code=self.trust_remote_code)
            self.cfg = adopt_init_model(self.cfg, self.init_gen.transformer)

    def setup(self, engine) -> None:
        self.cache = self._open_cache(engine)
        if self.init_gen is not None:
            check_cache_fits(self.init_gen.transformer, self.cache)
        self._model = self.build_model()
        if self.cfg.sample_every:
            self.vae = self.cache.load_vae().to(engine.accelerator.device)

    def build_model(self) -> torch.nn.Module:
        """The trainable module: a new or initial transformer (LoRA-wrapped with ``lora_rank``)."""
        cfg = self.cfg
        if self.init_gen is not None:
            model = self.init_gen.transformer.float()
        else:
            model = build_transformer(cfg, self.cache.latent_shape, self.cache.dim, self.cache.encoder_name)
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return add_lora(model, cfg) if cfg.lora_rank else model

    def model(self) -> torch.nn.Module:
        return self._model

    def dataset(self) -> torch.utils.data.Dataset:
        return self.cache

    def loss(self, model, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        x0, cond = batch["latents"], batch["condition"]  # (B, C, H, W), (B, T, D)
        drop = (torch.rand(x0.shape[0], generator=generator) < self.cfg.cfg_dropout).to(x0.device)
        return self.objective(model, x0, cond, drop, generator)

    def sample(self, engine, model):
        """A grid from fixed conditions (the first tile of each label, round-robin) and seed 0."""
        from pixgen.embeddings import Embeddings
        from pixgen.io import contact_sheet
        from pixgen.pipeline import Generator

        base = model.get_base_model() if self.cfg.lora_rank else model
        gen = Generator(base, self.vae, self.scheduler(), config={"num_inference_steps": self.cfg.sample_steps})
        cond = Embeddings(self.sample_conditions(), encoder=self.cache.encoder_name)
        out = gen.generate(embeddings=cond, seed=0, progress=False, batch_size=len(cond))
        return contact_sheet(out.images)

    def export(self, engine, state: dict[str, torch.Tensor], folder: Path) -> None:
        """A Generator folder: the EMA transformer (LoRA merged), VAE, encoder when local, bank."""
        self.generator_from_state(state).save_pretrained(folder)

    def run_info(self) -> dict[str, Any]:
        from training.flops import model_flops, train_step_flops

        cache, cfg = self.cache, self.cfg
        base = self._model.get_base_model() if cfg.lora_rank else self._model
        fwd = model_flops(base.config)["total"]
        return {"data": str(self.data), "cache": str(cache.root), "tiles": len(cache), "classes": cache.classes,
                "encoder": cache.encoder_name, "latent_shape": list(cache.latent_shape),
                "forward_flops_per_sample": fwd,
                "train_flops_per_step": train_step_flops(fwd, cfg.batch_size * cfg.grad_accum,
                                                         cfg.gradient_checkpointing)}

    # -- pieces ---------------------------------------------------------------------------------
    @property
    def objective(self):
        from training.losses import make_objective

        if not hasattr(self, "_objective"):
            self._objective = make_objective(self.cfg)
        return self._objective

    def _open_cache(self, engine):
        """The feature cache: DATA itself, or RUN/cache built from the image folder DATA (rank 0)."""
        from training.features import INDEX_FILE, FeatureCache, build_feature_cache, open_image_source
        from training.features import resolve_components

        cfg, acc = self.cfg, engine.accelerator
        if (self.data / INDEX_FILE).is_file():
            return FeatureCache(self.data, tokens=cfg.condition_tokens, fields=self.cache_fields)
        cache_dir = engine.out / "cache"
        if acc.is_main_process:
            dataset = open_image_source(self.data, mpp=cfg.mpp, size=cfg.image_size, fit=cfg.fit)
            vae, encoder = cfg.vae, cfg.encoder
            if self.init_gen is None and not (vae and encoder):
                vae, encoder = vae or str(DEFAULT_VAE), encoder or DEFAULT_ENCODER
                acc.print(f"caching {self.data} with the bundled components: autoencoder {vae}, encoder {encoder} "
                          "(pass --set vae=PATH --set encoder=NAME_OR_DIR, or --init MODEL, for others)")
            device = "cpu" if engine.cpu else str(acc.device)
            vae_m, enc, local = resolve_components(self.init_gen, vae, encoder, device=device,
                                                   encoder_path=cfg.encoder_path,
                                                   trust_remote_code=self.trust_remote_code)
            build_feature_cache(dataset, cache_dir, vae_m, enc, grid=cfg.condition_grid, device=device,
                                save_encoder=local)
        acc.wait_for_everyone()
        return FeatureCache(cache_dir, tokens=cfg.condition_tokens, fields=self.cache_fields)

    def sample_conditions(self) -> torch.Tensor:
        """Fixed conditions: the first cached tile of each label, round-robin, ``num_samples`` of them."""
        labels = self.cache.array("labels")
        firsts = [int(np.flatnonzero(labels == k)[0]) for k in sorted(set(labels.tolist()))]
        rows = [firsts[i % len(firsts)] for i in range(self.cfg.num_samples)]
        return torch.stack([self.cache[i]["condition"] for i in rows])  # (S, T, D)

    def scheduler(self):
        from pixgen.pipeline import default_scheduler

        if self.init_gen is not None:
            return type(self.init_gen.scheduler).from_config(self.init_gen.scheduler.config)
        return default_scheduler(self.cfg.objective)

    def transformer_from_state(self, state: dict[str, torch.Tensor]):
        """A fresh float32 transformer holding ``state`` (LoRA merged), in eval mode."""
        base = self._model.get_base_model() if self.cfg.lora_rank else self._model
        fresh = type(base).from_config(base.config)
        if self.cfg.lora_rank:
            fresh = add_lora(fresh, self.cfg)
        fresh.load_state_dict(state)
        return (fresh.merge_and_unload() if self.cfg.lora_rank else fresh).float().eval()

    def generator_from_state(self, state: dict[str, torch.Tensor], transformer=None):
        """The exported Generator (``transformer`` given: that one, e.g. the frozen base of a ControlNet)."""
        from pixgen.pipeline import Generator

        cache, cfg = self.cache, self.cfg
        config = dict(self.init_gen.config) if self.init_gen is not None else {}
        config.update({"encoder": cache.encoder_name, "image_size": cache.info["image_size"], "mpp": cache.mpp})
        config.pop("origin", None)
        if cfg.init:
            config["finetuned_from"] = cfg.init
        encoder, config["encoder_path"] = self._own_encoder()
        return Generator(transformer if transformer is not None else self.transformer_from_state(state),
                         cache.load_vae(), self.scheduler(), encoder=encoder,
                         embedding_bank=build_bank(cache, cfg.bank_size, cfg.seed), config=config)

    def _own_encoder(self) -> tuple[Any, str | None]:
        """(encoder, "encoder") when the model must carry its encoder (local / bundled), else (None, None)."""
        if self.cache.encoder_path is not None:
            from pixgen.encoders import load_encoder

            return load_encoder(str(self.cache.encoder_path)), "encoder"
        if self.init_gen is not None and self.init_gen.config.get("encoder_path"):
            return self.init_gen.encoder, "encoder"
        return None, None
