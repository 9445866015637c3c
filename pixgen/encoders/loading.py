"""`load_encoder` and the per-library loader hooks (`register_loader`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch

from pixgen.encoders.base import SPEC_FILENAME, Encoder
from pixgen.encoders.registry import ENCODERS, get_encoder_spec
from pixgen.encoders.spec import EncoderSpec
from pixgen.errors import EncoderMismatchError, InputError, ModelLoadError

__all__ = ["EncoderLoader", "load_encoder", "read_saved_spec", "register_loader"]


class EncoderLoader(Protocol):
    """Builds an `Encoder` for ``spec`` from the Hub (``local_path`` None) or a local directory."""

    def __call__(self, spec: EncoderSpec, local_path: str | None, token: str | None) -> Encoder: ...


_LOADERS: dict[str, EncoderLoader] = {}


def register_loader(library: str, fn: EncoderLoader) -> None:
    """Make `load_encoder` use ``fn`` for specs whose ``library`` is ``library``.

    Example:
        >>> def load_bundled(spec, local_path, token):          # doctest: +SKIP
        ...     return MyBundledEncoder(spec, weights_dir=local_path or DEFAULT_DIR)
        >>> register_loader("bundled", load_bundled)          # doctest: +SKIP
    """
    _LOADERS[library] = fn


def load_encoder(
    name_or_path: str,
    *,
    local_path: str | None = None,
    token: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> Encoder:
    """Load an encoder by registry name, or from a directory written by `Encoder.save_pretrained`.

    Args:
        name_or_path: a registry name (see `list_encoders`), or a directory with ``pixgen_encoder.json``.
        local_path: with a registry name, a directory holding the weights in the Hub layout
            (offline clusters, gated models downloaded elsewhere); nothing is downloaded then.
        token: Hugging Face token for gated models (default: ``HF_TOKEN`` / the cached login).
        device, dtype: where and in which precision to put the encoder (e.g. ``"cuda"``, ``"bfloat16"``).

    Returns the encoder in eval mode. Raises `InputError` for unknown names and
    `ModelLoadError` (saying how to get access, pass a token or a local path) when the
    weights cannot be read. ``HF_HUB_OFFLINE=1`` restricts loading to the local cache.

    Example:
        >>> enc = load_encoder("uni2-h", token="hf_...", device="cuda")           # doctest: +SKIP
        >>> enc = load_encoder("uni2-h", local_path="/models/UNI2-h")             # doctest: +SKIP
        >>> enc = load_encoder("runs/exp1/encoder")  # a save_pretrained directory  # doctest: +SKIP
    """
    spec, local_path = _resolve(name_or_path, local_path)
    loader = _LOADERS.get(spec.library)
    if loader is None:
        raise ModelLoadError(
            f"no loader for library {spec.library!r} (encoder '{spec.name}'); known: {', '.join(sorted(_LOADERS))}",
            fix=f"register one with pixgen.encoders.register_loader({spec.library!r}, fn)",
        )
    encoder = loader(spec, local_path, token)
    to_kwargs = {"device": device, "dtype": _dtype(dtype)}
    return encoder.to(**{k: v for k, v in to_kwargs.items() if v is not None}).eval()


def read_saved_spec(directory: str | Path) -> EncoderSpec:
    """The `EncoderSpec` recorded in ``directory/pixgen_encoder.json``."""
    path = Path(directory) / SPEC_FILENAME
    try:
        record = json.loads(path.read_text())
        return EncoderSpec.from_dict(record["spec"])
    except FileNotFoundError:
        raise ModelLoadError(
            f"{directory} has no {SPEC_FILENAME}, so pixgen cannot tell which encoder it holds",
            fix="pass the registry name with local_path=<directory>, or save the encoder with save_pretrained",
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"cannot read {path}: {err}", fix="re-save the encoder with save_pretrained") from err


def _resolve(name_or_path: str, local_path: str | None) -> tuple[EncoderSpec, str | None]:
    """Registry name (+ optional local_path) or saved directory -> (spec, weights directory)."""
    if name_or_path.lower() in ENCODERS:
        spec = get_encoder_spec(name_or_path)
        if local_path is not None and (Path(local_path) / SPEC_FILENAME).is_file():
            _check_same(spec, read_saved_spec(local_path), local_path)
        return spec, local_path
    if Path(name_or_path).expanduser().is_dir():
        if local_path is not None:
            raise InputError(
                f"got both a directory ({name_or_path}) and local_path={local_path}",
                fix="pass only the directory, or a registry name with local_path",
            )
        return read_saved_spec(Path(name_or_path).expanduser()), str(Path(name_or_path).expanduser())
    return get_encoder_spec(name_or_path), local_path  # raises InputError listing known names


def _check_same(spec: EncoderSpec, saved: EncoderSpec, directory: str) -> None:
    if (saved.name.lower(), saved.dim) != (spec.name.lower(), spec.dim):
        raise EncoderMismatchError(
            f"{directory} holds encoder '{saved.name}' ({saved.dim}-d), not '{spec.name}' ({spec.dim}-d)",
            fix=f"load it with load_encoder({directory!r}), or point local_path at '{spec.name}' weights",
        )


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise InputError(f"unknown dtype {dtype!r}", fix="use e.g. 'float32', 'float16' or 'bfloat16'")
    return resolved
