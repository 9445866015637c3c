"""The stain translator task: a rectified flow from H&E to IHC embeddings, on paired tiles.

The embedding-flow task (:class:`~training.tasks.flow.EmbeddingFlowTask`) with the H&E embedding
of each pair as the flow's source and the IHC embedding as its target, token by token (grid
models: every tile of the grid is one pair), no condition and no guidance. In PixCell's words
``x_t = t * ihc + (1 - t) * he`` with target ``ihc - he``; pixgen's flow convention is the same
line with ``s = 1 - t`` (:mod:`pixgen.models.flow`). The pairs are encoded once into
``RUN/cache`` (:mod:`training.tasks.paired`, with the H&E generator ``--init``'s encoder, so the
translator lives in that generator's embedding space). ``RUN/final`` is an
:class:`~pixgen.models.flow.EmbeddingFlow` with ``source="he"`` and ``domain="ihc-<marker>"``:
``pixgen.staining.StainTranslator.from_flow`` loads it.

Example:
    $ python -m training.tasks.translator --layout bci --root BCI_dataset --mpp 0.5 --crop 1024 \\
          --init StonyBrook-CVLab/PixCell-1024 --out runs/bci-her2-translator --stain-model runs/bci-stain
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.tasks.flow import EmbeddingFlowTask, FlowConfig
from training.tasks.paired import PairedData

__all__ = ["TranslatorConfig", "StainTranslatorTask", "main"]


@dataclass
class TranslatorConfig(FlowConfig):
    """A translator run: :class:`FlowConfig` with PixCell's MLP size (6 blocks, width 1024), its
    learning rate, no condition and no guidance dropout. ``init`` names the H&E generator whose
    encoder (and autoencoder, for the shared cache) embeds the pairs (``vae`` / ``encoder_path``:
    local weights for it, e.g. PixCell's SD3.5 VAE and UNI2-h); ``marker`` the IHC stain."""

    init: str = ""
    vae: str | None = None
    encoder_path: str | None = None
    marker: str = "her2"
    source: str = "he"
    condition: str = "none"
    hidden: int = 1024
    num_blocks: int = 6
    cfg_dropout: float = 0.0
    lr: float = 1e-4
    batch_size: int = 64
    max_steps: int = 10000
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    log_every: int = 50


class StainTranslatorTask(EmbeddingFlowTask):
    """Train a stain translator on paired embeddings (see the module docstring).

    Args:
        cfg: the run's :class:`TranslatorConfig` (``init`` required).
        pairs: the paired folders (:class:`~training.tasks.paired.PairedData`), or a paired cache folder.
    """

    def __init__(self, cfg: TranslatorConfig, pairs: PairedData | str | Path, trust_remote_code: bool = False):
        super().__init__(cfg, data={})
        self.pairs, self.trust_remote_code = pairs, trust_remote_code

    def configure(self, engine) -> None:
        """Nothing to read before the run folder exists (the cache is built in :meth:`setup`)."""

    def setup(self, engine) -> None:
        from pixgen.staining import ihc_domain

        self.arrays = self._paired_arrays(engine)
        super().setup(engine)
        config = {k: v for k, v in self._model.config.items() if not k.startswith("_")}
        self._model = type(self._model)(**{**config, "domain": ihc_domain(self.cfg.marker)})  # the output's stain

    def _paired_arrays(self, engine) -> dict[str, np.ndarray]:
        """{"source": H&E tokens, "target": IHC tokens}, (N * T, D) each, from the paired cache."""
        from training.features import FeatureCache
        from training.tasks.paired import build_paired_cache, check_pairs_mpp

        if isinstance(self.pairs, PairedData):
            from pixgen.pipeline import Generator

            gen = Generator.from_pretrained(self.cfg.init, vae_path=self.cfg.vae, encoder_path=self.cfg.encoder_path,
                                            trust_remote_code=self.trust_remote_code)
            check_pairs_mpp(self.pairs, gen)
            cache = build_paired_cache(self.pairs.dataset(), engine.out / "cache", gen)
        else:
            cache = FeatureCache(self.pairs)
        grid = "grid" in cache.info.get("arrays", {})
        target = cache.array("grid" if grid else "embeddings")
        source = cache.array("he_grid" if grid else "he_embeddings")
        dim = target.shape[-1]
        self.info = {"classes": [], "encoder": cache.encoder_name, "cache": str(cache.root), "pairs": len(cache)}
        return {"source": source.reshape(-1, dim).astype(np.float32), "target": target.reshape(-1, dim).astype(np.float32)}

    def run_info(self) -> dict[str, Any]:
        pairs = dataclasses.asdict(self.pairs) if isinstance(self.pairs, PairedData) else str(self.pairs)
        return {**super().run_info(), "data": "paired embeddings", "pairs": pairs, "marker": self.cfg.marker}


def build_parser() -> argparse.ArgumentParser:
    """``--layout --root --mpp [--crop] --init MODEL --out RUN [--resume]`` and every scalar
    :class:`TranslatorConfig` field as a flag."""
    from training.dataclass_cli import add_dataclass_flags
    from training.tasks.paired import add_paired_flags

    p = argparse.ArgumentParser(prog="python -m training.tasks.translator",
                                description="Train a stain translator (H&E -> IHC embeddings) on paired tiles.")
    add_paired_flags(p)
    p.add_argument("--out", required=True, help="run directory (RUN/final: the translator)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    add_dataclass_flags(p, TranslatorConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m training.tasks.translator`` (see the module docstring)."""
    from pixgen.errors import InputError
    from training.dataclass_cli import saved_config
    from training.engine import Engine
    from training.tasks.paired import paired_from_args, register_in_stain_model

    args = build_parser().parse_args(argv)
    pairs, marker = paired_from_args(args)
    known = {f.name for f in dataclasses.fields(TranslatorConfig)}
    base = {k: v for k, v in saved_config(args.out, args.resume).items() if k in known}
    base.update({k: v for k, v in vars(args).items() if k in known and v is not None})
    base.setdefault("marker", marker)
    if "adam_betas" in base:
        base["adam_betas"] = tuple(base["adam_betas"])
    cfg = TranslatorConfig(**base)
    if not cfg.init:
        raise InputError("the translator needs the H&E generator whose encoder embeds the pairs", fix="pass --init MODEL")
    final = Engine(StainTranslatorTask(cfg, pairs), args.out, resume=args.resume).fit()
    if args.stain_model:
        register_in_stain_model(args.stain_model, cfg.marker, "translator", final)
    print(f"wrote {final}")
    return 0


if __name__ == "__main__":
    from training.tasks.paired import run_main

    raise SystemExit(run_main(main))
