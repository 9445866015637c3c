"""The training engine: one accelerate loop for every pixgen model; tasks say what is trained.

The engine owns everything that is the same for every model: seeding, the data order (accelerate's
seedable sampler, epoch-seeded, ``skip_first_batches`` inside an epoch), gradient accumulation,
bf16 / fp16 autocast, AdamW (or CAME), warm-up, gradient clipping, EMA (diffusers ``EMAModel``),
atomic checkpoints in a format that runs no code when read, exact resume, one CSV log, sample
grids from the EMA weights, and the final export. A :class:`Task` brings the rest: the data, the
trainable module, ``batch -> loss``, a sample grid and the exported model folder.

All randomness of a micro-batch comes from a ``torch.Generator`` seeded with
``step_seed(seed, step, micro, rank)`` (and the global torch RNG is seeded with the same number
around the task's forward pass, for dropout / drop-path), so a killed run resumed with
``resume=True`` ends with bit-identical weights (on CPU) to an uninterrupted one.

Run directory::

    RUN/config.json          the resolved task config (``--resume`` starts from it)
    RUN/run.json             data, processes, parameters, versions (+ the task's own fields)
    RUN/log.csv              step, epoch, loss, the task's terms, lr, grad norm, samples/s, seconds
    RUN/checkpoints/checkpoint-00001000/   the last ``keep_checkpoints`` states (format below)
    RUN/samples/step-00001000.png          sample grids (EMA weights), when the task makes them
    RUN/checksums/rank-N.txt               sha256 of each process's final raw weights
    RUN/final/                             the task's export (EMA weights)

Checkpoint folder (nothing in it is unpickled: tensors are safetensors, the rest JSON)::

    model.safetensors        the trainable module's raw weights (unwrapped names)
    ema.safetensors          EMA shadow weights, by parameter name (when EMA is on)
    optimizer.safetensors    optimizer tensors, flat: ``state.<param index>.<name>``
    state.json               format, step, epoch, optimizer param groups and scalar state,
                             LR-scheduler state, EMA scalars, the task's extra state
    rng-<rank>.json          python / numpy / torch (and CUDA) RNG states as integers

Checkpoints written by the trainer before the engine (accelerate ``save_state``: ``optimizer.bin``,
``scheduler.bin``, ``custom_checkpoint_0.pkl`` for the EMA) still resume: those files are read
with ``torch.load(weights_only=True)``, which refuses any pickled code; their
``random_states_*.pkl`` are not read (no step depends on the global RNG state).

Example:
    >>> from training.tasks import GeneratorTask
    >>> Engine(GeneratorTask(get_preset("tiny"), "cache/"), "runs/t").fit()      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import platform
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixgen.errors import InputError
from pixgen.io import atomic_dir, write_json_atomic

__all__ = [
    "Engine", "EngineConfig", "Task", "CsvLog", "step_seed", "list_checkpoints", "weights_checksum",
    "make_optimizer", "save_tensors_and_state", "load_tensors_and_state", "flatten_optimizer",
    "unflatten_optimizer", "rng_state", "set_rng_state", "CHECKPOINT_FORMAT",
]

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_FORMAT = "pixgen-checkpoint"
STATE_FILE = "state.json"
LEGACY_STATE_FILE = "trainer_state.json"


# ----------------------------------------------------------------------------- configuration
@dataclass
class EngineConfig:
    """The loop's settings, shared by every task's config (each task config subclasses this).

    Optimisation: ``optimizer`` (``adamw`` or ``came``), ``lr``, ``weight_decay``, ``adam_betas``,
    ``warmup_steps`` (linear, then constant), ``decay_steps`` (0: none; else the learning rate falls
    linearly to 0 over the last ``decay_steps`` of ``max_steps``: a cooldown, which may be added to a
    resumed run), ``max_grad_norm`` (0: no clipping), ``batch_size``
    per process (global batch = batch_size x processes x grad_accum), ``mixed_precision``
    (``no``, ``bf16`` on CPU and GPU, ``fp16`` on GPU), ``ema_decay`` (0: no EMA; final/ holds the
    EMA weights otherwise). Bookkeeping: ``checkpoint_every`` / ``keep_checkpoints``,
    ``sample_every`` (0: never), ``log_every``, ``tensorboard``.

    Example:
        >>> EngineConfig(max_steps=10).grad_accum
        1
    """

    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    decay_steps: int = 0
    max_grad_norm: float = 1.0
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 100_000
    mixed_precision: str = "no"
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    seed: int = 0
    num_workers: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 1000
    log_every: int = 10
    tensorboard: bool = True

    # Fields that may differ between an interrupted run and its resumption.
    RESUMABLE = frozenset({"max_steps", "decay_steps", "checkpoint_every", "keep_checkpoints", "sample_every", "log_every",
                           "num_workers", "tensorboard"})

    def engine_problems(self) -> list[str]:
        """What is wrong with the loop's settings (empty when nothing is)."""
        problems = []
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            problems.append(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.optimizer not in ("adamw", "came"):
            problems.append(f"optimizer must be adamw or came, got {self.optimizer!r}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.decay_steps <= self.max_steps:
            problems.append(f"decay_steps must be in [0, max_steps={self.max_steps}], got {self.decay_steps}")
        for name in ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_factor(cfg: EngineConfig, step: int) -> float:
    """The learning-rate multiplier at ``step``: linear warm-up, constant, then the linear cooldown.

    Example:
        >>> cfg = EngineConfig(warmup_steps=10, max_steps=100, decay_steps=20)
        >>> [lr_factor(cfg, s) for s in (0, 5, 50, 80, 90)]
        [0.0, 0.5, 1.0, 1.0, 0.5]
    """
    warm = min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if not cfg.decay_steps:
        return warm
    return warm * min(1.0, max(0.0, (cfg.max_steps - step) / cfg.decay_steps))


class Task:
    """What one kind of model brings to the :class:`Engine` (subclass it; see ``training/tasks/``).

    The engine calls, in order: :meth:`configure` (may adopt settings from an initial model; writes
    nothing), :meth:`setup` (data and models; the run folder and config exist), :meth:`model` and
    :meth:`dataset`, then :meth:`loss` for every micro-batch, :meth:`sample` every
    ``sample_every`` steps and :meth:`export` once at the end (main process).

    The engine's ``step`` (the step being trained; after it, the steps done), ``start_step``, ``out``,
    ``resume`` and ``accelerator`` are there for tasks to read.

    Attributes:
        cfg: the task's config, an :class:`EngineConfig` subclass (written as RUN/config.json).
        log_fields: the loss terms :meth:`loss` reports, as log.csv columns.
    """

    cfg: EngineConfig
    log_fields: tuple[str, ...] = ()
    lr_lambda = None  # optional callable step -> LR multiplier (default: linear warm-up, then constant)

    def configure(self, engine: Engine) -> None:
        """Check the inputs and settle ``self.cfg`` before anything is written (optional)."""

    def setup(self, engine: Engine) -> None:
        """Open the data and build the models (``engine.accelerator`` and ``engine.out`` are set)."""
        raise NotImplementedError

    def model(self) -> torch.nn.Module:
        """The module the engine prepares, optimises (its parameters with ``requires_grad``) and EMAs."""
        raise NotImplementedError

    def dataset(self) -> torch.utils.data.Dataset:
        """Training items; the default collate makes them batches for :meth:`loss`."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss, named float terms) of one micro-batch; all randomness from ``generator``."""
        raise NotImplementedError

    def sample(self, engine: Engine, model: torch.nn.Module):
        """A sample grid (PIL image) from ``model`` (unwrapped, EMA weights), or None for no grid."""
        return None

    def export(self, engine: Engine, state: dict[str, torch.Tensor], folder: Path) -> None:
        """Write the final model folder from the trainable module's (EMA) state dict."""
        raise NotImplementedError

    def run_info(self) -> dict[str, Any]:
        """Extra RUN/run.json fields (data, sizes ...)."""
        return {}

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups (e.g. no weight decay on norms), or None for one group."""
        return None

    def before_optimizer_step(self, model: torch.nn.Module, optimizer, step: int) -> None:
        """After clipping, before each optimizer step (e.g. drop some gradients, set weight decay)."""

    def after_optimizer_step(self, model: torch.nn.Module, step: int) -> None:
        """After each optimizer step (e.g. a teacher's momentum update)."""

    def run_config(self) -> dict[str, Any]:
        """What RUN/config.json holds (default: ``cfg``); a resume must match it outside ``resumable``."""
        return self.cfg.to_dict()

    @property
    def resumable(self) -> frozenset[str]:
        """Config keys that may change between an interrupted run and its resumption."""
        return type(self.cfg).RESUMABLE


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


def make_optimizer(params: list[torch.nn.Parameter], cfg: EngineConfig) -> torch.optim.Optimizer:
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


class CsvLog:
    """The one training log writer: append-only CSV with a ``step`` column; on resume, rows after
    the resumed step are dropped first (so a replayed step is not logged twice).

    Example:
        >>> log = CsvLog(Path("runs/x/log.csv"), ["step", "loss"], resume_step=None)   # doctest: +SKIP
        >>> log.append({"step": 1, "loss": 0.5})                                        # doctest: +SKIP
    """

    def __init__(self, path: Path, fields: list[str], resume_step: int | None):
        self.path, self.fields = Path(path), list(fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                self.fields += [f for f in reader.fieldnames or [] if f not in self.fields]
                rows = [r for r in reader if int(r["step"]) <= resume_step]
        self._write(rows, "w")

    def _write(self, rows: list[dict[str, Any]], mode: str) -> None:
        with self.path.open(mode, newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore")
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        """Append one row; a key not yet in the header extends it (the file is rewritten once)."""
        new = [k for k in row if k not in self.fields]
        if new:
            with self.path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
            self.fields += new
            self._write(rows, "w")
        self._write([{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}], "a")


# ----------------------------------------------------------------------------- safe state files
def save_tensors_and_state(folder: str | Path, tensors: dict[str, dict[str, torch.Tensor]],
                           state: dict[str, Any]) -> Path:
    """Write ``{name}.safetensors`` per tensor group and ``state.json`` into ``folder`` atomically
    (a temporary sibling folder renamed when complete). Readable without unpickling anything.

    Example:
        >>> save_tensors_and_state("runs/ae/checkpoint", {"model": model.state_dict()}, {"step": 3})  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        for name, group in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
        write_json_atomic(tmp / STATE_FILE, {"format": CHECKPOINT_FORMAT, "version": 1, **state})
    return folder


def load_tensors_and_state(folder: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Inverse of :func:`save_tensors_and_state`: ({group: tensors}, state)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{folder / STATE_FILE} is not a pixgen checkpoint", fix="pass a checkpoint folder")
    tensors = {p.name[: -len(".safetensors")]: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}
    return tensors, state


def flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer ``state_dict`` as (flat tensors ``state.<i>.<name>``, JSON-able rest).

    Example:
        >>> opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
        >>> flatten_optimizer(opt.state_dict())[1]["param_groups"][0]["params"]
        [0]
    """
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, Any]:
    """python, numpy and torch (+ CUDA) global RNG states as JSON-able integers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ----------------------------------------------------------------------------- the engine
class Engine:
    """Train ``task`` into the run folder ``out``.

    Args:
        task: a :class:`Task` (its ``cfg`` is the run's config).
        out: the run directory.
        resume: continue from the latest checkpoint in ``out`` (a fresh start when there is none).
        cpu: force the CPU even when a GPU is present.

    A run that fails before its first checkpoint leaves no run folder behind (only what it found
    there, e.g. a reusable feature cache); a later failure keeps the checkpoints to resume from.

    Example:
        >>> final = Engine(task, "runs/t").fit()     # doctest: +SKIP
    """

    def __init__(self, task: Task, out: str | Path, resume: bool = False, cpu: bool | None = None):
        self.task, self.out, self.resume = task, Path(out), resume
        self.cpu = (not torch.cuda.is_available()) if cpu is None else cpu
        self.epoch = self.step = self.start_step = 0
        self.accelerator = None

    @property
    def cfg(self) -> EngineConfig:
        return self.task.cfg

    def on_step_end(self, step: int, logs: dict[str, float]) -> None:
        """Called on every process after each optimizer step (a hook for monitoring and tests)."""

    # -- setup ----------------------------------------------------------------------------
    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DataLoaderConfiguration, DistributedType, GradientAccumulationPlugin
        from accelerate.utils import ProjectConfiguration, is_tensorboard_available

        cfg = self.cfg
        # A process may train more than once (notebooks, tests): forget the previous run's settings
        # (mixed precision ...) but keep the process group (PartialState) of a distributed launch.
        AcceleratorState._reset_state(reset_partial_state=False)
        if cfg.mixed_precision == "fp16" and self.cpu:
            raise InputError("fp16 mixed precision needs a GPU", fix="use mixed_precision=bf16 on CPUs")
        tensorboard = cfg.tensorboard and is_tensorboard_available()
        acc = Accelerator(
            cpu=self.cpu,
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum, sync_with_dataloader=False),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
            step_scheduler_with_optimizer=False,
            log_with="tensorboard" if tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise InputError(f"the training engine does not checkpoint sharded ({acc.distributed_type}) runs yet",
                             fix="launch with DDP (accelerate launch --multi_gpu)")
        return acc

    def _write_config(self, acc) -> None:
        path = self.out / "config.json"
        if path.is_file() and self.resume:
            saved = json.loads(path.read_text())
            now = self.task.run_config()
            resumable = self.task.resumable
            changed = [k for k in now if k in saved and _plain(saved[k]) != _plain(now[k]) and k not in resumable]
            if changed:
                raise InputError(f"cannot resume {self.out} with a different {', '.join(changed)}",
                                 fix="resume with the run's own config.json, or start a new --out")
        if acc.is_main_process:
            write_json_atomic(path, self.task.run_config())

    # -- the run --------------------------------------------------------------------------
    def fit(self) -> Path:
        """Run to ``cfg.max_steps`` and write ``out/final``; returns its path."""
        existed = self.out.exists()
        before = set(self.out.iterdir()) if existed else set()
        try:
            return self._fit()
        except BaseException:
            if self.accelerator is None or self.accelerator.is_main_process:
                self._clean_failed_start(existed, before)
            raise

    def _clean_failed_start(self, existed: bool, before: set[Path]) -> None:
        """A run that failed before its first checkpoint: remove what it wrote (a complete feature
        cache it built stays, it is reusable), and the folder if it made it and it is empty."""
        if list_checkpoints(self.out) or not self.out.is_dir():
            return
        for path in set(self.out.iterdir()) - before:
            if path.name == "cache" and (path / "index.json").is_file():
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if not existed and not any(self.out.iterdir()):
            self.out.rmdir()

    def _fit(self) -> Path:
        from accelerate.utils import set_seed
        from diffusers.training_utils import EMAModel

        acc = self.accelerator = self._make_accelerator()
        checkpoints = list_checkpoints(self.out)
        if checkpoints and not self.resume:
            raise InputError(f"{self.out} already holds checkpoints of a run",
                             fix="pass --resume to continue it, or a new --out")
        set_seed(self.cfg.seed)
        self.task.configure(self)
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_config(acc)
        task, cfg = self.task, self.cfg
        task.setup(self)
        data = task.dataset()
        if len(data) < cfg.batch_size * acc.num_processes:
            raise InputError(f"{len(data)} training items are fewer than one global batch "
                             f"({cfg.batch_size} x {acc.num_processes} processes)", fix="lower --batch-size")
        model = task.model()
        model.train()
        groups = task.param_groups(model) or [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(groups, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, task.lr_lambda or partial(lr_factor, cfg))
        loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                             num_workers=cfg.num_workers, pin_memory=not self.cpu)
        model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
        params = [p for p in model.parameters() if p.requires_grad]  # as the wrapper (DDP) holds them
        ema = None
        if cfg.ema_decay:  # diffusers' EMA: warm-up schedule, store/restore for samples
            ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=cfg.ema_warmup, power=3 / 4)
        self.model, self.optimizer, self.scheduler, self.ema, self.params = model, optimizer, scheduler, ema, params
        step = self.start_step = self._restore(checkpoints[-1]) if self.resume and checkpoints else 0
        self._write_run_info(step)
        self._train(loader, step)
        return self._finish()

    def _batches(self, loader, start_batch: int) -> Iterator[dict[str, Any]]:
        """Endless batches from ``start_batch`` on: epoch e uses the sampler seeded with e."""
        acc = self.accelerator
        epoch, skip = divmod(start_batch, len(loader))
        while True:
            self.epoch = epoch
            loader.set_epoch(epoch)
            yield from (acc.skip_first_batches(loader, skip) if skip else loader)
            epoch, skip = epoch + 1, 0

    def _train_step(self, batches, step: int) -> dict[str, float]:
        acc, cfg, model, logs = self.accelerator, self.cfg, self.model, {}
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            with acc.accumulate(model):
                seed = step_seed(cfg.seed, step, micro, acc.process_index)
                gen = torch.Generator().manual_seed(seed)
                with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
                    torch.manual_seed(seed)  # global-RNG users (dropout, drop-path) follow the step too
                    with acc.autocast():
                        loss, parts = self.task.loss(model, batch, gen)
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    logs["grad_norm"] = float(acc.clip_grad_norm_(self.params, cfg.max_grad_norm))
                if acc.sync_gradients:
                    self.task.before_optimizer_step(model, self.optimizer, step)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if acc.sync_gradients:
                    self.task.after_optimizer_step(model, step)
            for key, value in {"loss": loss.item(), **parts}.items():
                logs[key] = logs.get(key, 0.0) + value / cfg.grad_accum
        logs["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        if self.ema is not None:
            self.ema.step(self.params)
        return logs

    def _train(self, loader, step: int) -> None:
        acc, cfg = self.accelerator, self.cfg
        fields = ["step", "epoch", "loss", *self.task.log_fields, "lr", "grad_norm", "samples_per_s", "seconds"]
        log = CsvLog(self.out / "log.csv", fields, step if self.resume else None) if acc.is_main_process else None
        if acc.log_with:
            acc.init_trackers("tensorboard")
        batches = self._batches(loader, step * cfg.grad_accum)
        samples_per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
        window: dict[str, float] = {}
        t_window = t_start = time.perf_counter()
        n_window = 0
        while step < cfg.max_steps:
            self.step = step  # the step being trained (tasks may read it)
            logs = self._train_step(batches, step)
            step = self.step = step + 1
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
                self._save_checkpoint(step)
            if cfg.sample_every and step % cfg.sample_every == 0:
                self._sample(step)
            self.on_step_end(step, logs)

    # -- checkpoints ------------------------------------------------------------------------
    def _param_names(self) -> list[str]:
        inner = self.accelerator.unwrap_model(self.model)
        return [name for name, p in inner.named_parameters() if p.requires_grad]

    def _save_checkpoint(self, step: int) -> None:
        """Safetensors + JSON into a temporary folder, renamed when complete; keep the last K."""
        acc = self.accelerator
        folder = self.out / "checkpoints"
        name = f"{CHECKPOINT_PREFIX}{step:08d}"
        final = folder / name
        acc.wait_for_everyone()
        model_state = acc.get_state_dict(self.model)  # a collective
        if acc.is_main_process:
            opt_tensors, opt_rest = flatten_optimizer(self.optimizer.state_dict())
            tensors = {"model": model_state, "optimizer": opt_tensors}
            state: dict[str, Any] = {"step": step, "epoch": self.epoch, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                     "optimizer": opt_rest, "scheduler": self.scheduler.state_dict()}
            if self.ema is not None:
                ema = self.ema.state_dict()
                tensors["ema"] = dict(zip(self._param_names(), ema.pop("shadow_params")))
                state["ema"] = ema
            folder.mkdir(parents=True, exist_ok=True)
            save_tensors_and_state(final, tensors, state)
        acc.wait_for_everyone()
        write_json_atomic(final / f"rng-{acc.process_index}.json", rng_state())
        acc.wait_for_everyone()
        if acc.is_main_process:
            for old in list_checkpoints(self.out)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _restore(self, folder: Path) -> int:
        """Load a checkpoint (this format, or the pre-engine accelerate one); returns its step."""
        acc = self.accelerator
        if (folder / STATE_FILE).is_file():
            tensors, state = load_tensors_and_state(folder)
            optimizer_state = unflatten_optimizer(tensors.get("optimizer", {}), state["optimizer"])
            ema_state = None
            if self.ema is not None:
                shadow = tensors["ema"]
                ema_state = {**state["ema"], "shadow_params": [shadow[n] for n in self._param_names()]}
            rng = folder / f"rng-{acc.process_index}.json"
            if rng.is_file():
                set_rng_state(json.loads(rng.read_text()))
            scheduler_state = state["scheduler"]
        else:
            tensors, state, optimizer_state, scheduler_state, ema_state = _read_legacy_checkpoint(folder, self.ema)
        acc.unwrap_model(self.model).load_state_dict(tensors["model"])
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(scheduler_state)
        if self.ema is not None:
            self.ema.load_state_dict(ema_state)
        acc.print(f"resumed from {folder} (step {state['step']})")
        return int(state["step"])

    # -- samples, final -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _with_ema(self) -> Iterator[None]:
        """The EMA weights in the model (every rank), the raw ones back afterwards."""
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        try:
            yield
        finally:
            if self.ema is not None:
                self.ema.restore(self.params)

    def _sample(self, step: int) -> None:
        """RUN/samples/step-N.png from the task (every rank runs it: sharded models need all; rank 0 writes)."""
        acc = self.accelerator
        inner = acc.unwrap_model(self.model)
        with self._with_ema():
            inner.eval()
            try:
                with torch.no_grad():
                    grid = self.task.sample(self, inner)
            finally:
                inner.train()
        if grid is not None and acc.is_main_process:
            path = self.out / "samples" / f"step-{step:08d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)

    def _finish(self) -> Path:
        """Per-rank checksums of the raw weights; RUN/final from the EMA weights (main process)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        inner = acc.unwrap_model(self.model)
        (self.out / "checksums").mkdir(exist_ok=True)
        (self.out / "checksums" / f"rank-{acc.process_index}.txt").write_text(weights_checksum(inner) + "\n")
        if self.ema is not None:
            self.ema.copy_to(self.params)
        state = acc.get_state_dict(self.model)  # every rank takes part
        final = self.out / "final"
        if acc.is_main_process:
            with atomic_dir(final) as tmp:
                self.task.export(self, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, tmp)
            acc.print(f"wrote {final}")
        acc.wait_for_everyone()
        acc.end_training()  # also destroys the process group (clean exit under accelerate launch)
        return final

    def _write_run_info(self, step: int) -> None:
        acc = self.accelerator
        if not acc.is_main_process:
            return
        import accelerate
        import diffusers

        model = acc.unwrap_model(self.model)
        write_json_atomic(self.out / "run.json", {
            "task": type(self.task).__name__, "processes": acc.num_processes,
            "distributed_type": str(acc.distributed_type), "device": str(acc.device), "started_at_step": step,
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **self.task.run_info(),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "accelerate": accelerate.__version__, "python": platform.python_version()},
            "host": platform.node(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })


def _plain(value: Any) -> Any:
    """JSON round trip (tuples -> lists) so saved and current configs compare by value."""
    return json.loads(json.dumps(value, default=str))


def _read_legacy_checkpoint(folder: Path, ema) -> tuple[dict, dict, dict, dict, dict | None]:
    """A pre-engine checkpoint (accelerate ``save_state``): every pickle file is read with
    ``weights_only=True`` (tensors and plain containers only: a pickled object is refused, never run)."""
    from safetensors.torch import load_file

    def load(name: str) -> Any:
        try:
            return torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError for anything but tensors and plain containers
            raise InputError(f"cannot read {folder / name} safely ({type(err).__name__})",
                             fix="resume from a checkpoint written by pixgen, or start a new run") from None

    state = json.loads((folder / LEGACY_STATE_FILE).read_text())
    tensors = {"model": load_file(str(folder / "model.safetensors"))}
    ema_state = load("custom_checkpoint_0.pkl") if ema is not None else None
    return tensors, state, load("optimizer.bin"), load("scheduler.bin"), ema_state
