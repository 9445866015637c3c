"""The pixgen generator: a PixArt-style diffusion transformer conditioned on SSL embeddings.

Reads top to bottom: patchify -> adaLN-single timestep modulation -> N x (self-attention,
cross-attention to condition tokens, MLP) -> modulated final norm -> unpatchify.

Module names follow diffusers' PixArt / PixCell layout (``pos_embed``, ``adaln_single``,
``caption_projection``, ``transformer_blocks.i.attn1``, ...), so published PixCell weights load
without renaming. The blocks are diffusers' own (``BasicTransformerBlock`` with SDPA, or
xformers when enabled); what is ours is the conditioning: any number of condition tokens, an
optional fixed 2-D sin-cos position embedding for a grid of tokens, a learned null embedding
for classifier-free guidance, and per-block ControlNet residuals.

Example:
    >>> model = PixgenTransformer.from_preset("pixgen-tiny", caption_channels=32)
    >>> x = torch.randn(2, 4, 8, 8)
    >>> y = torch.randn(2, 1, 32)
    >>> model(x, torch.tensor([10.0, 500.0]), y).sample.shape
    torch.Size([2, 4, 8, 8])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed_from_grid
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle
from diffusers.utils import BaseOutput
from torch import nn

from pixgen.errors import EncoderMismatchError, InputError

__all__ = ["PixgenTransformer", "TransformerOutput", "PRESETS"]

# Size presets: one registry. XL/2 is PixCell's (and PixArt-Sigma's) size, ~0.6 B parameters.
PRESETS: dict[str, dict[str, int]] = {
    "pixgen-tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16),
    "pixgen-XS": dict(num_layers=8, num_attention_heads=4, attention_head_dim=64),  # the bundled default (CPU-trained)
    "pixgen-S/2": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64),
    "pixgen-B/2": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64),
    "pixgen-XL/2": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72),
}

PREDICTION_TYPES = ("flow", "epsilon")


@dataclass
class TransformerOutput(BaseOutput):
    """``sample``: (B, out_channels, H, W) prediction (velocity or epsilon [+ variance])."""

    sample: torch.Tensor


def grid_pos_embed(dim: int, num_tokens: int, base_size: int, interpolation_scale: float = 2.0) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding for a square grid of condition tokens, (num_tokens, dim).

    Positions are laid out as PixCell lays them (grid scaled to ``base_size``, shifted by a phase
    of ``base_size // num_tokens``), so PixCell-1024's 4x4 UNI grid sees the same codes.
    """
    side = round(num_tokens**0.5)
    if side * side != num_tokens:
        raise InputError(f"a grid position embedding needs a square number of tokens, got {num_tokens}")
    coords = torch.arange(side, dtype=torch.float32) / (side / base_size) / interpolation_scale
    coords = coords + base_size // num_tokens
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=0).reshape(2, 1, side, side)
    return get_2d_sincos_pos_embed_from_grid(dim, grid, output_type="pt").float()


class ConditionPosEmbed(nn.Module):
    """Adds the fixed grid embedding to condition tokens (in the encoder's space, before projection)."""

    def __init__(self, dim: int, num_tokens: int, base_size: int):
        super().__init__()
        # Persistent, named as in PixCell's checkpoints (`y_pos_embed.y_pos_embed`).
        self.register_buffer("y_pos_embed", grid_pos_embed(dim, num_tokens, base_size)[None])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T, Dc)
        return (tokens + self.y_pos_embed).to(tokens.dtype)


class ConditionProjection(nn.Module):
    """MLP from the encoder's embedding space to the model width, plus the null embedding for CFG."""

    def __init__(self, in_features: int, hidden_size: int, num_tokens: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden_size, hidden_size)
        # Learned null condition ("no image given"), in the encoder's space. PixCell stores a
        # fixed random one under the same name; it loads into this parameter unchanged.
        self.uncond_embedding = nn.Parameter(torch.randn(num_tokens, in_features) / in_features**0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T, Dc) -> (B, T, D)
        return self.linear_2(self.act_1(self.linear_1(tokens)))


class PixgenTransformer(ModelMixin, ConfigMixin):
    """PixArt-style DiT over VAE latents, cross-attending to SSL-embedding condition tokens.

    Args:
        num_attention_heads, attention_head_dim: width = heads x head_dim.
        in_channels: latent channels. out_channels: ``in_channels`` (velocity / epsilon) or
            ``2 * in_channels`` (epsilon with learned variance, as PixCell).
        num_layers: depth. sample_size: latent side the position embedding is built for.
        patch_size: latent pixels per token side.
        caption_channels: dimension of the condition embeddings (the encoder's ``dim``).
        caption_num_tokens: condition tokens per image (1, or a square grid such as 16).
        condition_pos_embed: add the fixed 2-D grid embedding to the tokens (default: on when
            ``caption_num_tokens > 1``).
        prediction_type: ``"flow"`` (velocity ``noise - x0``) or ``"epsilon"``.
        encoder_name: registry name of the encoder that made the training embeddings; inputs
            tagged with another encoder are refused.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock", "PatchEmbed"]

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
    ):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise InputError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        out_channels = out_channels or in_channels
        if out_channels not in (in_channels, 2 * in_channels):
            raise InputError(f"out_channels must be in_channels or 2*in_channels, got {out_channels}")
        self.inner_dim = inner = num_attention_heads * attention_head_dim
        self.out_channels = out_channels
        self.gradient_checkpointing = False

        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=inner,
            interpolation_scale=interpolation_scale or max(sample_size // 64, 1),
        )
        self.adaln_single = AdaLayerNormSingle(inner)
        if condition_pos_embed is None:
            condition_pos_embed = caption_num_tokens > 1
        self.y_pos_embed = (
            ConditionPosEmbed(caption_channels, caption_num_tokens, sample_size // patch_size)
            if condition_pos_embed
            else None
        )
        self.caption_projection = ConditionProjection(caption_channels, inner, caption_num_tokens)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner,
                num_attention_heads,
                attention_head_dim,
                dropout=dropout,
                cross_attention_dim=inner,
                activation_fn=activation_fn,
                num_embeds_ada_norm=num_embeds_ada_norm,
                attention_bias=attention_bias,
                norm_type="ada_norm_single",
                norm_elementwise_affine=False,
                norm_eps=norm_eps,
            )
            for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(inner, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, inner) / inner**0.5)
        self.proj_out = nn.Linear(inner, patch_size * patch_size * out_channels)
        self._init_weights()

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> PixgenTransformer:
        """Build a model of a named size (``PRESETS``), other config fields from ``overrides``.

        Example:
            >>> PixgenTransformer.from_preset("pixgen-S/2", in_channels=4, caption_channels=384)  # doctest: +SKIP
        """
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}", fix=f"use one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], **overrides})

    def _init_weights(self) -> None:
        """DiT/PixArt init: xavier linears; zero cross-attention outputs and final projection."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for linear in (self.adaln_single.emb.timestep_embedder.linear_1, self.adaln_single.emb.timestep_embedder.linear_2):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.attn2.to_out[0].weight)
            nn.init.zeros_(block.attn2.to_out[0].bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    @property
    def learned_sigma(self) -> bool:
        """True when the model also predicts the variance (out_channels = 2 x in_channels)."""
        return self.out_channels == 2 * self.config.in_channels

    def check_condition(self, tokens: torch.Tensor) -> None:
        """Refuse condition tokens of the wrong rank, dimension or count, with the fix."""
        cfg = self.config
        if tokens.ndim != 3:
            raise InputError(f"condition tokens must be (batch, tokens, dim), got shape {tuple(tokens.shape)}")
        if tokens.shape[-1] != cfg.caption_channels:
            raise EncoderMismatchError(
                f"condition embeddings have dim {tokens.shape[-1]}, this model expects {cfg.caption_channels}"
                + (f" ({cfg.encoder_name} embeddings)" if cfg.encoder_name else ""),
                fix=f"embed references with the model's own encoder ({cfg.encoder_name or 'see `pixgen info`'})",
            )
        if self.y_pos_embed is not None and tokens.shape[1] != cfg.caption_num_tokens:
            raise InputError(
                f"this model takes a grid of {cfg.caption_num_tokens} condition tokens, got {tokens.shape[1]}",
                fix=f"pass {cfg.caption_num_tokens} embeddings per image (one per tile, row-major)",
            )

    def to(self, *args, **kwargs):
        """Move / cast like ``nn.Module.to``. diffusers' ``ModelMixin.to`` warns "There are modules
        in ... that should be kept in float32: []" on every cast with a dtype, even when the list is
        empty (it tests ``(self._keep_in_fp32_modules or []) is not None``); this model keeps no
        module in float32, so that check is skipped here rather than silencing diffusers' logger.

        Example:
            >>> tiny_transformer().to("cpu", torch.bfloat16).dtype  # doctest: +SKIP
            torch.bfloat16
        """
        if self._keep_in_fp32_modules or getattr(self, "is_quantized", False):
            return super().to(*args, **kwargs)
        return nn.Module.to(self, *args, **kwargs)

    def null_condition(self, batch_size: int, num_tokens: int | None = None) -> torch.Tensor:
        """The null ("unconditional") tokens, (B, T, Dc), for classifier-free guidance."""
        null = self.caption_projection.uncond_embedding
        num_tokens = num_tokens or null.shape[0]
        if null.shape[0] != num_tokens:  # single learned token repeated for token-count-free models
            null = null[:1].expand(num_tokens, -1)
        return null[None].expand(batch_size, -1, -1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        drop_condition: torch.Tensor | None = None,
        controlnet_block_samples: list[torch.Tensor] | None = None,
        return_dict: bool = True,
    ) -> TransformerOutput | tuple[torch.Tensor]:
        """Predict velocity / epsilon for noisy latents.

        Args:
            hidden_states: (B, C, H, W) noisy latents.
            timestep: (B,) or scalar; diffusion step in [0, 1000) (flow: sigma x 1000).
            encoder_hidden_states: (B, T, Dc) condition tokens in the encoder's space.
            drop_condition: (B,) bool; True rows use the null condition (CFG dropout / uncond).
            controlnet_block_samples: residuals (B, N, D) added after each block, in order.
        """
        self.check_condition(encoder_hidden_states)
        batch, _, height, width = hidden_states.shape
        p = self.config.patch_size
        if drop_condition is not None:
            null = self.null_condition(batch, encoder_hidden_states.shape[1]).to(encoder_hidden_states.dtype)
            encoder_hidden_states = torch.where(drop_condition[:, None, None], null, encoder_hidden_states)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)

        x = self.pos_embed(hidden_states)  # (B, N, D)
        t_mod, t_emb = self.adaln_single(timestep, batch_size=batch, hidden_dtype=x.dtype)  # (B, 6D), (B, D)
        y = encoder_hidden_states if self.y_pos_embed is None else self.y_pos_embed(encoder_hidden_states)
        y = self.caption_projection(y.to(x.dtype))  # (B, T, D)

        for i, block in enumerate(self.transformer_blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, None, y, None, t_mod)
            else:
                x = block(x, encoder_hidden_states=y, timestep=t_mod)
            if controlnet_block_samples is not None and i < len(controlnet_block_samples):
                x = x + controlnet_block_samples[i]

        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)  # (B, N, p*p*C_out)
        x = x.reshape(batch, height // p, width // p, p, p, self.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", x).reshape(batch, self.out_channels, height, width)
        return TransformerOutput(sample=out) if return_dict else (out,)
