"""Condition values: what a generated image is conditioned on, resolved to tokens per image.

Every way of asking for an image ends as condition tokens in the model's encoder space
(:class:`~pixgen.embeddings.Embeddings`, tagged ``(encoder, domain)``). A condition is a small
value that says how to get them; :meth:`Generator.generate` takes one and resolves it with
:meth:`Condition.resolve`, one row per output image, each from that image's own seed:

* :class:`Reference`: reference images, embedded by the model's encoder (a grid of tiles for
  grid models such as PixCell-1024);
* :class:`BankDraw`: one entry of the model's embedding bank per image, for a label (or all
  labels pooled), drawn from the image's seed, so image ``i`` of a run equals the image made
  alone with its seed;
* :class:`RawEmbeddings`: tokens given directly ((N, D), (N, T, D) or tagged embeddings);
* :class:`EmbeddingGrid`: a (rows, cols, D) grid of tile embeddings, flattened row-major into
  one image's tokens;
* :class:`PriorSample`: a new embedding per image from the model's learned prior
  (:mod:`pixgen.prior`) for a label or a prompt, from the image's own seed (as :class:`BankDraw`);
* :class:`PriorPath`: points along a path between two labels / prompts, the same prior noise at
  every point (controlled augmentation, ``pixgen generate --interpolate A B``).

Extension point: subclass :class:`Condition` and implement ``size`` (how many distinct
conditions; each gets ``num_images`` images) and ``resolve`` (tokens for the given per-image
seeds). :class:`PriorSample` draws ``prior.sample(condition, seed)`` per seed as
:class:`BankDraw` draws bank entries; a stain translation would wrap another condition and map its tokens,
retagging the domain (``Embeddings(..., domain="ihc")``).

Example:
    >>> gen.generate(BankDraw("lung_aca"), num_images=4, seed=0)            # doctest: +SKIP
    >>> gen.generate(Reference(["tile.png"]), num_images=2)                 # doctest: +SKIP
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image

from pixgen.embeddings import Embeddings
from pixgen.errors import InputError

if TYPE_CHECKING:  # the Generator resolves conditions; conditions only read it
    from pixgen.pipeline import Generator

__all__ = ["Condition", "Reference", "BankDraw", "PriorSample", "PriorPath", "RawEmbeddings", "EmbeddingGrid",
           "as_condition", "from_keywords"]


class Condition(ABC):
    """A request for condition tokens (see the module docstring)."""

    @abstractmethod
    def size(self, model: Generator) -> int:
        """How many distinct conditions this value holds (each gets ``num_images`` images)."""

    @abstractmethod
    def resolve(self, model: Generator, seeds: Sequence[int | None], generator: torch.Generator | None = None) -> Embeddings:
        """Tokens for ``len(seeds) = size * num_images`` images, condition-major (condition ``k``'s
        images are rows ``k * num_images ...``); random choices use each image's seed, or
        ``generator`` where a seed is None."""


class FixedCondition(Condition):
    """A condition whose tokens do not depend on the seed: computed once, repeated per image."""

    @abstractmethod
    def embeddings(self, model: Generator) -> Embeddings:
        """The distinct conditions, (size, T, D)."""

    def size(self, model: Generator) -> int:
        return len(self.embeddings(model))

    def resolve(self, model: Generator, seeds: Sequence[int | None], generator: torch.Generator | None = None) -> Embeddings:
        base = self.embeddings(model)
        per = len(seeds) // len(base)
        ids = base.ids or [f"condition[{i}]" for i in range(len(base))]
        return Embeddings(base.values.repeat_interleave(per, 0), encoder=base.encoder, domain=base.domain,
                          ids=[i for i in ids for _ in range(per)])


@dataclass(eq=False)
class Reference(FixedCondition):
    """Reference images (paths, PIL images, uint8 arrays) embedded by the model's own encoder."""

    images: Sequence[Any]

    def __post_init__(self) -> None:
        if isinstance(self.images, (str, Path, Image.Image, np.ndarray)):
            self.images = [self.images]
        if len(self.images) == 0:
            raise InputError("no reference images given", fix="pass at least one image path")
        self._cache: tuple[int, Embeddings] | None = None

    def embeddings(self, model: Generator) -> Embeddings:
        if self._cache is None or self._cache[0] != id(model):  # size() and resolve() embed once
            self._cache = (id(model), model.embed_references(self.images))
        return self._cache[1]


@dataclass(eq=False)
class RawEmbeddings(FixedCondition):
    """Condition tokens given directly: tagged :class:`Embeddings`, or an untagged (N, D) / (N, T, D) tensor."""

    values: Embeddings | torch.Tensor | np.ndarray

    def embeddings(self, model: Generator) -> Embeddings:
        if isinstance(self.values, Embeddings):
            return self.values
        return Embeddings(torch.as_tensor(self.values), encoder=None, domain=None)


@dataclass(eq=False)
class EmbeddingGrid(FixedCondition):
    """A grid of tile embeddings, (rows, cols, D) for one image or (N, rows, cols, D), flattened
    row-major into ``rows * cols`` tokens per image (PixCell-1024: 4 x 4 UNI2-h embeddings)."""

    grid: torch.Tensor | np.ndarray
    encoder: str | None = None
    domain: str | None = None

    def embeddings(self, model: Generator) -> Embeddings:
        grid = torch.as_tensor(self.grid)
        grid = grid[None] if grid.ndim == 3 else grid
        if grid.ndim != 4:
            raise InputError(f"an embedding grid must be (rows, cols, D) or (N, rows, cols, D), got {tuple(grid.shape)}")
        return Embeddings(grid.flatten(1, 2), encoder=self.encoder, domain=self.domain)


@dataclass(eq=False)
class BankDraw(Condition):
    """One embedding-bank entry per image for ``label`` (None: all labels pooled), drawn from the
    image's own seed: the draw for seed ``s`` is the same in any run, whatever ``num_images``."""

    label: str | None = None

    def size(self, model: Generator) -> int:
        return 1

    def resolve(self, model: Generator, seeds: Sequence[int | None], generator: torch.Generator | None = None) -> Embeddings:
        bank = model.embedding_bank
        if bank is None:
            raise InputError("this model has no embedding bank, so a label cannot be used",
                             fix="pass reference images or embeddings")
        return bank.draw(self.label, seeds, generator=generator)


def _prior(model: Generator):
    prior = getattr(model, "prior", None)
    if prior is None:
        raise InputError("this model has no embedding prior, so it cannot sample new embeddings for a label or prompt",
                         fix="use --from-bank (a bank draw), reference images or embeddings")
    return prior


def _prior_embeddings(model: Generator, prior, values: torch.Tensor, ids: list[str]) -> Embeddings:
    return Embeddings(values[:, None], encoder=prior.encoder, domain=model.config.get("domain"), ids=ids)


@dataclass(eq=False)
class PriorSample(Condition):
    """A new embedding per image from the model's prior for ``label`` or ``prompt`` (one of them),
    from the image's own seed: seed ``s`` gives the same embedding in any run, whatever ``num_images``.
    ``extra_terms`` (one list per image) adds terms per image where the combination stays one the
    prior saw (:meth:`pixgen.prior.Vocabulary.extend_seen`): mask-guided generation adds each
    mask's density / composition (:func:`pixgen.prior.mask_terms`), so an epithelial layout gets an
    epithelial embedding.

    Example:
        >>> gen.generate(PriorSample(prompt="colon, inflammatory-rich"), num_images=4, seed=0)  # doctest: +SKIP
        >>> gen.generate(PriorSample("consep", extra_terms=[["dense"], ["epithelial"]]), num_images=2)  # doctest: +SKIP
    """

    label: str | None = None
    prompt: str | None = None
    extra_terms: Sequence[Sequence[str]] | None = None

    def size(self, model: Generator) -> int:
        return 1

    def resolve(self, model: Generator, seeds: Sequence[int | None], generator: torch.Generator | None = None) -> Embeddings:
        prior = _prior(model)
        name = self.label if self.label is not None else self.prompt
        if self.extra_terms is None:
            z = prior.sample(prior.condition(self.label, self.prompt), seeds, generator)
            return _prior_embeddings(model, prior, z, [f"{name}[prior seed {s}]" for s in seeds])
        if len(self.extra_terms) != len(seeds):
            raise InputError(f"extra_terms has {len(self.extra_terms)} entries for {len(seeds)} images",
                             fix="give one list of terms per image")
        vocab = prior.vocabulary
        base = vocab.terms_of(name)
        terms = [vocab.extend_seen(base, extra) for extra in self.extra_terms]
        z = prior.sample(torch.stack([vocab.vector(t) for t in terms]), seeds, generator)
        ids = [f"{', '.join([name, *t[len(base):]])}[prior seed {s}]" for t, s in zip(terms, seeds)]
        return _prior_embeddings(model, prior, z, ids)


@dataclass(eq=False)
class PriorPath(Condition):
    """``points`` conditions on the straight line between the condition vectors of ``start`` and
    ``end`` (labels or prompts), each sampled from the same prior noise, so the embeddings move
    smoothly from a sample of ``start`` to one of ``end``; image ``j`` of every point uses the noise
    of seed ``seeds[j]`` (the first point's seeds).

    Example:
        >>> gen.generate(PriorPath("lung_n", "lung_scc", points=8), num_images=1, seed=0)  # doctest: +SKIP
    """

    start: str
    end: str
    points: int = 8

    def __post_init__(self) -> None:
        if self.points < 2:
            raise InputError(f"a path needs at least 2 points, got {self.points}")

    def size(self, model: Generator) -> int:
        return self.points

    def resolve(self, model: Generator, seeds: Sequence[int | None], generator: torch.Generator | None = None) -> Embeddings:
        prior = _prior(model)
        a, b = (prior.vocabulary.parse(x) for x in (self.start, self.end))
        per = len(seeds) // self.points
        noise = prior.noise(seeds[:per], generator).repeat(self.points, 1)
        t = torch.linspace(0, 1, self.points).repeat_interleave(per)[:, None]
        z = prior.sample((1 - t) * a + t * b, noise=noise)
        ids = [f"{self.start}->{self.end}[t={float(x):.3g} seed {seeds[i % per]}]" for i, x in enumerate(t[:, 0])]
        return _prior_embeddings(model, prior, z, ids)


def as_condition(value: Any) -> Condition:
    """A :class:`Condition` from a condition, tagged embeddings or a tensor / array of tokens."""
    if isinstance(value, Condition):
        return value
    if isinstance(value, (Embeddings, torch.Tensor, np.ndarray)):
        return RawEmbeddings(value)
    raise InputError(f"cannot condition on a {type(value).__name__}",
                     fix="pass a pixgen.conditioning value (Reference, BankDraw, RawEmbeddings, EmbeddingGrid)")


def label_or_prompt(model: Generator, text: str) -> Condition:
    """A region's or a request's condition from one string: a label of the model (as ``label=``:
    its prior, else its bank), otherwise a prompt in the prior's vocabulary (unknown words are
    refused when it is resolved, naming them).

    Example:
        >>> label_or_prompt(gen, "colon, inflammatory-rich").prompt  # doctest: +SKIP
        'colon, inflammatory-rich'
    """
    if text in model.labels or getattr(model, "prior", None) is None:
        return from_keywords(model, label=text)
    return PriorSample(prompt=text)


def from_keywords(model: Generator, condition: Any = None, embeddings: Any = None, reference: Any = None,
                  label: str | None = None) -> Condition:
    """The condition that ``generate``'s conveniences (``embeddings=``, ``reference=``, ``label=``)
    describe: a label samples the model's prior when it has one (:class:`PriorSample`), else draws
    from its bank; nothing given means bank draws from all labels when the model has a bank."""
    given = [x is not None for x in (condition, embeddings, reference, label)]
    if sum(given) > 1:
        raise InputError("give only one of condition, embeddings, reference or label")
    if condition is not None:
        return as_condition(condition)
    if embeddings is not None:
        return as_condition(embeddings)
    if reference is not None:
        return Reference(reference)
    if label is not None and getattr(model, "prior", None) is not None:
        return PriorSample(label)
    if label is not None or model.embedding_bank is not None:
        return BankDraw(label)
    raise InputError("nothing to condition on", fix="pass reference images, embeddings, or a label")
