"""The IHC generator task: an H&E generator adapted to IHC tiles (LoRA, or full fine-tuning).

PixCell's recipe (``virtual_staining/train_lora.py``): the H&E generator, frozen, gets rank-4
LoRA adapters on its cross-attention (``--preset pixcell-stain-lora``: PixCell-1024, alpha = rank,
PixCell's target names) and learns to denoise IHC tiles conditioned on their own IHC embeddings,
with the usual condition dropout (0.1). ``lora_rank=0`` fine-tunes every weight instead. The
paired tiles are encoded once into ``RUN/cache`` (:mod:`training.tasks.paired`; only the IHC side
is used here). It is the generator task (:class:`~training.tasks.generator.GeneratorTask`: the
engine's loop, exact resume, EMA, the LoRA merged into the export); ``RUN/final`` is a Generator
whose domain is ``ihc-<marker>`` (its bank too), so it accepts only embeddings translated to that stain.

Example:
    $ python -m training.tasks.lora --layout bci --root BCI_dataset --mpp 0.5 --crop 1024 \\
          --preset pixcell-stain-lora --init StonyBrook-CVLab/PixCell-1024 --out runs/bci-her2-lora \\
          --stain-model runs/bci-stain
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from training.presets import TrainConfig
from training.tasks.generator import GeneratorTask
from training.tasks.paired import PairedData

__all__ = ["StainLoRATask", "main", "run_stain_task", "add_stain_task_flags"]


class StainLoRATask(GeneratorTask):
    """Train the IHC generator (see the module docstring).

    Args:
        cfg: the run's :class:`~training.presets.TrainConfig` (``init``: the H&E generator).
        pairs: the paired folders. marker: the IHC marker (the export's domain is ``ihc-<marker>``).
    """

    def __init__(self, cfg: TrainConfig, pairs: PairedData, marker: str, trust_remote_code: bool = False):
        super().__init__(cfg, pairs.root, trust_remote_code=trust_remote_code)
        self.pairs, self.marker = pairs, marker.lower()

    def _open_cache(self, engine):
        from training.tasks.paired import open_paired_cache

        return open_paired_cache(self, engine, self.pairs, self.cache_fields)

    def generator_from_state(self, state, transformer=None):
        """The exported Generator, tagged with the IHC domain (model and bank)."""
        from pixgen.staining import ihc_domain

        gen = super().generator_from_state(state, transformer)
        gen.config["domain"] = ihc_domain(self.marker)
        if gen.embedding_bank is not None:
            gen.embedding_bank.domain = ihc_domain(self.marker)  # the bank holds IHC tiles' embeddings
        return gen

    def run_info(self) -> dict[str, Any]:
        return {**super().run_info(), "pairs": dataclasses.asdict(self.pairs), "marker": self.marker}


def add_stain_task_flags(p: argparse.ArgumentParser, preset: str) -> argparse.ArgumentParser:
    """The paired-data flags plus the ``pixgen train`` options these tasks use."""
    from training.presets import PRESETS
    from training.tasks.paired import add_paired_flags

    add_paired_flags(p)
    p.add_argument("--marker", help="the IHC marker (default: her2 for bci, the one --markers names for mist)")
    p.add_argument("--out", required=True, help="run directory (RUN/final: the model)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=preset, help=f"named config (default {preset})")
    p.add_argument("--init", help="the H&E Generator directory or hub id to start from")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lora-rank", type=int, help="LoRA rank (0: fine-tune every weight)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig field")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    return p


def run_stain_task(argv: list[str] | None, task_cls, prog: str, description: str, preset: str, role: str) -> Path:
    """Parse, resolve the config (preset or the run's saved one, then flags), fit, register."""
    from training.engine import Engine
    from training.tasks.paired import paired_from_args, register_in_stain_model
    from training.trainer import resolve_config

    p = add_stain_task_flags(argparse.ArgumentParser(prog=prog, description=description), preset)
    args = p.parse_args(argv)
    pairs, marker = paired_from_args(args)
    overrides = {"init": args.init, "max_steps": args.max_steps, "batch_size": args.batch_size, "lr": args.lr,
                 "lora_rank": args.lora_rank, "mpp": args.mpp}
    cfg = resolve_config(args.preset, args.out, args.resume, overrides, args.set)
    final = Engine(task_cls(cfg, pairs, marker), args.out, resume=args.resume, cpu=True if args.cpu else None).fit()
    if args.stain_model:
        register_in_stain_model(args.stain_model, marker, role, final)
    print(f"wrote {final}")
    return final


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m training.tasks.lora`` (see the module docstring)."""
    run_stain_task(argv, StainLoRATask, "python -m training.tasks.lora",
                   "Train the IHC generator (LoRA on an H&E generator) on the IHC side of paired tiles.",
                   "pixcell-stain-lora", "generator")
    return 0


if __name__ == "__main__":
    from training.tasks.paired import run_main

    raise SystemExit(run_main(main))
