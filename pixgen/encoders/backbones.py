"""Encoders over timm and transformers ViT backbones, and their loaders.

timm and transformers are imported inside the functions here, never at module import.

Hub layouts read and written:

* timm: ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg``) + ``model.safetensors``
  (or ``pytorch_model.bin``), as written by ``timm.models.push_to_hf_hub``;
* transformers: the ``save_pretrained`` layout (``config.json`` + ``model.safetensors``, plus the
  model's ``*.py`` files for ``trust_remote_code`` models).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pixgen.encoders.base import Encoder
from pixgen.encoders.hub import (
    hub_cached_snapshot,
    hub_download,
    hub_errors,
    hub_is_offline,
)
from pixgen.encoders.spec import EncoderSpec
from pixgen.errors import ModelLoadError

__all__ = ["TimmEncoder", "TransformersEncoder", "load_timm", "load_transformers"]

TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# timm constructor arguments that take classes; specs store them as dotted import paths.
LAYER_KWARGS = ("mlp_layer", "act_layer", "norm_layer", "embed_layer", "block_fn")


# --- timm -------------------------------------------------------------------------------------
class TimmEncoder(Encoder):
    """A timm ViT: tokens from ``forward_features``, patch tokens after ``num_prefix_tokens``."""

    def __init__(self, spec: EncoderSpec, backbone: nn.Module, hub_config: dict[str, Any]):
        super().__init__(spec, backbone)
        self.hub_config = hub_config  # config.json content (JSON-only model_args) for saving

    def forward_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.backbone.forward_features(pixel_values)  # (N, prefix + P, D)
        return tokens[:, 0], tokens[:, self.backbone.num_prefix_tokens :]

    def save_backbone(self, directory: Path) -> None:
        from safetensors.torch import save_file

        config = dict(self.hub_config)
        config["pretrained_cfg"] = {
            **config.get("pretrained_cfg", {}),
            "input_size": [3, self.input_size, self.input_size],
            "mean": list(self.mean),
            "std": list(self.std),
            "num_classes": 0,
        }
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.backbone.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))


def load_timm(spec: EncoderSpec, local_path: str | None, token: str | None) -> TimmEncoder:
    """Loader for library ``"timm"``: Hub id or local Hub-layout directory -> `TimmEncoder`."""
    config_file, weights_file = _timm_files(spec, local_path, token)
    config = json.loads(config_file.read_text())
    if "architecture" not in config:
        raise ModelLoadError(
            f"{config_file} has no 'architecture' entry, so it is not a timm config",
            fix="point local_path at a directory saved by timm (push_to_hf_hub / save_for_hf) or pixgen",
        )
    model = _build_timm(spec, config, weights_file)
    if not hasattr(model, "num_prefix_tokens"):
        raise ModelLoadError(
            f"timm architecture {config['architecture']!r} is not a ViT-style token model",
            fix="use a Vision Transformer backbone (CLS token + patch tokens)",
        )
    _check_width(spec, model.num_features)
    hub_config = {**config, "num_classes": 0, "model_args": _json_args(config, spec)}
    return TimmEncoder(spec, model, hub_config)


def _timm_files(spec: EncoderSpec, local_path: str | None, token: str | None) -> tuple[Path, Path]:
    if local_path is not None:
        directory = _local_dir(spec, local_path)
        weights = [directory / name for name in TIMM_WEIGHT_FILES if (directory / name).is_file()]
        if not (directory / "config.json").is_file() or not weights:
            raise ModelLoadError(
                f"{directory} is not a timm Hub-layout directory (needs config.json and one of "
                f"{', '.join(TIMM_WEIGHT_FILES)})",
                fix="download the Hub repository files into that directory, or save the encoder with save_pretrained",
            )
        return directory / "config.json", weights[0]
    repo = _require_hub_id(spec)
    offline = hub_is_offline()
    with hub_errors(spec, offline=offline):
        config = hub_download(repo, "config.json", token=token, offline=offline)
        return config, _hub_weights(repo, token, offline)


def _hub_weights(repo: str, token: str | None, offline: bool) -> Path:
    from huggingface_hub.errors import EntryNotFoundError

    missing: EntryNotFoundError | None = None
    for name in TIMM_WEIGHT_FILES:
        try:
            return hub_download(repo, name, token=token, offline=offline)
        except EntryNotFoundError as err:
            missing = err
    raise missing  # type: ignore[misc]


def _build_timm(spec: EncoderSpec, config: dict[str, Any], weights: Path) -> nn.Module:
    import timm

    kwargs = {**config.get("model_args", {}), **_resolve_layers(spec.model_kwargs), "num_classes": 0}
    try:
        return timm.create_model(
            config["architecture"],
            pretrained=True,
            pretrained_cfg_overlay={"file": str(weights), "custom_load": False},
            **kwargs,
        )
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise ModelLoadError(
            f"could not build timm encoder '{spec.name}' from {weights}: {str(err).splitlines()[0][:300]}",
            fix="check that the weights belong to this encoder and that spec.model_kwargs match the checkpoint",
        ) from err


def _resolve_layers(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Replace dotted paths ("timm.layers.SwiGLUPacked") in layer arguments by the classes."""
    return {k: _import_dotted(v) if k in LAYER_KWARGS and _is_dotted(v) else v for k, v in kwargs.items()}


def _is_dotted(value: Any) -> bool:
    return isinstance(value, str) and "." in value


def _import_dotted(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ModelLoadError(f"cannot import {path!r} named in the encoder's model_kwargs", fix="check the dotted path") from err


def _json_args(config: dict[str, Any], spec: EncoderSpec) -> dict[str, Any]:
    """model_args for the saved config.json: checkpoint args plus the spec's JSON-only kwargs.

    Layer classes stay in the spec (``pixgen_encoder.json``), as on the Hub where they are
    passed by the caller, so that config.json stays loadable by plain timm.
    """
    extra = {k: v for k, v in spec.model_kwargs.items() if k not in LAYER_KWARGS}
    return {**config.get("model_args", {}), **extra, "num_classes": 0}


# --- transformers -----------------------------------------------------------------------------
class TransformersEncoder(Encoder):
    """A transformers ViT / DINOv2: ``last_hidden_state`` with CLS, optional registers, patches."""

    def forward_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.backbone(pixel_values=pixel_values).last_hidden_state  # (N, prefix + P, D)
        prefix = 1 + int(getattr(self.backbone.config, "num_register_tokens", 0) or 0)
        return tokens[:, 0], tokens[:, prefix:]

    def save_backbone(self, directory: Path) -> None:
        self.backbone.save_pretrained(directory)


def load_transformers(spec: EncoderSpec, local_path: str | None, token: str | None) -> TransformersEncoder:
    """Loader for library ``"transformers"``: ``AutoModel.from_pretrained`` on a Hub id or directory.

    ``spec.model_kwargs`` go to ``from_pretrained`` (e.g. ``{"trust_remote_code": True}``).
    """
    from transformers import AutoModel

    kwargs = spec.model_kwargs
    if local_path is not None:
        directory = _local_dir(spec, local_path)
        if not (directory / "config.json").is_file():
            raise ModelLoadError(
                f"{directory} has no config.json, so it is not a transformers model directory",
                fix="save the model with save_pretrained, or download the Hub repository files there",
            )
        try:
            model = AutoModel.from_pretrained(str(directory), local_files_only=True, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"could not load transformers encoder '{spec.name}' from {directory}: {str(err).splitlines()[0][:300]}",
                fix="check the directory holds a complete save_pretrained output (config.json, weights, and "
                "the model's *.py files for trust_remote_code models)",
            ) from err
    else:
        repo = _require_hub_id(spec)
        offline = hub_is_offline()
        with hub_errors(spec, offline=offline):
            source = str(hub_cached_snapshot(repo, token=token)) if offline else repo
            model = AutoModel.from_pretrained(source, token=token, local_files_only=offline, **kwargs)
    _check_width(spec, int(model.config.hidden_size))
    return TransformersEncoder(spec, model)


# --- shared -----------------------------------------------------------------------------------
def _local_dir(spec: EncoderSpec, local_path: str) -> Path:
    directory = Path(local_path).expanduser()
    if not directory.is_dir():
        raise ModelLoadError(
            f"local_path for encoder '{spec.name}' is not a directory: {directory}",
            fix="pass the directory that holds config.json and the weights",
        )
    return directory


def _require_hub_id(spec: EncoderSpec) -> str:
    if spec.hub_id is None:
        raise ModelLoadError(
            f"encoder '{spec.name}' has source {spec.source!r}, not a Hub id ('hf-hub:org/repo')",
            fix="pass local_path= to a directory holding its weights",
        )
    return spec.hub_id


def _check_width(spec: EncoderSpec, width: int) -> None:
    if width != spec.embedding_width:
        raise ModelLoadError(
            f"backbone for '{spec.name}' has token width {width}, but the spec expects "
            f"{spec.embedding_width} (dim={spec.dim}, output={spec.output!r})",
            fix="check that local_path holds this encoder's weights, or fix the spec's dim",
        )
