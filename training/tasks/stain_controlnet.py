"""The direct baseline for virtual staining: a ControlNet-style branch fed the H&E latents.

No translator: the IHC generator (``--init``, e.g. PixCell-1024 or a ``training.tasks.lora``
export) is frozen, and a ControlNet (:class:`~training.tasks.controlnet.ControlNetTask`, PixCell's
latent-input layout) learns to steer it from the paired H&E tile's VAE latents (cache field
``he_latents``, shaped like the latents, so they enter as ready control latents). The condition
tokens are the H&E tile's own embedding (``he_embeddings`` / ``he_grid``): at inference the
baseline sees the H&E image only, through both inputs. Compare it with the embedding route
(translator + IHC generator) on the same pairs (docs/staining.md).

``RUN/final`` is the base Generator with ``controlnet/``, domain ``ihc-<marker>`` and
``stain_baseline`` in its config; :func:`pixgen.staining.direct_stain` runs it.

Example:
    $ python -m training.tasks.stain_controlnet --layout bci --root BCI_dataset --mpp 0.5 --crop 1024 \\
          --init runs/bci-her2-lora/final --out runs/bci-her2-controlnet
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from training.presets import TrainConfig
from training.tasks.controlnet import ControlNetTask
from training.tasks.paired import PairedData

__all__ = ["StainControlNetTask", "main", "CONTROL_FIELD"]

CONTROL_FIELD = "he_latents"


class _HEConditioned(torch.utils.data.Dataset):
    """Items whose condition tokens are the paired H&E tile's embedding(s)."""

    def __init__(self, base: torch.utils.data.Dataset, field: str):
        self.base, self.field = base, field

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.base[index]
        he = item[self.field]
        return {**item, "condition": he[None] if he.ndim == 1 else he}  # (T, D)


class StainControlNetTask(ControlNetTask):
    """Train the direct H&E-latent ControlNet baseline (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, pairs: PairedData, marker: str, trust_remote_code: bool = False):
        cfg = dataclasses.replace(cfg, task="controlnet", control_field=CONTROL_FIELD)
        super().__init__(cfg, pairs.root, trust_remote_code=trust_remote_code)
        self.pairs, self.marker = pairs, marker.lower()

    @property
    def he_field(self) -> str:
        return "he_grid" if self.cfg.condition_grid > 1 else "he_embeddings"

    def setup(self, engine) -> None:
        self.cache_fields = (CONTROL_FIELD, self.he_field)
        super().setup(engine)

    def _open_cache(self, engine):
        from training.tasks.paired import open_paired_cache

        return open_paired_cache(self, engine, self.pairs, self.cache_fields)

    def dataset(self) -> torch.utils.data.Dataset:
        return _HEConditioned(super().dataset(), self.he_field)

    def generator_from_state(self, state, transformer=None):
        """The base Generator + ControlNet, tagged as the IHC baseline that conditions on H&E."""
        from pixgen.staining import ihc_domain

        gen = super().generator_from_state(state, transformer)
        gen.config["domain"] = ihc_domain(self.marker)
        gen.config["stain_baseline"] = {"control": CONTROL_FIELD, "condition": "he"}
        if gen.embedding_bank is not None:
            gen.embedding_bank.domain = ihc_domain(self.marker)
        return gen

    def run_info(self) -> dict[str, Any]:
        return {**super().run_info(), "pairs": dataclasses.asdict(self.pairs), "marker": self.marker}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m training.tasks.stain_controlnet`` (see the module docstring)."""
    from training.tasks.lora import run_stain_task

    run_stain_task(argv, StainControlNetTask, "python -m training.tasks.stain_controlnet",
                   "Train the direct baseline: a ControlNet fed the H&E latents, over a frozen IHC generator.",
                   "pixcell-stain-controlnet", "baseline")
    return 0


if __name__ == "__main__":
    from training.tasks.paired import run_main

    raise SystemExit(run_main(main))
