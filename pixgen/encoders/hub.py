"""Hugging Face Hub access for encoder weights: offline detection and actionable errors.

Offline is decided per call: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set to a true value,
or the Hub host cannot be reached within a few seconds. Offline loads read only the local cache,
so a machine without network fails at once with a clear message instead of retrying for minutes.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from pixgen.encoders.spec import EncoderSpec
from pixgen.errors import ModelLoadError, PixgenError

__all__ = ["access_fix", "hub_download", "hub_errors", "hub_is_offline", "hub_snapshot"]

_TRUE = {"1", "true", "yes", "on"}
_PROBE_TIMEOUT_S = 3.0


def hub_is_offline() -> bool:
    """True when Hub downloads must not be attempted (offline env var set, or no route to the Hub)."""
    if any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False  # a proxy may reach the Hub even when direct connections cannot
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError:
        return True
    return False


def hub_download(repo_id: str, filename: str, *, token: str | None, offline: bool, revision: str | None = None) -> Path:
    """Download (or find in the cache) one file of a Hub model repository."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, token=token, local_files_only=offline, revision=revision))


def hub_snapshot(
    repo_id: str, *, token: str | None, offline: bool, allow_patterns: list[str], revision: str | None = None
) -> Path:
    """The snapshot directory of a repository holding only files matching ``allow_patterns``.

    Loaders ask for data files only (``*.json``, ``*.safetensors``), so a repository's Python
    files are never downloaded unless a pinned, user-authorised entry needs them. Offline, the
    cached snapshot is returned without touching the network.

    Example:
        >>> hub_snapshot("owkin/phikon-v2", token=None, offline=False, allow_patterns=["*.json", "*.safetensors"])  # doctest: +SKIP
    """
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(
        repo_id, token=token, revision=revision, local_files_only=offline, allow_patterns=allow_patterns
    ))


def access_fix(spec: EncoderSpec, *, offline: bool = False) -> str:
    """How to get the weights: request access, pass a token, go online, or point at a local copy."""
    repo = spec.hub_id or spec.source
    steps = f"request access at https://huggingface.co/{repo}, then " if spec.gated else ""
    online = "run once with network access (HF_HUB_OFFLINE unset) to fill the cache, " if offline else ""
    return (
        f"{steps}{online}pass token='hf_...' to load_encoder (or set HF_TOKEN); or pass local_path= "
        f"(CLI: --encoder-path) to a directory holding the weights in the Hub layout "
        f"(config.json + model.safetensors)"
    )


@contextlib.contextmanager
def hub_errors(spec: EncoderSpec, *, offline: bool) -> Iterator[None]:
    """Turn Hub / network failures inside the block into one `ModelLoadError` with the fix."""
    try:
        yield
    except PixgenError:
        raise
    except (OSError, ValueError) as err:  # HTTP errors, missing cache entries, bad repo ids
        raise ModelLoadError(
            f"could not get encoder '{spec.name}' from the Hugging Face Hub ({spec.hub_id}): {_reason(err, offline)}",
            fix=access_fix(spec, offline=offline),
        ) from err


def _reason(err: BaseException, offline: bool) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    chain = _causes(err)
    if any(isinstance(e, GatedRepoError) for e in chain):
        return "the repository is gated and this account/token has no access (HTTP 401/403)"
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return "repository not found, or not visible without a valid token"
    if offline or any(isinstance(e, LocalEntryNotFoundError) for e in chain):
        return "offline (HF_HUB_OFFLINE set, or no network) and the files are not in the local cache"
    return str(err).splitlines()[0][:300]


def _causes(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain
