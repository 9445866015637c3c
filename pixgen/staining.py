"""Virtual staining: an H&E image becomes an IHC image through the embedding space.

    H&E image --encoder--> H&E embedding (domain "he") --stain translator (flow)--> IHC embedding
    (domain "ihc-<marker>") --IHC generator--> IHC image

Each step checks what it is given: the translator refuses embeddings of another encoder or of a
domain other than H&E; the IHC generator refuses embeddings that were not translated to its
stain (:meth:`pixgen.embeddings.Embeddings.check_encoder`). Every refusal is one
:class:`~pixgen.errors.PixgenError` line with a fix.

Two model layouts load with :meth:`StainPipeline.from_pretrained`:

* pixgen's own: a folder with ``stain_model.json`` naming, per stain, a translator folder (an
  :class:`~pixgen.models.flow.EmbeddingFlow` with ``source="he"`` and ``domain="ihc-<marker>"``,
  as ``python -m training.tasks.translator`` exports it) and an IHC generator folder (a
  :class:`~pixgen.pipeline.Generator` with that domain, e.g. ``python -m training.tasks.lora``);
* PixCell's published one (``StonyBrook-CVLab/pixcell-virtual-staining``: ``ckpts/mlp/<name>_mlp.pth``
  and ``ckpts/lora/<name>_lora.pth``) over a PixCell-1024 base (``base=``), see :mod:`pixgen.pixcell`.

Stains load lazily (a PixCell LoRA file holds a whole 0.6 B transformer), on first use.
Regions of slides go through the large-image path (:mod:`pixgen.large`): the region's tiles are
embedded, translated as one grid and generated with overlapping windows (:meth:`StainPipeline.stain_region`).

Example:
    >>> pipe = StainPipeline.from_pretrained("runs/bci-stain")                     # doctest: +SKIP
    >>> ihc = pipe.stain(["he_tile.png"], to="her2", seed=0)                       # doctest: +SKIP
    >>> ihc[0].save("her2.png")                                                    # doctest: +SKIP
    >>> pipe = StainPipeline.from_pretrained("StonyBrook-CVLab/pixcell-virtual-staining",
    ...                                      vae_path="/models/sd35/vae", encoder_path="/models/UNI2-h")  # doctest: +SKIP
    >>> pipe.stain("he_1024.png", to="mist_her2")                                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixgen.embeddings import Embeddings
from pixgen.errors import EncoderMismatchError, InputError, ModelLoadError
from pixgen.pipeline import Generator
from pixgen.sampling import StepCallback

__all__ = [
    "HE_DOMAIN",
    "IHC_EOSIN_SHARE",
    "STAIN_MODEL_FILE",
    "StainPipeline",
    "StainResult",
    "StainTranslator",
    "check_mpp",
    "ihc_domain",
    "looks_like_ihc",
    "side_by_side",
    "stain_statistics",
    "write_stain_model",
]

STAIN_MODEL_FILE = "stain_model.json"
STAIN_MODEL_FORMAT = "pixgen-stain-model"
HE_DOMAIN = "he"
# An image whose tissue carries less than this share of eosin in colour deconvolution (skimage
# rgb2hed) looks like IHC, not H&E: on ../shared/data the 402 128-px crops of the 14 IHC images measured
# 0.000-0.073, H&E tiles 0.000-0.549 (3 % of CoNSeP below 0.08; docs/staining.md).
IHC_EOSIN_SHARE = 0.08
GLASS = 215  # a pixel whose darkest RGB channel is above this is empty glass, not tissue
MIN_TISSUE = 0.05  # below this tissue fraction an image is background: no stain verdict
MPP_TOLERANCE = 0.25  # relative difference of resolution accepted without an error
FLOW_STEPS = 20


def ihc_domain(marker: str) -> str:
    """The embedding domain of IHC tissue stained for ``marker``.

    Example:
        >>> ihc_domain("HER2")
        'ihc-her2'
    """
    return f"ihc-{marker.strip().lower()}"


# ------------------------------------------------------------------ bad input: IHC given as H&E
def stain_statistics(image: Any) -> dict[str, float]:
    """Mean hematoxylin, eosin and DAB densities over the tissue pixels of an RGB image
    (scikit-image ``rgb2hed``, negatives clipped), the eosin share ``e / (h + e + dab)`` and the
    tissue fraction. Pixel value 0 is read as 1: rgb2hed turns black JPEG pixels into outliers.

    Example:
        >>> stats = stain_statistics(np.full((8, 8, 3), 128, np.uint8))
        >>> sorted(stats)
        ['dab', 'eosin', 'eosin_share', 'hematoxylin', 'tissue']
    """
    from skimage.color import rgb2hed

    rgb = np.asarray(image)[..., :3]
    tissue = rgb.min(-1) < GLASS
    hed = np.clip(rgb2hed(np.maximum(rgb, 1))[tissue if tissue.any() else slice(None)], 0, None).reshape(-1, 3)
    h, e, d = (float(v) for v in hed.mean(0))
    return {"hematoxylin": h, "eosin": e, "dab": d, "eosin_share": e / max(h + e + d, 1e-9), "tissue": float(tissue.mean())}


def looks_like_ihc(image: Any) -> bool:
    """True when the tissue carries almost no eosin (IHC: hematoxylin + DAB), see ``IHC_EOSIN_SHARE``;
    an image with almost no tissue (background) is not judged."""
    stats = stain_statistics(image)
    return stats["tissue"] >= MIN_TISSUE and stats["eosin_share"] < IHC_EOSIN_SHARE


def _warn_if_ihc(images: Sequence[np.ndarray], names: Sequence[str]) -> None:
    flagged = [n for n, im in zip(names, images) if looks_like_ihc(im)]
    if flagged:
        shown = ", ".join(flagged[:3]) + (f" (+{len(flagged) - 3} more)" if len(flagged) > 3 else "")
        warnings.warn(f"{shown} look(s) like IHC, not H&E (almost no eosin in colour deconvolution); the stain "
                      "translator expects H&E input, so the output describes another tissue than intended",
                      stacklevel=3)


# ------------------------------------------------------------------ the translator
class _PixCellVelocity(torch.nn.Module):
    """PixCell's flow MLP in pixgen's flow convention (:func:`pixgen.models.flow.sample_flow`):
    pixgen integrates ``x_s = (1 - s) target + s source`` from s = 1 with velocity ``source - target``
    at timestep ``s * 1000``; PixCell's ``t = 1 - s`` runs from H&E (0) to IHC (1) with velocity
    ``ihc - he`` at timestep ``999 t``; so pixgen's velocity is minus PixCell's."""

    def __init__(self, mlp: torch.nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, sample, timestep, class_labels=None, condition=None, drop_condition=None):
        from pixgen.models.flow import EmbeddingFlowOutput

        t = 1.0 - timestep.float() / 1000.0
        return EmbeddingFlowOutput(sample=-self.mlp(sample, 999.0 * t))


class StainTranslator:
    """Maps H&E embeddings to IHC embeddings of one marker with a rectified flow (Euler steps).

    Args:
        velocity: a pixgen-convention velocity model (an :class:`~pixgen.models.flow.EmbeddingFlow`
            trained with ``source`` = H&E embeddings; PixCell's MLP is wrapped by :meth:`from_pixcell`).
        encoder: the encoder both embedding spaces belong to (registry name).
        marker: the IHC marker (``her2``, ``ki67`` ...); the output domain is ``ihc-<marker>``.
        steps: Euler steps from the H&E to the IHC embedding.

    Example:
        >>> from pixgen.models.flow import EmbeddingFlow
        >>> t = StainTranslator(EmbeddingFlow(dim=8, hidden=16, num_blocks=1, source="he"), encoder="e", marker="her2")
        >>> t.translate(Embeddings(torch.zeros(2, 8), encoder="e")).domain
        'ihc-her2'
    """

    def __init__(self, velocity: torch.nn.Module, *, encoder: str | None, marker: str, steps: int = FLOW_STEPS,
                 dim: int | None = None):
        self.velocity, self.encoder, self.marker, self.steps = velocity.eval(), encoder, marker.lower(), int(steps)
        self.dim = dim if dim is not None else int(velocity.config.dim)

    @property
    def domain(self) -> str:
        return ihc_domain(self.marker)

    @classmethod
    def from_flow(cls, folder: str | Path, steps: int | None = None) -> StainTranslator:
        """A translator folder written by ``python -m training.tasks.translator`` (EmbeddingFlow layout)."""
        from pixgen.models.flow import EmbeddingFlow

        folder = Path(folder)
        try:
            flow = EmbeddingFlow.from_pretrained(folder).float()
        except (OSError, ValueError, TypeError) as err:
            raise ModelLoadError(f"cannot load the stain translator in {folder}: {str(err).splitlines()[0][:160]}",
                                 fix="pass a translator folder written by python -m training.tasks.translator") from err
        cfg = flow.config
        if cfg.source != HE_DOMAIN or not (cfg.domain or "").startswith("ihc-"):
            raise ModelLoadError(f"{folder} is an embedding flow from {cfg.source!r} to {cfg.domain!r}, not a stain "
                                 "translator from 'he' to 'ihc-<marker>'",
                                 fix="train one with python -m training.tasks.translator")
        return cls(flow, encoder=cfg.encoder, marker=cfg.domain.removeprefix("ihc-"),
                   steps=steps or FLOW_STEPS)

    @classmethod
    def from_pixcell(cls, path: str | Path, marker: str, steps: int | None = None,
                     encoder: str = "uni2-h") -> StainTranslator:
        """PixCell's published flow MLP (``ckpts/mlp/<name>_mlp.pth``) on UNI2-h embeddings."""
        from pixgen.pixcell import load_pixcell_flow_mlp

        mlp = load_pixcell_flow_mlp(path)
        return cls(_PixCellVelocity(mlp), encoder=encoder, marker=marker, steps=steps or FLOW_STEPS,
                   dim=mlp.config.in_channels)

    def check(self, emb: Embeddings) -> None:
        """Refuse embeddings of another encoder, width or domain (one line, with the fix)."""
        if emb.values.shape[-1] != self.dim:
            raise EncoderMismatchError(f"embeddings have dim {emb.values.shape[-1]}, the {self.marker} translator "
                                       f"takes {self.dim} ({self.encoder})",
                                       fix=f"embed the H&E images with {self.encoder or 'the translator’s encoder'}")
        if self.encoder and emb.encoder and emb.encoder != self.encoder:
            raise EncoderMismatchError(f"embeddings come from encoder {emb.encoder!r}, the {self.marker} translator "
                                       f"was trained on {self.encoder!r}", fix=f"re-embed the H&E images with {self.encoder!r}")
        if emb.domain not in (HE_DOMAIN, None):
            raise EncoderMismatchError(f"embeddings describe {emb.domain!r} tissue, the translator maps H&E ('he') "
                                       f"to {self.domain!r}", fix="pass embeddings of H&E images")

    @torch.no_grad()
    def translate(self, emb: Embeddings) -> Embeddings:
        """(N, T, D) H&E embeddings -> the same shape in ``ihc-<marker>``, token by token."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.check(emb)
        n, tokens, dim = emb.values.shape
        param = next(self.velocity.parameters())
        x = emb.values.reshape(-1, dim).to(param.device, param.dtype)
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        # a uniform grid s = 1, 1 - 1/n, ..., 1/n (PixCell's Euler steps from H&E to IHC); diffusers'
        # default grid for n steps ends with a step of 0.001, which sample_flow's priors are tuned to
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / self.steps, self.steps).tolist(), device=x.device)
        for t in sched.timesteps:
            x = sched.step(self.velocity(x, t.expand(len(x))).sample, t, x).prev_sample
        return Embeddings(x.float().cpu().reshape(n, tokens, dim), encoder=self.encoder or emb.encoder,
                          ids=list(emb.ids), domain=self.domain)


# ------------------------------------------------------------------ one stain, loaded lazily
@dataclass
class _Stain:
    name: str
    marker: str
    load_translator: Callable[[], StainTranslator | None]  # None: the direct baseline (no translator)
    load_generator: Callable[[], Generator]
    source: dict[str, str] = field(default_factory=dict)
    _loaded: tuple[StainTranslator | None, Generator] | None = None

    def get(self, device: Any = None) -> tuple[StainTranslator | None, Generator]:
        if self._loaded is None:
            translator, gen = self.load_translator(), self.load_generator()
            if device is not None:
                gen.to(device)
                if translator is not None:
                    translator.velocity.to(device)
            if translator is not None:
                _check_pair(self.name, translator, gen)
            self._loaded = (translator, gen)
        return self._loaded


def _check_pair(name: str, translator: StainTranslator, gen: Generator) -> None:
    if gen.config.get("domain") != translator.domain:
        raise ModelLoadError(f"stain {name!r}: the generator makes {gen.config.get('domain')!r} images, the "
                             f"translator maps to {translator.domain!r}",
                             fix="pair a translator and an IHC generator of the same marker in stain_model.json")
    enc = gen.config.get("encoder")
    if translator.encoder and enc and translator.encoder != enc:
        raise ModelLoadError(f"stain {name!r}: the translator works on {translator.encoder!r} embeddings, the "
                             f"generator on {enc!r}", fix="train both on embeddings of the same encoder")


@dataclass
class StainResult:
    """What :meth:`StainPipeline.run` made: ``images`` (IHC, PIL), the ``he`` inputs as loaded, the
    H&E and translated ``embeddings``, the ``seeds`` and the settings used."""

    images: list[Image.Image]
    he: list[np.ndarray]
    he_embeddings: Embeddings | None
    ihc_embeddings: Embeddings
    seeds: list[int | None]
    settings: dict[str, Any]


class StainPipeline:
    """H&E -> IHC (see the module docstring). Build it with :meth:`from_pretrained`.

    Args:
        stains: name -> :class:`_Stain` (loaders of a translator and an IHC generator).
        device: where models go when a stain loads.
    """

    def __init__(self, stains: dict[str, _Stain], device: Any = None, source: str | None = None):
        if not stains:
            raise ModelLoadError("a stain model needs at least one stain", fix="list stains in stain_model.json")
        self._stains, self.device, self.source = stains, device, source

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, base: str | Path | None = None, token: str | None = None,
                        local_files_only: bool | None = None, vae_path: str | Path | None = None,
                        encoder_path: str | Path | None = None, device: str | torch.device | None = None,
                        flow_steps: int | None = None, trust_remote_code: bool = False) -> StainPipeline:
        """A stain model from a local folder or a hub id (pixgen's layout or PixCell's, see the module
        docstring). ``base``: the PixCell-1024 folder or hub id PixCell's LoRAs adapt (default
        ``StonyBrook-CVLab/PixCell-1024``); ``vae_path`` / ``encoder_path``: local SD3.5 VAE and
        UNI2-h weights (offline clusters, gated hubs); ``flow_steps``: Euler steps of the translators.

        Example:
            >>> StainPipeline.from_pretrained("runs/bci-stain").stains           # doctest: +SKIP
            ['her2']
        """
        root = _resolve_stain_model(path_or_id, token, local_files_only)
        load = {"token": token, "vae_path": vae_path, "encoder_path": encoder_path, "trust_remote_code": trust_remote_code}
        if (root / STAIN_MODEL_FILE).is_file():
            stains = _pixgen_stains(root, flow_steps, load, local_files_only)
        elif _is_direct_baseline(root):
            stains = _direct_stains(root, load, local_files_only)
        else:
            from pixgen import pixcell

            if not (root / pixcell.STAIN_MLP_DIR).is_dir():
                raise ModelLoadError(f"{path_or_id} is not a stain model (no {STAIN_MODEL_FILE}, no "
                                     f"{pixcell.STAIN_MLP_DIR}/)", fix="pass a folder written by the staining "
                                     f"training commands, or {pixcell.STAIN_REPO}")
            stains = _pixcell_stains(root, str(path_or_id), base or pixcell.STAIN_BASE, flow_steps, load,
                                     local_files_only)
        return cls(stains, device=device, source=str(path_or_id))

    @property
    def stains(self) -> list[str]:
        """The stains this model can make (``to=`` values)."""
        return sorted(self._stains)

    def stain_name(self, to: str) -> str:
        """The stain ``to`` names: a stain name, or a marker that exactly one stain makes."""
        key = to.strip().lower()
        if key in self._stains:
            return key
        by_marker = [n for n, s in self._stains.items() if s.marker == key]
        if len(by_marker) == 1:
            return by_marker[0]
        if by_marker:
            raise InputError(f"--to {to} matches several stains: {', '.join(sorted(by_marker))}",
                             fix=f"name one of them, e.g. --to {min(by_marker)}")
        raise InputError(f"this stain model has no translator for {to!r}",
                         fix=f"available: {', '.join(self.stains)} (markers: "
                             f"{', '.join(sorted({s.marker for s in self._stains.values()}))})")

    def components(self, to: str) -> tuple[StainTranslator | None, Generator]:
        """(translator, IHC generator) of a stain, loaded on first use; the translator is None for
        the direct baseline (:func:`direct_stain`)."""
        return self._stains[self.stain_name(to)].get(self.device)

    def describe(self) -> dict[str, Any]:
        """Stains, markers and where their weights come from (for ``pixgen stain --list``)."""
        return {name: {"marker": s.marker, "domain": ihc_domain(s.marker), **s.source} for name, s in
                sorted(self._stains.items())}

    # ------------------------------------------------------------------ tiles
    def embed(self, images: Sequence[Any], to: str, mpp: float | None = None,
              names: Sequence[str] | None = None) -> tuple[Embeddings, list[np.ndarray]]:
        """H&E images (paths, PIL, uint8 arrays) -> their embeddings by the stain's encoder, tagged
        ``he``, and the images as loaded. Warns on IHC-looking input; refuses a wrong ``mpp``."""
        _, gen = self.components(to)
        arrays, names = _load_images(images, names)
        check_mpp(mpp, gen)
        _warn_if_ihc(arrays, names)
        return _embed_tiles(gen, arrays, HE_DOMAIN, names), arrays

    @torch.no_grad()
    def run(self, images: Sequence[Any] | None = None, to: str = "her2", *, embeddings: Embeddings | None = None,
            seed: int | None = 0, num_inference_steps: int | None = None, guidance_scale: float | None = None,
            mpp: float | None = None, batch_size: int = 8, progress: bool = False,
            names: Sequence[str] | None = None, callback: StepCallback | None = None) -> StainResult:
        """Stain H&E ``images`` (or H&E ``embeddings``) to ``to``: one IHC image per input; image
        ``i`` uses seed ``seed + i``. Returns a :class:`StainResult` (see :meth:`stain` for images only).

        Args:
            callback: the sampler's per-step callback, ``callback(step, timestep, latents, x0)``
                per step of each batch of ``batch_size`` images (the direct baseline: per step of
                one batch of all images); returning False raises
                :class:`~pixgen.sampling.SamplingCancelled` and nothing is returned.

        Example:
            >>> result = pipe.run(["a.png"], to="her2", callback=lambda *step: not stop.is_set())  # doctest: +SKIP
        """
        translator, gen = self.components(to)
        if (images is None) == (embeddings is None):
            raise InputError("give H&E images or H&E embeddings (one of them)")
        he_arrays: list[np.ndarray] = []
        if translator is None:  # the direct baseline: H&E images only, no translator
            if images is None:
                raise InputError("the direct baseline stains H&E images, not embeddings", fix="pass H&E tiles")
            check_mpp(mpp, gen)
            ims, he_arrays, cond = _direct_stain(gen, images, seed or 0, num_inference_steps, guidance_scale, names,
                                                 callback)
            he = Embeddings(cond.values, encoder=cond.encoder, ids=cond.ids, domain=HE_DOMAIN)
            return StainResult(ims, he_arrays, he, cond, [(seed or 0) + i for i in range(len(ims))],
                               {"stain": self.stain_name(to), "marker": self._stains[self.stain_name(to)].marker,
                                "flow_steps": None, "direct": True})
        if images is not None:
            embeddings, he_arrays = self.embed(images, to, mpp=mpp, names=names)
        ihc = translator.translate(embeddings)
        out = gen.generate(ihc, num_images=1, seed=seed, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, batch_size=batch_size, progress=progress, callback=callback)
        settings = {"stain": self.stain_name(to), "marker": translator.marker, "flow_steps": translator.steps,
                    **out.extra}
        return StainResult(out.images, he_arrays, embeddings, ihc, out.seeds, settings)

    def stain(self, images: Sequence[Any], to: str = "her2", *, seed: int | None = 0, **kwargs: Any) -> list[Image.Image]:
        """H&E tiles (paths, PIL images, uint8 arrays) -> IHC tiles (PIL), one per input.

        Keywords: ``num_inference_steps``, ``guidance_scale`` (default: the IHC generator's),
        ``mpp`` (the inputs' resolution, checked against the model's), ``batch_size``, ``progress``,
        ``callback`` (the sampler's per-step callback: returning False cancels with
        :class:`~pixgen.sampling.SamplingCancelled`; see :meth:`run`).

        Example:
            >>> pipe.stain(["a.png", "b.png"], to="her2", seed=0)[0].size     # doctest: +SKIP
            (1024, 1024)
            >>> pipe.stain(["a.png"], to="her2", callback=lambda step, t, x, x0: step < 5)  # cancels at step 6  # doctest: +SKIP
        """
        return self.run(images, to, seed=seed, **kwargs).images

    # ------------------------------------------------------------------ regions (large-image path)
    def stain_region(self, slide: str | Path, out: str | Path, to: str = "her2", *,
                     region: tuple[int, int, int, int] | None = None, slide_mpp: float | None = None, seed: int = 0,
                     num_inference_steps: int | None = None, guidance_scale: float | None = None,
                     overlap: int | None = None, batch_size: int = 16, progress: bool = False,
                     **large_kwargs: Any) -> tuple[dict[str, Any], np.ndarray]:
        """Stain a slide region into one seamless IHC image ``out`` (``.ome.tiff`` or ``.png``) with
        :func:`pixgen.large.generate_large`: the region is read at the model's mpp and cut into the
        model's cells (:func:`pixgen.large.layout_from_slide`), the cells' H&E embeddings are
        translated as one grid, and the IHC generator samples overlapping windows on that layout.
        Returns (the large-image summary, the H&E region at the model's mpp). ``large_kwargs`` go to
        :func:`~pixgen.large.generate_large` (``tile``, ``compression``, ``callback``: the per window
        batch and step callback, whose cancel leaves ``OUT.partial/`` to resume).

        Example:
            >>> summary, he = pipe.stain_region("slide.svs", "her2.ome.tiff", to="her2", region=(0, 0, 4096, 4096))  # doctest: +SKIP
        """
        from pixgen.large import Layout, generate_large, layout_from_slide

        translator, gen = self.components(to)
        if translator is None:
            raise InputError("the direct baseline stains tiles of its own size, not slide regions",
                             fix="stain the region's tiles, or use a stain model with a translator")
        layout, real = layout_from_slide(gen, slide, region, slide_mpp=slide_mpp)
        _warn_if_ihc([real], [str(slide)])
        rows, cols, dim = layout.grid.shape
        # layout_from_slide tags the grid with the generator's domain (it makes twins); these are H&E tiles
        he = Embeddings(layout.grid.reshape(rows * cols, dim), encoder=layout.encoder, domain=HE_DOMAIN)
        ihc = translator.translate(he)
        ihc.check_encoder(gen.config.get("encoder"), gen.transformer.config.caption_channels, gen.config.get("domain"))
        grid = Layout(ihc.values.reshape(rows, cols, dim), layout.cell, encoder=ihc.encoder, domain=ihc.domain)
        summary = generate_large(gen, grid, out, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                 seed=seed, overlap=overlap, batch_size=batch_size, progress=progress, **large_kwargs)
        return {**summary, "stain": self.stain_name(to), "flow_steps": translator.steps}, real


@torch.no_grad()
def direct_stain(gen: Generator, images: Sequence[Any], *, seed: int = 0, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None) -> list[Image.Image]:
    """The direct baseline (``python -m training.tasks.stain_controlnet``): H&E tiles of the model's
    size -> IHC tiles, with no translator. The H&E image reaches the IHC generator twice: as its
    VAE latents through the ControlNet, and as its own embedding for the condition tokens (the
    baseline was trained so; ``stain_baseline`` in its config says it). Image ``i`` uses seed ``seed + i``.

    Example:
        >>> gen = Generator.from_pretrained("runs/bci-her2-controlnet/final")      # doctest: +SKIP
        >>> direct_stain(gen, ["he_1024.png"], seed=0)[0].save("her2_direct.png")  # doctest: +SKIP
    """
    return _direct_stain(gen, images, seed, num_inference_steps, guidance_scale)[0]


def _direct_stain(gen: Generator, images: Any, seed: int, num_inference_steps: int | None,
                  guidance_scale: float | None, names: Sequence[str] | None = None,
                  callback: StepCallback | None = None) -> tuple[list[Image.Image], list[np.ndarray], Embeddings]:
    """:func:`direct_stain`'s images, the H&E tiles as loaded and the condition tokens used."""
    from pixgen.encoders.images import to_uint8_batch
    from pixgen.sampling import check_sampling_args, sample

    if gen.controlnet is None or not gen.config.get("stain_baseline"):
        raise ModelLoadError("this model is not a direct staining baseline (no controlnet/ or no stain_baseline)",
                             fix="pass RUN/final of python -m training.tasks.stain_controlnet")
    arrays, names = _load_images(images, names)
    size = gen.config["image_size"]
    if any(a.shape[:2] != (size, size) for a in arrays):
        raise InputError(f"the direct baseline takes {size} x {size} px H&E tiles",
                         fix=f"crop the tiles to {size} px at {gen.config.get('mpp')} um/px")
    _warn_if_ihc(arrays, names)
    # the baseline's condition is the H&E embedding itself, in the generator's own domain by training
    cond = _embed_tiles(gen, arrays, gen.config.get("domain"), names)
    gen.check_conditions(cond)
    steps, guidance, _ = check_sampling_args(num_inference_steps or gen.config["num_inference_steps"],
                                             gen.config["guidance_scale"] if guidance_scale is None else guidance_scale)
    pixels = to_uint8_batch(arrays).float().to(gen.device) / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
    control = gen.vae.encode(pixels.to(gen.dtype)).to(gen.dtype)
    noise = gen.initial_noise([seed + i for i in range(len(arrays))])
    latents = sample(gen.transformer, gen.scheduler, noise.to(gen.device, gen.dtype), cond.values.to(gen.device),
                     num_inference_steps=steps, guidance_scale=guidance, controlnet=gen.controlnet, control=control,
                     callback=callback)
    out = ((gen.vae.decode(latents.to(gen.dtype)).float().cpu() + 1) / 2).clamp(0, 1)
    images = [Image.fromarray(a) for a in (out.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)]
    return images, arrays, cond

def _load_images(images: Any, names: Sequence[str] | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Paths / PIL images / arrays -> RGB uint8 arrays, and a name per image."""
    from pixgen.io import load_rgb

    images = [images] if isinstance(images, (str, Path, Image.Image, np.ndarray)) else list(images)
    if not images:
        raise InputError("no H&E images given", fix="pass at least one image")
    names = list(names) if names is not None else \
        [str(im) if isinstance(im, (str, Path)) else f"image[{i}]" for i, im in enumerate(images)]
    arrays = [load_rgb(im) if isinstance(im, (str, Path)) else
              np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im)[..., :3] for im in images]
    return arrays, names


def _embed_tiles(gen: Generator, arrays: Sequence[np.ndarray], domain: str | None,
                 names: Sequence[str] | None = None) -> Embeddings:
    """Condition tokens of tiles by the generator's encoder (a grid for grid models), tagged ``domain``."""
    enc = gen.encoder
    tokens = gen.transformer.config.caption_num_tokens
    values = enc.embed_grid(arrays, grid=round(tokens**0.5)) if tokens > 1 else enc.embed(arrays)
    return Embeddings(values, encoder=enc.spec.name, ids=list(names or []), domain=domain)


def check_mpp(mpp: float | None, gen: Generator) -> None:
    """Refuse inputs whose stated resolution differs from the model's by more than ``MPP_TOLERANCE``."""
    want = gen.config.get("mpp")
    if mpp is None or not want:
        return
    if mpp <= 0 or abs(mpp / want - 1) > MPP_TOLERANCE:
        raise InputError(f"the H&E images are at {mpp} um/px, the stain model works at {want} um/px",
                         fix=f"resample them to {want} um/px (e.g. pixgen tile --mpp {want}) or stain a slide "
                             "region, which is read at the model's resolution")


def side_by_side(he: Sequence[Any], ihc: Sequence[Image.Image], pad: int = 2) -> Image.Image:
    """One sheet with a row per input: H&E | IHC, the H&E resized to the IHC image's size.

    Example:
        >>> side_by_side([np.zeros((8, 8, 3), np.uint8)], [Image.new("RGB", (8, 8))]).size
        (22, 12)
    """
    from pixgen.io import contact_sheet

    if len(he) != len(ihc) or not ihc:
        raise InputError(f"{len(he)} H&E and {len(ihc)} IHC images: a sheet needs pairs")
    size = ihc[0].size
    cells = []
    for a, b in zip(he, ihc):
        a = a if isinstance(a, Image.Image) else Image.fromarray(np.asarray(a, np.uint8))
        cells += [a.convert("RGB").resize(size, Image.BICUBIC), b.convert("RGB")]
    return contact_sheet(cells, columns=2, pad=pad)


# ------------------------------------------------------------------ layouts
def _resolve_stain_model(path_or_id: str | Path, token: str | None, local_files_only: bool | None) -> Path:
    local = Path(path_or_id)
    if local.is_dir():
        return local
    if local.exists() or str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1:
        raise ModelLoadError(f"no stain model at {path_or_id}",
                             fix="pass a stain-model folder (stain_model.json) or a hub id owner/name")
    from huggingface_hub import snapshot_download

    try:  # configs and translators now; a stain's generator weights when it is first used
        return Path(snapshot_download(str(path_or_id), token=token, local_files_only=bool(local_files_only),
                                      allow_patterns=["*.json", "ckpts/mlp/*", "*/translator/*"]))
    except Exception as err:  # hub errors have many types; the message is what matters
        raise ModelLoadError(f"could not fetch {path_or_id!r} from the hub ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:160]})",
                             fix="check the id and your network, or download it and pass the local folder") from err


def _hub_file(repo: str, root: Path, name: str, token: str | None, local_files_only: bool | None) -> Path:
    """``root/name`` when present, else that file of hub ``repo`` (downloaded on first use)."""
    if (root / name).is_file():
        return root / name
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, name, token=token, local_files_only=bool(local_files_only)))
    except Exception as err:
        raise ModelLoadError(f"missing {name} (not in {root}, and the hub said {type(err).__name__})",
                             fix=f"download {repo}/{name} and place it under {root}") from err


def _pixgen_stains(root: Path, flow_steps: int | None, load: dict[str, Any],
                   local_files_only: bool | None) -> dict[str, _Stain]:
    try:
        spec = json.loads((root / STAIN_MODEL_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"corrupt {root / STAIN_MODEL_FILE}: {err}", fix="re-write it (docs/staining.md)") from err
    if spec.get("format") != STAIN_MODEL_FORMAT or not isinstance(spec.get("stains"), dict):
        raise ModelLoadError(f"{root / STAIN_MODEL_FILE} is not a pixgen stain model",
                             fix=f'it needs "format": "{STAIN_MODEL_FORMAT}" and "stains": {{name: {{...}}}}')
    stains = {}
    for name, entry in spec["stains"].items():
        try:
            tr, gen_path = root / entry["translator"], entry["generator"]
        except (KeyError, TypeError):
            raise ModelLoadError(f"stain {name!r} in {root / STAIN_MODEL_FILE} lacks 'translator' or 'generator'",
                                 fix="give both folders (relative to the stain model) for each stain") from None
        gen_ref = root / gen_path if (root / gen_path).exists() else gen_path  # a folder here, or a hub id

        def translator(tr=tr):
            return StainTranslator.from_flow(tr, steps=flow_steps)

        def generator(ref=gen_ref):
            return Generator.from_pretrained(ref, local_files_only=local_files_only, **load)

        marker = str(entry.get("marker", name)).lower()
        stains[name.lower()] = _Stain(name.lower(), marker, translator, generator,
                                      {"translator": str(entry["translator"]), "generator": str(gen_path)})
    return stains


def _pixcell_stains(root: Path, repo: str, base: str | Path, flow_steps: int | None, load: dict[str, Any],
                    local_files_only: bool | None) -> dict[str, _Stain]:
    from pixgen import pixcell

    names = sorted(p.name.removesuffix("_mlp.pth") for p in (root / pixcell.STAIN_MLP_DIR).glob("*_mlp.pth"))
    if not names:
        raise ModelLoadError(f"no *_mlp.pth in {root / pixcell.STAIN_MLP_DIR}",
                             fix=f"download the ckpts/ folder of {pixcell.STAIN_REPO}")
    stains = {}
    for name in names:
        marker = name.split("_", 1)[1] if name.startswith("mist_") else "her2"  # her2match is HER2

        def translator(name=name, marker=marker):
            return StainTranslator.from_pixcell(root / pixcell.STAIN_MLP_DIR / f"{name}_mlp.pth", marker, flow_steps)

        def generator(name=name, marker=marker):
            lora = _hub_file(repo, root, f"{pixcell.STAIN_LORA_DIR}/{name}_lora.pth", load["token"], local_files_only)
            gen = Generator.from_pretrained(base, local_files_only=local_files_only, **load)
            pixcell.load_stain_lora(gen.transformer, lora)
            gen.config.update({"domain": ihc_domain(marker), "guidance_scale": pixcell.STAIN_GUIDANCE})
            return gen

        stains[name] = _Stain(name, marker, translator, generator,
                              {"translator": f"{pixcell.STAIN_MLP_DIR}/{name}_mlp.pth",
                               "generator": f"{base} + {pixcell.STAIN_LORA_DIR}/{name}_lora.pth"})
    return stains


def _is_direct_baseline(root: Path) -> bool:
    try:
        return bool(json.loads((root / "model_index.json").read_text()).get("stain_baseline"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _direct_stains(root: Path, load: dict[str, Any], local_files_only: bool | None) -> dict[str, _Stain]:
    """A direct-baseline Generator folder as a one-stain model (its marker from its domain)."""
    marker = str(json.loads((root / "model_index.json").read_text()).get("domain", "ihc-")).removeprefix("ihc-")

    def generator():
        return Generator.from_pretrained(root, local_files_only=local_files_only, **load)

    return {marker: _Stain(marker, marker, lambda: None, generator, {"generator": str(root), "translator": "none "
                           "(direct baseline: H&E latents through its ControlNet)"})}


def write_stain_model(folder: str | Path, stains: dict[str, dict[str, str]]) -> Path:
    """Write ``stain_model.json`` into ``folder``: ``stains`` maps a name to ``translator`` and
    ``generator`` paths (relative to ``folder``, or a generator hub id) and an optional ``marker``.

    Example:
        >>> write_stain_model("runs/bci-stain", {"her2": {"translator": "translator", "generator": "generator"}})  # doctest: +SKIP
    """
    from pixgen.io import write_json_atomic

    return write_json_atomic(Path(folder) / STAIN_MODEL_FILE,
                             {"format": STAIN_MODEL_FORMAT, "version": 1, "stains": stains})

