"""`Encoder`: one interface over every SSL backbone (timm, transformers, bundled).

Subclasses wrap a backbone and implement two methods:

* ``forward_tokens(pixel_values) -> (cls, patch_tokens)`` with shapes (N, D) and (N, P, D);
* ``save_backbone(directory)`` writing the backbone in its library's Hub layout.

Everything else (preprocessing, pooling per ``spec.output``, batching, grids, saving the spec)
lives here, so all encoders behave the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pixgen.encoders.images import to_uint8_batch
from pixgen.encoders.spec import EncoderSpec
from pixgen.errors import InputError
from pixgen.io import write_json_atomic

__all__ = ["SPEC_FILENAME", "Encoder"]

SPEC_FILENAME = "pixgen_encoder.json"
_FORMAT_VERSION = 1


class Encoder(nn.Module):
    """An SSL image encoder: uint8 RGB images in, (N, dim) embeddings out.

    Get one with `pixgen.encoders.load_encoder`; ``spec`` holds its facts and the properties
    ``name``, ``dim``, ``input_size``, ``mean``, ``std`` and ``mpp`` mirror it.

    Example:
        >>> enc = load_encoder("uni2-h", token="hf_...")  # doctest: +SKIP
        >>> enc.embed(tiles).shape                          # tiles: uint8 (N, 3, H, W)  # doctest: +SKIP
        torch.Size([N, 1536])
    """

    def __init__(self, spec: EncoderSpec, backbone: nn.Module):
        super().__init__()
        self.spec = spec
        self.backbone = backbone

    # --- facts ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.spec.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.spec.std

    @property
    def mpp(self) -> float:
        return self.spec.mpp

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # --- backbone hooks (subclasses) ----------------------------------------------------------
    def forward_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone pass: (N, 3, S, S) -> CLS token (N, D) and patch tokens (N, P, D)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_tokens")

    def save_backbone(self, directory: Path) -> None:
        """Write the backbone's config and weights into ``directory`` (its Hub layout)."""
        raise NotImplementedError(f"{type(self).__name__} must implement save_backbone")

    # --- public API ---------------------------------------------------------------------------
    def preprocess(self, images: Any) -> torch.Tensor:
        """Images (anything `to_uint8_batch` takes) -> normalised float32 (N, 3, S, S) on the CPU.

        Scales to [0, 1], resizes to ``input_size`` (``spec.resize`` interpolation, antialiased;
        skipped when the size already matches) and normalises with ``mean`` / ``std``.

        Example:
            >>> enc.preprocess(np.zeros((256, 256, 3), np.uint8)).shape  # doctest: +SKIP
            torch.Size([1, 3, 224, 224])
        """
        x = to_uint8_batch(images).float().div_(255.0)  # (N, 3, H, W)
        size = self.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode=self.spec.resize, antialias=True, align_corners=False)
            x = x.clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Preprocessed (N, 3, S, S) float pixels -> (N, dim) embeddings (gradients allowed)."""
        x = self._check_pixels(pixel_values).to(self.device, self.dtype)
        cls, patches = self.forward_tokens(x)  # (N, D), (N, P, D)
        if self.spec.output == "cls+mean":
            return torch.cat([cls, patches.mean(dim=1)], dim=-1)  # (N, 2D)
        return cls

    @torch.no_grad()
    def embed(self, images: Any, batch_size: int = 64) -> torch.Tensor:
        """Embed images in batches -> float32 (N, dim) on the CPU.

        Example:
            >>> enc.embed([pil_a, pil_b]).shape  # doctest: +SKIP
            torch.Size([2, 1536])
        """
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}", fix="pass batch_size=64")
        batch = to_uint8_batch(images)
        out = [self(self.preprocess(chunk)).float().cpu() for chunk in batch.split(batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def embed_grid(self, images: Any, grid: int, *, batch_size: int = 64) -> torch.Tensor:
        """Split each image into ``grid`` x ``grid`` tiles and embed them -> (N, grid*grid, dim).

        Tiles are in row-major order: index ``r * grid + c`` is row ``r``, column ``c``.
        Image height and width must be multiples of ``grid``.

        Example:
            >>> enc.embed_grid(uint8_1024px_images, grid=4).shape  # doctest: +SKIP
            torch.Size([N, 16, 1536])
        """
        batch = to_uint8_batch(images)  # (N, 3, H, W)
        n, c, h, w = batch.shape
        if grid < 1 or h % grid or w % grid:
            raise InputError(
                f"cannot split {h}x{w} images into a {grid}x{grid} grid",
                fix="use grid >= 1 that divides both height and width, or crop the images first",
            )
        th, tw = h // grid, w // grid
        tiles = batch.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5)  # (N, g, g, 3, th, tw)
        emb = self.embed(tiles.reshape(n * grid * grid, c, th, tw), batch_size=batch_size)
        return emb.reshape(n, grid * grid, -1)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Save spec (``pixgen_encoder.json``) and backbone so `load_encoder(directory)` restores it.

        The backbone files use its library's Hub layout (``config.json`` + ``model.safetensors``),
        so the directory also works as ``local_path=`` for the registry name.

        Example:
            >>> enc.save_pretrained("encoders/uni2-h")                # doctest: +SKIP
            >>> load_encoder("encoders/uni2-h")                       # doctest: +SKIP
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.save_backbone(path)
        record = {"format_version": _FORMAT_VERSION, "spec": self.spec.to_dict()}
        write_json_atomic(path / SPEC_FILENAME, record)
        return path

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, input_size={self.input_size}, mpp={self.mpp}"

    def _check_pixels(self, x: Any) -> torch.Tensor:
        size = self.input_size
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputError(
                f"pixel_values must be a float tensor, got {getattr(x, 'dtype', type(x).__name__)}",
                fix="pass encoder.preprocess(images), or call encoder.embed(images)",
            )
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size) or x.shape[0] == 0:
            raise InputError(
                f"pixel_values has shape {tuple(x.shape)}; {self.name} expects (N, 3, {size}, {size}), N >= 1",
                fix="pass encoder.preprocess(images), which resizes to the encoder's input size",
            )
        if not torch.isfinite(x).all():
            raise InputError("pixel_values contain NaN or infinite values", fix="check the input images")
        return x
