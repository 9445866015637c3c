"""ControlNet for :class:`PixgenTransformer`: a trainable copy of its first blocks steered by a mask.

Reads top to bottom: patchify the noisy latents *and* the control latents (a VAE-encoded mask),
add them, run ``num_layers`` transformer blocks copied from the base model, and send each block's
output through a zero-initialised linear layer. The outputs are per-block residuals that
:class:`PixgenTransformer` adds after its blocks (``controlnet_block_samples``).

Module names are PixCell's (``PixCellControlNet`` in ``PixCell-256-Cell-ControlNet``): the copied
families ``pos_embed``, ``adaln_single``, ``caption_projection``, ``y_pos_embed``,
``transformer_blocks.i``, ``norm_out``, ``scale_shift_table``, ``proj_out`` (the last two are not
used by the forward pass, but PixCell stores them, so they are kept for strict loading), plus
``cond_pos_embed`` (patch embedding of the control latents, zero-initialised projection) and
``controlnet_blocks.i`` (zero-initialised linear layers).

Over an hourglass base (``conv_channels``) the ControlNet also copies the down conv stages: the
control input is added after their input convolution (through a zero-initialised ``cond_conv_in``)
and each stage's skip gets a zero-initialised 1x1 convolution (``controlnet_skip_blocks.i``), whose
output the base adds to its own skip. The finest skip runs at the latent grid (4 px per latent
pixel), so the mask steers nuclear outlines directly, not only through the coarse tokens.

Masks become control latents the way PixCell encodes them: a binary mask replicated to RGB,
scaled to [-1, 1] and encoded by the VAE (posterior mean, SD3 scaling/shift), see
:func:`mask_to_pixels`.

Example:
    >>> base = PixgenTransformer.from_preset("pixgen-tiny", caption_channels=32)
    >>> cn = PixgenControlNet.from_transformer(base, num_layers=1)
    >>> x, c, y = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 1, 32)
    >>> [r.shape for r in cn(x, torch.tensor([10, 20]), y, c).controlnet_block_samples]
    [torch.Size([2, 16, 32])]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import PatchEmbed
from diffusers.utils import BaseOutput
from torch import nn

from pixgen.errors import InputError, ModelLoadError
from pixgen.models.transformer import PixgenTransformer

__all__ = ["PixgenControlNet", "ControlNetOutput", "mask_to_pixels", "per_image"]


@dataclass
class ControlNetOutput(BaseOutput):
    """``controlnet_block_samples``: one (B, N, D) residual per copied block, in block order;
    ``controlnet_skip_samples``: hourglass only, one residual per conv-stage skip (finest first)."""

    controlnet_block_samples: tuple[torch.Tensor, ...]
    controlnet_skip_samples: tuple[torch.Tensor, ...] = ()

    def residuals(self) -> dict[str, list[torch.Tensor]]:
        """The keyword arguments that hand these residuals to :meth:`PixgenTransformer.forward`."""
        out = {"controlnet_block_samples": list(self.controlnet_block_samples)}
        if self.controlnet_skip_samples:
            out["controlnet_skip_samples"] = list(self.controlnet_skip_samples)
        return out


class PixgenControlNet(PixgenTransformer):
    """A ControlNet over a :class:`PixgenTransformer` (same config fields, see there).

    Args:
        num_layers: how many transformer blocks are copied (and how many residuals come out);
            PixCell-256-Cell-ControlNet uses the first 27 of 28.
        conditioning_channels: channels of the control input (default: ``in_channels``, a mask
            encoded by the model's own VAE: PixCell's layout).
        conditioning_downsample: 1 (default): the control input is at the latent grid (PixCell);
            > 1 (a power of 2, the VAE's factor): it is at the pixel grid (e.g. the 6 channels of
            :func:`pixgen.masks.encode_masks`) and a small conv ``mask_encoder`` brings it to the
            latent grid.
        conv_channels, conv_layers, conv_groups: the hourglass base's (see the module docstring).
        Other arguments: as :class:`PixgenTransformer`.
    """

    _conv_decoder = False

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int = 1000,
        norm_eps: float = 1e-6,
        interpolation_scale: float | None = None,
        caption_channels: int = 1536,
        caption_num_tokens: int = 1,
        condition_pos_embed: bool | None = None,
        prediction_type: str = "flow",
        encoder_name: str | None = None,
        conditioning_channels: int | None = None,
        conditioning_downsample: int = 1,
        conv_channels: tuple[int, ...] | None = None,
        conv_layers: int = 1,
        conv_groups: int = 32,
    ):
        super().__init__(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels, out_channels=out_channels, num_layers=num_layers, dropout=dropout,
            attention_bias=attention_bias, sample_size=sample_size, patch_size=patch_size,
            activation_fn=activation_fn, num_embeds_ada_norm=num_embeds_ada_norm, norm_eps=norm_eps,
            interpolation_scale=interpolation_scale, caption_channels=caption_channels,
            caption_num_tokens=caption_num_tokens, condition_pos_embed=condition_pos_embed,
            prediction_type=prediction_type, encoder_name=encoder_name, conv_channels=conv_channels,
            conv_layers=conv_layers, conv_groups=conv_groups,
        )
        inner = self.inner_dim
        cond_in = conditioning_channels or in_channels
        self.mask_encoder = None
        if conditioning_downsample > 1:
            self.mask_encoder = _mask_encoder(cond_in, conditioning_downsample, MASK_FEATURES)
            cond_in = MASK_FEATURES
        self.cond_pos_embed = self.cond_conv_in = self.controlnet_skip_blocks = None
        if conv_channels:
            self.cond_conv_in = nn.Conv2d(cond_in, conv_channels[0], 3, padding=1)
            self.controlnet_skip_blocks = nn.ModuleList(nn.Conv2d(c, c, 1) for c in conv_channels)
        else:  # same patching (and fixed sin-cos table) as `pos_embed`; only the projection learns
            self.cond_pos_embed = PatchEmbed(
                height=sample_size,
                width=sample_size,
                patch_size=patch_size,
                in_channels=cond_in,
                embed_dim=inner,
                interpolation_scale=self.pos_embed.interpolation_scale,
            )
        self.controlnet_blocks = nn.ModuleList(nn.Linear(inner, inner) for _ in range(num_layers))
        self._zero_init_control()

    def _zero_init_control(self) -> None:
        """Zero the new projections: a fresh ControlNet leaves the base model's output unchanged."""
        entry = self.cond_conv_in if self.cond_conv_in is not None else self.cond_pos_embed.proj
        for module in (entry, *self.controlnet_blocks, *(self.controlnet_skip_blocks or ())):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_transformer(
        cls, transformer: PixgenTransformer, num_layers: int | None = None, conditioning_channels: int | None = None,
        conditioning_downsample: int = 1,
    ) -> PixgenControlNet:
        """Start a ControlNet from a trained transformer: copy its first ``num_layers`` blocks and
        all shared modules; the control projections start at zero (the mask encoder, if any, at
        PyTorch's default init: its output only reaches the model through the zeroed projection).

        Example:
            >>> cn = PixgenControlNet.from_transformer(gen.transformer, num_layers=27)  # doctest: +SKIP
        """
        config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        depth = config["num_layers"] if num_layers is None else num_layers
        if not 1 <= depth <= config["num_layers"]:
            raise InputError(f"num_layers must be in 1..{config['num_layers']}, got {depth}")
        controlnet = cls(**{**config, "num_layers": depth, "conditioning_channels": conditioning_channels,
                            "conditioning_downsample": conditioning_downsample})
        base_state = transformer.state_dict()
        own = controlnet.state_dict()
        copied = {k: v for k, v in base_state.items() if k in own and own[k].shape == v.shape}
        new = ("cond_pos_embed.", "cond_conv_in.", "controlnet_blocks.", "controlnet_skip_blocks.", "mask_encoder.")
        missing = [k for k in own if k not in copied and not k.startswith(new)]
        if missing:
            raise ModelLoadError(f"cannot copy {missing[:3]} from the transformer", fix="use a PixgenTransformer base")
        controlnet.load_state_dict(copied, strict=False)
        controlnet.to(transformer.device)
        return controlnet if transformer.dtype == controlnet.dtype else controlnet.to(dtype=transformer.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        drop_condition: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ControlNetOutput | tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Per-block residuals for the base transformer.

        Args:
            hidden_states: (B, C, H, W) noisy latents (what the base model sees).
            timestep: (B,) or scalar diffusion step.
            encoder_hidden_states: (B, T, Dc) condition tokens in the encoder's space.
            controlnet_cond: (B, C_cond, H, W) control latents (e.g. a VAE-encoded cell mask), or
                (B, C_cond, H*f, W*f) pixel-grid channels with a mask encoder (f = conditioning_downsample).
            conditioning_scale: multiplies every residual (0 switches the ControlNet off).
            drop_condition: (B,) bool; True rows use the null condition tokens.
        """
        self.check_condition(encoder_hidden_states)
        f = self.config.conditioning_downsample
        if tuple(controlnet_cond.shape[-2:]) != tuple(s * f for s in hidden_states.shape[-2:]):
            raise InputError(
                f"control input is {tuple(controlnet_cond.shape[-2:])}, latents {tuple(hidden_states.shape[-2:])}"
                + (f" (the mask encoder expects {f}x the latent size)" if f > 1 else ""),
                fix="pass a mask of the output image's size",
            )
        batch = hidden_states.shape[0]
        cond = controlnet_cond.to(hidden_states.dtype)
        cond = self.mask_encoder(cond) if self.mask_encoder is not None else cond  # pixel -> latent grid
        timestep = timestep.expand(batch) if timestep.ndim == 0 else timestep
        t_mod, t_emb = self.adaln_single(timestep, batch_size=batch, hidden_dtype=hidden_states.dtype)  # (B, 6D), (B, D)
        y = self._project_condition(encoder_hidden_states, drop_condition, hidden_states.dtype)  # (B, T, D)
        skip_residuals: tuple[torch.Tensor, ...] = ()
        if self.conv_stages is not None:  # as the base: ResBlocks see the timestep and the pooled condition
            feature_map, skips = self.conv_stages.down(hidden_states, t_emb + y.mean(dim=1), hint=self.cond_conv_in(cond))
            skip_residuals = tuple(conv(s) * conditioning_scale for conv, s in zip(self.controlnet_skip_blocks, skips))
            x = self.pos_embed(feature_map)
        else:
            x = self.pos_embed(hidden_states) + self.cond_pos_embed(cond)  # (B, N, D)
        residuals = []
        for block, zero_linear in zip(self.transformer_blocks, self.controlnet_blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, None, y, None, t_mod)
            else:
                x = block(x, encoder_hidden_states=y, timestep=t_mod)
            residuals.append(zero_linear(x) * conditioning_scale)  # (B, N, D)
        out = ControlNetOutput(controlnet_block_samples=tuple(residuals), controlnet_skip_samples=skip_residuals)
        return out if return_dict else (out.controlnet_block_samples, out.controlnet_skip_samples)

    def control_input(self, masks: Any, size: int | tuple[int, int], vae_encode) -> torch.Tensor:
        """Control input for ``masks`` at image ``size``: pixel-grid channels
        (:func:`pixgen.masks.control_channels`) for a mask-encoder ControlNet, else PixCell's
        binary masks through ``vae_encode`` (pixels in [-1, 1] -> latents)."""
        if self.mask_encoder is not None:
            from pixgen.masks import control_channels

            return control_channels(masks, size)
        return vae_encode(mask_to_pixels(masks, size))

    def _project_condition(self, tokens: torch.Tensor, drop: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Condition tokens -> (B, T, D): null rows, grid position embedding, projection (as the base)."""
        if drop is not None:
            null = self.null_condition(tokens.shape[0], tokens.shape[1]).to(tokens.dtype)
            tokens = torch.where(drop[:, None, None], null, tokens)
        if self.y_pos_embed is not None:
            tokens = self.y_pos_embed(tokens)
        return self.caption_projection(tokens.to(dtype))


MASK_FEATURES = 16  # channels the mask encoder hands to ``cond_pos_embed``


def _mask_encoder(channels: int, downsample: int, features: int) -> nn.Sequential:
    """Pixel-grid mask channels -> latent-grid features: one 3x3 conv, then a stride-2 conv per
    factor of 2 (ControlNet's conditioning embedding, scaled to a 6-channel mask)."""
    steps = int(np.log2(downsample))
    if 2 ** steps != downsample:
        raise InputError(f"conditioning_downsample must be a power of 2, got {downsample}")
    widths = [32] + [min(32 * 2 ** k, 64) for k in range(1, steps + 1)]
    layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1), nn.SiLU()]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.SiLU()]
    return nn.Sequential(*layers, nn.Conv2d(widths[-1], features, 3, padding=1))


def mask_to_pixels(masks: Any, size: int | tuple[int, int]) -> torch.Tensor:
    """Binary cell masks -> (N, 3, H, W) float images in [-1, 1], ready for the VAE; ``size`` is
    the output image's side or ``(height, width)``.

    Accepts one mask or a sequence of masks: arrays / tensors (H, W), (H, W, 1|3) or (N, H, W) of
    bool or integers (0 background; any non-zero value, e.g. 1, 255 or an instance id, is a cell),
    or PIL images. This is PixCell's encoding: a 0/255 mask replicated to RGB, scaled to [0, 1]
    and then to [-1, 1].

    Example:
        >>> mask_to_pixels(np.eye(8, dtype=np.uint8), 8).shape
        torch.Size([1, 3, 8, 8])
    """
    arrays = [_mask_array(m) for m in _as_list(masks)]
    if not arrays:
        raise InputError("control_image is empty", fix="pass a binary mask (H, W) per image, or one for all")
    height, width = (size, size) if isinstance(size, int) else size
    for arr in arrays:
        if arr.shape != (height, width):
            raise InputError(
                f"control mask is {arr.shape[0]}x{arr.shape[1]}, the images are {height}x{width}",
                fix=f"pass a {height}x{width} mask (crop or resize it with nearest-neighbour interpolation)",
            )
    binary = torch.from_numpy(np.stack(arrays)).float()  # (N, H, W) in {0, 1}
    return (binary * 2 - 1)[:, None].expand(-1, 3, -1, -1).contiguous()


def _as_list(masks: Any) -> list[Any]:
    if isinstance(masks, (list, tuple)):
        return list(masks)
    arr = np.asarray(masks.detach().cpu() if isinstance(masks, torch.Tensor) else masks)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3):  # (N, H, W) stack
        return list(arr)
    return [arr]


def _mask_array(mask: Any) -> np.ndarray:
    """One mask -> (H, W) uint8 in {0, 1}; colour masks count a pixel as cell if any channel is set."""
    arr = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3):
        arr = arr.any(axis=-1)
    if arr.ndim != 2:
        raise InputError(f"a control mask must be (H, W) or (H, W, 1|3), got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError("control mask contains NaN or Inf", fix="pass a binary uint8 / bool mask")
    return (arr > 0).astype(np.uint8)


def per_image(values: torch.Tensor, num_conditions: int, num_images: int) -> torch.Tensor:
    """Rows for every output image from one row for all, one per condition (repeated
    ``num_images`` times, like the conditions) or one per output image.

    Example:
        >>> per_image(torch.zeros(2, 3), num_conditions=2, num_images=3).shape
        torch.Size([6, 3])
    """
    total = num_conditions * num_images
    if values.shape[0] == 1:
        return values.expand(total, *values.shape[1:])
    if values.shape[0] == num_conditions:
        return values.repeat_interleave(num_images, 0)
    if values.shape[0] == total:
        return values
    raise InputError(
        f"got {values.shape[0]} control masks for {num_conditions} conditions x {num_images} images",
        fix="pass one mask, one per condition, or one per output image",
    )
