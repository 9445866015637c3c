"""Text encoders: the registry of pathology CLIP-style text towers (CONCH, PLIP, QuiltNet), beside the image one.

A text encoder turns prompts into vectors a text-conditioned prior (:mod:`pixgen.prior`, trained
with ``python -m training.tasks.flow --condition FIELD`` on a cache field of text vectors) can take.
Loading follows the image encoders' rules (:mod:`pixgen.encoders.loading`): the Hub is asked only
for data files (``*.json``, ``*.txt``, ``*.safetensors``), a config that names custom code
(``auto_map``) is refused, pickled weights are never read, and ``local_path`` (a folder in the
Hub layout) replaces the download for gated or offline use.

Layouts: ``clip`` is transformers' ``CLIPModel`` / ``CLIPTextModelWithProjection`` folder
(``config.json`` + ``model.safetensors`` + tokenizer files), read as a text tower with its
projection. ``open_clip`` (QuiltNet's Hub files) and ``conch`` (CONCH's CoCa, its own package) are
registered with their facts but load only after conversion to the ``clip`` layout (see docs/prior.md).

Example:
    >>> enc = load_text_encoder("plip", local_path="/models/plip")        # doctest: +SKIP
    >>> enc.encode(["lung adenocarcinoma"]).shape                          # doctest: +SKIP
    torch.Size([1, 512])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from pixgen.encoders.backbones import read_json_file, weights_errors
from pixgen.encoders.hub import hub_errors, hub_is_offline, hub_snapshot
from pixgen.errors import InputError, ModelLoadError

__all__ = ["TextEncoderSpec", "TextEncoder", "TEXT_ENCODERS", "register_text_encoder", "get_text_encoder_spec",
           "list_text_encoders", "load_text_encoder"]

LAYOUTS = ("clip", "open_clip", "conch")


@dataclass(frozen=True)
class TextEncoderSpec:
    """Facts about one text tower: ``name`` (registry key), ``dim`` (projected embedding width),
    ``source`` (``hf-hub:org/repo``), ``layout`` (:data:`LAYOUTS`), ``gated``, ``licence``,
    ``description``, ``context_length`` (tokens) and ``revision`` (a Hub commit, or None)."""

    name: str
    dim: int
    source: str
    layout: str
    gated: bool = False
    licence: str = ""
    description: str = ""
    context_length: int = 77
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise InputError(f"text encoder layout must be one of {LAYOUTS}, got {self.layout!r}")

    @property
    def hub_id(self) -> str | None:
        return self.source.removeprefix("hf-hub:") if self.source.startswith("hf-hub:") else None


TEXT_ENCODERS: dict[str, TextEncoderSpec] = {}


def register_text_encoder(spec: TextEncoderSpec, *, overwrite: bool = False) -> TextEncoderSpec:
    """Add ``spec`` to the registry (``overwrite`` to replace an entry)."""
    key = spec.name.lower()
    if key in TEXT_ENCODERS and not overwrite:
        raise InputError(f"text encoder {spec.name!r} is already registered", fix="pass overwrite=True")
    TEXT_ENCODERS[key] = spec
    return spec


def get_text_encoder_spec(name: str) -> TextEncoderSpec:
    """The registered spec, or an :class:`InputError` listing the known names."""
    try:
        return TEXT_ENCODERS[name.lower()]
    except KeyError:
        raise InputError(f"unknown text encoder {name!r}", fix=f"use one of: {', '.join(sorted(TEXT_ENCODERS))}") from None


def list_text_encoders() -> list[TextEncoderSpec]:
    return [TEXT_ENCODERS[k] for k in sorted(TEXT_ENCODERS)]


for _spec in (
    TextEncoderSpec("plip", 512, "hf-hub:vinid/plip", "clip", licence="see the model card",
                    description="PLIP (Huang et al. 2023): CLIP ViT-B/32 fine-tuned on OpenPath pathology image-text pairs."),
    TextEncoderSpec("quiltnet", 512, "hf-hub:wisdomik/QuiltNet-B-32", "open_clip", licence="MIT",
                    description="QuiltNet-B-32 (Ikezogwo et al. 2023): OpenCLIP ViT-B/32 trained on Quilt-1M; the Hub "
                                "holds open_clip files with pickled weights: convert to the clip layout first."),
    TextEncoderSpec("conch", 512, "hf-hub:MahmoodLab/CONCH", "conch", gated=True, licence="CC BY-NC-ND 4.0",
                    description="CONCH (Lu et al. 2024): CoCa ViT-B/16 on 1.17M pathology image-caption pairs; gated, "
                                "needs its own package: convert its text tower to the clip layout first."),
):
    register_text_encoder(_spec)


class TextEncoder(nn.Module):
    """A tokenizer + CLIP text tower with projection; :meth:`encode` gives L2-normalised (N, dim) vectors."""

    def __init__(self, spec: TextEncoderSpec, model: nn.Module, tokenizer):
        super().__init__()
        self.spec, self.model, self.tokenizer = spec, model, tokenizer

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, dim) unit vectors for ``prompts``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.spec.context_length, return_tensors="pt")
        out = self.model(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))
        return torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)


def load_text_encoder(name: str, *, local_path: str | Path | None = None, token: str | None = None,
                      device: str | torch.device | None = None) -> TextEncoder:
    """Load a registered text encoder from the Hub (data files only) or from ``local_path``.

    Example:
        >>> load_text_encoder("conch")     # doctest: +SKIP
        ModelLoadError: ... gated ... request access ...
    """
    spec = get_text_encoder_spec(name)
    if local_path is not None:
        directory = Path(local_path).expanduser()
        if not directory.is_dir():
            raise ModelLoadError(f"local_path for text encoder '{spec.name}' is not a directory: {directory}",
                                 fix="pass the folder holding config.json, model.safetensors and the tokenizer files")
    else:
        if spec.layout != "clip":
            raise ModelLoadError(_convert_message(spec), fix=_convert_fix(spec))
        offline = hub_is_offline()
        with hub_errors(spec, offline=offline):  # type: ignore[arg-type]  (reads name / hub_id / gated / source)
            directory = hub_snapshot(spec.hub_id, token=token, revision=spec.revision, offline=offline,
                                     allow_patterns=["*.json", "*.txt", "*.safetensors"])
    model, tokenizer = _clip_text_tower(spec, directory)
    return TextEncoder(spec, model, tokenizer).to(device or "cpu").eval()


def _convert_message(spec: TextEncoderSpec) -> str:
    return (f"text encoder '{spec.name}' is published in the {spec.layout} layout, which pixgen does not read "
            "(it needs that project's code or pickled weights)")


def _convert_fix(spec: TextEncoderSpec) -> str:
    gate = f"request access at https://huggingface.co/{spec.hub_id}, " if spec.gated else ""
    return (f"{gate}convert its text tower to a transformers CLIP folder (config.json + model.safetensors + tokenizer "
            "files) where you trust the code, then pass local_path= to that folder")


def _clip_text_tower(spec: TextEncoderSpec, directory: Path):
    """A transformers CLIP text tower with projection and its tokenizer, from data files only."""
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection
    from transformers.utils import logging as hf_logging

    config_file = directory / "config.json"
    if not config_file.is_file():
        if (directory / "open_clip_config.json").is_file():
            raise ModelLoadError(f"{directory} holds open_clip files; " + _convert_message(spec), fix=_convert_fix(spec))
        raise ModelLoadError(f"{directory} has no config.json, so it is not a CLIP text-tower folder",
                             fix="save the model with save_pretrained, or download the Hub repository files there")
    raw = read_json_file(config_file)
    if "auto_map" in raw or "auto_map" in read_json_file_if(directory / "tokenizer_config.json"):
        raise ModelLoadError(f"{directory} asks for custom Python code (auto_map); pixgen never runs code named by a "
                             "model file", fix="use a folder transformers' CLIP classes read as they are")
    if not list(directory.glob("*.safetensors")):
        raise ModelLoadError(f"{directory} has no .safetensors weights; pixgen never unpickles .bin / .pt files",
                             fix="convert the weights to safetensors where you trust them, then load again")
    config = CLIPTextConfig.from_dict({**raw.get("text_config", raw), "projection_dim": raw.get("projection_dim", spec.dim)})
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a full CLIPModel file also holds the vision tower, which is not read
    try:
        with weights_errors(directory, f"text encoder '{spec.name}'"):
            model = CLIPTextModelWithProjection.from_pretrained(str(directory), config=config, local_files_only=True,
                                                                use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(level)
    if model.config.projection_dim != spec.dim:
        raise ModelLoadError(f"{directory} projects to {model.config.projection_dim}-d, '{spec.name}' is {spec.dim}-d",
                             fix=f"point local_path at '{spec.name}' weights")
    return model, tokenizer


def read_json_file_if(path: Path) -> dict:
    """``read_json_file`` for a file that may be absent (then ``{}``)."""
    return read_json_file(path) if path.is_file() else {}

