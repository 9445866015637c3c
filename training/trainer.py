"""The trainer: ``pixgen train``, on accelerate, from one CPU to many GPUs and nodes.

One training step = ``grad_accum`` micro-batches of cached latents + condition tokens, the
objective of :mod:`training.losses` (rectified flow or epsilon [+ learned variance]), CFG
condition dropout through the model's ``drop_condition``, AdamW (or CAME), EMA
(``diffusers.training_utils.EMAModel``), optional bf16 autocast and gradient checkpointing.

Exact resume: all randomness of a step (noise, timesteps, condition dropout) comes from a
generator seeded with (seed, step, micro-batch, rank), and the data order from accelerate's
seedable sampler (epoch-seeded) with ``skip_first_batches`` inside an epoch. A checkpoint
(``accelerator.save_state`` + EMA + step) is written to a temporary folder and renamed, so an
interrupted run resumed with ``--resume`` ends with bit-identical weights (on CPU) to an
uninterrupted one.

Run directory::

    RUN/config.json          resolved TrainConfig (``--resume`` starts from it)
    RUN/run.json             data, processes, model size, FLOPs, versions
    RUN/log.csv              step, loss, lr, grad norm, samples/s  (+ RUN/logs/ TensorBoard)
    RUN/cache/               feature cache, when DATA was an image folder
    RUN/checkpoints/checkpoint-00001000/   the last ``keep_checkpoints`` states
    RUN/samples/step-00001000.png          sample grids from fixed conditions (EMA weights)
    RUN/checksums/rank-N.txt               sha256 of each process's final weights
    RUN/final/               Generator directory (EMA weights, LoRA merged): ``pixgen generate --model RUN/final``

Example:
    $ pixgen train --preset tiny --data cache/ --out runs/t --max-steps 100
    $ accelerate launch --multi_gpu --num_processes 2 -m pixgen.cli train --preset S-256 --data cache/ --out runs/s
    >>> Trainer(get_preset("tiny"), "cache/", "runs/t").fit()     # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixgen.errors import InputError
from pixgen.io import atomic_dir, atomic_write, write_json_atomic
from training.presets import PRESETS, RESUMABLE_FIELDS, TrainConfig, apply_overrides, get_preset

__all__ = [
    "Trainer", "train", "resolve_config", "dry_run_report", "list_checkpoints", "step_seed",
    "build_transformer", "add_parser", "run",
]

CHECKPOINT_PREFIX = "checkpoint-"
LOG_FIELDS = ["step", "epoch", "loss", "mse", "vb", "lr", "grad_norm", "samples_per_s", "seconds"]


# ----------------------------------------------------------------------------- small pieces
def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The seed of one micro-batch's randomness: a pure function of where it is in the run.

    Example:
        >>> step_seed(0, 10, 0, 0) == step_seed(0, 10, 0, 0) != step_seed(0, 10, 0, 1)
        True
    """
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are not listed)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 over a module's state dict (sorted keys, raw bytes): equal iff the weights are equal."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_transformer(cfg: TrainConfig, latent_shape: tuple[int, int, int], cond_dim: int,
                      encoder_name: str | None, device: str | torch.device | None = None):
    """A new ``PixgenTransformer`` sized by ``cfg.model`` for the cache's latents and encoder.

    Example:
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


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or CAME (PixArt's memory-light optimizer) when ``came-pytorch`` is installed."""
    if cfg.optimizer == "came":
        try:
            from came_pytorch import CAME
        except ImportError:
            raise InputError("optimizer=came needs the came-pytorch package",
                             fix="pip install came-pytorch, or use optimizer=adamw") from None
        return CAME(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(*cfg.adam_betas, 0.9999),
                    eps=(1e-30, 1e-16))
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)


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


class CsvLog:
    """Append-only CSV log; on resume, rows after the resumed step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.is_file():
            with path.open(newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
            self._write(rows, "w")
        elif not path.is_file() or resume_step is None:
            self._write([], "w")

    def _write(self, rows: list[dict[str, Any]], mode: str) -> None:
        with self.path.open(mode, newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS, extrasaction="ignore")
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        self._write([{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}], "a")


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Train (or fine-tune) a generator on a feature cache or an image folder.

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
        self.cfg, self.data, self.out, self.resume = cfg, Path(data), Path(out), resume
        self.trust_remote_code = trust_remote_code
        self.cpu = (not torch.cuda.is_available()) if cpu is None else cpu

    def on_step_end(self, step: int, logs: dict[str, float]) -> None:
        """Called on every process after each optimizer step (a hook for monitoring and tests)."""

    # -- setup ----------------------------------------------------------------------------
    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration
        from accelerate.utils import is_tensorboard_available

        from accelerate.state import AcceleratorState

        cfg = self.cfg
        # A process may train more than once (notebooks, tests): forget the previous run's settings
        # (mixed precision ...) but keep the process group (PartialState) of a distributed launch.
        AcceleratorState._reset_state(reset_partial_state=False)
        if cfg.mixed_precision == "fp16" and self.cpu:
            raise InputError("fp16 mixed precision needs a GPU", fix="use mixed_precision=bf16 on CPUs")
        tensorboard = cfg.tensorboard and is_tensorboard_available()
        return Accelerator(
            cpu=self.cpu,
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum, sync_with_dataloader=False),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
            step_scheduler_with_optimizer=False,
            log_with="tensorboard" if tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )

    def _data(self, acc, init_gen):
        """The feature cache: DATA itself, or RUN/cache built from the image folder DATA (rank 0)."""
        from training.features import INDEX_FILE, FeatureCache, build_feature_cache, open_image_source
        from training.features import resolve_components

        cfg = self.cfg
        if (self.data / INDEX_FILE).is_file():
            return FeatureCache(self.data, tokens=cfg.condition_tokens)
        cache_dir = self.out / "cache"
        if acc.is_main_process:
            dataset = open_image_source(self.data, mpp=cfg.mpp, size=cfg.image_size, fit=cfg.fit)
            if not (init_gen or (cfg.vae and cfg.encoder)):
                raise InputError("to cache an image folder the trainer needs a VAE and an encoder",
                                 fix="pass --init MODEL, or --set vae=PATH --set encoder=NAME_OR_DIR "
                                     "(or build the cache first with `pixgen features`)")
            device = "cpu" if self.cpu else str(acc.device)
            vae, enc, local = resolve_components(init_gen, cfg.vae, cfg.encoder, device=device,
                                                 encoder_path=cfg.encoder_path, trust_remote_code=self.trust_remote_code)
            build_feature_cache(dataset, cache_dir, vae, enc, grid=cfg.condition_grid, device=device,
                                save_encoder=local)
        acc.wait_for_everyone()
        return FeatureCache(cache_dir, tokens=cfg.condition_tokens)

    def _write_config(self, acc) -> None:
        path = self.out / "config.json"
        if path.is_file() and self.resume:
            saved = TrainConfig.from_dict(json.loads(path.read_text()))
            changed = [f.name for f in dataclasses.fields(TrainConfig)
                       if getattr(saved, f.name) != getattr(self.cfg, f.name) and f.name not in RESUMABLE_FIELDS]
            if changed:
                raise InputError(f"cannot resume {self.out} with a different {', '.join(changed)}",
                                 fix="resume with the run's own config.json, or start a new --out")
        if acc.is_main_process:
            write_json_atomic(path, self.cfg.to_dict())

    # -- the run --------------------------------------------------------------------------
    def fit(self) -> Path:
        """Run to ``cfg.max_steps`` and write ``out/final``; returns its path."""
        from accelerate.utils import set_seed
        from diffusers.optimization import get_constant_schedule_with_warmup
        from diffusers.training_utils import EMAModel

        from training.losses import make_objective

        acc = self._accelerator()
        checkpoints = list_checkpoints(self.out)
        if checkpoints and not self.resume:
            raise InputError(f"{self.out} already holds checkpoints of a run",
                             fix="pass --resume to continue it, or a new --out")
        set_seed(self.cfg.seed)
        init_gen = self._init_generator()
        if init_gen is not None:
            self.cfg = adopt_init_model(self.cfg, init_gen.transformer)
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_config(acc)
        cfg = self.cfg
        cache = self._data(acc, init_gen)
        if len(cache) < cfg.batch_size * acc.num_processes:
            raise InputError(f"{len(cache)} cached tiles are fewer than one global batch "
                             f"({cfg.batch_size} x {acc.num_processes} processes)", fix="lower --batch-size")
        if init_gen is not None:
            check_cache_fits(init_gen.transformer, cache)
            model = init_gen.transformer.float()
        else:
            model = build_transformer(cfg, cache.latent_shape, cache.dim, cache.encoder_name)
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        if cfg.lora_rank:
            model = add_lora(model, cfg)
        model.train()
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
        scheduler = get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
        loader = torch.utils.data.DataLoader(cache, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                             num_workers=cfg.num_workers, pin_memory=not self.cpu)
        model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
        params = [p for p in model.parameters() if p.requires_grad]  # as the wrapper (DDP/FSDP) holds them
        ema = None
        if cfg.ema_decay:  # diffusers' EMA: warm-up schedule, state_dict for checkpoints, store/restore
            ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=cfg.ema_warmup, power=3 / 4)
            acc.register_for_checkpointing(ema)
        step = self._restore(acc, checkpoints)
        self._write_run_info(acc, cache, acc.unwrap_model(model), step)
        self.vae = cache.load_vae().to(acc.device) if cfg.sample_every else None
        self._train(acc, model, optimizer, scheduler, ema, params, loader, make_objective(cfg), cache, step,
                    init_gen)
        return self._finish(acc, model, ema, params, cache, init_gen)

    def _init_generator(self):
        if not self.cfg.init:
            return None
        from pixgen.pipeline import Generator

        cfg = self.cfg
        vae_path = cfg.vae if cfg.vae and Path(cfg.vae).is_dir() else None
        return Generator.from_pretrained(cfg.init, vae_path=vae_path, encoder_path=cfg.encoder_path,
                                         trust_remote_code=self.trust_remote_code)

    def _restore(self, acc, checkpoints: list[Path]) -> int:
        """Load the latest checkpoint (``--resume``); returns the step to continue from."""
        if not (self.resume and checkpoints):
            return 0
        acc.load_state(str(checkpoints[-1]))
        state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
        acc.print(f"resumed from {checkpoints[-1]} (step {state['step']})")
        return int(state["step"])

    def _batches(self, acc, loader, start_batch: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches from ``start_batch`` on: epoch e uses the sampler seeded with e."""
        epoch, skip = divmod(start_batch, len(loader))
        while True:
            self.epoch = epoch
            loader.set_epoch(epoch)
            yield from (acc.skip_first_batches(loader, skip) if skip else loader)
            epoch, skip = epoch + 1, 0

    def _train_step(self, acc, model, optimizer, scheduler, ema, params, objective, batches, step: int
                    ) -> dict[str, float]:
        cfg, logs = self.cfg, {}
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            with acc.accumulate(model):
                gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, micro, acc.process_index))
                x0, cond = batch["latents"], batch["condition"]  # (B, C, H, W), (B, T, D)
                drop = (torch.rand(x0.shape[0], generator=gen) < cfg.cfg_dropout).to(x0.device)
                loss, parts = objective(model, x0, cond, drop, gen)
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    logs["grad_norm"] = float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in {"loss": loss.item(), **parts}.items():
                logs[key] = logs.get(key, 0.0) + value / cfg.grad_accum
        logs["lr"] = scheduler.get_last_lr()[0]
        scheduler.step()
        if ema is not None:
            ema.step(params)
        return logs

    def _train(self, acc, model, optimizer, scheduler, ema, params, loader, objective, cache, step: int,
               init_gen) -> None:
        cfg = self.cfg
        log = CsvLog(self.out / "log.csv", step if self.resume else None) if acc.is_main_process else None
        if acc.log_with:
            acc.init_trackers("tensorboard")
        batches = self._batches(acc, loader, step * cfg.grad_accum)
        samples_per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
        window: dict[str, float] = {}
        t_window = t_start = time.perf_counter()
        n_window = 0
        while step < cfg.max_steps:
            logs = self._train_step(acc, model, optimizer, scheduler, ema, params, objective, batches, step)
            step += 1
            n_window += 1
            for key, value in logs.items():
                window[key] = window.get(key, 0.0) + value
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                means = {k: v / n_window for k, v in window.items()}
                means["loss"] = acc.reduce(torch.tensor(means["loss"], device=acc.device), "mean").item()
                now = time.perf_counter()
                row = {"step": step, "epoch": self.epoch, **means, "seconds": round(now - t_start, 3),
                       "samples_per_s": samples_per_step * n_window / (now - t_window)}
                if log is not None:
                    log.append(row)
                if acc.log_with:
                    acc.log({k: v for k, v in row.items() if k != "step"}, step=step)
                acc.print(f"step {step}/{cfg.max_steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                          f"{row['samples_per_s']:.1f} samples/s")
                window, n_window, t_window = {}, 0, time.perf_counter()
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                self._save_checkpoint(acc, step)
            if cfg.sample_every and step % cfg.sample_every == 0:
                self._sample(acc, model, ema, params, cache, step, init_gen)
            self.on_step_end(step, logs)

    # -- checkpoints, samples, final --------------------------------------------------------
    def _save_checkpoint(self, acc, step: int) -> None:
        """``accelerator.save_state`` into a temporary folder, renamed when complete; keep the last K."""
        folder = self.out / "checkpoints"
        name = f"{CHECKPOINT_PREFIX}{step:08d}"
        tmp, final = folder / f".tmp-{name}", folder / name
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_json_atomic(tmp / "trainer_state.json", {"step": step, "epoch": self.epoch,
                                                           "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in list_checkpoints(self.out)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _base_model(self, acc, model):
        """The PixgenTransformer inside DDP / peft wrappers (LoRA layers still injected)."""
        inner = acc.unwrap_model(model)
        return inner.get_base_model() if self.cfg.lora_rank else inner

    def _sample_conditions(self, cache) -> torch.Tensor:
        """Fixed conditions: the first cached tile of each label, round-robin, ``num_samples`` of them."""
        labels = cache.array("labels")
        firsts = [int(np.flatnonzero(labels == k)[0]) for k in sorted(set(labels.tolist()))]
        rows = [firsts[i % len(firsts)] for i in range(self.cfg.num_samples)]
        return torch.stack([cache[i]["condition"] for i in rows])  # (S, T, D)

    def _scheduler(self, init_gen):
        from pixgen.pipeline import default_scheduler

        if init_gen is not None:
            return type(init_gen.scheduler).from_config(init_gen.scheduler.config)
        return default_scheduler(self.cfg.objective)

    def _sample(self, acc, model, ema, params, cache, step: int, init_gen) -> None:
        """RUN/samples/step-N.png from fixed conditions and seeds, EMA weights (every rank runs it:
        sharded models need all of them; rank 0 writes)."""
        from pixgen.embeddings import Embeddings
        from pixgen.io import contact_sheet
        from pixgen.pipeline import Generator

        base = self._base_model(acc, model)
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        base.eval()
        try:
            gen = Generator(base, self.vae, self._scheduler(init_gen), config={"num_inference_steps": self.cfg.sample_steps})
            cond = Embeddings(self._sample_conditions(cache), encoder=cache.encoder_name)
            out = gen.generate(embeddings=cond, seed=0, progress=False, batch_size=len(cond))
            if acc.is_main_process:
                with atomic_write(self.out / "samples" / f"step-{step:08d}.png") as fh:
                    contact_sheet(out.images).save(fh, format="PNG")
        finally:
            base.train()
            if ema is not None:
                ema.restore(params)

    def _finish(self, acc, model, ema, params, cache, init_gen) -> Path:
        """Per-rank checksums; RUN/final from the EMA weights (LoRA merged) by rank 0; process group closed.

        The weights go through ``accelerator.get_state_dict`` (a collective: it gathers FSDP /
        ZeRO-3 shards) into a fresh copy of the model, so the same code serves DDP and sharded runs.
        """
        from pixgen.pipeline import Generator

        acc.wait_for_everyone()
        inner = acc.unwrap_model(model)
        if acc.distributed_type != "FSDP":  # FSDP ranks hold different shards by design
            (self.out / "checksums").mkdir(exist_ok=True)
            (self.out / "checksums" / f"rank-{acc.process_index}.txt").write_text(weights_checksum(inner) + "\n")
        if ema is not None:
            ema.copy_to(params)
        state = acc.get_state_dict(model)  # every rank takes part
        final = self.out / "final"
        if acc.is_main_process:
            base = inner.get_base_model() if self.cfg.lora_rank else inner
            fresh = type(base).from_config(base.config)
            if self.cfg.lora_rank:
                fresh = add_lora(fresh, self.cfg)
            fresh.load_state_dict({k: v.float() for k, v in state.items()})
            transformer = (fresh.merge_and_unload() if self.cfg.lora_rank else fresh).float().eval()
            config = dict(init_gen.config) if init_gen is not None else {}
            config.update({"encoder": cache.encoder_name, "image_size": cache.info["image_size"], "mpp": cache.mpp})
            config.pop("origin", None)
            if self.cfg.init:
                config["finetuned_from"] = self.cfg.init
            encoder, config["encoder_path"] = self._own_encoder(cache, init_gen)
            gen = Generator(transformer, cache.load_vae(), self._scheduler(init_gen), encoder=encoder,
                            embedding_bank=build_bank(cache, self.cfg.bank_size, self.cfg.seed), config=config)
            with atomic_dir(final) as tmp:
                gen.save_pretrained(tmp)
            acc.print(f"wrote {final}")
        acc.wait_for_everyone()
        acc.end_training()  # also destroys the process group (clean exit under accelerate launch)
        return final

    @staticmethod
    def _own_encoder(cache, init_gen) -> tuple[Any, str | None]:
        """(encoder, "encoder") when the model must carry its encoder (local / bundled), else (None, None)."""
        if cache.encoder_path is not None:
            from pixgen.encoders import load_encoder

            return load_encoder(str(cache.encoder_path)), "encoder"
        if init_gen is not None and init_gen.config.get("encoder_path"):
            return init_gen.encoder, "encoder"
        return None, None

    def _write_run_info(self, acc, cache, model, step: int) -> None:
        if not acc.is_main_process:
            return
        from training.flops import model_flops, train_step_flops

        import accelerate
        import diffusers

        base = model.get_base_model() if self.cfg.lora_rank else model
        fwd = model_flops(base.config)["total"]
        write_json_atomic(self.out / "run.json", {
            "data": str(self.data), "cache": str(cache.root), "tiles": len(cache), "classes": cache.classes,
            "encoder": cache.encoder_name, "latent_shape": list(cache.latent_shape),
            "processes": acc.num_processes, "distributed_type": str(acc.distributed_type),
            "device": str(acc.device), "started_at_step": step,
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "forward_flops_per_sample": fwd,
            "train_flops_per_step": train_step_flops(fwd, self.cfg.batch_size * self.cfg.grad_accum * acc.num_processes,
                                                     self.cfg.gradient_checkpointing),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "accelerate": accelerate.__version__, "python": platform.python_version()},
            "host": platform.node(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })


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
    factor, channels, dim, encoder, source = 8, 16, 1536, cfg.encoder, "assumed"
    if cfg.vae and (Path(cfg.vae) / "config.json").is_file():
        vc = json.loads((Path(cfg.vae) / "config.json").read_text())
        factor = 2 ** (len(vc.get("block_out_channels", [0] * 4)) - 1) if vc.get("_class_name") != "PixelSpace" else 1
        channels, source = vc.get("latent_channels", vc.get("channels", channels)), "vae config"
    if cfg.encoder:
        try:
            from pixgen.encoders import get_encoder_spec, read_saved_spec

            spec = read_saved_spec(cfg.encoder) if Path(cfg.encoder).is_dir() else get_encoder_spec(cfg.encoder)
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
    from training.flops import measure_matmul_rate, model_flops, train_step_flops

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
        f"{(geo['side'] // mc.patch_size) ** 2}; condition {mc.caption_num_tokens} x {mc.caption_channels} "
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
    p.add_argument("--data", required=True, help="feature cache (pixgen features) or image / tile folder")
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
    overrides = {"max_steps": args.max_steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                 "lr": args.lr, "mixed_precision": args.mixed_precision, "init": args.init,
                 "lora_rank": args.lora_rank, "mpp": args.mpp, "gradient_checkpointing": args.gradient_checkpointing}
    cfg = resolve_config(args.preset, args.out, args.resume, overrides, args.set)
    if args.dry_run:
        print(dry_run_report(cfg, args.data, processes=int(os.environ.get("WORLD_SIZE", 1))))
        return 0
    final = Trainer(cfg, args.data, args.out, resume=args.resume, cpu=True if args.cpu else None,
                    trust_remote_code=args.trust_remote_code).fit()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done: pixgen generate --model {final} --label ... --out samples/")
    return 0
