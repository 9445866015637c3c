"""Training objectives: rectified flow, and DDPM epsilon prediction (+ IDDPM learned variance).

Each objective has ``loss(predict, x0, generator) -> (loss, logs)`` over any denoiser
``predict(x_t, timestep) -> prediction`` and inputs of any rank (latents (B, C, H, W), embeddings
(B, D) or tokens (B, T, D)); calling it as ``objective(model, x0, condition, drop, generator)``
is the shorthand for a :class:`~pixgen.models.transformer.PixgenTransformer`. All randomness
comes from ``generator``, so a training step is a pure function of (weights, batch, seed) and
resumes exactly.

- :class:`FlowMatching`: ``x_t = (1 - s) x0 + s eps``, target ``v = eps - x0``, timestep
  ``s * 1000``; ``s`` logit-normal (SD3: ``sigmoid(N(m, s^2))``) or uniform. Sampled by
  diffusers' ``FlowMatchEulerDiscreteScheduler`` (pixgen's flow convention). With a ``source``
  batch in place of the noise it is a translator between two distributions (PixCell's stain
  flow: ``x_t = t target + (1 - t) source`` with ``t = 1 - s``; sampling starts at the source).
- :class:`EpsilonDiffusion`: linear betas over 1000 steps (PixArt / PixCell), ``t`` uniform,
  MSE on epsilon. With learned variance (2C output channels) the variance channels get
  IDDPM's variational-bound term (KL to the true posterior; discretised Gaussian NLL at t = 0),
  with the mean frozen, exactly how PixArt trains PixCell.

Example:
    >>> obj = FlowMatching()
    >>> loss, logs = obj(model, x0, cond, drop, torch.Generator().manual_seed(0))   # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pixgen.errors import InputError

__all__ = ["FlowMatching", "EpsilonDiffusion", "make_objective", "normal_kl", "discretized_gaussian_nll"]


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``like`` of any rank."""
    return values.view(-1, *([1] * (like.ndim - 1)))


def _transformer(model, condition: torch.Tensor, drop: torch.Tensor | None):
    """``predict(x_t, t)`` of a PixgenTransformer with fixed condition tokens and dropout rows."""
    return lambda x_t, t: model(x_t, t, condition, drop_condition=drop).sample


def _randn(shape: torch.Size | tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Noise drawn on the generator's device (CPU) and moved, so it does not depend on the device."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(like.device)


class FlowMatching:
    """Rectified-flow objective (velocity target); see the module docstring.

    Args:
        sampling: ``"logit-normal"`` or ``"uniform"`` distribution of the noise level ``s``.
        mean, std: of the logit-normal's underlying normal.
    """

    prediction_type = "flow"

    def __init__(self, sampling: str = "logit-normal", mean: float = 0.0, std: float = 1.0):
        if sampling not in ("logit-normal", "uniform"):
            raise InputError(f"unknown timestep sampling {sampling!r}", fix="use logit-normal or uniform")
        self.sampling, self.mean, self.std = sampling, mean, std

    def sample_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) noise levels in (0, 1)."""
        if self.sampling == "uniform":
            return torch.rand(n, generator=generator)
        return torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator))

    def __call__(self, model, x0: torch.Tensor, condition: torch.Tensor, drop: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss(_transformer(model, condition, drop), x0, generator)

    def loss(self, predict, x0: torch.Tensor, generator: torch.Generator, source: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE to the velocity ``source - x0`` at ``x_t = (1 - s) x0 + s source`` (source: noise by default).

        Example:
            >>> x0 = torch.zeros(4, 8)
            >>> loss, _ = FlowMatching().loss(lambda x, t: torch.zeros_like(x), x0, torch.Generator().manual_seed(0))
            >>> 0.5 < float(loss) < 1.5      # the target is unit noise
            True
        """
        noise = _randn(x0.shape, generator, x0) if source is None else source  # like x0
        s = self.sample_sigmas(x0.shape[0], generator).to(x0.device)  # (B,)
        sb = _per_sample(s, x0)
        x_t = (1 - sb) * x0 + sb * noise
        pred = predict(x_t, s * 1000).float()
        loss = F.mse_loss(pred, noise - x0)
        return loss, {"mse": loss.item()}


class EpsilonDiffusion:
    """DDPM epsilon objective over diffusers' linear-beta schedule, optional learned variance.

    Example:
        >>> obj = EpsilonDiffusion(learned_sigma=True)
        >>> round(float(obj.betas[0]), 6), round(float(obj.betas[-1]), 6), obj.num_timesteps
        (0.0001, 0.02, 1000)
    """

    prediction_type = "epsilon"

    def __init__(self, learned_sigma: bool = False, num_timesteps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02):
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule="linear",
                              beta_start=beta_start, beta_end=beta_end)
        self.learned_sigma, self.num_timesteps = learned_sigma, num_timesteps
        betas = sched.betas.double()  # (T,)
        ac = torch.cumprod(1 - betas, 0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1 - ac_prev) / (1 - ac)
        self.betas = betas
        self.sqrt_ac, self.sqrt_1m_ac = ac.sqrt(), (1 - ac).sqrt()
        # log of the posterior variance, its t = 0 value (0) replaced by t = 1's (IDDPM's clipping)
        self.post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self.post_coef_x0 = betas * ac_prev.sqrt() / (1 - ac)
        self.post_coef_xt = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)

    @staticmethod
    def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _per_sample(values[t.cpu()].float().to(like.device), like)

    def __call__(self, model, x0: torch.Tensor, condition: torch.Tensor, drop: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss(_transformer(model, condition, drop), x0, generator)

    def loss(self, predict, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Epsilon MSE (+ the variational-bound term with learned variance: channels on dim 1)."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), generator=generator)  # (B,)
        noise = _randn(x0.shape, generator, x0)
        x_t = self._at(self.sqrt_ac, t, x0) * x0 + self._at(self.sqrt_1m_ac, t, x0) * noise
        out = predict(x_t, t.to(x0.device)).float()  # (B, C or 2C, ...)
        channels = x0.shape[1]
        if self.learned_sigma != (out.shape[1] == 2 * channels):
            raise InputError(f"the model predicts {out.shape[1]} channels for {channels}-channel latents, "
                             f"but learned_sigma={self.learned_sigma}",
                             fix="set learned_sigma to match the model (PixCell: true)")
        eps = out[:, :channels]
        mse = F.mse_loss(eps, noise)
        if not self.learned_sigma:
            return mse, {"mse": mse.item()}
        vb = self.vb_term(out[:, channels:], eps.detach(), x0, x_t, t).mean()
        return mse + vb, {"mse": mse.item(), "vb": vb.item()}

    def vb_term(self, var_values: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
        """(B,) variational-bound term in bits per dimension (IDDPM ``learned_range`` variance).

        The model's log variance interpolates between the posterior's and ``log beta_t`` with
        ``(v + 1) / 2``; the mean comes from the (frozen) epsilon prediction.
        """
        at = lambda values: self._at(values, t, x0)  # noqa: E731
        true_mean = at(self.post_coef_x0) * x0 + at(self.post_coef_xt) * x_t
        true_logvar = at(self.post_logvar)
        x0_pred = (x_t - at(self.sqrt_1m_ac) * eps) / at(self.sqrt_ac)
        model_mean = at(self.post_coef_x0) * x0_pred + at(self.post_coef_xt) * x_t
        frac = (var_values + 1) / 2
        model_logvar = frac * at(torch.log(self.betas)) + (1 - frac) * true_logvar
        kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).mean(1) / math.log(2.0)
        nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t.to(x0.device) == 0, nll, kl)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats.

    Example:
        >>> float(normal_kl(torch.tensor(0.), torch.tensor(0.), torch.tensor(0.), torch.tensor(0.)))
        0.0
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise -log P(x) in nats for data in [-1, 1] quantised to 256 levels (IDDPM's decoder term).

    Example:
        >>> nll = discretized_gaussian_nll(torch.zeros(1), torch.zeros(1), torch.tensor([-7.0]))  # sharp: P(bin) ~ 1
        >>> bool(nll < 1e-3)
        True
    """
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (centred + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (centred - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
    return -log_probs


def make_objective(cfg) -> FlowMatching | EpsilonDiffusion:
    """The objective a :class:`training.presets.TrainConfig` asks for."""
    if cfg.objective == "flow":
        return FlowMatching(cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std)
    return EpsilonDiffusion(learned_sigma=cfg.learned_sigma)
