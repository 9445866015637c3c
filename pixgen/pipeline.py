"""``Generator``: transformer + autoencoder + scheduler + encoder (+ embedding bank), one entry point.

Conditioning always ends as condition tokens in the model's encoder space: given directly
(``embeddings``), made from ``reference`` images by the model's own encoder, or drawn from the
model's embedding bank by ``label``.

Sampling: classifier-free guidance runs conditional and unconditional rows in one batched
forward, ``pred = uncond + w * (cond - uncond)`` (pixgen's convention: ``w = 1`` is the plain
conditional model, no extra forward). Image ``i`` of a call with ``seed=s`` starts from the
noise of seed ``s + i``, so it is reproducible alone and independent of batch size.

Default samplers (diffusers schedulers): flow-matching models use
``FlowMatchEulerDiscreteScheduler``; epsilon models (PixCell) use ``DPMSolverMultistepScheduler``
(DPM-Solver++, order 2) over PixCell's linear betas. Step counts default to the model's
``num_inference_steps`` (28 flow / 20 epsilon unless the model says otherwise).

Example:
    >>> gen = Generator.from_pretrained("path/to/model")                       # doctest: +SKIP
    >>> out = gen.generate(reference=["tile.png"], num_images=4, seed=0)       # doctest: +SKIP
    >>> out.images[0].save("variation.png")                                     # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from pixgen import __version__
from pixgen.embeddings import EmbeddingBank, Embeddings
from pixgen.errors import InputError, ModelLoadError
from pixgen.io import load_image
from pixgen.models.autoencoders import Autoencoder, load_autoencoder
from pixgen.models.controlnet import PixgenControlNet, mask_to_pixels, per_image
from pixgen.models.transformer import PixgenTransformer

__all__ = ["Generator", "GenerationOutput", "default_scheduler", "SCHEDULERS"]

SCHEDULERS = {cls.__name__: cls for cls in (FlowMatchEulerDiscreteScheduler, DPMSolverMultistepScheduler)}
DEFAULT_STEPS = {"flow": 28, "epsilon": 20}
INDEX_FILE = "model_index.json"


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
        config: ``encoder`` (registry name), ``image_size``, ``mpp``, ``num_inference_steps``,
            ``guidance_scale``, and ``encoder_path`` (``"encoder"`` when the encoder's weights are
            saved inside the model directory; None for hub encoders such as UNI2-h).
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
    ):
        self.transformer = transformer
        self.controlnet = controlnet
        self.vae = vae
        self.scheduler = scheduler or default_scheduler(transformer.config.prediction_type)
        self._encoder = encoder
        self.embedding_bank = embedding_bank
        pred = transformer.config.prediction_type
        self.config: dict[str, Any] = {
            "encoder": transformer.config.encoder_name,
            "encoder_path": None,
            "image_size": transformer.config.sample_size * vae.downsample_factor,
            "mpp": None,
            "num_inference_steps": DEFAULT_STEPS[pred],
            "guidance_scale": 1.0 if pred == "flow" else 2.0,
            **(config or {}),
        }
        self._encoder_token: str | None = None
        self._encoder_override: str | None = None  # local weights given at load time, not saved
        self._root: Path | None = None  # where the model was loaded from

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
    ) -> Generator:
        """Load from a local directory or a hub id; ``vae_path``/``encoder_path`` override weights.

        Example:
            >>> Generator.from_pretrained("./runs/my-run/final", device="cpu")  # doctest: +SKIP
        """
        root = _resolve(path_or_id, token, local_files_only)
        index = _read_index(root)
        from pixgen import formats

        adapter = formats.detect(root, index)
        if adapter is not None:  # a published layout (e.g. PixCell): its own loader
            gen = adapter(root, index, token=token, vae_path=vae_path, encoder_path=encoder_path, local_files_only=local_files_only)
        else:
            transformer = PixgenTransformer.from_pretrained(root / "transformer")
            vae = load_autoencoder(vae_path or root / "vae", token=token, local_files_only=local_files_only)
            scheduler = _load_scheduler(root / "scheduler")
            config = {k: v for k, v in index.items() if not k.startswith("_")}
            controlnet = PixgenControlNet.from_pretrained(root / "controlnet") if (root / "controlnet").is_dir() else None
            gen = cls(transformer, vae, scheduler, embedding_bank=EmbeddingBank.load(root), config=config,
                      controlnet=controlnet)
        gen.locate(root, encoder_path=encoder_path, token=token)
        return gen.to(device, dtype) if device or dtype else gen

    def locate(self, root: str | Path | None, encoder_path: str | Path | None = None, token: str | None = None) -> Generator:
        """Record where the model was loaded from and where its encoder's weights come from
        (``encoder_path``: local weights, not saved with the model; ``token``: for gated hubs).
        Loaders (:meth:`from_pretrained`, format adapters such as PixCell's) call it.

        Example:
            >>> gen.locate("/models/PixCell-256", encoder_path="/models/UNI2-h")  # doctest: +SKIP
        """
        self._root = Path(root) if root is not None else None
        self._encoder_override = str(encoder_path) if encoder_path else None
        self._encoder_token = token
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
        index = {"_class_name": "Generator", "_pixgen_version": __version__, **config}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
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
                self._encoder = load_encoder(str(path), device=self.device)
            else:  # registry name, optionally with local weights (offline clusters, gated hubs)
                self._encoder = load_encoder(name, local_path=path, token=self._encoder_token, device=self.device)
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
            "autoencoder": self.vae.kind,
            "encoder": self.config.get("encoder"),
            "condition_dim": cfg.caption_channels,
            "condition_tokens": cfg.caption_num_tokens,
            "condition_pos_embed": self.transformer.y_pos_embed is not None,
            "prediction": cfg.prediction_type + (" + learned variance" if self.transformer.learned_sigma else ""),
            "scheduler": type(self.scheduler).__name__,
            "num_inference_steps": self.config["num_inference_steps"],
            "guidance_scale": self.config["guidance_scale"],
            "bank": {k: int(v.shape[0]) for k, v in self.embedding_bank.entries.items()} if self.embedding_bank else None,
            "controlnet": {"layers": self.controlnet.config.num_layers} if self.controlnet is not None else None,
        }

    # ------------------------------------------------------------------ conditioning
    def embed_references(self, reference: Sequence[Any]) -> Embeddings:
        """Embed reference images (paths, PIL, arrays) with the model's encoder, as condition tokens."""
        if isinstance(reference, (str, Path, Image.Image, np.ndarray)):
            reference = [reference]
        ids = [str(r) if isinstance(r, (str, Path)) else f"reference[{i}]" for i, r in enumerate(reference)]
        images = [load_image(r) if isinstance(r, (str, Path)) else r for r in reference]
        tokens = self.transformer.config.caption_num_tokens
        enc = self.encoder
        values = enc.embed_grid(images, grid=round(tokens**0.5)) if tokens > 1 else enc.embed(images)
        return Embeddings(values, encoder=enc.spec.name, ids=ids)

    def conditions(
        self,
        embeddings: Embeddings | torch.Tensor | None = None,
        reference: Sequence[Any] | None = None,
        label: str | None = None,
        num_images: int = 1,
        seed: int = 0,
    ) -> Embeddings:
        """One condition per output image: each given condition repeated ``num_images`` times,
        or ``num_images`` bank draws for a ``label`` (for nothing given: from all bank labels)."""
        given = [x is not None for x in (embeddings, reference, label)]
        if sum(given) > 1:
            raise InputError("give only one of embeddings, reference or label")
        if num_images < 1:
            raise InputError(f"num_images must be >= 1, got {num_images}")
        if label is not None or (sum(given) == 0 and self.embedding_bank is not None):
            if self.embedding_bank is None:
                raise InputError("this model has no embedding bank, so --label cannot be used", fix="pass --reference images")
            return self.embedding_bank.sample(label, num_images, seed=seed)  # no label: all labels pooled
        if reference is not None:
            cond = self.embed_references(reference)
        elif embeddings is not None:
            cond = embeddings if isinstance(embeddings, Embeddings) else Embeddings(embeddings)
        else:
            raise InputError(
                "nothing to condition on",
                fix="pass reference images, embeddings, or a label"
                + (f" (labels: {', '.join(self.embedding_bank.labels)})" if self.embedding_bank else ""),
            )
        ids = cond.ids or [f"condition[{i}]" for i in range(len(cond))]
        return Embeddings(
            cond.values.repeat_interleave(num_images, 0),
            encoder=cond.encoder,
            ids=[i for i in ids for _ in range(num_images)],
        )

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
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
        control_image: Any | None = None,
        controlnet_conditioning_scale: float = 1.0,
    ) -> GenerationOutput:
        """Generate images.

        Args:
            embeddings: condition tokens (N, D) / (N, T, D) or tagged :class:`Embeddings`.
            reference: image paths / PIL images / uint8 arrays, embedded by the model's encoder.
            label: a label of the model's embedding bank (``pixgen info`` lists them).
            num_images: images per condition (per label for ``label``).
            num_inference_steps, guidance_scale: default to the model's config.
            generator: a torch.Generator for all noise (overrides ``seed``).
            seed: image i uses seed ``seed + i``.
            output_type: ``"pil"``, ``"np"`` (uint8 NHWC), ``"pt"`` (float NCHW in [0, 1]) or ``"latent"``.
            batch_size: images per forward (memory only; results do not depend on it).
            control_image: binary cell mask(s) of the output size, (H, W) uint8/bool (non-zero = cell):
                one for all images, one per condition or one per image; needs a ``controlnet``.
            controlnet_conditioning_scale: strength of the ControlNet residuals (0 = off).

        Example:
            >>> out = gen.generate(label="lung_aca", num_images=2, seed=1)  # doctest: +SKIP
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InputError(f"unknown output_type {output_type!r}", fix="use pil, np, pt or latent")
        steps = int(num_inference_steps or self.config["num_inference_steps"])
        guidance = float(self.config["guidance_scale"] if guidance_scale is None else guidance_scale)
        if steps < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {steps}")
        cond = self.conditions(embeddings, reference, label, num_images, seed or 0)
        cond.check_encoder(self.config.get("encoder"), self.transformer.config.caption_channels)
        self.transformer.check_condition(cond.values)
        seeds = [None] * len(cond) if generator is not None else [(seed or 0) + i for i in range(len(cond))]
        noise = self._noise(len(cond), seeds, generator)
        control = self._control_latents(control_image, len(cond) // num_images, num_images)
        latents = []
        chunks = range(0, len(cond), batch_size)
        bar = tqdm(total=len(chunks) * steps, desc="denoising", disable=not progress, unit="step")
        for start in chunks:
            sl = slice(start, start + batch_size)
            ctrl = None if control is None else control[sl]
            latents.append(self._denoise(noise[sl], cond.values[sl].to(self.device, self.dtype), steps, guidance, bar,
                                         ctrl, controlnet_conditioning_scale))
        bar.close()
        latents = torch.cat(latents)
        images = latents if output_type == "latent" else self._decode(latents, output_type, batch_size)
        return GenerationOutput(images=images, seeds=seeds, condition_ids=cond.ids, conditions=cond,
                                extra={"num_inference_steps": steps, "guidance_scale": guidance})

    def _noise(self, n: int, seeds: list[int | None], generator: torch.Generator | None) -> torch.Tensor:
        cfg = self.transformer.config
        shape = (self.vae.latent_channels, cfg.sample_size, cfg.sample_size)
        if generator is not None:
            return randn_tensor((n, *shape), generator=generator, dtype=torch.float32)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    def _control_latents(self, control_image: Any, num_conditions: int, num_images: int) -> torch.Tensor | None:
        """VAE latents of the control masks, one per output image (PixCell's mask encoding)."""
        if control_image is None:
            return None
        if self.controlnet is None:
            raise InputError("this model has no ControlNet, so control_image cannot be used",
                             fix="load a model with a controlnet/ folder, e.g. PixCell-256-Cell-ControlNet")
        pixels = mask_to_pixels(control_image, self.config["image_size"])  # (M, 3, H, W) in [-1, 1]
        vae_dtype = next(self.vae.parameters(), torch.zeros((), dtype=self.dtype)).dtype
        latents = self.vae.encode(pixels.to(self.device, vae_dtype)).to(self.dtype)
        return per_image(latents, num_conditions, num_images)

    def _control_residuals(self, model_in, t, cond, control, scale: float, use_cfg: bool) -> list[torch.Tensor] | None:
        """ControlNet residuals for the conditional rows; unconditional CFG rows get none (as PixCell)."""
        if control is None:
            return None
        n = control.shape[0]
        res = self.controlnet(model_in[:n], t.expand(n).to(self.device), cond, control, conditioning_scale=scale)
        samples = res.controlnet_block_samples
        return [torch.cat([r, torch.zeros_like(r)]) for r in samples] if use_cfg else list(samples)

    def _denoise(self, x: torch.Tensor, cond: torch.Tensor, steps: int, guidance: float, bar,
                 control: torch.Tensor | None = None, control_scale: float = 1.0) -> torch.Tensor:
        """Run the scheduler loop for one chunk; CFG rows batched with the conditional ones."""
        x = x.to(self.device)
        self.scheduler.set_timesteps(steps, device=self.device)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow schedulers start at sigma 1
        use_cfg = guidance != 1.0
        n = x.shape[0]
        drop = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(self.device)
        for t in self.scheduler.timesteps:
            model_in = torch.cat([x, x]) if use_cfg else x
            if hasattr(self.scheduler, "scale_model_input"):
                model_in = self.scheduler.scale_model_input(model_in, t)
            model_in = model_in.to(self.dtype)
            pred = self.transformer(
                model_in,
                t.expand(model_in.shape[0]).to(self.device),
                torch.cat([cond, cond]) if use_cfg else cond,
                drop_condition=drop if use_cfg else None,
                controlnet_block_samples=self._control_residuals(model_in, t, cond, control, control_scale, use_cfg),
            ).sample.float()
            pred = pred[:, : self.vae.latent_channels]  # drop the learned-variance half, if any
            if use_cfg:
                cond_pred, uncond_pred = pred.chunk(2)
                pred = uncond_pred + guidance * (cond_pred - uncond_pred)
            x = self.scheduler.step(pred, t, x).prev_sample
            bar.update(1)
        return x

    def _decode(self, latents: torch.Tensor, output_type: str, batch_size: int):
        vae_dtype = next(self.vae.parameters(), torch.zeros((), dtype=self.dtype)).dtype
        pixels = torch.cat([
            self.vae.decode(latents[i : i + batch_size].to(self.device, vae_dtype)).float().cpu()
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

    try:
        return Path(snapshot_download(str(path_or_id), token=token, local_files_only=bool(local_files_only)))
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
    name = json.loads(config_file.read_text()).get("_class_name")
    cls = SCHEDULERS.get(name)
    if cls is None:
        raise ModelLoadError(f"unsupported scheduler {name!r} in {config_file}", fix=f"use one of {', '.join(SCHEDULERS)}")
    return cls.from_pretrained(directory)


def _enable_xformers(model: PixgenTransformer) -> None:
    """Use xformers attention on GPU when it is installed (the `gpu` extra); SDPA otherwise."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        return
    model.enable_xformers_memory_efficient_attention()
