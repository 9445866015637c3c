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
* :func:`make_scheduler`: a diffusers scheduler by sampler name (``euler``, ``heun``, ``dpm++2m``,
  ``unipc``; flow-matching or epsilon), with an optional timestep ``shift``.
* Guidance interval (Kynkaanniemi et al., 2024, "Applying guidance in a limited interval"):
  ``sample(..., guidance_interval=(lo, hi))`` applies CFG only at steps whose noise level
  ``t / T`` lies in ``[lo, hi]``; the other steps run the conditional rows alone (one batch,
  not two), so a step outside the interval costs half.
* :data:`QUALITY_PRESETS`: ``fast`` / ``balanced`` / ``best``, each a sampler, step count,
  guidance interval and compute dtype, measured against the 28-step Euler reference
  (``docs/benchmarks.md``); :func:`quality_preset` resolves a name.
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
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                       UniPCMultistepScheduler)

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
    "SAMPLERS",
    "make_scheduler",
    "QualityPreset",
    "QUALITY_PRESETS",
    "DEFAULT_QUALITY",
    "quality_preset",
    "in_guidance_interval",
]

# Which CFG half gets the ControlNet residuals (see the module docstring).
CONTROLNET_CFG = ("both", "cond")


# Sampler names; each maps to a diffusers scheduler (see make_scheduler). Heun makes 2 model
# calls per step but the last; the multistep solvers (DPM-Solver++ 2M, UniPC) make one.
SAMPLERS = ("euler", "heun", "dpm++2m", "unipc")
# PixCell's DPM-Solver++ over linear betas: the epsilon models' schedule (pixgen.pipeline.default_scheduler).
_EPSILON_BETAS = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}


def make_scheduler(sampler: str = "euler", prediction_type: str = "flow", shift: float = 1.0):
    """The diffusers scheduler for ``sampler`` on a ``"flow"`` or ``"epsilon"`` model.

    ``shift`` > 1 spends more steps at high noise (SD3's ``sigma' = s sigma / (1 + (s - 1) sigma)``).
    Flow models: Euler and Heun are diffusers' flow-matching schedulers; DPM-Solver++ (2M) and
    UniPC run in their flow mode (``use_flow_sigmas``, ``prediction_type="flow_prediction"``).
    Epsilon models (PixCell): ``dpm++2m`` and ``unipc`` over linear betas.

    Example:
        >>> type(make_scheduler("dpm++2m")).__name__
        'DPMSolverMultistepScheduler'
        >>> make_scheduler("heun").order
        2
    """
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}", fix=f"use one of {', '.join(SAMPLERS)}")
    if not (math.isfinite(shift) and shift > 0):
        raise InputError(f"shift must be a positive number, got {shift}", fix="use 1 (no shift) or e.g. 3")
    if prediction_type == "flow":
        flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": shift}
        return {
            "euler": lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
            "heun": lambda: FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=shift),
            "dpm++2m": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **flow),
            "unipc": lambda: UniPCMultistepScheduler(solver_order=2, **flow),
        }[sampler]()
    if sampler == "dpm++2m":
        return DPMSolverMultistepScheduler(**_EPSILON_BETAS, algorithm_type="dpmsolver++", solver_order=2)
    if sampler == "unipc":
        return UniPCMultistepScheduler(**_EPSILON_BETAS, solver_order=2)
    raise InputError(f"sampler {sampler!r} is for flow-matching models; this one predicts {prediction_type}",
                     fix="use dpm++2m or unipc")


@dataclass(frozen=True)
class QualityPreset:
    """Named sampling settings (see :data:`QUALITY_PRESETS`).

    ``guidance_interval``: the noise levels ``t / T`` where CFG applies (None: every step).
    ``dtype``: the compute dtype of transformer and decoder (``"bfloat16"`` is used only where the
    device runs it natively: CUDA, or a CPU with AVX512-BF16 / AMX; float32 otherwise).
    """

    sampler: str
    num_inference_steps: int
    guidance_interval: tuple[float, float] | None = None
    dtype: str = "float32"
    shift: float = 1.0


# Flow-matching models only (epsilon models keep their DPM-Solver++ 20 steps). Chosen from the
# quality-vs-steps curve of the bundled model (docs/benchmarks.md): `fast` is the fewest steps whose
# FD with both detectors stays inside the bootstrap interval of 28-step Euler with CFG, `balanced`
# (the default) the fewest whose FD reaches the reference's own value, `best` the reference itself.
# bfloat16 measured at the reference's FD; the guidance interval [0, 0.7] saved 3 of 16 rows at a
# consistently worse CNN FD, so no preset uses it.
QUALITY_PRESETS: dict[str, QualityPreset] = {
    "best": QualityPreset("euler", 28, None, "bfloat16"),
    "balanced": QualityPreset("dpm++2m", 12, None, "bfloat16"),
    "fast": QualityPreset("dpm++2m", 8, None, "bfloat16"),
}
DEFAULT_QUALITY = "balanced"


def quality_preset(name: str) -> QualityPreset:
    """The settings of a named quality preset.

    Example:
        >>> quality_preset("best").sampler
        'euler'
    """
    if name not in QUALITY_PRESETS:
        raise InputError(f"unknown quality {name!r}", fix=f"use one of {', '.join(QUALITY_PRESETS)}")
    return QUALITY_PRESETS[name]


def check_sampling_choice(quality: str | None, sampler: str | None) -> None:
    """Refuse an unknown ``--quality`` / ``--sampler`` name before anything loads.

    Example:
        >>> check_sampling_choice("fast", "unipc")
    """
    if quality is not None:
        quality_preset(quality)
    if sampler is not None and sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}", fix=f"use one of {', '.join(SAMPLERS)}")


def in_guidance_interval(timestep: torch.Tensor, num_train_timesteps: int, interval: tuple[float, float] | None) -> bool:
    """Whether CFG applies at ``timestep``: its noise level ``t / T`` lies in ``interval`` (None: always).

    Example:
        >>> in_guidance_interval(torch.tensor(900.0), 1000, (0.0, 0.7))
        False
    """
    if interval is None:
        return True
    level = float(timestep) / num_train_timesteps
    return interval[0] <= level <= interval[1]


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
            ``forward(x, t, tokens, drop_condition=, controlnet_block_samples=, controlnet_skip_samples=)``).
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
    residuals = {}
    if controlnet is not None and control is not None:
        residuals = _control_residuals(controlnet, x, t, tokens, drop, control.to(x.device, dtype),
                                       controlnet_conditioning_scale, use_cfg and controlnet_cfg == "cond")
    out = denoiser(x, t, tokens, drop_condition=drop, **residuals).sample.float()
    out = out[:, : latents.shape[1]]  # the velocity / epsilon half; a learned variance is not used by the solvers
    if not use_cfg:
        return out
    cond_pred, uncond_pred = out.chunk(2)
    return uncond_pred + guidance_scale * (cond_pred - uncond_pred)


def _control_residuals(controlnet, x, t, tokens, drop, control, scale: float,
                       cond_half_only: bool) -> dict[str, list[torch.Tensor]]:
    """The denoiser's ControlNet keyword arguments (per-block residuals, and per-skip ones for an
    hourglass) for every row of ``x``, zeros on the null half if ``cond_half_only``."""
    if cond_half_only:
        n = control.shape[0]
        res = controlnet(x[:n], t[:n], tokens[:n], control, conditioning_scale=scale).residuals()
        return {k: [torch.cat([r, torch.zeros_like(r)]) for r in v] for k, v in res.items()}
    reps = x.shape[0] // control.shape[0]
    res = controlnet(x, t, tokens, control.repeat(reps, 1, 1, 1), conditioning_scale=scale, drop_condition=drop)
    return res.residuals()


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
    guidance_interval: tuple[float, float] | None = None,
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
        guidance_interval: ``(lo, hi)`` noise levels ``t / T`` where CFG applies; elsewhere the
            conditional rows run alone (guidance 1). None: CFG at every step.

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
    if guidance_interval is not None and not 0 <= guidance_interval[0] <= guidance_interval[1] <= 1:
        raise InputError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {guidance_interval}",
                         fix="pass noise levels t/T, e.g. (0.0, 0.7)")
    device = next(denoiser.parameters()).device
    with warnings.catch_warnings():  # diffusers' DPM-Solver++ passes a tensor to np.array: numpy 2's deprecation, not ours
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy keyword", DeprecationWarning)
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
            w = guidance if in_guidance_interval(t, scheduler.config.num_train_timesteps, guidance_interval) else 1.0
            pred = guided_prediction(denoiser, model_in, t, cond, w, controlnet=controlnet, control=control,
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
