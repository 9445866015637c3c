"""Arithmetic of a training step: parameters, FLOPs from the model config, matmul peak of this machine.

FLOPs count the matrix multiplications (2 per multiply-add) of one forward pass over one sample,
from the config alone; a training step costs about 3x the forward (backward = 2x), 4x with
gradient checkpointing (the forward runs twice). Elementwise work (norms, GELU, softmax) is
left out: it is a few percent at these sizes, and ``tests/test_train_flops.py`` checks the count
against torch's own ``FlopCounterMode``.

Example:
    >>> f = forward_flops(num_layers=12, width=384, tokens=256, cond_tokens=1, cond_dim=1536,
    ...                   patch_size=2, in_channels=16, out_channels=16)
    >>> round(f["total"] / 1e9, 2)   # GFLOPs per 256 px sample for pixgen-S/2 on f8 latents
    13.93
"""

from __future__ import annotations

import time

import torch

__all__ = ["forward_flops", "conv_stage_flops", "model_flops", "train_step_flops", "measure_matmul_rate", "TIMESTEP_FREQ_DIM"]

TIMESTEP_FREQ_DIM = 256  # sinusoidal timestep features before the embedder MLP (PixArt)
MLP_RATIO = 4


def forward_flops(num_layers: int, width: int, tokens: int, cond_tokens: int, cond_dim: int,
                  patch_size: int, in_channels: int, out_channels: int) -> dict[str, float]:
    """Forward matmul FLOPs for one sample, by part (``total`` = their sum).

    Per block (N image tokens, T condition tokens, width D): self-attention projections
    ``8 N D^2`` and scores/values ``4 N^2 D``; cross-attention ``4 N D^2 + 4 T D^2 + 4 N T D``;
    MLP ``2 x 2 x N x D x 4D = 16 N D^2``.
    """
    n, t, d = tokens, cond_tokens, width
    parts = {
        "patch_embed": 2 * n * patch_size**2 * in_channels * d,
        "timestep": 2 * (TIMESTEP_FREQ_DIM * d + d * d + d * 6 * d),
        "condition": 2 * t * (cond_dim * d + d * d),
        "self_attention": num_layers * (8 * n * d * d + 4 * n * n * d),
        "cross_attention": num_layers * (4 * n * d * d + 4 * t * d * d + 4 * n * t * d),
        "mlp": num_layers * 2 * 2 * n * d * MLP_RATIO * d,
        "proj_out": 2 * n * d * patch_size**2 * out_channels,
    }
    parts = {k: float(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def conv_stage_flops(channels: tuple[int, ...], layers: int, side: int, in_channels: int, out_channels: int,
                     width: int) -> float:
    """Forward conv + FiLM-projection FLOPs of an hourglass model's ``ConvStages`` for one sample.

    Stage ``i`` (side ``side / 2**i``, ``C_i`` channels): ``layers`` ResBlocks down (two 3x3
    convs), the same up with the first one taking the concatenated skip (``2 C_i`` in, plus its
    1x1 shortcut), a stride-2 conv into the next stage and a 3x3 conv after each upsampling;
    ``conv_in`` / ``conv_out`` at full resolution.
    """
    def conv(cin: int, cout: int, area: int, k: int = 3) -> int:
        return 2 * k * k * cin * cout * area

    total = conv(in_channels, channels[0], side**2) + conv(channels[0], out_channels, side**2)
    for i, c in enumerate(channels):
        area = (side >> i) ** 2
        film = 2 * width * 2 * c  # the ResBlock's timestep projection to scale and shift
        total += layers * (2 * conv(c, c, area) + film)  # down
        total += conv(2 * c, c, area) + conv(c, c, area) + conv(2 * c, c, area, k=1) + film  # up, first
        total += (layers - 1) * (2 * conv(c, c, area) + film)
        if i + 1 < len(channels):
            total += conv(c, channels[i + 1], (side >> (i + 1)) ** 2) + conv(channels[i + 1], c, area)
    return float(total)


def token_count(config, latent_size: int | None = None) -> int:
    """Tokens the transformer blocks see: patches of the latent, or of an hourglass' coarsest conv stage.

    Example:
        >>> token_count({"sample_size": 32, "patch_size": 2, "conv_channels": (64, 128)})
        64
    """
    c = dict(config)
    conv = tuple(c.get("conv_channels") or ())
    side = (latent_size or c["sample_size"]) // 2 ** max(len(conv) - 1, 0) // c["patch_size"]
    return side * side


def model_flops(config, latent_size: int | None = None) -> dict[str, float]:
    """:func:`forward_flops` for a ``PixgenTransformer`` config (dict or FrozenDict).

    Example:
        >>> model_flops(PixgenTransformer.from_preset("pixgen-tiny").config)["total"] > 0  # doctest: +SKIP
        True
    """
    c = dict(config)
    latent = latent_size or c["sample_size"]
    width, out_channels = c["num_attention_heads"] * c["attention_head_dim"], c.get("out_channels") or c["in_channels"]
    conv = tuple(c.get("conv_channels") or ())
    parts = forward_flops(
        num_layers=c["num_layers"], width=width, tokens=token_count(c, latent),
        cond_tokens=c["caption_num_tokens"], cond_dim=c["caption_channels"], patch_size=c["patch_size"],
        in_channels=conv[-1] if conv else c["in_channels"], out_channels=conv[-1] if conv else out_channels,
    )
    if conv:
        parts["conv_stages"] = conv_stage_flops(conv, c.get("conv_layers", 1), latent, c["in_channels"], out_channels,
                                                width)
        parts["total"] += parts["conv_stages"]
    return parts


def train_step_flops(forward_per_sample: float, batch_size: int, gradient_checkpointing: bool = False) -> float:
    """FLOPs of one optimizer step on ``batch_size`` samples: (3 or 4) x forward x batch."""
    return (4.0 if gradient_checkpointing else 3.0) * forward_per_sample * batch_size


def measure_matmul_rate(dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 0.5,
                        device: str | torch.device = "cpu") -> float:
    """Achieved FLOP/s of square ``torch.matmul`` on this machine (all threads torch uses), the
    best of three windows of ``seconds / 3``.

    Example:
        >>> measure_matmul_rate(torch.bfloat16, seconds=0.2) > 1e9   # doctest: +SKIP
        True
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.matmul(a, b)  # warm-up
    sync()
    best = 0.0
    for _ in range(3):  # best of three windows: other jobs on a shared machine only ever slow it down
        count, start = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            count += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / 3:
                break
        best = max(best, 2.0 * size**3 * count / elapsed)
    return best
