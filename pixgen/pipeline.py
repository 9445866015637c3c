"""``Generator``: transformer + autoencoder + scheduler + encoder (+ embedding bank), one entry point.

Conditioning always ends as condition tokens in the model's encoder space, described by a
:mod:`pixgen.conditioning` value (reference images, a bank draw by label, raw embeddings, a grid);
``generate``'s ``embeddings=``, ``reference=`` and ``label=`` keywords build those values.

Sampling is :func:`pixgen.sampling.sample` (classifier-free guidance
``pred = uncond + w * (cond - uncond)``; ``w = 1`` is the plain conditional model, no extra
forward; ControlNet residuals; the scheduler loop). Image ``i`` of a call with ``seed=s`` takes
its noise and its bank draw from seed ``s + i``, so it is reproducible alone, whatever
``num_images``. Batch size changes only float rounding (see ``tests/test_sampling.py``).

Default samplers (diffusers schedulers): flow-matching models use
``FlowMatchEulerDiscreteScheduler``; epsilon models (PixCell) use ``DPMSolverMultistepScheduler``
(DPM-Solver++, order 2) over PixCell's linear betas. Step counts default to the model's
``num_inference_steps`` (28 flow / 20 epsilon unless the model says otherwise).

Quality presets (flow-matching models): ``Generator(..., quality="fast")``,
``from_pretrained(..., quality=)`` or :meth:`Generator.set_quality` replace the model's sampler,
step count, guidance interval and compute dtype with a measured preset
(:data:`pixgen.sampling.QUALITY_PRESETS`; ``pixgen generate --quality``). A bfloat16 preset on a
float32 model runs bfloat16 copies of transformer, ControlNet and decoder (made once, kept) where
the device computes bfloat16 natively (CUDA; CPUs with AVX512-BF16 or AMX), float32 elsewhere.

Example:
    >>> gen = Generator.from_pretrained("path/to/model")                       # doctest: +SKIP
    >>> out = gen.generate(reference=["tile.png"], num_images=4, seed=0)       # doctest: +SKIP
    >>> out.images[0].save("variation.png")                                     # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                       UniPCMultistepScheduler)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from pixgen import __version__
from pixgen.conditioning import Condition, from_keywords
from pixgen.embeddings import DEFAULT_DOMAIN, EmbeddingBank, Embeddings
from pixgen.errors import InputError, ModelLoadError, PixgenError
from pixgen.io import load_image, write_json_atomic
from pixgen.io.int8 import load_model
from pixgen.models.autoencoders import Autoencoder, load_autoencoder
from pixgen.models.controlnet import PixgenControlNet, per_image
from pixgen.models.transformer import PixgenTransformer
from pixgen.prior import PRIOR_DIR, EmbeddingPrior
from pixgen.sampling import (DEFAULT_QUALITY, QualityPreset, StepCallback, check_sampling_args, make_scheduler, quality_preset, sample,
                             start_step_for_strength)

__all__ = ["Generator", "GenerationOutput", "default_scheduler", "SCHEDULERS"]

SCHEDULERS = {cls.__name__: cls for cls in (FlowMatchEulerDiscreteScheduler, DPMSolverMultistepScheduler,
                                             FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler)}
DEFAULT_STEPS = {"flow": 28, "epsilon": 20}
INDEX_FILE = "model_index.json"
# A reference more than this factor larger or smaller than the model's tiles gets a warning (a 2x
# difference is a scan at twice the resolution of the same field, which is fine).
REFERENCE_SIZE_TOLERANCE = 2.0


def default_scheduler(prediction_type: str):
    """The scheduler a new model of this prediction type samples with (see module docstring)."""
    if prediction_type == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="epsilon",
    )


@dataclass
class GenerationOutput:
    """``images`` in the requested ``output_type``; ``seeds`` and ``condition_ids`` per image."""

    images: Any
    seeds: list[int | None]
    condition_ids: list[str]
    conditions: Embeddings | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Generator:
    """A complete generative model (see module docstring).

    Args:
        transformer: the denoiser. vae: latents <-> images. scheduler: a diffusers scheduler.
        encoder: a loaded :class:`pixgen.encoders.Encoder`, or None to load it lazily by name.
        embedding_bank: label -> real-tile embeddings, for label-only generation.
        controlnet: optional :class:`PixgenControlNet` steering generation with a cell mask.
        prior: optional :class:`~pixgen.prior.EmbeddingPrior` (``MODEL/prior/``): new embeddings for a
            label or a prompt; ``label=`` samples it when present.
        config: ``encoder`` (registry name), ``domain`` (stain of the generated tissue, ``"he"``;
            embeddings of another domain are refused), ``image_size``, ``mpp``,
            ``num_inference_steps``, ``guidance_scale``, ``controlnet_cfg`` (``"both"`` / ``"cond"``,
            see :mod:`pixgen.sampling`), ``guidance_interval`` (noise levels ``t / T`` where CFG applies,
            None = every step), ``compute_dtype`` (set by a quality preset) and ``encoder_path``
            (``"encoder"`` when the encoder's weights are saved inside the model directory; None for hub
            encoders such as UNI2-h).
        quality: a quality preset name (``fast``, ``balanced``, ``best``) or a
            :class:`~pixgen.sampling.QualityPreset`; see :meth:`set_quality`. None keeps the model's own.
    """

    def __init__(
        self,
        transformer: PixgenTransformer,
        vae: Autoencoder,
        scheduler=None,
        encoder=None,
        embedding_bank: EmbeddingBank | None = None,
        config: dict[str, Any] | None = None,
        controlnet: PixgenControlNet | None = None,
        prior: EmbeddingPrior | None = None,
        quality: str | QualityPreset | None = None,
    ):
        self.transformer = transformer
        self.prior = prior
        self.controlnet = controlnet
        self.vae = vae
        self.scheduler = scheduler or default_scheduler(transformer.config.prediction_type)
        self._encoder = encoder
        self.embedding_bank = embedding_bank
        pred = transformer.config.prediction_type
        self.config: dict[str, Any] = {
            "encoder": transformer.config.encoder_name,
            "encoder_path": None,
            "domain": DEFAULT_DOMAIN,
            "controlnet_cfg": "both",
            "image_size": transformer.config.sample_size * vae.downsample_factor,
            "mpp": None,
            "num_inference_steps": DEFAULT_STEPS[pred],
            "guidance_scale": 1.0 if pred == "flow" else 2.0,
            **(config or {}),
        }
        self._encoder_token: str | None = None
        self._encoder_override: str | None = None  # local weights given at load time, not saved
        self._trust_remote_code = False  # the caller's, never the model folder's, say-so
        self._root: Path | None = None  # where the model was loaded from
        self._low_precision: tuple[tuple, tuple] | None = None  # (key, modules) of a bfloat16 preset's copies
        if quality is not None:
            self.set_quality(quality)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        token: str | None = None,
        local_files_only: bool | None = None,
        vae_path: str | Path | None = None,
        encoder_path: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        quality: str | QualityPreset | None = None,
    ) -> Generator:
        """Load from a local directory or a hub id; ``vae_path``/``encoder_path`` override weights;
        ``quality`` applies a preset (:meth:`set_quality`).

        No code from the folder runs; ``trust_remote_code`` is passed to `load_encoder` (see there).

        Example:
            >>> Generator.from_pretrained("./runs/my-run/final", device="cpu")  # doctest: +SKIP
        """
        root = _resolve(path_or_id, token, local_files_only)
        index = _read_index(root)
        from pixgen import formats

        with _reading(root / "transformer"):
            adapter = formats.detect(root, index)
        if adapter is not None:  # a published layout (e.g. PixCell): its own loader
            with _reading(root):
                gen = adapter(root, index, token=token, vae_path=vae_path, encoder_path=encoder_path,
                              local_files_only=local_files_only)
        else:
            with _reading(root / "transformer"):
                transformer = load_model(PixgenTransformer, root / "transformer")
            with _reading(Path(vae_path) if vae_path else root / "vae"):
                vae = load_autoencoder(vae_path or root / "vae", token=token, local_files_only=local_files_only)
            scheduler = _load_scheduler(root / "scheduler")
            config = {k: v for k, v in index.items() if not k.startswith("_")}
            controlnet = None
            if (root / "controlnet").is_dir():
                with _reading(root / "controlnet"):
                    controlnet = load_model(PixgenControlNet, root / "controlnet")
            gen = cls(transformer, vae, scheduler, embedding_bank=EmbeddingBank.load(root), config=config,
                      controlnet=controlnet, prior=EmbeddingPrior.load(root / PRIOR_DIR))
        gen.locate(root, encoder_path=encoder_path, token=token, trust_remote_code=trust_remote_code)
        if quality is not None:
            gen.set_quality(quality)
        return gen.to(device, dtype) if device or dtype else gen

    def set_quality(self, quality: str | QualityPreset) -> Generator:
        """Sample with a quality preset: its diffusers scheduler, step count, guidance interval and
        compute dtype replace the model's (``guidance_scale`` stays the model's); returns ``self``.

        Presets are measured on flow-matching models; an epsilon model (PixCell) is refused.

        Example:
            >>> gen.set_quality("fast").config["num_inference_steps"]  # doctest: +SKIP
            8
        """
        preset = quality_preset(quality) if isinstance(quality, str) else quality
        prediction = self.transformer.config.prediction_type
        if prediction != "flow":
            raise InputError(f"quality presets are measured for flow-matching models; this one predicts {prediction}",
                             fix="leave --quality out (the model's own sampler) and set --steps instead")
        self.scheduler = make_scheduler(preset.sampler, prediction, preset.shift)
        self.config.update(num_inference_steps=preset.num_inference_steps, compute_dtype=preset.dtype,
                           guidance_interval=list(preset.guidance_interval) if preset.guidance_interval else None,
                           quality=quality if isinstance(quality, str) else None)
        return self

    def use_sampling(self, quality: str | None = None, sampler: str | None = None) -> Generator:
        """The commands' sampling choice: a flow-matching model samples with ``quality`` (default
        :data:`~pixgen.sampling.DEFAULT_QUALITY`), its solver replaced by ``sampler``; another model
        (PixCell, epsilon) keeps its own sampler unless ``sampler`` names one (``quality`` is refused
        there by :meth:`set_quality`); returns ``self``.

        Example:
            >>> gen.use_sampling("fast", "unipc").config["num_inference_steps"]  # doctest: +SKIP
            8
        """
        prediction = self.transformer.config.prediction_type
        if prediction != "flow" and quality is None:
            if sampler:
                self.scheduler = make_scheduler(sampler, prediction)
            return self
        preset = quality_preset(quality or DEFAULT_QUALITY)
        return self.set_quality(replace(preset, sampler=sampler) if sampler else quality or DEFAULT_QUALITY)

    def locate(self, root: str | Path | None, *, encoder_path: str | Path | None = None,
               token: str | None = None, trust_remote_code: bool = False) -> Generator:
        """Record where the model was loaded from (an encoder saved with it is found there), local
        encoder weights that replace it (used, not saved), the hub token and whether the user allowed a
        pinned registry encoder's remote code (never read from the folder); returns ``self``.
        Loaders (:meth:`from_pretrained`, format adapters such as PixCell's) call it.

        Example:
            >>> gen.locate("/models/PixCell-256", encoder_path="/models/UNI2-h")  # doctest: +SKIP
        """
        self._root = Path(root) if root is not None else None
        self._encoder_override = str(encoder_path) if encoder_path else None
        self._encoder_token = token
        self._trust_remote_code = trust_remote_code
        return self

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the diffusers-style layout: ``model_index.json``, ``transformer/``, ``vae/``,
        ``scheduler/``, ``encoder/`` (when the encoder is saved with the model) and the bank."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(directory / "transformer")
        if self.controlnet is not None:
            self.controlnet.save_pretrained(directory / "controlnet")
        self.vae.save_pretrained(directory / "vae")
        self.scheduler.save_pretrained(directory / "scheduler")
        config = dict(self.config)
        if config.get("encoder_path"):  # the encoder belongs to the model (bundled / trained with it)
            self.encoder.save_pretrained(directory / "encoder")
            config["encoder_path"] = "encoder"
        if self.embedding_bank is not None:
            self.embedding_bank.save(directory)
        if self.prior is not None:
            self.prior.save(directory / PRIOR_DIR)
        index = {"_class_name": "Generator", "_pixgen_version": __version__, **config}
        write_json_atomic(directory / INDEX_FILE, index)
        return directory

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Generator:
        """Move every component (``dtype`` applies to transformer and VAE)."""
        for module in (self.transformer, self.controlnet, self.vae, self._encoder):
            if module is not None:
                module.to(device=device, dtype=dtype if module is not self._encoder else None)
        if device is not None and torch.device(device).type == "cuda":
            _enable_xformers(self.transformer)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype sampling runs in: the model's, or bfloat16 for a float32 model under a bfloat16
        preset on a device that computes it natively."""
        if self.config.get("compute_dtype") == "bfloat16" and self.dtype == torch.float32 and _native_bf16(self.device):
            return torch.bfloat16
        return self.dtype

    @property
    def labels(self) -> list[str]:
        """The labels ``label=`` accepts: the prior's, or the embedding bank's when there is no prior."""
        if self.prior is not None:
            return sorted(self.prior.labels)
        return self.embedding_bank.labels if self.embedding_bank is not None else []

    @property
    def source(self) -> Path | None:
        """The folder the model was loaded from (None for a model built in memory)."""
        return self._root

    @property
    def encoder(self):
        """The model's SSL encoder, loaded on first use (label-only generation never needs it)."""
        if self._encoder is None:
            name = self.config.get("encoder")
            if not name:
                raise ModelLoadError(
                    "this model does not name its encoder, so reference images cannot be embedded",
                    fix="pass embeddings instead of reference images",
                )
            from pixgen.encoders import load_encoder

            path = self._encoder_override
            if path is None and self.config.get("encoder_path") and self._root is not None:
                path = str(self._root / self.config["encoder_path"])
            if path and (Path(path) / "pixgen_encoder.json").is_file():  # saved with the model
                self._encoder = load_encoder(str(path), device=self.device, trust_remote_code=self._trust_remote_code)
            else:  # registry name, optionally with local weights (offline clusters, gated hubs)
                self._encoder = load_encoder(name, local_path=path, token=self._encoder_token, device=self.device,
                                             trust_remote_code=self._trust_remote_code)
        return self._encoder

    def describe(self) -> dict[str, Any]:
        """What this model is: sizes, conditioning, sampler, bank (used by ``pixgen info``)."""
        cfg = self.transformer.config
        return {
            "parameters": sum(p.numel() for p in self.transformer.parameters()),
            "layers": cfg.num_layers,
            "width": cfg.num_attention_heads * cfg.attention_head_dim,
            "heads": cfg.num_attention_heads,
            "patch_size": cfg.patch_size,
            "latent": [self.vae.latent_channels, cfg.sample_size, cfg.sample_size],
            "image_size": self.config["image_size"],
            "mpp": self.config.get("mpp"),
            "field_of_view_um": self.config["image_size"] * self.config["mpp"] if self.config.get("mpp") else None,
            "autoencoder": self.vae.kind,
            "encoder": self.config.get("encoder"),
            "domain": self.config.get("domain"),
            "condition_dim": cfg.caption_channels,
            "condition_tokens": cfg.caption_num_tokens,
            "condition_pos_embed": self.transformer.y_pos_embed is not None,
            "prediction": cfg.prediction_type + (" + learned variance" if self.transformer.learned_sigma else ""),
            "scheduler": type(self.scheduler).__name__,
            "quality": self.config.get("quality"),
            "guidance_interval": self.config.get("guidance_interval"),
            "num_inference_steps": self.config["num_inference_steps"],
            "guidance_scale": self.config["guidance_scale"],
            "bank": {k: int(v.shape[0]) for k, v in self.embedding_bank.entries.items()} if self.embedding_bank else None,
            "prior": self.prior.describe() if self.prior is not None else None,
            "controlnet": ({"layers": self.controlnet.config.num_layers, "cfg": self.config.get("controlnet_cfg")}
                           if self.controlnet is not None else None),
        }

    # ------------------------------------------------------------------ conditioning
    def embed_references(self, reference: Sequence[Any]) -> Embeddings:
        """Embed reference images (paths, PIL, arrays) with the model's encoder, as condition tokens
        (tagged with the model's domain: references are taken to show the tissue it generates)."""
        if isinstance(reference, (str, Path, Image.Image, np.ndarray)):
            reference = [reference]
        ids = [str(r) if isinstance(r, (str, Path)) else f"reference[{i}]" for i, r in enumerate(reference)]
        images = [load_image(r) if isinstance(r, (str, Path)) else r for r in reference]
        for name, img in zip(ids, images):
            self._warn_field_of_view(name, img)
        tokens = self.transformer.config.caption_num_tokens
        enc = self.encoder
        values = enc.embed_grid(images, grid=round(tokens**0.5)) if tokens > 1 else enc.embed(images)
        return Embeddings(values, encoder=enc.spec.name, ids=ids, domain=self.config.get("domain"))

    def _warn_field_of_view(self, name: str, image: Any) -> None:
        """Warn (one line) when a reference is far from the model's tile size: the encoder resizes
        any image to its input, so a whole slide region or a thumbnail would silently condition on
        another field of view than the model was trained with (as ``pixgen features`` warns for tiles)."""
        size = self.config["image_size"]
        h, w = np.asarray(image).shape[:2]
        if max(h, w) > REFERENCE_SIZE_TOLERANCE * size or max(h, w) < size / REFERENCE_SIZE_TOLERANCE:
            mpp = self.config.get("mpp")
            field = f"{size} px at {mpp} um/px ({size * mpp:g} um)" if mpp else f"{size} px at the training resolution"
            warnings.warn(f"reference {name} is {w}x{h} px, far from this model's field of view ({field}); the "
                          "encoder resizes it anyway, so its tissue is seen at another scale than in training "
                          "(crop references to that field)", stacklevel=3)

    def check_conditions(self, cond: Embeddings) -> None:
        """Refuse tokens of another encoder, dimension, domain or token count (:class:`EncoderMismatchError`)."""
        cond.check_encoder(self.config.get("encoder"), self.transformer.config.caption_channels, self.config.get("domain"))
        self.transformer.check_condition(cond.values)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, condition: Condition | Embeddings | torch.Tensor | None = None, **kwargs: Any) -> GenerationOutput:
        """Generate images: all batches of :meth:`generate_batches`, joined.

        Example:
            >>> out = gen.generate(label="lung_aca", num_images=2, seed=1)  # doctest: +SKIP
            >>> out = gen.generate(BankDraw("lung_aca"), num_images=2, seed=1)  # the same  # doctest: +SKIP
        """
        parts = list(self.generate_batches(condition, **kwargs))
        images = [p.images for p in parts]
        if isinstance(images[0], list):
            joined = [im for part in images for im in part]
        elif isinstance(images[0], np.ndarray):
            joined = np.concatenate(images)
        else:
            joined = torch.cat(images)
        cond = parts[0].conditions
        conditions = Embeddings(torch.cat([p.conditions.values for p in parts]), encoder=cond.encoder,
                                ids=[i for p in parts for i in p.condition_ids], domain=cond.domain)
        return GenerationOutput(images=joined, seeds=[s for p in parts for s in p.seeds],
                                condition_ids=conditions.ids, conditions=conditions,
                                extra={k: v for k, v in parts[0].extra.items() if k != "batch_start"})

    @torch.no_grad()
    def generate_batches(
        self,
        condition: Condition | Embeddings | torch.Tensor | None = None,
        *,
        embeddings: Embeddings | torch.Tensor | None = None,
        reference: Sequence[Any] | None = None,
        label: str | None = None,
        num_images: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = 0,
        output_type: str = "pil",
        batch_size: int = 8,
        progress: bool = True,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        image: Any | None = None,
        strength: float = 1.0,
        control_image: Any | None = None,
        controlnet_conditioning_scale: float = 1.0,
        controlnet_cfg: str | None = None,
        callback: StepCallback | None = None,
    ) -> Iterator[GenerationOutput]:
        """Generate images batch by batch (write each batch as it comes; nothing is held).

        Args:
            condition: a :mod:`pixgen.conditioning` value (:class:`Reference`, :class:`BankDraw`,
                :class:`RawEmbeddings`, :class:`EmbeddingGrid`) or condition tokens. The keywords
                below build one; give one of them. Nothing: bank draws from all labels.
            embeddings: condition tokens (N, D) / (N, T, D) or tagged :class:`Embeddings`.
            reference: image paths / PIL images / uint8 arrays, embedded by the model's encoder.
            label: a label (``pixgen info`` lists them): the model's prior samples it when the model
                has one (:class:`PriorSample`), else its bank draws it (:class:`BankDraw`).
            num_images: images per condition (per label for ``label``).
            num_inference_steps, guidance_scale: default to the model's config; steps >= 1 and a
                finite guidance are required. ``guidance_scale == 1`` skips the unconditional pass.
            generator: a torch.Generator for all noise and draws (overrides ``seed``).
            seed: image i uses seed ``seed + i`` for its noise and its bank draw, so it is
                reproducible alone and does not depend on ``num_images``.
            output_type: ``"pil"``, ``"np"`` (uint8 NHWC), ``"pt"`` (float NCHW in [0, 1]) or ``"latent"``.
            batch_size: images per forward (memory only).
            height, width: output size in pixels (default: the model's ``image_size``); any
                multiple of the autoencoder's factor times the patch size.
            latents: starting noise (N, C, h, w) for all N images, instead of seeded noise.
            image: img2img: image(s) (one for all, one per condition or one per image), encoded
                by the autoencoder and noised to the step ``strength`` sets.
            strength: img2img strength in (0, 1]; 1 starts from pure noise.
            control_image: binary cell mask(s) of the output size, (H, W) uint8/bool (non-zero = cell):
                one for all images, one per condition or one per image; needs a ``controlnet``.
            controlnet_conditioning_scale: strength of the ControlNet residuals (0 = off).
            controlnet_cfg: ``"both"`` / ``"cond"``: which CFG half gets the residuals (default:
                the model's ``controlnet_cfg`` config, ``"both"``; see :mod:`pixgen.sampling`).
            callback: ``callback(step, timestep, latents, x0)`` per step of each batch; returning
                False raises :class:`SamplingCancelled` (batches already yielded stay valid).

        Example:
            >>> for batch in gen.generate_batches(label="lung_aca", num_images=64, batch_size=16):  # doctest: +SKIP
            ...     save(batch.images, batch.seeds)
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InputError(f"unknown output_type {output_type!r}", fix="use pil, np, pt or latent")
        steps, guidance, strength = check_sampling_args(
            self.config["num_inference_steps"] if num_inference_steps is None else num_inference_steps,
            self.config["guidance_scale"] if guidance_scale is None else guidance_scale, strength)
        if num_images < 1:
            raise InputError(f"num_images must be >= 1, got {num_images}")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        controlnet_cfg = controlnet_cfg or self.config.get("controlnet_cfg", "both")
        cond_value = from_keywords(self, condition, embeddings, reference, label)
        total = cond_value.size(self) * num_images
        seeds: list[int | None] = [None] * total if generator is not None else [(seed or 0) + i for i in range(total)]
        cond = cond_value.resolve(self, seeds, generator)
        self.check_conditions(cond)
        shape = self._latent_shape(height, width)
        noise = self._noise(seeds, shape, generator, latents)
        control = self._control_latents(control_image, total // num_images, num_images, shape)
        start = start_step_for_strength(steps, strength) if image is not None else 0
        clean = self._image_latents(image, total // num_images, num_images, shape) if image is not None else None
        bar = tqdm(total=-(-total // batch_size) * (steps - start), desc="denoising", disable=not progress, unit="step")

        def on_step(step, t, x, x0):
            bar.update(1)
            return None if callback is None else callback(step, t, x, x0)

        transformer, vae, controlnet = self._compute_modules()
        interval = self.config.get("guidance_interval")
        try:
            for lo in range(0, total, batch_size):
                sl = slice(lo, lo + batch_size)
                out = sample(transformer, self.scheduler, noise[sl], cond.values[sl], num_inference_steps=steps,
                             guidance_scale=guidance, start_step=start, image_latents=None if clean is None else clean[sl],
                             controlnet=controlnet if control is not None else None,
                             control=None if control is None else control[sl],
                             controlnet_conditioning_scale=controlnet_conditioning_scale,
                             controlnet_cfg=controlnet_cfg, callback=on_step,
                             guidance_interval=tuple(interval) if interval else None)
                part = Embeddings(cond.values[sl], encoder=cond.encoder, ids=cond.ids[sl], domain=cond.domain)
                images = out if output_type == "latent" else self._decode(out, output_type, batch_size, vae)
                yield GenerationOutput(images=images, seeds=seeds[sl], condition_ids=part.ids, conditions=part,
                                       extra={"num_inference_steps": steps, "guidance_scale": guidance,
                                              "scheduler": type(self.scheduler).__name__, "guidance_interval": interval,
                                              "quality": self.config.get("quality"),
                                              "strength": strength, "controlnet_cfg": controlnet_cfg,
                                              "batch_start": lo})
        finally:
            bar.close()

    def initial_noise(self, seeds: Sequence[int], height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The starting noise ``generate`` uses for images with these seeds, (N, C, h, w); pass it
        back as ``latents=`` (e.g. the same noise at every point of an interpolation).

        Example:
            >>> z = gen.initial_noise([7]).repeat(8, 1, 1, 1)       # doctest: +SKIP
        """
        return self._noise(list(seeds), self._latent_shape(height, width), None, None)

    def _latent_shape(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        """(C, h, w) of the latents for an output of ``height`` x ``width`` pixels."""
        size, f = self.config["image_size"], self.vae.downsample_factor
        height, width = height or size, width or size
        unit = f * self.transformer.config.patch_size
        if height % unit or width % unit or height < unit or width < unit:
            raise InputError(f"image size {height}x{width} is not a positive multiple of {unit} px",
                             fix=f"use multiples of {unit} (autoencoder factor {f} x patch size)")
        return (self.vae.latent_channels, height // f, width // f)

    def _noise(self, seeds: list[int | None], shape: tuple[int, int, int], generator: torch.Generator | None,
               latents: torch.Tensor | None) -> torch.Tensor:
        """Starting noise: ``latents`` as given, else image i's noise from ``torch.Generator(seed_i)``."""
        if latents is not None:
            latents = torch.as_tensor(latents, dtype=torch.float32)
            if tuple(latents.shape) != (len(seeds), *shape):
                raise InputError(f"latents have shape {tuple(latents.shape)}, expected {(len(seeds), *shape)}",
                                 fix="pass one (C, h, w) noise tensor per output image")
            return latents
        if generator is not None:
            return randn_tensor((len(seeds), *shape), generator=generator, dtype=torch.float32)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters(), torch.zeros((), dtype=self.dtype)).dtype
        return self.vae.encode(pixels.to(self.device, vae_dtype)).float()

    def _control_latents(self, control_image: Any, num_conditions: int, num_images: int,
                         shape: tuple[int, int, int] | None = None) -> torch.Tensor | None:
        """Control input of the masks, one per output image: PixCell's VAE latents of binary
        masks, or pixel-grid mask channels for a mask-encoder ControlNet (:mod:`pixgen.masks`)."""
        if control_image is None:
            return None
        if self.controlnet is None:
            raise InputError("this model has no ControlNet, so control_image cannot be used",
                             fix="load a model with a controlnet/ folder, e.g. PixCell-256-Cell-ControlNet")
        f = self.vae.downsample_factor
        size = (shape[1] * f, shape[2] * f) if shape is not None else self.config["image_size"]
        control = self.controlnet.control_input(control_image, size, self._vae_encode)  # (M, C, h, w)
        return per_image(control.to(self.device, self.dtype), num_conditions, num_images)

    def _image_latents(self, image: Any, num_conditions: int, num_images: int, shape: tuple[int, int, int]) -> torch.Tensor:
        """img2img: clean latents of ``image`` (paths, PIL, uint8 arrays), one per output image."""
        from pixgen.encoders.images import to_uint8_batch

        items = image if isinstance(image, (list, tuple)) else [image]
        batch = to_uint8_batch([load_image(i) if isinstance(i, (str, Path)) else i for i in items])  # (M, 3, H, W)
        f = self.vae.downsample_factor
        if tuple(batch.shape[-2:]) != (shape[1] * f, shape[2] * f):
            raise InputError(f"img2img image is {batch.shape[-2]}x{batch.shape[-1]}, the output is "
                             f"{shape[1] * f}x{shape[2] * f}", fix="crop or resize it to the output size")
        latents = self._vae_encode(batch.float() / 127.5 - 1)
        return per_image(latents, num_conditions, num_images)

    def _compute_modules(self) -> tuple[PixgenTransformer, Autoencoder, PixgenControlNet | None]:
        """Transformer, autoencoder and ControlNet in the preset's ``compute_dtype``: the modules
        themselves, or bfloat16 copies of float32 ones (made once per set of modules and device, then
        kept: weights changed in place afterwards need :meth:`set_quality` again)."""
        modules = (self.transformer, self.vae, self.controlnet)
        if self.compute_dtype == self.dtype:
            return modules
        key = (*(id(m) for m in modules), str(self.device))
        if self._low_precision is None or self._low_precision[0] != key:
            copies = tuple(None if m is None else copy.deepcopy(m).to(torch.bfloat16) for m in modules)
            self._low_precision = (key, copies)
        return self._low_precision[1]

    def _decode(self, latents: torch.Tensor, output_type: str, batch_size: int, vae: Autoencoder | None = None):
        vae = vae or self.vae
        vae_dtype = next(vae.parameters(), torch.zeros((), dtype=self.dtype)).dtype
        pixels = torch.cat([
            vae.decode(latents[i : i + batch_size].to(self.device, vae_dtype)).float().cpu()
            for i in range(0, len(latents), batch_size)
        ])
        pixels = ((pixels + 1) / 2).clamp(0, 1)  # (N, 3, H, W) in [0, 1]
        if output_type == "pt":
            return pixels
        array = (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        return array if output_type == "np" else [Image.fromarray(a) for a in array]


def _resolve(path_or_id: str | Path, token: str | None, local_files_only: bool | None) -> Path:
    """A local model directory, or a hub snapshot of ``path_or_id``."""
    local = Path(path_or_id)
    if local.is_dir():
        return local
    looks_local = local.exists() or str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1
    if looks_local:
        raise ModelLoadError(
            f"no model directory at {path_or_id}",
            fix="pass a folder written by Generator.save_pretrained / `pixgen train` (RUN/final), or a hub id owner/name",
        )
    from huggingface_hub import snapshot_download

    try:  # data files only: a repository's *.py (e.g. custom pipelines) is never fetched
        return Path(snapshot_download(str(path_or_id), token=token, local_files_only=bool(local_files_only),
                                      allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # hub errors have many types; the message is what matters
        raise ModelLoadError(
            f"could not fetch {path_or_id!r} from the hub ({type(err).__name__}: {str(err).splitlines()[0][:160]})",
            fix="check the id, request access if it is gated and pass --token / HF_TOKEN, or download it and pass the local folder",
        ) from err


def _read_index(root: Path) -> dict[str, Any]:
    path = root / INDEX_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{root} is not a model directory (no {INDEX_FILE})",
            fix="pass the folder written by save_pretrained or `pixgen train` (RUN/final)",
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"corrupt {path}: {err}", fix="restore the file or re-save the model") from err


def _load_scheduler(directory: Path):
    config_file = directory / "scheduler_config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"no scheduler config at {config_file}", fix="re-save the model with save_pretrained")
    try:
        name = json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as err:  # not JSON, or JSON that is not an object
        raise ModelLoadError(f"corrupt {config_file}: {err}", fix="restore scheduler_config.json (re-download or "
                             "re-save the model)") from err
    cls = SCHEDULERS.get(name)
    if cls is None:
        raise ModelLoadError(f"unsupported scheduler {name!r} in {config_file}", fix=f"use one of {', '.join(SCHEDULERS)}")
    with _reading(directory):
        return cls.from_pretrained(directory)


@contextmanager
def _reading(folder: Path) -> Iterator[None]:
    """Turn what diffusers / json / safetensors raise for a broken component folder (bad JSON, a
    config value of the wrong type, truncated weights) into one :class:`ModelLoadError` naming the
    folder and the fix; a folder whose only weights are a pickle is refused before it is opened."""
    _refuse_pickled_weights(folder)
    try:
        yield
    except PixgenError:
        raise
    except (OSError, ValueError, TypeError) as err:  # diffusers: OSError; json, safetensors: ValueError; bad config values: TypeError
        raise ModelLoadError(f"could not load {folder}: {_first_line(err)}{_root_cause(err)}",
                             fix=f"restore {folder.name}/ (re-download or re-save the model): a config is damaged "
                             "or the weights are truncated") from err


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _root_cause(err: BaseException) -> str:
    """`` (Type: message)`` of the JSON or safetensors error behind a library's wrapper, if any."""
    cause = err.__cause__ or err.__context__
    while cause is not None:
        if isinstance(cause, json.JSONDecodeError) or type(cause).__name__ == "SafetensorError":
            return f" ({type(cause).__name__}: {_first_line(cause)})"
        cause = cause.__cause__ or cause.__context__
    return ""


def _refuse_pickled_weights(folder: Path) -> None:
    """pixgen's model folders hold safetensors; a pickle-based weights file alone is not read (diffusers
    would unpickle it with weights_only=True, after a warning about unsafe serialization)."""
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if pickles:
            raise ModelLoadError(f"{folder / pickles[0]} is a pickle-based weights file and {folder} has no .safetensors "
                                 "weights; pixgen never unpickles model files",
                                 fix="use the model's .safetensors weights (or convert the checkpoint to safetensors "
                                 "where you trust it)")


def _native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (elsewhere it is emulated, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _enable_xformers(model: PixgenTransformer) -> None:
    """Use xformers attention on GPU when it is installed (the `gpu` extra); SDPA otherwise."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        return
    model.enable_xformers_memory_efficient_attention()
