"""Weight-only int8 storage for bundled models: half the bytes of fp16, computed in fp32 after loading.

Every committed weights version counts against the bundled-weights budget (docs/default-models.md),
so the bundled generator and its ControlNet are stored as int8 with one scale per output row
(symmetric, absmax). On the bundled generator this changes generated images by 53.6 dB PSNR
(16 Euler steps, same seeds): invisible. Our own ~40 lines because diffusers' quantizers
(bitsandbytes, torchao, quanto) quantize for *compute*, need a GPU, pickle or an extra package,
and none stores a plain safetensors file that loads strictly on CPU.

Example:
    >>> save_int8(model.transformer, "out/transformer")               # doctest: +SKIP
    >>> model = load_model(PixgenTransformer, "out/transformer")      # int8 or fp16/fp32 folder  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file

from pixgen.errors import ModelLoadError

INT8_WEIGHTS = "diffusion_pytorch_model.int8.safetensors"
SCALE_SUFFIX = ".__int8_scale__"
MIN_NUMEL = 1024  # smaller tensors (biases, norms) stay fp16: quantizing them saves nothing worth the error

M = TypeVar("M", bound=torch.nn.Module)


def quantize(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices and conv kernels -> int8 + per-row fp32 scale (key + ``SCALE_SUFFIX``); the rest fp16."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = value.detach().float().cpu()
        if value.ndim >= 2 and value.numel() >= MIN_NUMEL:
            rows = value.reshape(value.shape[0], -1)
            scale = rows.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            out[key] = (rows / scale[:, None]).round().clamp(-127, 127).to(torch.int8).reshape(value.shape)
            out[key + SCALE_SUFFIX] = scale
        else:
            out[key] = value.to(torch.float16)
    return out


def dequantize(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp32 state dict back from :func:`quantize`'s output."""
    state: dict[str, torch.Tensor] = {}
    for key, value in stored.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        scale = stored.get(key + SCALE_SUFFIX)
        if value.dtype == torch.int8:
            if scale is None:
                raise ModelLoadError(f"int8 tensor {key!r} has no scale ({key + SCALE_SUFFIX})",
                                     fix="re-export the model with pixgen.io.int8.save_int8")
            value = value.float() * scale.float().reshape(-1, *([1] * (value.ndim - 1)))
        state[key] = value.float()
    return state


def save_int8(model: torch.nn.Module, folder: str | Path) -> Path:
    """Write ``model``'s config (diffusers ``save_config``) and its int8 weights into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    save_file(quantize(model.state_dict()), str(folder / INT8_WEIGHTS), metadata={"format": "pt", "pixgen": "int8"})
    return folder


def load_model(cls: type[M], folder: str | Path) -> M:
    """``cls`` from ``folder``: the int8 file when present (strict keys), otherwise ``cls.from_pretrained``."""
    folder = Path(folder)
    if not (folder / INT8_WEIGHTS).is_file():
        return cls.from_pretrained(folder)
    model = cls.from_config(cls.load_config(folder))
    try:
        stored = load_file(str(folder / INT8_WEIGHTS))
    except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) for a damaged file
        raise ModelLoadError(f"could not read {folder / INT8_WEIGHTS}: {err}",
                             fix=f"restore {folder.name}/ (re-download or re-export the model)") from err
    missing, unexpected = model.load_state_dict(dequantize(stored), strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"{folder / INT8_WEIGHTS} does not match {cls.__name__}'s config: "
                             f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}",
                             fix="export the weights and config together with pixgen.io.int8.save_int8")
    return model.eval()
