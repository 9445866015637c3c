"""Turn the image types people hand to pixgen into one uint8 NCHW RGB tensor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pixgen.errors import InputError
from pixgen.io import to_rgb

__all__ = ["to_uint8_batch"]

_ACCEPTED = (
    "a PIL image, a uint8 numpy array (H, W, 3) or (N, H, W, 3), "
    "a uint8 torch tensor (3, H, W) or (N, 3, H, W), or a list of these"
)


def to_uint8_batch(images: Any) -> torch.Tensor:
    """Convert images to a uint8 tensor of shape (N, 3, H, W) on the CPU.

    Accepts a PIL image (converted to RGB), a uint8 numpy array in HWC / NHWC layout, a uint8
    torch tensor in CHW / NCHW layout, or a list mixing these (all of the same size).
    Anything else (float arrays, NaN values, other channel counts, an empty batch) raises
    `InputError` saying what is wrong and how to fix it.

    Example:
        >>> import numpy as np
        >>> to_uint8_batch(np.zeros((64, 64, 3), dtype=np.uint8)).shape
        torch.Size([1, 3, 64, 64])
    """
    if isinstance(images, (list, tuple)):
        return _stack([_one(item) for item in images])
    return _stack([_one(images)])


def _one(image: Any) -> torch.Tensor:
    """One input (PIL image, array or tensor) -> uint8 (N, 3, H, W)."""
    if _is_pil(image):
        return torch.from_numpy(np.asarray(to_rgb(image)).copy()).permute(2, 0, 1)[None]  # 16-bit scaled, not clipped
    if isinstance(image, np.ndarray):
        _check_dtype(image.dtype, np.isnan(image).any() if image.dtype.kind == "f" else False)
        if image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise InputError(
                f"numpy image has shape {image.shape}; expected (H, W, 3) or (N, H, W, 3) RGB",
                fix="pass RGB arrays in channels-last layout (convert grayscale/RGBA to RGB first)",
            )
        tensor = torch.from_numpy(np.ascontiguousarray(image))
        return tensor.permute(2, 0, 1)[None] if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    if isinstance(image, torch.Tensor):
        _check_dtype(image.dtype, image.is_floating_point() and bool(image.isnan().any()))
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise InputError(
                f"image tensor has shape {tuple(image.shape)}; expected (3, H, W) or (N, 3, H, W)",
                fix="pass RGB tensors channels-first, e.g. x.permute(0, 3, 1, 2) for NHWC",
            )
        return image.detach().cpu().reshape(-1, *image.shape[-3:])
    raise InputError(f"cannot read images of type {type(image).__name__}", fix=f"pass {_ACCEPTED}")


def _check_dtype(dtype: Any, has_nan: bool) -> None:
    if has_nan:
        raise InputError("image contains NaN values", fix="pass uint8 images with values 0-255")
    if dtype not in (np.uint8, torch.uint8):
        raise InputError(
            f"images must be uint8 (0-255), got dtype {dtype}",
            fix="convert with (x * 255).round().clip(0, 255) and cast to uint8 if x is in [0, 1]",
        )


def _stack(batches: Sequence[torch.Tensor]) -> torch.Tensor:
    if not batches or sum(len(b) for b in batches) == 0:
        raise InputError("empty batch: no images given", fix="pass at least one image")
    sizes = {tuple(b.shape[-2:]) for b in batches}
    if len(sizes) > 1:
        raise InputError(
            f"images in one batch differ in size: {sorted(sizes)}",
            fix="crop or resize the images to one size, or pass them in separate calls",
        )
    return torch.cat(list(batches)).contiguous()


def _is_pil(image: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(image, Image.Image)
