"""`load_encoder` and the per-library loader hooks (`register_loader`)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from pixgen.encoders.backbones import read_json_file
from pixgen.encoders.base import SPEC_FILENAME, Encoder
from pixgen.encoders.registry import ENCODERS, get_encoder_spec
from pixgen.encoders.spec import EncoderSpec, is_pinned
from pixgen.errors import EncoderMismatchError, InputError, ModelLoadError

__all__ = ["EncoderLoader", "load_encoder", "read_saved_spec", "register_loader"]


class EncoderLoader(Protocol):
    """Builds an `Encoder` for ``spec`` from the Hub (``local_path`` None) or a local directory.

    `load_encoder` adds ``trust_remote_code=True`` only for an authorised, pinned registry entry
    (so loaders that never run model code need not accept it).
    """

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
    trust_remote_code: bool = False,
) -> Encoder:
    """Load an encoder by registry name, or from a directory written by `Encoder.save_pretrained`.

    Loading runs no code from the files read: a folder's ``pixgen_encoder.json`` is data checked
    against an allow-list, and custom model code (``remote_code`` entries such as Hibou) runs only
    with ``trust_remote_code=True`` for a registry entry pinned to a commit hash.

    Args:
        name_or_path: a registry name (see `list_encoders`), or a directory with ``pixgen_encoder.json``.
        local_path: with a registry name, a directory holding the weights in the Hub layout
            (offline clusters, gated models downloaded elsewhere); nothing is downloaded then.
        token: Hugging Face token for gated models (default: ``HF_TOKEN`` / the cached login).
        device, dtype: where and in which precision to put the encoder (e.g. ``"cuda"``, ``"bfloat16"``).
        trust_remote_code: allow the Python code of a ``remote_code`` registry entry, at its pinned
            revision, to run (CLI: ``--trust-remote-code``). Ignored for every other encoder. With
            ``local_path`` the code in that directory runs: point it only at the pinned commit's files.

    Returns the encoder in eval mode. Raises `InputError` for unknown names and
    `ModelLoadError` (saying how to get access, pass a token or a local path) when the
    weights cannot be read. ``HF_HUB_OFFLINE=1`` restricts loading to the local cache.

    Example:
        >>> enc = load_encoder("uni2-h", token="hf_...", device="cuda")           # doctest: +SKIP
        >>> enc = load_encoder("uni2-h", local_path="/models/UNI2-h")             # doctest: +SKIP
        >>> enc = load_encoder("runs/exp1/encoder")  # a save_pretrained directory  # doctest: +SKIP
        >>> enc = load_encoder("hibou-b", trust_remote_code=True)  # needs a pinned entry  # doctest: +SKIP
    """
    spec, local_path = _resolve(name_or_path, local_path)
    loader = _LOADERS.get(spec.library)
    if loader is None:
        raise ModelLoadError(
            f"no loader for library {spec.library!r} (encoder '{spec.name}'); known: {', '.join(sorted(_LOADERS))}",
            fix=f"register one with pixgen.encoders.register_loader({spec.library!r}, fn)",
        )
    if spec.remote_code:
        _check_remote_code(spec, trust_remote_code)
        encoder = loader(spec, local_path, token, trust_remote_code=True)
    else:
        encoder = loader(spec, local_path, token)
    to_kwargs = {"device": device, "dtype": _dtype(dtype)}
    return encoder.to(**{k: v for k, v in to_kwargs.items() if v is not None}).eval()


def _check_remote_code(spec: EncoderSpec, trust_remote_code: bool) -> None:
    """A ``remote_code`` entry loads only when the caller allows it AND the entry is pinned."""
    where = f"https://huggingface.co/{spec.hub_id}" if spec.hub_id else spec.source
    if not is_pinned(spec.revision):
        raise ModelLoadError(
            f"encoder '{spec.name}' runs custom Python code from {where}, and its registry entry pins no reviewed "
            "commit, so pixgen will not run it",
            fix="review the repository's *.py files, then register the entry pinned to that commit: register_encoder("
            f"dataclasses.replace(get_encoder_spec({spec.name!r}), revision='<40-hex commit>'), overwrite=True), and "
            "load it with trust_remote_code=True (CLI: --trust-remote-code); or choose another encoder (`pixgen encoders`)",
        )
    if not trust_remote_code:
        raise ModelLoadError(
            f"encoder '{spec.name}' runs custom Python code from {where} (commit {spec.revision[:12]})",
            fix="if you trust that code, pass trust_remote_code=True (CLI: --trust-remote-code); "
            "or choose another encoder (`pixgen encoders`)",
        )


def read_saved_spec(directory: str | Path) -> EncoderSpec:
    """The `EncoderSpec` recorded in ``directory/pixgen_encoder.json`` (data only: see `EncoderSpec.from_dict`)."""
    path = Path(directory) / SPEC_FILENAME
    if not path.is_file():
        raise ModelLoadError(
            f"{directory} has no {SPEC_FILENAME}, so pixgen cannot tell which encoder it holds",
            fix="pass the registry name with local_path=<directory>, or save the encoder with save_pretrained",
        )
    record = read_json_file(path)
    try:
        return EncoderSpec.from_dict(record["spec"])
    except InputError as err:
        raise ModelLoadError(f"{path}: {err.message}", fix=err.fix) from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelLoadError(
            f"cannot read {path}: {type(err).__name__}: {err}", fix="re-save the encoder with save_pretrained"
        ) from err


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
