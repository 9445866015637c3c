"""A small rectified-flow model in embedding space: the class / text prior and the stain translator.

:class:`EmbeddingFlow` is a residual MLP that predicts the flow velocity of an embedding (B, D) or
of condition tokens (B, T, D) at a flow time, conditioned on a class id, on a vector (a text
embedding, a source embedding) or on nothing. It follows pixgen's flow convention (diffusers'
``FlowMatchEulerDiscreteScheduler``): ``x_s = (1 - s) target + s source`` with the velocity
``source - target`` and the timestep ``s * 1000``; the source is Gaussian noise for a prior, or
the paired embedding for a translator (PixCell's stain flow: ``x_t = t ihc + (1 - t) he``, with
``t = 1 - s``). :func:`sample_flow` integrates it from the source to the target with that scheduler.

A prior may work in a PCA-whitened space (``whiten_rank=k``): the flow moves noise in the ``k``
leading principal directions of its training targets, each scaled to unit variance, and
:meth:`EmbeddingFlow.from_flow_space` maps the result back (the other ``dim - k`` directions stay at
the mean). Embeddings that vary along a few directions (docs/prior.md: two carry > 90 % of a lung
class's variance) then get no spurious spread in the many small ones, because the network's error
in a direction is scaled by that direction's own standard deviation. The transform is stored as
buffers, so it travels in the safetensors file and loads strictly.

Example:
    >>> model = EmbeddingFlow(dim=8, num_classes=2, hidden=32, num_blocks=2)
    >>> x = sample_flow(model, torch.randn(4, 8), class_labels=torch.tensor([0, 1, 0, 1]), steps=4)
    >>> x.shape
    torch.Size([4, 8])
    >>> white = EmbeddingFlow(dim=8, hidden=32, num_blocks=2, whiten_rank=3)
    >>> white.fit_whitening(torch.randn(100, 8))
    >>> sample_flow(white, torch.randn(4, white.flow_dim), steps=4).shape      # noise in 3-d, embeddings in 8-d
    torch.Size([4, 8])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from pixgen.errors import InputError

__all__ = ["EmbeddingFlow", "EmbeddingFlowOutput", "sample_flow"]


@dataclass
class EmbeddingFlowOutput(BaseOutput):
    """``sample``: the predicted velocity, shaped like the input."""

    sample: torch.Tensor


class ResidualBlock(nn.Module):
    """LayerNorm -> scale/shift from the conditioning -> Linear -> SiLU -> Linear, added back."""

    def __init__(self, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.modulation = nn.Linear(hidden, 3 * hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(4 * hidden, hidden))
        nn.init.zeros_(self.modulation.weight)  # starts as identity (adaLN-zero, as DiT)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (B, [T,] H), (B, [1,] H)
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class EmbeddingFlow(ModelMixin, ConfigMixin):
    """Residual-MLP velocity model in an embedding space.

    Args:
        dim: embedding width (e.g. 1536 for UNI2-h).
        hidden: width of the residual blocks. num_blocks: their number. dropout: inside each block.
        num_classes: > 0 to condition on class ids (a learned null class is added for guidance).
        condition_dim: > 0 to condition on vectors of this width (text / source embeddings), with
            a learned null vector for guidance.
        class_names: the class ids' names (kept in the config for the CLI / API).
        source: ``"noise"`` (a prior) or the name of the source embeddings (a translator, e.g. ``"he"``).
        encoder: the embedding space's encoder name; domain: its domain (e.g. ``"he"``, ``"ihc-her2"``).
        whiten_rank: > 0 to work in the PCA-whitened space of this many leading directions (priors
            only; set the transform with :meth:`fit_whitening` before training).
    """

    @register_to_config
    def __init__(self, dim: int, hidden: int = 512, num_blocks: int = 4, dropout: float = 0.0,
                 num_classes: int = 0, condition_dim: int = 0, class_names: list[str] | None = None,
                 source: str = "noise", encoder: str | None = None, domain: str | None = None,
                 whiten_rank: int = 0):
        super().__init__()
        if whiten_rank and (source != "noise" or not 0 < whiten_rank <= dim):
            raise InputError(f"whiten_rank={whiten_rank} needs a noise source and 0 < rank <= dim ({dim})",
                             fix="use whiten_rank only for a prior, at most the embedding width")
        if whiten_rank:
            self.register_buffer("whiten_mean", torch.zeros(dim))  # (D,)
            self.register_buffer("whiten_basis", torch.eye(dim)[:whiten_rank])  # (k, D) orthonormal rows
            self.register_buffer("whiten_scale", torch.ones(whiten_rank))  # (k,) std along each row
        width = whiten_rank or dim
        self.proj_in = nn.Linear(width, hidden)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, hidden)
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None  # last row: null
        self.cond_proj = nn.Linear(condition_dim, hidden) if condition_dim else None
        self.null_condition = nn.Parameter(torch.zeros(condition_dim)) if condition_dim else None
        self.blocks = nn.ModuleList(ResidualBlock(hidden, dropout) for _ in range(num_blocks))
        self.norm_out = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, width)

    @property
    def flow_dim(self) -> int:
        """Width of the space the flow moves in (``whiten_rank``, else ``dim``)."""
        return self.config.whiten_rank or self.config.dim

    @torch.no_grad()
    def fit_whitening(self, targets: torch.Tensor) -> None:
        """Set the whitened space from training targets (N, D): mean, leading principal directions and their std."""
        x = targets.double().reshape(-1, self.config.dim)
        mean = x.mean(0)
        eigval, eigvec = torch.linalg.eigh(torch.cov((x - mean).T))  # ascending
        k = self.config.whiten_rank
        self.whiten_mean.copy_(mean)
        self.whiten_basis.copy_(eigvec[:, -k:].flip(1).T)
        self.whiten_scale.copy_(eigval[-k:].flip(0).clamp_min(1e-12 * float(eigval[-1])).sqrt())

    def to_flow_space(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (..., D) -> the flow's coordinates (..., flow_dim) (identity without whitening)."""
        if not self.config.whiten_rank:
            return x
        return (x - self.whiten_mean.to(x.dtype)) @ self.whiten_basis.to(x.dtype).T / self.whiten_scale.to(x.dtype)

    def from_flow_space(self, z: torch.Tensor) -> torch.Tensor:
        """The flow's coordinates (..., flow_dim) -> embeddings (..., D) (identity without whitening)."""
        if not self.config.whiten_rank:
            return z
        return (z * self.whiten_scale.to(z.dtype)) @ self.whiten_basis.to(z.dtype) + self.whiten_mean.to(z.dtype)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None,
                condition: torch.Tensor | None = None, drop_condition: torch.Tensor | None = None,
                return_dict: bool = True) -> EmbeddingFlowOutput | tuple[torch.Tensor]:
        """Velocity at ``sample`` (B, flow_dim) or (B, T, flow_dim) and flow timestep(s) ``timestep`` (s * 1000).

        Args:
            class_labels: (B,) int class ids (models with ``num_classes``).
            condition: (B, condition_dim) vectors (models with ``condition_dim``).
            drop_condition: (B,) bool; True rows use the null class / vector (guidance).
        """
        cfg = self.config
        if sample.shape[-1] != self.flow_dim:
            raise InputError(f"flow inputs are {sample.shape[-1]}-d, the flow model's are {self.flow_dim}-d"
                             + (f" (its whitened space of {cfg.dim}-d embeddings)" if cfg.whiten_rank else ""),
                             fix="use embeddings of the encoder the model was trained on (to_flow_space maps them)")
        batch = sample.shape[0]
        timestep = timestep.expand(batch) if timestep.ndim == 0 else timestep
        c = self.time_embed(self.time_proj(timestep.to(sample.device)).to(sample.dtype))  # (B, H)
        drop = drop_condition if drop_condition is not None else torch.zeros(batch, dtype=torch.bool, device=sample.device)
        if self.class_embed is not None:
            if class_labels is None:
                raise InputError("this flow model is conditioned on a class", fix="pass class_labels")
            labels = torch.where(drop, torch.full_like(class_labels, cfg.num_classes), class_labels)
            c = c + self.class_embed(labels)
        if self.cond_proj is not None:
            if condition is None:
                raise InputError("this flow model is conditioned on a vector", fix="pass condition")
            vec = torch.where(drop[:, None], self.null_condition.to(condition.dtype).expand_as(condition), condition)
            c = c + self.cond_proj(vec)
        if sample.ndim == 3:
            c = c[:, None]  # one conditioning for all tokens
        x = self.proj_in(sample)
        for block in self.blocks:
            x = block(x, c)
        out = self.proj_out(self.norm_out(x))
        return EmbeddingFlowOutput(sample=out) if return_dict else (out,)


@torch.no_grad()
def sample_flow(model: EmbeddingFlow, source: torch.Tensor, class_labels: torch.Tensor | None = None,
                condition: torch.Tensor | None = None, steps: int = 20, guidance: float = 1.0,
                scheduler=None) -> torch.Tensor:
    """Integrate ``model`` from ``source`` (noise for a prior, source embeddings for a translator)
    to the target space with diffusers' ``FlowMatchEulerDiscreteScheduler`` (or ``scheduler``).
    A whitened prior takes noise (B, flow_dim) and returns embeddings (B, dim).

    ``guidance`` > 1 mixes in the unconditional velocity (classifier-free guidance); 1 skips it.

    Example:
        >>> model = EmbeddingFlow(dim=8, num_classes=2, hidden=16, num_blocks=1)
        >>> sample_flow(model, torch.zeros(2, 8), class_labels=torch.tensor([0, 1]), steps=2, guidance=2.0).shape
        torch.Size([2, 8])
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    sched = scheduler or FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(steps, device=source.device)
    x = source.float()
    batch = x.shape[0]
    keep = torch.zeros(batch, dtype=torch.bool, device=x.device)
    for t in sched.timesteps:
        v = model(x, t.expand(batch), class_labels, condition, drop_condition=keep).sample
        if guidance != 1.0:
            v_null = model(x, t.expand(batch), class_labels, condition, drop_condition=~keep).sample
            v = v_null + guidance * (v - v_null)
        x = sched.step(v, t, x).prev_sample
    return model.from_flow_space(x)
