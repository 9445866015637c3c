"""The embedding-flow task: an :class:`~pixgen.models.flow.EmbeddingFlow` trained with rectified flow.

The same task trains a class prior (source: noise; condition: class ids), a text prior (condition:
vectors) and a stain translator (source: paired embeddings of the other stain). Data is a feature
cache (target ``embeddings`` or another array field; ``labels`` as classes; a field of vectors as
condition; a field of paired embeddings as source) or, for tests and small jobs, a dict of arrays
``{"target": (N, D), "label": (N,), "condition": (N, E), "source": (N, D)}`` (label / condition /
source optional).

Example:
    >>> cfg = FlowConfig(max_steps=500, source="noise", condition="labels")
    >>> Engine(EmbeddingFlowTask(cfg, "cache/"), "runs/prior").fit()     # doctest: +SKIP
    >>> EmbeddingFlow.from_pretrained("runs/prior/final")                 # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixgen.errors import InputError
from training.engine import EngineConfig, Task

__all__ = ["FlowConfig", "EmbeddingFlowTask", "main"]


@dataclass
class FlowConfig(EngineConfig):
    """An embedding-flow run (the loop's settings are :class:`~training.engine.EngineConfig`'s).

    Args:
        target: cache array field the model generates (``embeddings``; ``grid`` for token grids).
        source: ``"noise"`` (a prior) or the cache field of paired source embeddings (a translator).
        condition: ``"labels"`` (class ids), a cache field of vectors, or ``"none"``.
        hidden, num_blocks, dropout: the residual MLP. cfg_dropout: null-condition rate (guidance).
        timestep_sampling: ``uniform`` or ``logit-normal``. sample_steps: Euler steps when sampling.
        whiten_rank: > 0 trains a prior in the PCA-whitened space of the targets' leading
            directions (:class:`~pixgen.models.flow.EmbeddingFlow`'s ``whiten_rank``); 0: as given.
    """

    target: str = "embeddings"
    source: str = "noise"
    condition: str = "labels"
    hidden: int = 512
    num_blocks: int = 4
    dropout: float = 0.0
    cfg_dropout: float = 0.1
    timestep_sampling: str = "uniform"
    sample_steps: int = 20
    whiten_rank: int = 0
    lr: float = 1e-3
    warmup_steps: int = 0
    batch_size: int = 256
    max_steps: int = 5000
    ema_decay: float = 0.999
    sample_every: int = 0
    tensorboard: bool = False

    def __post_init__(self) -> None:
        problems = self.engine_problems()
        if self.timestep_sampling not in ("uniform", "logit-normal"):
            problems.append(f"timestep_sampling must be uniform or logit-normal, got {self.timestep_sampling!r}")
        if not 0 <= self.cfg_dropout < 1:
            problems.append(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if self.whiten_rank < 0 or (self.whiten_rank and self.source != "noise"):
            problems.append(f"whiten_rank must be >= 0 and needs source=noise, got {self.whiten_rank} with {self.source!r}")
        if problems:
            raise InputError("invalid flow config: " + "; ".join(problems))


class _Arrays(torch.utils.data.Dataset):
    """Rows of equally long arrays as dicts of tensors."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        lengths = {len(v) for v in arrays.values()}
        if len(lengths) != 1:
            raise InputError(f"flow data arrays differ in length: {sorted(lengths)}")
        self.arrays = {k: torch.from_numpy(np.asarray(v, dtype=np.int64 if k == "label" else np.float32))
                       for k, v in arrays.items()}
        self.n = lengths.pop()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.arrays.items()}


class EmbeddingFlowTask(Task):
    """Train an :class:`~pixgen.models.flow.EmbeddingFlow` (see the module docstring)."""

    log_fields = ("mse",)

    def __init__(self, cfg: FlowConfig, data: str | Path | dict[str, np.ndarray]):
        self.cfg, self.data = cfg, data
        self.info: dict[str, Any] = {}

    def configure(self, engine) -> None:
        self.arrays = self._arrays()

    def _arrays(self) -> dict[str, np.ndarray]:
        cfg = self.cfg
        if isinstance(self.data, dict):
            arrays = {k: np.asarray(v) for k, v in self.data.items() if v is not None}
            if "target" not in arrays:
                raise InputError("flow data needs a 'target' array")
            labels = arrays.get("label")
            self.info = {"classes": [str(k) for k in range(int(labels.max()) + 1)] if labels is not None else []}
            return arrays
        from training.features import FeatureCache

        cache = FeatureCache(self.data)
        arrays = {"target": cache.array(cfg.target)}
        if cfg.condition == "labels":
            if not cache.classes:
                raise InputError(f"the cache {self.data} has no class labels", fix="set condition=none or a field")
            arrays["label"] = cache.array("labels")
        elif cfg.condition != "none":
            arrays["condition"] = cache.array(cfg.condition)
        if cfg.source != "noise":
            arrays["source"] = cache.array(cfg.source)
        self.info = {"classes": cache.classes, "encoder": cache.encoder_name}
        return arrays

    def setup(self, engine) -> None:
        from pixgen.models.flow import EmbeddingFlow
        from training.losses import FlowMatching

        target = self.arrays["target"]
        if "source" in self.arrays and self.arrays["source"].shape != target.shape:
            raise InputError(f"source embeddings {self.arrays['source'].shape} and targets {target.shape} differ",
                             fix="pair one source embedding with each target")
        cfg = self.cfg
        self._model = EmbeddingFlow(
            dim=int(target.shape[-1]), hidden=cfg.hidden, num_blocks=cfg.num_blocks, dropout=cfg.dropout,
            num_classes=len(self.info["classes"]) if "label" in self.arrays else 0,
            condition_dim=int(self.arrays["condition"].shape[-1]) if "condition" in self.arrays else 0,
            class_names=self.info["classes"] or None, source=cfg.source, encoder=self.info.get("encoder"),
            whiten_rank=cfg.whiten_rank)
        if cfg.whiten_rank:
            self._model.fit_whitening(torch.from_numpy(np.asarray(target, dtype=np.float32)))
        self._data = _Arrays(self.arrays)
        self.objective = FlowMatching(cfg.timestep_sampling)

    def model(self) -> torch.nn.Module:
        return self._model

    def dataset(self) -> torch.utils.data.Dataset:
        return self._data

    def loss(self, model, batch: dict[str, torch.Tensor], generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = self._model.to_flow_space(batch["target"])  # the buffers are fixed: the unwrapped model's serve
        drop = (torch.rand(x0.shape[0], generator=generator) < self.cfg.cfg_dropout).to(x0.device)
        labels, cond = batch.get("label"), batch.get("condition")

        def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x_t, t, labels, cond, drop_condition=drop).sample

        return self.objective.loss(predict, x0, generator, source=batch.get("source"))

    def export(self, engine, state: dict[str, torch.Tensor], folder: Path) -> None:
        """``EmbeddingFlow.save_pretrained`` of the EMA weights."""
        fresh = type(self._model).from_config(self._model.config)
        fresh.load_state_dict(state)
        fresh.save_pretrained(folder)

    def run_info(self) -> dict[str, Any]:
        return {"data": str(self.data) if not isinstance(self.data, dict) else "arrays",
                "items": len(self._data), **self.info}


def build_parser() -> argparse.ArgumentParser:
    """CLI: ``--data CACHE --out RUN [--resume]`` and every scalar :class:`FlowConfig` field as a flag."""
    from training.dataclass_cli import add_dataclass_flags

    p = argparse.ArgumentParser(prog="python -m training.tasks.flow",
                                description="Train an embedding-flow model (class / text prior, stain translator) "
                                            "on a feature cache.")
    p.add_argument("--data", required=True, help="feature cache (pixgen features), with the fields the config names")
    p.add_argument("--out", required=True, help="run directory (RUN/final: EmbeddingFlow.from_pretrained)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    add_dataclass_flags(p, FlowConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m training.tasks.flow``.

    Example:
        $ python -m training.tasks.flow --data cache/ --out runs/prior --max-steps 2000 --condition labels
        $ python -m training.tasks.flow --data pairs/ --out runs/her2 --source he_embeddings --condition none
    """
    from training.dataclass_cli import saved_config
    from training.engine import Engine

    args = vars(build_parser().parse_args(argv))
    data, out, resume = args.pop("data"), args.pop("out"), args.pop("resume")
    known = {f.name for f in dataclasses.fields(FlowConfig)}
    base = {k: v for k, v in saved_config(out, resume).items() if k in known}
    base.update({k: v for k, v in args.items() if v is not None})
    if "adam_betas" in base:
        base["adam_betas"] = tuple(base["adam_betas"])
    final = Engine(EmbeddingFlowTask(FlowConfig(**base), data), out, resume=resume).fit()
    print(f"wrote {final}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
