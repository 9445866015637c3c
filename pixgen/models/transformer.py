"""The pixgen generator: a PixArt-style diffusion transformer conditioned on SSL embeddings.

Reads top to bottom: patchify -> adaLN-single timestep modulation -> N x (self-attention,
cross-attention to condition tokens, MLP) -> modulated final norm -> unpatchify.

With ``conv_channels`` the model is an hourglass (U-ViT / HDiT-like hybrid): timestep-modulated
convolutional ResBlocks at the finest latent scales, with U-Net skip connections, around the
same transformer blocks, which then run on the coarsest conv stage's tokens. Convolutions learn
local texture (nuclear outlines, chromatin) per FLOP much faster than attention on coarse
tokens, and the skips carry the finest scale past the token bottleneck (docs/generator-v2.md).

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
from itertools import pairwise

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed_from_grid
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.utils import BaseOutput
from torch import nn

from pixgen.errors import EncoderMismatchError, InputError

__all__ = ["PixgenTransformer", "TransformerOutput", "PRESETS", "ConvStages"]

# Size presets: one registry. XL/2 is PixCell's (and PixArt-Sigma's) size, ~0.6 B parameters.
PRESETS: dict[str, dict[str, object]] = {
    "pixgen-tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16),
    # Hourglass sizes: conv stages at the latent's full and half resolution around the blocks.
    "pixgen-tiny-H": dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, conv_channels=(16, 32), conv_groups=8),
    "pixgen-XS-H": dict(num_layers=6, num_attention_heads=4, attention_head_dim=64, conv_channels=(64, 128)),
    "pixgen-XS-H96": dict(num_layers=6, num_attention_heads=4, attention_head_dim=64, conv_channels=(96, 192)),
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


class ConvStages(nn.Module):
    """The convolutional half of the hourglass: down stages before the transformer, up stages after.

    Stage ``i`` runs at ``1 / 2**i`` of the latent side with ``channels[i]`` channels:
    ``layers`` diffusers ``ResnetBlock2D`` (FiLM-modulated by ``temb``: timestep + pooled
    condition) on the way down, a skip to the same stage on the way up (concatenated, then
    ``layers`` ResBlocks), stride-2 convolutions / nearest-upsample + conv between stages.
    ``down`` returns the coarsest feature map (the transformer patchifies it) and the skips.
    ``decoder=False`` builds the down half only (a ControlNet's copy needs no up stages).
    """

    def __init__(self, in_channels: int, out_channels: int, channels: tuple[int, ...], layers: int,
                 temb_channels: int, groups: int = 32, decoder: bool = True):
        super().__init__()
        self.decoder = decoder

        def resnet(cin: int, cout: int) -> ResnetBlock2D:
            return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb_channels, groups=groups,
                                 time_embedding_norm="scale_shift")

        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down_resnets = nn.ModuleList(nn.ModuleList(resnet(c, c) for _ in range(layers)) for c in channels)
        self.downsamplers = nn.ModuleList(
            Downsample2D(c, use_conv=True, out_channels=n, name="op") for c, n in pairwise(channels))
        if not decoder:
            return
        self.up_resnets = nn.ModuleList(
            nn.ModuleList(resnet(2 * c if j == 0 else c, c) for j in range(layers)) for c in channels)
        self.upsamplers = nn.ModuleList(
            Upsample2D(n, use_conv=True, out_channels=c) for c, n in pairwise(channels))
        self.norm_out = nn.GroupNorm(groups, channels[0], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def down(self, x: torch.Tensor, temb: torch.Tensor, hint: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C_in, H, W) -> coarsest map (B, channels[-1], H / 2**(S-1), ...), skips (finest first).
        ``hint`` (B, channels[0], H, W) is added after ``conv_in`` (a ControlNet's control input)."""
        h, skips = self.conv_in(x), []
        if hint is not None:
            h = h + hint
        for i, resnets in enumerate(self.down_resnets):
            for block in resnets:
                h = block(h, temb)
            skips.append(h)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)
        return h, skips

    def up(self, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        """Coarsest map back to (B, C_out, H, W), through the skips."""
        for i in reversed(range(len(self.up_resnets))):
            h = torch.cat([h, skips[i]], dim=1)
            for block in self.up_resnets[i]:
                h = block(h, temb)
            if i > 0:
                h = self.upsamplers[i - 1](h)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


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
        conv_channels: hourglass mode (``None``: plain DiT): channels of the convolutional stages
            at the latent's full, half, ... resolution (:class:`ConvStages`); the transformer then
            patchifies the coarsest stage with ``patch_size`` (e.g. 32x32 latents, (64, 128),
            patch 2: 8 x 8 tokens).
        conv_layers: ResBlocks per conv stage on each side of the transformer.
        conv_groups: GroupNorm groups of the conv stages.

    Example (hourglass):
        >>> m = PixgenTransformer.from_preset("pixgen-tiny-H", caption_channels=32, sample_size=8, patch_size=2)
        >>> m(torch.randn(1, 4, 8, 8), torch.tensor([5.0]), torch.randn(1, 1, 32)).sample.shape
        torch.Size([1, 4, 8, 8])
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock", "PatchEmbed"]
    _conv_decoder = True  # build the hourglass' up stages (a ControlNet copies the down half only)

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
        conv_channels: tuple[int, ...] | None = None,
        conv_layers: int = 1,
        conv_groups: int = 32,
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

        self.conv_stages = None
        token_map, token_channels = sample_size, in_channels  # what the transformer patchifies
        if conv_channels:
            conv_channels = tuple(conv_channels)
            scale = 2 ** (len(conv_channels) - 1)
            if sample_size % (scale * patch_size) or any(c % conv_groups for c in conv_channels):
                raise InputError(
                    f"hourglass: sample_size {sample_size} must be a multiple of {scale * patch_size} and every "
                    f"conv channel count {conv_channels} a multiple of conv_groups {conv_groups}")
            self.conv_stages = ConvStages(in_channels, out_channels, conv_channels, conv_layers, inner, conv_groups,
                                          decoder=self._conv_decoder)
            token_map, token_channels = sample_size // scale, conv_channels[-1]
        self.pos_embed = PatchEmbed(
            height=token_map,
            width=token_map,
            patch_size=patch_size,
            in_channels=token_channels,
            embed_dim=inner,
            interpolation_scale=interpolation_scale or max(sample_size // 64, 1),
        )
        self.adaln_single = AdaLayerNormSingle(inner)
        if condition_pos_embed is None:
            condition_pos_embed = caption_num_tokens > 1
        self.y_pos_embed = (
            ConditionPosEmbed(caption_channels, caption_num_tokens, token_map // patch_size)
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
        self.token_out_channels = token_channels if conv_channels else out_channels
        self.proj_out = nn.Linear(inner, patch_size * patch_size * self.token_out_channels)
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
        if self.conv_stages is None:
            nn.init.zeros_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)
        elif self.conv_stages.decoder:
            # the output conv is the last layer here: it starts at zero, the token path stays live
            nn.init.zeros_(self.conv_stages.conv_out.weight)
            nn.init.zeros_(self.conv_stages.conv_out.bias)

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
        controlnet_skip_samples: list[torch.Tensor] | None = None,
        return_dict: bool = True,
    ) -> TransformerOutput | tuple[torch.Tensor]:
        """Predict velocity / epsilon for noisy latents.

        Args:
            hidden_states: (B, C, H, W) noisy latents.
            timestep: (B,) or scalar; diffusion step in [0, 1000) (flow: sigma x 1000).
            encoder_hidden_states: (B, T, Dc) condition tokens in the encoder's space.
            drop_condition: (B,) bool; True rows use the null condition (CFG dropout / uncond).
            controlnet_block_samples: residuals (B, N, D) added after each block, in order.
            controlnet_skip_samples: hourglass only: residuals added to the conv stages' skips
                (finest first, each the skip's shape).
        """
        self.check_condition(encoder_hidden_states)
        batch = hidden_states.shape[0]
        p = self.config.patch_size
        if drop_condition is not None:
            null = self.null_condition(batch, encoder_hidden_states.shape[1]).to(encoder_hidden_states.dtype)
            encoder_hidden_states = torch.where(drop_condition[:, None, None], null, encoder_hidden_states)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        t_mod, t_emb = self.adaln_single(timestep, batch_size=batch, hidden_dtype=hidden_states.dtype)  # (B, 6D), (B, D)
        y = encoder_hidden_states if self.y_pos_embed is None else self.y_pos_embed(encoder_hidden_states)
        y = self.caption_projection(y.to(t_emb.dtype))  # (B, T, D)
        feature_map, skips, temb = hidden_states, None, None
        if self.conv_stages is not None:
            temb = t_emb + y.mean(dim=1)  # ResBlocks see the timestep and the (pooled) condition
            feature_map, skips = self.conv_stages.down(hidden_states, temb)
            if controlnet_skip_samples:
                skips = [s + r for s, r in zip(skips, controlnet_skip_samples, strict=True)]
        map_height, map_width = feature_map.shape[-2:]
        x = self.pos_embed(feature_map)  # (B, N, D)

        for i, block in enumerate(self.transformer_blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, None, y, None, t_mod)
            else:
                x = block(x, encoder_hidden_states=y, timestep=t_mod)
            if controlnet_block_samples is not None and i < len(controlnet_block_samples):
                x = x + controlnet_block_samples[i]

        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)  # (B, N, p*p*C_tok)
        channels = self.token_out_channels
        x = x.reshape(batch, map_height // p, map_width // p, p, p, channels)
        out = torch.einsum("nhwpqc->nchpwq", x).reshape(batch, channels, map_height, map_width)
        if self.conv_stages is not None:
            out = self.conv_stages.up(out, skips, temb)
        return TransformerOutput(sample=out) if return_dict else (out,)
