"""The one sampler: guided prediction (CFG + ControlNet residuals) and the scheduler loop.

A plain function over a denoiser, in the style of edm2's sampler and diffusers' pipelines. It
knows nothing of images, encoders or files: it takes starting latents of any shape, condition
tokens (one row per latent) and a diffusers scheduler, and returns denoised latents.
:class:`pixgen.pipeline.Generator` is a thin layer over it; large images, masks, staining and
the studio call the same two functions.

* :func:`guided_prediction`: one guided model output. Classifier-free guidance,
  ``pred = uncond + w * (cond - uncond)``, with the conditional and null rows in one batched
  forward. ``w == 1`` is exactly the conditional model, so the null rows are skipped (the
  PixArt / diffusers convention). ``w < 1`` still runs them: ``w = 0`` is the unconditional
  model and ``0 < w < 1`` interpolates; treating those as ``w = 1`` would silently give another
  result than asked for. ControlNet residuals go to both halves (``controlnet_cfg="both"``,
  diffusers' ControlNet pipelines: each half with its own tokens) or to the conditional half
  only (``"cond"``). A learned-variance half of the model output is dropped here, explicitly.
* :func:`sample`: the loop. ``start_step`` > 0 (or :func:`start_step_for_strength`) with
  ``image_latents`` is img2img: the clean latents are noised to the start timestep with the
  scheduler's own method (``scale_noise`` for flow matching, ``add_noise`` otherwise). A
  ``callback(step, timestep, latents, x0)`` sees every step with the predicted clean latents;
  returning ``False`` (or raising :class:`SamplingCancelled`) stops the loop with
  :class:`SamplingCancelled`.

Example:
    >>> from pixgen.testing import tiny_transformer
    >>> from pixgen.pipeline import default_scheduler
    >>> model = tiny_transformer()
    >>> noise, cond = torch.randn(2, 4, 8, 12), torch.randn(2, 1, 32)  # any latent shape
    >>> sample(model, default_scheduler("flow"), noise, cond, num_inference_steps=2, guidance_scale=2.0).shape
    torch.Size([2, 4, 8, 12])
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import torch

from pixgen.errors import InputError, PixgenError

__all__ = [
    "sample",
    "guided_prediction",
    "predicted_x0",
    "prediction_from_x0",
    "start_step_for_strength",
    "check_sampling_args",
    "SamplingCancelled",
    "StepCallback",
    "CONTROLNET_CFG",
]

# Which CFG half gets the ControlNet residuals (see the module docstring).
CONTROLNET_CFG = ("both", "cond")


class StepCallback(Protocol):
    """``callback(step, timestep, latents, x0)`` after each step; return ``False`` to cancel."""

    def __call__(self, step: int, timestep: torch.Tensor, latents: torch.Tensor, x0: torch.Tensor) -> bool | None: ...


class SamplingCancelled(PixgenError):
    """Sampling was stopped by a step callback (it returned False or raised this)."""


def check_sampling_args(num_inference_steps: Any, guidance_scale: Any, strength: Any = 1.0) -> tuple[int, float, float]:
    """Validated ``(steps, guidance, strength)``, or a one-line :class:`InputError`.

    Example:
        >>> check_sampling_args(20, 2.0)
        (20, 2.0, 1.0)
    """
    if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
        raise InputError(f"the number of sampling steps must be a whole number >= 1, got {num_inference_steps}",
                         fix="pass --steps 1 or more (or leave it out for the model's default)")
    guidance = float(guidance_scale)
    if not math.isfinite(guidance):
        raise InputError(f"guidance scale must be a finite number, got {guidance_scale}",
                         fix="pass e.g. --guidance 2 (1 = the conditional model alone, no guidance)")
    strength = float(strength)
    if not (0.0 < strength <= 1.0):
        raise InputError(f"strength must be in (0, 1], got {strength}", fix="1 = from pure noise; lower keeps more of the image")
    return int(num_inference_steps), guidance, strength


def start_step_for_strength(num_inference_steps: int, strength: float) -> int:
    """The step img2img starts at for ``strength`` (diffusers' rule: the last ``strength`` share of the
    steps run; 1 = all of them).

    Example:
        >>> start_step_for_strength(20, 0.5)
        10
    """
    run = min(int(num_inference_steps * strength), num_inference_steps)
    if run < 1:
        raise InputError(f"strength {strength} leaves no step of {num_inference_steps} to run",
                         fix=f"raise strength to at least {1 / num_inference_steps:.3g} or use more steps")
    return num_inference_steps - run


def guided_prediction(
    denoiser: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    cond: torch.Tensor,
    guidance_scale: float = 1.0,
    *,
    controlnet: torch.nn.Module | None = None,
    control: torch.Tensor | None = None,
    controlnet_conditioning_scale: float = 1.0,
    controlnet_cfg: str = "both",
) -> torch.Tensor:
    """The guided model output for ``latents`` (B, C, H, W) at ``timestep``, in float32.

    Args:
        denoiser: a :class:`~pixgen.models.transformer.PixgenTransformer` (or anything with its
            ``forward(x, t, tokens, drop_condition=, controlnet_block_samples=)``).
        cond: (B, T, D) condition tokens, one row per latent.
        guidance_scale: CFG ``w``; ``w == 1`` runs the conditional rows only.
        controlnet, control: optional ControlNet and its (B, C', H, W) control latents.
        controlnet_cfg: ``"both"`` or ``"cond"``: which CFG half gets the residuals.

    Returns the velocity / epsilon prediction, (B, C, H, W): channels beyond ``C`` (a learned
    variance) are dropped.

    Example:
        >>> guided_prediction(model, torch.randn(1, 4, 8, 8), torch.tensor(500.0), torch.randn(1, 1, 32), 2.0).shape  # doctest: +SKIP
        torch.Size([1, 4, 8, 8])
    """
    if controlnet_cfg not in CONTROLNET_CFG:
        raise InputError(f"controlnet_cfg must be one of {CONTROLNET_CFG}, got {controlnet_cfg!r}")
    n = latents.shape[0]
    use_cfg = guidance_scale != 1.0
    dtype = next(denoiser.parameters()).dtype
    x = torch.cat([latents, latents]) if use_cfg else latents
    x = x.to(dtype)
    tokens = (torch.cat([cond, cond]) if use_cfg else cond).to(x.device, dtype)
    drop = torch.arange(x.shape[0], device=x.device) >= n if use_cfg else None  # rows n.. use the null tokens
    t = timestep.to(x.device).expand(x.shape[0])
    residuals = None
    if controlnet is not None and control is not None:
        residuals = _control_residuals(controlnet, x, t, tokens, drop, control.to(x.device, dtype),
                                       controlnet_conditioning_scale, use_cfg and controlnet_cfg == "cond")
    out = denoiser(x, t, tokens, drop_condition=drop, controlnet_block_samples=residuals).sample.float()
    out = out[:, : latents.shape[1]]  # the velocity / epsilon half; a learned variance is not used by the solvers
    if not use_cfg:
        return out
    cond_pred, uncond_pred = out.chunk(2)
    return uncond_pred + guidance_scale * (cond_pred - uncond_pred)


def _control_residuals(controlnet, x, t, tokens, drop, control, scale: float, cond_half_only: bool) -> list[torch.Tensor]:
    """Per-block ControlNet residuals for every row of ``x`` (zeros on the null half if ``cond_half_only``)."""
    if cond_half_only:
        n = control.shape[0]
        res = controlnet(x[:n], t[:n], tokens[:n], control, conditioning_scale=scale).controlnet_block_samples
        return [torch.cat([r, torch.zeros_like(r)]) for r in res]
    reps = x.shape[0] // control.shape[0]
    res = controlnet(x, t, tokens, control.repeat(reps, 1, 1, 1), conditioning_scale=scale, drop_condition=drop)
    return list(res.controlnet_block_samples)


def predicted_x0(scheduler, prediction_type: str, latents: torch.Tensor, pred: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The clean latents a prediction implies (for previews and x0 averaging over windows).

    Flow matching (``x_t = (1 - s) x0 + s noise``, ``v = noise - x0``, ``s = t / T``): ``x_t - s v``.
    Epsilon: ``(x_t - sqrt(1 - a) eps) / sqrt(a)`` with ``a`` the cumulative alpha at ``t``.
    """
    if prediction_type == "flow":
        sigma = timestep.float() / scheduler.config.num_train_timesteps
        return latents - sigma * pred
    alpha = scheduler.alphas_cumprod[int(timestep)].to(latents.device, torch.float32)
    return (latents - (1 - alpha).sqrt() * pred) / alpha.sqrt()


def prediction_from_x0(scheduler, prediction_type: str, latents: torch.Tensor, x0: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The prediction (velocity / epsilon) that implies clean latents ``x0``: the inverse of
    :func:`predicted_x0` (large images average x0 over overlapping windows, then step with this).

    Example:
        >>> from pixgen.pipeline import default_scheduler
        >>> s, x, v, t = default_scheduler("flow"), torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor(500.0)
        >>> torch.allclose(prediction_from_x0(s, "flow", x, predicted_x0(s, "flow", x, v, t), t), v, atol=1e-5)
        True
    """
    if prediction_type == "flow":
        sigma = timestep.float() / scheduler.config.num_train_timesteps
        return (latents - x0) / sigma
    alpha = scheduler.alphas_cumprod[int(timestep)].to(latents.device, torch.float32)
    return (latents - alpha.sqrt() * x0) / (1 - alpha).sqrt()


@torch.no_grad()
def sample(
    denoiser: torch.nn.Module,
    scheduler,
    noise: torch.Tensor,
    cond: torch.Tensor,
    *,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    start_step: int = 0,
    image_latents: torch.Tensor | None = None,
    controlnet: torch.nn.Module | None = None,
    control: torch.Tensor | None = None,
    controlnet_conditioning_scale: float = 1.0,
    controlnet_cfg: str = "both",
    callback: StepCallback | Callable[..., Any] | None = None,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` (B, C, H, W, any H and W the denoiser's patch size divides) into clean latents.

    Args:
        denoiser: the model (see :func:`guided_prediction`); its ``config.prediction_type`` is
            ``"flow"`` or ``"epsilon"`` and must match the scheduler.
        scheduler: a diffusers scheduler (FlowMatchEuler, DPM-Solver++, ...); its state is reset.
        noise: starting Gaussian noise (the "latents" of a diffusers pipeline).
        cond: (B, T, D) condition tokens.
        num_inference_steps, guidance_scale: as :func:`check_sampling_args` validates them.
        start_step: skip the first steps of the schedule (img2img); needs ``image_latents``.
        image_latents: clean latents (B, C, H, W) noised with ``noise`` to the start timestep.
        controlnet, control, controlnet_conditioning_scale, controlnet_cfg: see :func:`guided_prediction`.
        callback: ``callback(step, timestep, latents, x0)`` after each step (see :class:`StepCallback`).
        predict: ``predict(model_input, timestep) -> prediction`` replaces the one
            :func:`guided_prediction` call per step (then ``cond`` and the ControlNet arguments are
            not used): large images run guided predictions per overlapping window and return the
            prediction of the averaged x0 (:mod:`pixgen.large`).

    Raises :class:`SamplingCancelled` when the callback returns ``False``.

    Example:
        >>> out = sample(model, scheduler, torch.randn(1, 4, 16, 16), tokens, num_inference_steps=20,
        ...              guidance_scale=2.0, callback=lambda i, t, x, x0: print(i))  # doctest: +SKIP
    """
    steps, guidance, _ = check_sampling_args(num_inference_steps, guidance_scale)
    if cond.shape[0] != noise.shape[0]:
        raise InputError(f"{cond.shape[0]} condition rows for {noise.shape[0]} latents", fix="pass one condition row per latent")
    if not 0 <= start_step < steps:
        raise InputError(f"start_step must be in 0..{steps - 1}, got {start_step}")
    if start_step > 0 and image_latents is None:
        raise InputError("a start step > 0 (strength < 1) needs image_latents to start from",
                         fix="pass the clean latents (or an image) to noise to the start step")
    device = next(denoiser.parameters()).device
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps[start_step * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start_step * scheduler.order)
    noise = noise.to(device, torch.float32)
    x = _start_latents(scheduler, noise, image_latents, timesteps[:1])
    prediction_type = denoiser.config.prediction_type
    for i, t in enumerate(timesteps):
        model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        if predict is not None:
            pred = predict(model_in, t)
        else:
            pred = guided_prediction(denoiser, model_in, t, cond, guidance, controlnet=controlnet, control=control,
                                     controlnet_conditioning_scale=controlnet_conditioning_scale,
                                     controlnet_cfg=controlnet_cfg)
        x0 = predicted_x0(scheduler, prediction_type, x, pred, t) if callback is not None else None
        x = scheduler.step(pred, t, x).prev_sample
        if callback is not None and callback(start_step + i, t, x, x0) is False:
            raise SamplingCancelled(f"sampling cancelled by the step callback at step {start_step + i + 1} of {steps}")
    return x


def _start_latents(scheduler, noise: torch.Tensor, image_latents: torch.Tensor | None, t0: torch.Tensor) -> torch.Tensor:
    """Pure noise (times the scheduler's initial sigma), or ``image_latents`` noised to ``t0``."""
    if image_latents is None:
        return noise * getattr(scheduler, "init_noise_sigma", 1.0)
    clean = image_latents.to(noise.device, torch.float32)
    if clean.shape != noise.shape:
        raise InputError(f"image latents {tuple(clean.shape)} do not match the noise {tuple(noise.shape)}")
    if hasattr(scheduler, "scale_noise"):  # flow matching: x_t = (1 - s) x0 + s noise
        return scheduler.scale_noise(clean, t0, noise)
    return scheduler.add_noise(clean, noise, t0.expand(clean.shape[0]))
