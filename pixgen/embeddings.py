"""Embeddings tagged ``(encoder, domain)``, and the embedding bank of a model.

The embedding space is pixgen's interface: every request ends as condition tokens of one
encoder. Tagging them with that encoder's name and the stain domain of the tissue they describe
(``"he"``, ``"ihc"``, ...) lets a model refuse foreign embeddings: an IHC model refuses H&E
embeddings of the same encoder until a stain translator has mapped them.

Example:
    >>> emb = Embeddings(torch.randn(4, 1, 384), encoder="pixgen-ssl")
    >>> (emb.encoder, emb.domain)
    ('pixgen-ssl', 'he')
    >>> save_embeddings("refs.safetensors", emb)                 # doctest: +SKIP
    >>> load_embeddings("refs.safetensors").domain               # doctest: +SKIP
    'he'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from pixgen.errors import EncoderMismatchError, InputError, ModelLoadError
from pixgen.io import write_bytes_atomic

__all__ = ["Embeddings", "EmbeddingBank", "save_embeddings", "load_embeddings"]


DEFAULT_DOMAIN = "he"  # what embeddings and models without a domain tag describe


@dataclass
class Embeddings:
    """Condition tokens ``values`` (N, T, D) made by ``encoder`` (registry name) from tissue of
    stain ``domain``; None means unknown (untagged arrays), which any model accepts."""

    values: torch.Tensor
    encoder: str | None = None
    ids: list[str] = field(default_factory=list)
    domain: str | None = DEFAULT_DOMAIN

    def __post_init__(self) -> None:
        values = torch.as_tensor(self.values)
        if values.ndim == 2:  # (N, D): one token per image
            values = values[:, None]
        if values.ndim != 3 or values.shape[0] == 0:
            raise InputError(
                f"embeddings must be (N, D) or (N, tokens, D) with N > 0, got shape {tuple(values.shape)}"
            )
        if not torch.isfinite(values).all():
            bad = (~torch.isfinite(values)).flatten(1).any(1).nonzero().flatten().tolist()
            raise InputError(
                f"embeddings contain NaN or Inf (rows {bad[:8]})",
                fix="recompute them from valid images; check the encoder's input for blank or corrupt tiles",
            )
        self.values = values.float()

    def __len__(self) -> int:
        return self.values.shape[0]

    def check_encoder(self, expected: str | None, dim: int, domain: str | None = None) -> None:
        """Raise :class:`EncoderMismatchError` unless these embeddings fit a model's encoder,
        embedding size and stain domain."""
        if self.values.shape[-1] != dim:
            raise EncoderMismatchError(
                f"embeddings have dim {self.values.shape[-1]} but the model expects {dim}"
                + (f" ({expected})" if expected else ""),
                fix=f"embed the images with {expected or 'the model’s encoder'} (pixgen info MODEL shows it)",
            )
        if expected and self.encoder and self.encoder != expected:
            raise EncoderMismatchError(
                f"embeddings come from encoder {self.encoder!r}, the model was trained on {expected!r}",
                fix=f"re-embed the images with {expected!r} or pass references instead",
            )
        if domain and self.domain and self.domain != domain:
            raise EncoderMismatchError(
                f"embeddings describe {self.domain!r} tissue, the model generates {domain!r}",
                fix=f"translate them to {domain!r} with a stain translator, or use a model trained on {self.domain!r}",
            )


def save_embeddings(path: str | Path, emb: Embeddings) -> None:
    """Write embeddings + encoder and domain tags + ids to one safetensors file."""
    meta = {"encoder": emb.encoder or "", "domain": emb.domain or "", "ids": json.dumps(emb.ids)}
    write_bytes_atomic(path, save({"values": emb.values.contiguous()}, metadata=meta))


def load_embeddings(path: str | Path) -> Embeddings:
    """Read embeddings written by :func:`save_embeddings` (or a ``.pt``/``.npy`` array, untagged)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no embeddings file at {path}", fix="check the --embeddings path")
    if path.suffix in (".npy", ".pt"):
        return Embeddings(_load_array(path), domain=None)
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            values = f.get_tensor("values")
    except (SafetensorError, OSError, KeyError) as err:
        raise InputError(
            f"{path} is not a pixgen embeddings file ({err})",
            fix="write it with pixgen.embeddings.save_embeddings, or pass a .npy / .pt array",
        ) from err
    domain = meta.get("domain", DEFAULT_DOMAIN) or None  # files written before domains existed are H&E
    return Embeddings(values, encoder=meta.get("encoder") or None, ids=json.loads(meta.get("ids", "[]")), domain=domain)


def _load_array(path: Path) -> torch.Tensor:
    """A numeric tensor from ``.pt`` / ``.npy``, never unpickling objects (no code from the file runs)."""
    import pickle

    import numpy as np

    try:
        if path.suffix == ".pt":
            values = torch.load(path, weights_only=True, map_location="cpu")
        else:
            values = torch.from_numpy(np.load(path, allow_pickle=False))
    except (pickle.UnpicklingError, ValueError, TypeError, RuntimeError, EOFError, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        if isinstance(err, pickle.UnpicklingError) or "allow_pickle" in reason:
            reason = "it holds pickled Python objects, which pixgen never unpickles"
        raise InputError(
            f"{path} is not a plain numeric array ({reason})",
            fix="save the embeddings with pixgen.embeddings.save_embeddings, torch.save(tensor) or np.save(float_array)",
        ) from err
    if not isinstance(values, torch.Tensor) or not (values.is_floating_point() or values.dtype in (torch.int32, torch.int64)):
        raise InputError(
            f"{path} holds {type(values).__name__ if not isinstance(values, torch.Tensor) else values.dtype}, not a numeric tensor",
            fix="save one float tensor / array of shape (N, D) or (N, tokens, D)",
        )
    return values


class EmbeddingBank:
    """Embeddings of real training tiles, grouped by label, so a label alone can condition.

    Stored as ``embedding_bank.safetensors`` (one tensor per label) with each label's tile
    sources and the domain in the metadata.

    Example:
        >>> bank = EmbeddingBank({"lung_scc": torch.randn(10, 1, 8)}, encoder="pixgen-ssl")
        >>> bank.draw("lung_scc", seeds=[0, 1, 2]).values.shape
        torch.Size([3, 1, 8])
    """

    FILENAME = "embedding_bank.safetensors"

    def __init__(self, entries: dict[str, torch.Tensor], encoder: str | None, sources: dict[str, list[str]] | None = None,
                 domain: str | None = DEFAULT_DOMAIN):
        if not entries:
            raise InputError("an embedding bank needs at least one label")
        self.entries = {k: Embeddings(v).values for k, v in entries.items()}
        self.encoder = encoder
        self.sources = sources or {}
        self.domain = domain

    @property
    def labels(self) -> list[str]:
        return sorted(self.entries)

    def draw(self, label: str | None, seeds: Sequence[int | None], generator: torch.Generator | None = None) -> Embeddings:
        """One entry of ``label`` (all labels pooled when None) per seed: entry ``randint(pool)``
        of a generator seeded with that seed, so a seed draws the same entry in any run (draws
        are independent, so a run may repeat an entry). A None seed draws from ``generator``."""
        if label is not None and label not in self.entries:
            raise InputError(f"unknown label {label!r}", fix=f"use one of: {', '.join(self.labels)}")
        names = [label] if label is not None else self.labels
        pool = torch.cat([self.entries[k] for k in names])
        owners = [f"{k}[{i}]" for k in names for i in range(self.entries[k].shape[0])]
        idx = [int(torch.randint(pool.shape[0], (1,), generator=generator if s is None else torch.Generator().manual_seed(s)))
               for s in seeds]
        return Embeddings(pool[idx], encoder=self.encoder, domain=self.domain, ids=[owners[i] for i in idx])

    def sample(self, label: str | None, n: int, seed: int = 0) -> Embeddings:
        """``n`` distinct bank embeddings of ``label`` (all labels pooled when None), drawn with one
        seed (for reports that want distinct entries); with replacement only when the pool holds
        fewer than ``n``. Generation draws per image instead (:meth:`draw`)."""
        if label is not None and label not in self.entries:
            raise InputError(f"unknown label {label!r}", fix=f"use one of: {', '.join(self.labels)}")
        names = [label] if label is not None else self.labels
        pool = torch.cat([self.entries[k] for k in names])
        owners = [f"{k}[{i}]" for k in names for i in range(self.entries[k].shape[0])]
        gen = torch.Generator().manual_seed(seed)
        if n > pool.shape[0]:
            idx = torch.randint(pool.shape[0], (n,), generator=gen)
        else:
            idx = torch.randperm(pool.shape[0], generator=gen)[:n]
        return Embeddings(pool[idx], encoder=self.encoder, domain=self.domain, ids=[owners[i] for i in idx.tolist()])

    def save(self, directory: str | Path) -> None:
        meta = {"encoder": self.encoder or "", "domain": self.domain or "", "sources": json.dumps(self.sources)}
        write_bytes_atomic(Path(directory) / self.FILENAME, save({k: v.contiguous() for k, v in self.entries.items()}, metadata=meta))

    @classmethod
    def load(cls, directory: str | Path) -> EmbeddingBank | None:
        """The bank in ``directory``, or None when the model has none."""
        path = Path(directory) / cls.FILENAME
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            entries = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"corrupt embedding bank {path}: {err}", fix="re-create the bank or remove it") from err
        return cls(entries, encoder=meta.get("encoder") or None, sources=json.loads(meta.get("sources", "{}")),
                   domain=meta.get("domain", DEFAULT_DOMAIN) or None)
