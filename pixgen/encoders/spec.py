"""`EncoderSpec`: everything pixgen needs to know about an SSL encoder, as plain data.

A spec is JSON-serialisable, so a saved encoder directory records it in ``pixgen_encoder.json``.
Layer classes in ``model_kwargs`` (e.g. timm's ``mlp_layer``) are written as dotted import
paths (``"timm.layers.SwiGLUPacked"``) and resolved only when the backbone is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pixgen.errors import InputError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "OUTPUTS", "EncoderSpec"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUTS = ("cls", "cls+mean")


@dataclass(frozen=True)
class EncoderSpec:
    """Facts about one encoder: embedding size, input size, normalisation, resolution, origin.

    ``str(spec)`` is its registry name; ``repr`` shows every field.

    Attributes:
        name: registry key, e.g. ``"uni2-h"``.
        dim: size of the embedding the encoder returns (``cls+mean`` doubles the token width).
        input_size: square side, in pixels, of the images the backbone takes.
        mean, std: per-channel RGB normalisation applied to images scaled to [0, 1].
        mpp: microns per pixel of the tiles the model was trained on.
        source: ``"hf-hub:<org>/<repo>"`` or ``"bundled"``.
        library: ``"timm"``, ``"transformers"`` or ``"bundled"`` (selects the loader).
        gated: whether the Hub repository needs an access request and a token.
        output: ``"cls"`` or ``"cls+mean"`` (CLS token concatenated with the mean patch token).
        licence: licence of the weights.
        description: one or two sentences for people choosing an encoder.
        model_kwargs: extra arguments for the backbone constructor (``timm.create_model`` or
            ``AutoModel.from_pretrained``).
        resize: interpolation (antialiased) when images are resized to ``input_size``:
            ``"bicubic"`` or ``"bilinear"`` (as the embeddings a model was trained on were made).

    Example:
        >>> spec = EncoderSpec(name="my-vit", dim=384, input_size=224, mean=IMAGENET_MEAN,
        ...                    std=IMAGENET_STD, mpp=0.5, source="hf-hub:me/my-vit", library="timm")
        >>> spec.embedding_width
        384
    """

    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float
    source: str
    library: str
    gated: bool = False
    output: str = "cls"
    licence: str = ""
    description: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    resize: str = "bicubic"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _triple(self.mean, "mean", self.name))
        object.__setattr__(self, "std", _triple(self.std, "std", self.name))
        problems = []
        if not self.name:
            problems.append("name is empty")
        if self.output not in OUTPUTS:
            problems.append(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.dim <= 0 or (self.output == "cls+mean" and self.dim % 2):
            problems.append(f"dim must be positive (and even for 'cls+mean'), got {self.dim}")
        if self.input_size <= 0 or self.mpp <= 0:
            problems.append("input_size and mpp must be positive")
        if any(s <= 0 for s in self.std):
            problems.append("std values must be positive")
        if self.resize not in ("bicubic", "bilinear"):
            problems.append(f"resize must be 'bicubic' or 'bilinear', got {self.resize!r}")
        if problems:
            raise InputError(
                f"invalid EncoderSpec {self.name!r}: " + "; ".join(problems),
                fix="correct the EncoderSpec fields",
            )

    def __str__(self) -> str:
        return self.name

    @property
    def embedding_width(self) -> int:
        """Width of one backbone token (``dim``, or ``dim // 2`` for ``cls+mean``)."""
        return self.dim // 2 if self.output == "cls+mean" else self.dim

    @property
    def hub_id(self) -> str | None:
        """``"org/repo"`` for Hub-hosted encoders, else None."""
        return self.source.removeprefix("hf-hub:") if self.source.startswith("hf-hub:") else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists).

        Example:
            >>> EncoderSpec.from_dict(spec.to_dict()) == spec  # doctest: +SKIP
            True
        """
        data = dataclasses.asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderSpec:
        """Build a spec from `to_dict` output; keys this pixgen version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _triple(values: Any, what: str, name: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) != 3:
        raise InputError(
            f"EncoderSpec {name!r}: {what} needs 3 values (R, G, B), got {len(vals)}",
            fix=f"give {what} as a tuple of three floats",
        )
    return vals  # type: ignore[return-value]
