"""The ControlNet task: a :class:`~pixgen.models.controlnet.PixgenControlNet` over a frozen generator.

The base transformer (``cfg.init``) is frozen and never optimised; the ControlNet starts as a copy
of its first ``cfg.controlnet_layers`` blocks with zero-initialised connections, so training starts
from the base model's own output. Control inputs come from the feature cache field
``cfg.control_field``, whose per-tile shape says what it is:

* ``(H, W)`` at the tile size: binary masks, encoded once by the cache's VAE (PixCell's binary-mask
  encoding, :func:`~pixgen.models.controlnet.mask_to_pixels`);
* ``(C, h, w)`` at the latent shape: ready control latents;
* ``(C, H, W)`` at the tile size: pixel-grid control channels (the 6 of
  :func:`pixgen.masks.encode_masks`: nucleus, 4 classes, boundary); the ControlNet then gets a conv
  mask encoder (``conditioning_channels=C``, ``conditioning_downsample`` = the VAE's factor), so
  multi-class masks need no option: the cache field's shape sets it. The loss is the base model's objective with the ControlNet residuals
added. The export is the base Generator folder plus ``controlnet/``, which
``pixgen.Generator.from_pretrained`` loads with it.

Example:
    >>> add_field("cache/", "mask", masks)                                        # doctest: +SKIP
    >>> cfg = apply_overrides(get_preset("tiny"), {"task": "controlnet", "init": "runs/base/final"})
    >>> Engine(ControlNetTask(cfg, "cache/"), "runs/cn").fit()                    # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pixgen.errors import InputError
from training.presets import TrainConfig
from training.tasks.generator import GeneratorTask

__all__ = ["ControlNetTask"]


class _WithControl(torch.utils.data.Dataset):
    """Cache items plus ``control``: the control latents of each tile (held in memory)."""

    def __init__(self, cache, control: torch.Tensor):
        self.cache, self.control = cache, control

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.cache[index], "control": self.control[index]}


class ControlNetTask(GeneratorTask):
    """Train a ControlNet for the generator ``cfg.init`` (see the module docstring)."""

    log_fields = ("mse", "vb")

    def __init__(self, cfg: TrainConfig, data: str | Path, trust_remote_code: bool = False):
        super().__init__(cfg, data, trust_remote_code=trust_remote_code)  # cfg.init is required (TrainConfig.validate)
        self.cache_fields = (cfg.control_field,)
        self.base = None

    def setup(self, engine) -> None:
        super().setup(engine)
        self.base = self.init_gen.transformer.float().requires_grad_(False).eval().to(engine.accelerator.device)
        self.controls = self._control_latents()

    def build_model(self) -> torch.nn.Module:
        from pixgen.models.controlnet import PixgenControlNet

        layers = self.cfg.controlnet_layers or None
        channels, downsample = self._pixel_control()
        controlnet = PixgenControlNet.from_transformer(self.init_gen.transformer.float(), num_layers=layers,
                                                       conditioning_channels=channels,
                                                       conditioning_downsample=downsample)
        if self.cfg.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        return controlnet

    def dataset(self) -> torch.utils.data.Dataset:
        return _WithControl(self.cache, self.controls)

    def _pixel_control(self) -> tuple[int | None, int]:
        """(conditioning_channels, conditioning_downsample): (C, factor) for a (C, H, W) field at
        the tile size, else (None, 1) (PixCell's layout)."""
        shape = tuple(self.cache.fields.get(self.cfg.control_field, {}).get("shape", ()))
        size, (_, h, _) = self.cache.info["image_size"], self.cache.latent_shape
        if len(shape) == 3 and shape[1:] == (size, size) and size != h:
            return shape[0], size // h
        return None, 1

    @torch.no_grad()
    def _control_latents(self) -> torch.Tensor:
        """(N, C, h, w): the field as is when it holds latents or pixel-grid channels (kept as
        stored, e.g. uint8, and made float per batch), else masks through the cache's VAE."""
        from pixgen.models.controlnet import mask_to_pixels

        name, (c, h, w) = self.cfg.control_field, self.cache.latent_shape
        values = torch.from_numpy(self.cache.array(name))
        if tuple(values.shape[1:]) == (c, h, w):
            return values.float()
        if self._pixel_control()[0] is not None:
            return values
        size = self.cache.info["image_size"]
        if tuple(values.shape[1:]) != (size, size):
            raise InputError(f"cache field {name!r} holds {tuple(values.shape[1:])} per tile: neither masks "
                             f"({size}, {size}) nor latents ({c}, {h}, {w})",
                             fix="store one mask per tile at the tile size")
        vae = self.cache.load_vae()
        return torch.cat([vae.encode(mask_to_pixels(values[i:i + 64].numpy(), size)).float()
                          for i in range(0, len(values), 64)])

    def loss(self, model, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        x0, cond, control = batch["latents"], batch["condition"], batch["control"].float()
        drop = (torch.rand(x0.shape[0], generator=generator) < self.cfg.cfg_dropout).to(x0.device)

        def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            residuals = model(x_t, t, cond, control, drop_condition=drop).residuals()
            return self.base(x_t, t, cond, drop_condition=drop, **residuals).sample

        return self.objective.loss(predict, x0, generator)

    def sample(self, engine, model):
        """No grid: sampling a ControlNet needs masks in the Generator's input form (not cached)."""
        return None

    def export(self, engine, state: dict[str, torch.Tensor], folder: Path) -> None:
        """The base Generator (unchanged weights) with ``controlnet/`` holding the EMA ControlNet."""
        controlnet = type(self._model).from_config(self._model.config)
        controlnet.load_state_dict(state)
        gen = self.generator_from_state(state, transformer=self.init_gen.transformer.float().eval())
        gen.controlnet = controlnet.eval()
        gen.save_pretrained(folder)

    def run_info(self) -> dict[str, Any]:
        return {"data": str(self.data), "cache": str(self.cache.root), "tiles": len(self.cache),
                "base": self.cfg.init, "control_field": self.cfg.control_field,
                "controlnet_layers": self._model.config.num_layers}
