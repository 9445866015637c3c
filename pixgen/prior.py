"""A learned embedding prior: new condition embeddings for a label or a prompt, without a real tile.

:class:`EmbeddingPrior` is an :class:`~pixgen.models.flow.EmbeddingFlow` (rectified flow from
Gaussian noise to the model's encoder space) conditioned on a multi-hot vector over a small
:class:`Vocabulary` of terms (organ, diagnosis, nuclear composition and density). A label of the
training data is a fixed set of terms (``lung_scc`` = ``lung`` + ``squamous-cell-carcinoma``); a
prompt is parsed into terms; terms left unsaid are marginalised (the prior was trained on random
subsets of each tile's terms), so ``"lung"`` alone samples all lung tissue.

Folder layout (``MODEL/prior/``): ``config.json`` + ``diffusion_pytorch_model.safetensors`` (the
flow, diffusers' ModelMixin layout) and ``prior.json`` (vocabulary, labels, the term sets seen in
training, and the per-dimension mean / std the flow works in).

Sampling is per-image seeded: the noise of image ``i`` comes from ``torch.Generator(seed_i)``, so a
prior sample is the same in any run, whatever the batch.

Example:
    >>> prior = EmbeddingPrior.load("pixgen/weights/pixgen-default/prior")   # doctest: +SKIP
    >>> prior.sample(prior.vocabulary.parse("lung, inflammatory-rich"), seeds=[0, 1]).shape  # doctest: +SKIP
    torch.Size([2, 192])
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pixgen.errors import InputError, ModelLoadError
from pixgen.models.flow import EmbeddingFlow, sample_flow

__all__ = ["Term", "Vocabulary", "EmbeddingPrior", "PRIOR_DIR", "STOP_WORDS", "MASK_THRESHOLDS", "mask_terms"]

PRIOR_DIR = "prior"
PRIOR_FILE = "prior.json"
# Words a prompt may hold that carry no condition (documented in docs/prior.md; anything else unknown is an error).
STOP_WORDS = frozenset({"a", "an", "the", "of", "with", "and", "in", "tissue", "tile", "h&e"})


# Nuclei per 64 um field and type fractions behind the density / composition terms; chosen from the
# CoNSeP train distribution (docs/prior.md). The bundled prior was trained on tiles described this way.
MASK_THRESHOLDS = {"sparse_below": 15, "dense_from": 60, "min_nuclei": 5, "inflammatory_from": 0.3,
                   "epithelial_from": 0.5, "spindle_from": 0.5}


def mask_terms(inst: np.ndarray, types: np.ndarray | None = None) -> list[str]:
    """The density / composition terms of one 64 um field from its instance map (and CoNSeP type map:
    1 other, 2 inflammatory, 3 epithelial, 4 spindle-shaped; each nucleus takes its majority type).
    Any resolution: only counts and shares matter.

    Example:
        >>> inst = np.zeros((128, 128), np.int32)
        >>> for i in range(8): inst[i * 16:i * 16 + 4, :4] = i + 1
        >>> mask_terms(inst, np.where(inst > 0, 3, 0))
        ['sparse', 'epithelial']
    """
    ids = np.unique(inst)
    ids = ids[ids > 0]
    t = MASK_THRESHOLDS
    terms = ["sparse"] if len(ids) < t["sparse_below"] else ["dense"] if len(ids) >= t["dense_from"] else []
    if types is None or len(ids) < t["min_nuclei"]:
        return terms
    kinds = np.array([np.bincount(types[inst == i], minlength=5)[1:5].argmax() + 1 for i in ids])
    frac = {k: float((kinds == v).mean()) for k, v in (("inflammatory", 2), ("epithelial", 3), ("spindle", 4))}
    terms += ["inflammatory-rich"] if frac["inflammatory"] >= t["inflammatory_from"] else []
    terms += [k for k in ("epithelial", "spindle") if frac[k] >= t[f"{k}_from"]]
    return terms


@dataclass(frozen=True)
class Term:
    """One vocabulary term: its canonical ``name``, a ``group`` (organ, diagnosis, composition,
    density), the ``aliases`` a prompt may use and a one-line ``meaning`` (how it was measured)."""

    name: str
    group: str
    meaning: str
    aliases: tuple[str, ...] = ()


@dataclass
class Vocabulary:
    """The terms a prior understands, the labels as term sets, and the term sets seen in training.

    Example:
        >>> v = Vocabulary([Term("lung", "organ", "LC25000"), Term("sparse", "density", "< 15 nuclei")],
        ...                labels={"lung_n": ["lung"]}, seen=[["lung"], ["lung", "sparse"]])
        >>> v.parse("lung, sparse").tolist()
        [1.0, 1.0]
    """

    terms: list[Term]
    labels: dict[str, list[str]] = field(default_factory=dict)
    seen: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.terms = [t if isinstance(t, Term) else Term(**{**t, "aliases": tuple(t.get("aliases", ()))}) for t in self.terms]
        self.names = [t.name for t in self.terms]
        self._phrases: dict[str, list[str]] = {}
        for t in self.terms:
            for phrase in (t.name, *t.aliases):
                self._phrases[_norm(phrase)] = [t.name]
        for label, names in self.labels.items():
            self._phrases[_norm(label)] = list(names)

    @property
    def dim(self) -> int:
        return len(self.terms)

    def words(self) -> list[str]:
        """Everything a prompt may say: term names, aliases and labels."""
        return sorted({*self.names, *(a for t in self.terms for a in t.aliases), *self.labels})

    def terms_of(self, prompt: str) -> list[str]:
        """The canonical terms of ``prompt``: phrases matched longest first; commas, ``+`` and ``/``
        separate; stop words are skipped; anything else is an :class:`InputError` naming the known words."""
        tokens = [w for w in re.split(r"[\s,;+/]+", _norm(prompt)) if w]
        found: list[str] = []
        unknown: list[str] = []
        i = 0
        longest = max(len(p.split()) for p in self._phrases)
        while i < len(tokens):
            for n in range(min(longest, len(tokens) - i), 0, -1):
                phrase = " ".join(tokens[i:i + n])
                if phrase in self._phrases:
                    found += [t for t in self._phrases[phrase] if t not in found]
                    i += n
                    break
            else:
                if tokens[i] not in STOP_WORDS:
                    unknown.append(tokens[i])
                i += 1
        if unknown:
            raise InputError(f"the prompt uses words the prior does not know: {', '.join(unknown)}",
                             fix=f"use only: {', '.join(self.words())} (see `pixgen info`)")
        if not found:
            raise InputError(f"the prompt {prompt!r} names no term", fix=f"use one of: {', '.join(self.words())}")
        self.check_seen(found)
        return found

    def check_seen(self, terms: Sequence[str]) -> None:
        """Refuse a term combination that no training tile had (the prior would extrapolate)."""
        if self.seen and not any(set(terms) <= set(s) for s in self.seen):
            raise InputError(f"no training tile is described by {' + '.join(terms)} together",
                             fix="drop one of the terms; `pixgen info` lists the labels and terms")

    def extend_seen(self, terms: Sequence[str], extra: Sequence[str]) -> list[str]:
        """``terms`` plus each of ``extra`` (in order) that keeps the combination one a training tile had:
        a mask's composition added to a label without asking for an unseen one (``multi-organ`` tiles
        had no type maps, so ``epithelial`` is dropped there)."""
        out = list(terms)
        for t in extra:
            if t not in out and (not self.seen or any({*out, t} <= set(s) for s in self.seen)):
                out.append(t)
        return out

    def vector(self, terms: Sequence[str]) -> torch.Tensor:
        """The multi-hot condition vector (dim,) of canonical ``terms``."""
        v = torch.zeros(self.dim)
        for t in terms:
            v[self.names.index(t)] = 1.0
        return v

    def parse(self, prompt: str) -> torch.Tensor:
        """The condition vector of a prompt (a label is a prompt too)."""
        return self.vector(self.terms_of(prompt))

    def to_json(self) -> dict:
        return {"terms": [asdict(t) for t in self.terms], "labels": self.labels, "seen": self.seen}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


class EmbeddingPrior:
    """A conditional embedding flow with its vocabulary (see the module docstring).

    Args:
        flow: an :class:`EmbeddingFlow` with ``condition_dim == vocabulary.dim`` and ``source="noise"``.
        vocabulary: the terms and labels. mean, std: (D,) the flow's standardisation of the embeddings.
        steps: Euler steps when sampling. guidance: CFG scale on the condition vector.
        temperature: scale of the source noise (< 1 trades diversity for samples nearer the data;
            the bundled prior's was chosen on a grouped validation split, docs/prior.md).
        label_temperatures: per-label scales that replace ``temperature`` for a condition holding that
            label's terms (see :meth:`temperature_of`); empty: ``temperature`` everywhere.
    """

    def __init__(self, flow: EmbeddingFlow, vocabulary: Vocabulary, mean: torch.Tensor, std: torch.Tensor,
                 steps: int = 20, guidance: float = 1.0, temperature: float = 1.0,
                 label_temperatures: dict[str, float] | None = None):
        if flow.config.condition_dim != vocabulary.dim:
            raise ModelLoadError(f"the prior's flow takes {flow.config.condition_dim}-d conditions, its vocabulary has "
                                 f"{vocabulary.dim} terms", fix="re-export the prior (python -m recipes.prior)")
        self.flow, self.vocabulary = flow.eval(), vocabulary
        self.mean, self.std = torch.as_tensor(mean).float(), torch.as_tensor(std).float()
        self.steps, self.guidance, self.temperature = steps, guidance, temperature
        self.label_temperatures = dict(label_temperatures or {})
        if unknown := set(self.label_temperatures) - set(vocabulary.labels):
            raise ModelLoadError(f"the prior has temperatures for unknown labels {sorted(unknown)}",
                                 fix="re-export the prior (python -m recipes.prior)")

    @property
    def labels(self) -> list[str]:
        return sorted(self.vocabulary.labels)

    @property
    def encoder(self) -> str | None:
        return self.flow.config.encoder

    def condition(self, label: str | None = None, prompt: str | None = None) -> torch.Tensor:
        """The condition vector of a label or a prompt (unknown ones are an :class:`InputError`)."""
        if label is not None and label not in self.vocabulary.labels:
            raise InputError(f"unknown label {label!r}", fix=f"use one of: {', '.join(self.labels)}")
        if (label is None) == (prompt is None):
            raise InputError("give a label or a prompt")
        return self.vocabulary.parse(label if label is not None else prompt)

    def temperature_of(self, condition: torch.Tensor) -> torch.Tensor:
        """(N,) noise scale of condition vectors (dim,) or (N, dim): ``temperature``, moved towards each
        label's own temperature by the label's weight in the row (the smallest value of its terms: 1 when
        the row holds all of them, e.g. ``lung_scc`` or ``"colon, dense"`` for ``consep``; fractional
        along a path, so a path's temperature moves linearly from one label's to the other's).

        Example:
            >>> prior.label_temperatures = {"monuseg": 0.9}                       # doctest: +SKIP
            >>> prior.temperature_of(prior.condition("monuseg")).tolist()         # doctest: +SKIP
            [0.9]
        """
        cond = condition.float().reshape(-1, self.vocabulary.dim)
        base = torch.full((len(cond),), float(self.temperature))
        if not self.label_temperatures:
            return base
        weights = torch.stack([cond[:, self.vocabulary.vector(self.vocabulary.labels[k]) > 0].min(1).values.clamp(0, 1)
                               for k in self.label_temperatures], 1)
        weights = weights / weights.sum(1, keepdim=True).clamp(min=1.0)  # nested labels: a convex mix
        shift = torch.tensor([t - self.temperature for t in self.label_temperatures.values()])
        return base + weights @ shift

    def noise(self, seeds: Sequence[int | None], generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, flow_dim) source noise times the temperature, row ``i`` from ``torch.Generator(seeds[i])``
        (or ``generator`` for None); flow_dim is the embedding width, or the rank of a whitened flow."""
        dim = self.flow.flow_dim
        return self.temperature * torch.stack(
            [torch.randn(dim, generator=generator if s is None else torch.Generator().manual_seed(s)) for s in seeds])

    @torch.no_grad()
    def sample(self, condition: torch.Tensor, seeds: Sequence[int | None] | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) embeddings for condition vectors (dim,) or (N, dim), from per-seed noise (or ``noise``, at
        ``temperature`` as :meth:`noise` draws it); each row's noise is rescaled to its own
        :meth:`temperature_of` (a no-op without ``label_temperatures``)."""
        if noise is None:
            if seeds is None:
                raise InputError("give seeds (one per sample) or noise")
            noise = self.noise(seeds, generator)
        cond = condition.float().expand(noise.shape[0], -1) if condition.ndim == 1 else condition.float()
        if self.label_temperatures:
            noise = noise * (self.temperature_of(cond) / self.temperature)[:, None]
        param = next(self.flow.parameters())
        z = sample_flow(self.flow.float(), noise.to(param.device), condition=cond.to(param.device), steps=self.steps,
                        guidance=self.guidance)
        return z.cpu() * self.std + self.mean

    def save(self, folder: str | Path) -> Path:
        """Write the ``prior/`` layout (module docstring) to ``folder``."""
        folder = Path(folder)
        self.flow.save_pretrained(folder)
        info = {**self.vocabulary.to_json(), "mean": self.mean.tolist(), "std": self.std.tolist(),
                "steps": self.steps, "guidance": self.guidance, "temperature": self.temperature,
                **({"label_temperatures": self.label_temperatures} if self.label_temperatures else {})}
        (folder / PRIOR_FILE).write_text(json.dumps(info, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> EmbeddingPrior | None:
        """The prior in ``folder`` (None when there is none); no code from the folder runs."""
        folder = Path(folder)
        if not (folder / PRIOR_FILE).is_file():
            return None
        try:
            info = json.loads((folder / PRIOR_FILE).read_text())
            flow = EmbeddingFlow.from_pretrained(folder).float()
            vocab = Vocabulary(info["terms"], labels=info.get("labels", {}), seen=info.get("seen", []))
            return cls(flow, vocab, torch.tensor(info["mean"]), torch.tensor(info["std"]),
                       steps=int(info.get("steps", 20)), guidance=float(info.get("guidance", 1.0)),
                       temperature=float(info.get("temperature", 1.0)),
                       label_temperatures={k: float(v) for k, v in info.get("label_temperatures", {}).items()})
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(f"corrupt embedding prior in {folder}: {err}",
                                 fix="re-export it (python -m recipes.prior) or remove the prior/ folder") from err

    def describe(self) -> dict:
        """Labels (with their own temperature, where one is set) and vocabulary, for ``pixgen info``."""
        temps = self.label_temperatures
        return {"labels": {k: " + ".join(v) + (f" (temperature {temps[k]:g})" if k in temps else "")
                           for k, v in self.vocabulary.labels.items()},
                "terms": {t.name: f"[{t.group}] {t.meaning}" + (f" (also: {', '.join(t.aliases)})" if t.aliases else "")
                          for t in self.vocabulary.terms},
                "stop_words": sorted(STOP_WORDS), "steps": self.steps, "guidance": self.guidance,
                "temperature": self.temperature,
                **({"label_temperatures": self.label_temperatures} if self.label_temperatures else {})}
