"""Encoders over timm and transformers ViT backbones, and their loaders.

timm and transformers are imported inside the functions here, never at module import.

Hub layouts read and written:

* timm: ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg``) + ``model.safetensors``
  (or ``pytorch_model.bin``, read by timm with ``weights_only=True``), as written by
  ``timm.models.push_to_hf_hub``;
* transformers: the ``save_pretrained`` layout (``config.json`` + ``model.safetensors``).

Loading runs no code from the files: ``config.json`` is checked like a spec (a timm architecture
name and plain-data model arguments), and a transformers ``config.json`` that asks for custom code
(``auto_map``) is refused unless `load_encoder` authorised it (``trust_remote_code=True`` on a
registry entry pinned to a commit). Hub downloads fetch only ``*.json`` and ``*.safetensors``
(plus ``*.py`` for such an authorised entry).
"""

from __future__ import annotations

import json
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from pixgen.encoders.base import Encoder
from pixgen.encoders.hub import (
    hub_download,
    hub_errors,
    hub_is_offline,
    hub_snapshot,
)
from pixgen.encoders.spec import LAYER_CLASSES, LAYER_KWARGS, EncoderSpec, check_model_kwargs, is_pinned
from pixgen.errors import InputError, ModelLoadError, PixgenError

__all__ = ["TimmEncoder", "TransformersEncoder", "load_timm", "load_transformers", "read_json_file", "weights_errors"]

TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


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
        from safetensors.torch import save

        from pixgen.io import write_bytes_atomic, write_json_atomic

        config = dict(self.hub_config)
        config["pretrained_cfg"] = {
            **config.get("pretrained_cfg", {}),
            "input_size": [3, self.input_size, self.input_size],
            "mean": list(self.mean),
            "std": list(self.std),
            "num_classes": 0,
        }
        write_json_atomic(directory / "config.json", config)
        state = {k: v.detach().contiguous() for k, v in self.backbone.state_dict().items()}
        write_bytes_atomic(directory / "model.safetensors", save(state))


def load_timm(spec: EncoderSpec, local_path: str | None, token: str | None) -> TimmEncoder:
    """Loader for library ``"timm"``: Hub id or local Hub-layout directory -> `TimmEncoder`."""
    config_file, weights_file = _timm_files(spec, local_path, token)
    config = read_json_file(config_file)
    _check_timm_config(config, config_file)
    model = _build_timm(spec, config, weights_file)
    if not hasattr(model, "num_prefix_tokens"):
        raise ModelLoadError(
            f"timm architecture {config['architecture']!r} is not a ViT-style token model",
            fix="use a Vision Transformer backbone (CLS token + patch tokens)",
        )
    _check_width(spec, model.num_features)
    hub_config = {**config, "num_classes": 0, "model_args": _json_args(config, spec)}
    return TimmEncoder(spec, model, hub_config)


def _check_timm_config(config: dict[str, Any], config_file: Path) -> None:
    """A timm config names a timm architecture and plain-data model arguments, nothing else."""
    import timm

    arch = config.get("architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(
            f"{config_file} has no 'architecture' entry, so it is not a timm config",
            fix="point local_path at a directory saved by timm (push_to_hf_hub / save_for_hf) or pixgen",
        )
    if not timm.is_model(arch):  # also refuses "hf-hub:..." names, which would download another repo
        raise ModelLoadError(
            f"{config_file} names architecture {arch!r}, which is not a timm model",
            fix="use a config.json written by timm or pixgen (architecture = a timm model name)",
        )
    _checked(config.get("model_args", {}), str(config_file))


def _checked(kwargs: Any, where: str) -> Any:
    try:
        check_model_kwargs(kwargs, where)
    except InputError as err:
        raise ModelLoadError(err.message, fix=err.fix) from None
    return kwargs


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
        config = hub_download(repo, "config.json", token=token, offline=offline, revision=spec.revision)
        return config, _hub_weights(repo, token, offline, spec.revision)


def _hub_weights(repo: str, token: str | None, offline: bool, revision: str | None) -> Path:
    from huggingface_hub.errors import EntryNotFoundError

    missing: EntryNotFoundError | None = None
    for name in TIMM_WEIGHT_FILES:
        try:
            return hub_download(repo, name, token=token, offline=offline, revision=revision)
        except EntryNotFoundError as err:
            missing = err
    raise missing  # type: ignore[misc]


def _build_timm(spec: EncoderSpec, config: dict[str, Any], weights: Path) -> nn.Module:
    import timm

    kwargs = {**config.get("model_args", {}), **_resolve_layers(spec.model_kwargs), "num_classes": 0}
    with weights_errors(weights, f"timm encoder '{spec.name}'"):
        return timm.create_model(
            config["architecture"],
            pretrained=True,
            pretrained_cfg_overlay={"file": str(weights), "custom_load": False},
            **kwargs,
        )


@contextmanager
def weights_errors(weights: Path, what: str) -> Iterator[None]:
    """Turn a corrupt, truncated or refused weights file inside the block into one `ModelLoadError`."""
    from safetensors import SafetensorError

    try:
        yield
    except PixgenError:
        raise
    except (RuntimeError, KeyError, TypeError, ValueError, OSError, EOFError, pickle.UnpicklingError,
            SafetensorError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        if isinstance(err, pickle.UnpicklingError) or "weights_only" in reason:
            raise ModelLoadError(
                f"{weights} holds pickled Python objects, which pixgen never unpickles ({what})",
                fix="use the model's .safetensors weights (or convert the checkpoint to safetensors where you trust it)",
            ) from err
        raise ModelLoadError(
            f"could not load {what} from {weights}: {reason}",
            fix=f"re-download or re-save {weights.name} (it may be truncated or corrupt), and check that the "
            "weights belong to this encoder",
        ) from err


def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a `ModelLoadError` naming the file when it is not valid JSON."""
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"corrupt {path}: {err}", fix=f"restore {Path(path).name} (re-download or re-save the encoder)") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"corrupt {path}: expected a JSON object", fix=f"restore {Path(path).name}")
    return data


def _resolve_layers(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Replace allowed dotted paths ("timm.layers.SwiGLUPacked") in layer arguments by the classes."""
    return {k: _layer_class(v) if k in LAYER_KWARGS and v in LAYER_CLASSES else v for k, v in kwargs.items()}


def _layer_class(path: str) -> Any:
    """One of `LAYER_CLASSES` (a fixed allow-list, checked again here) -> the class."""
    import importlib

    if path not in LAYER_CLASSES:
        raise ModelLoadError(f"layer class {path!r} is not allowed", fix=f"use one of {', '.join(sorted(LAYER_CLASSES))}")
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


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


def load_transformers(
    spec: EncoderSpec, local_path: str | None, token: str | None, *, trust_remote_code: bool = False
) -> TransformersEncoder:
    """Loader for library ``"transformers"``: a Hub id or local directory -> `TransformersEncoder`.

    ``spec.model_kwargs`` are config fields (data), set on the model's config. The model's own
    Python code runs only with ``trust_remote_code=True``, which `load_encoder` passes solely for
    a registry entry with ``remote_code`` pinned to a commit; otherwise a config that asks for
    custom code (``auto_map``) is refused.
    """
    if trust_remote_code and not (spec.remote_code and is_pinned(spec.revision)):
        raise ModelLoadError(
            f"encoder '{spec.name}' is not a registry entry pinned to a commit, so its code is not run",
            fix="register the entry with remote_code=True and revision='<40-hex commit>' first",
        )
    if local_path is not None:
        directory = _local_dir(spec, local_path)
    else:
        repo = _require_hub_id(spec)
        offline = hub_is_offline()
        patterns = ["*.json", "*.safetensors"] + (["*.py"] if trust_remote_code else [])
        with hub_errors(spec, offline=offline):
            directory = hub_snapshot(repo, token=token, revision=spec.revision, offline=offline, allow_patterns=patterns)
    model = _transformers_model(spec, directory, trust_remote_code)
    _check_width(spec, int(model.config.hidden_size))
    return TransformersEncoder(spec, model)


def _transformers_model(spec: EncoderSpec, directory: Path, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{directory} has no config.json, so it is not a transformers model directory",
            fix="save the model with save_pretrained, or download the Hub repository files there",
        )
    if "auto_map" in read_json_file(config_file) and not trust_remote_code:
        raise ModelLoadError(
            f"{config_file} asks for custom Python code (auto_map); pixgen never runs code named by a model file",
            fix="use a model transformers implements, or a registry entry pinned to a reviewed commit with "
            "--trust-remote-code (load_encoder(name, trust_remote_code=True)); see `pixgen encoders`",
        )
    with weights_errors(directory / "config.json", f"transformers encoder '{spec.name}'"):
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code, local_files_only=True)
    config.update(_checked(spec.model_kwargs, f"encoder '{spec.name}'"))
    with weights_errors(directory, f"transformers encoder '{spec.name}'"):
        return AutoModel.from_pretrained(
            str(directory), config=config, trust_remote_code=trust_remote_code, local_files_only=True, weights_only=True
        )


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
