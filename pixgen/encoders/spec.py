"""`EncoderSpec`: everything pixgen needs to know about an SSL encoder, as plain data.

A spec is JSON-serialisable, so a saved encoder directory records it in ``pixgen_encoder.json``.
A spec is data, never code: ``model_kwargs`` hold sizes and flags; layer classes (e.g. timm's
``mlp_layer``) are named by one of the fixed dotted paths in `LAYER_CLASSES` (resolved only when
the backbone is built), and no spec may set a loader argument that fetches files or runs code
(`FORBIDDEN_KWARGS`). Custom model code runs only for a registry entry with ``remote_code=True``
pinned to a ``revision`` (a commit hash), and only when the caller passes ``trust_remote_code=True``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from pixgen.errors import InputError

__all__ = [
    "FORBIDDEN_KWARGS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LAYER_CLASSES",
    "LAYER_KWARGS",
    "OUTPUTS",
    "EncoderSpec",
    "check_model_kwargs",
    "is_pinned",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUTS = ("cls", "cls+mean")
# timm constructor arguments that take classes; specs name them by one of LAYER_CLASSES.
LAYER_KWARGS = ("mlp_layer", "act_layer", "norm_layer", "embed_layer", "block_fn")
# The only classes a spec may name (an allow-list, so that no file can make pixgen import a module).
LAYER_CLASSES = frozenset({
    "timm.layers.SwiGLUPacked", "timm.layers.SwiGLU", "timm.layers.Mlp", "timm.layers.GluMlp",
    "torch.nn.SiLU", "torch.nn.GELU", "torch.nn.LayerNorm", "torch.nn.Identity",
})
# Loader arguments (timm.create_model, transformers from_pretrained) that fetch files, unpickle or run code.
FORBIDDEN_KWARGS = frozenset({
    "trust_remote_code", "code_revision", "revision", "auto_map", "weights_only", "use_safetensors",
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "custom_load",
    "from_tf", "from_flax", "state_dict", "config", "local_files_only", "token", "subfolder", "device_map",
})
_COMMIT = re.compile(r"[0-9a-f]{40}")


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
        model_kwargs: data for the backbone: ``timm.create_model`` model arguments, or transformers
            config fields; checked by `check_model_kwargs`.
        remote_code: the model needs custom Python code from its Hub repository (``trust_remote_code``).
            Only registry entries set it; a spec read from a folder never does.
        revision: the Hub commit hash to download (required with ``remote_code``), or None for the
            default branch.
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
    remote_code: bool = False
    revision: str | None = None
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
        if self.revision is not None and not is_pinned(self.revision):
            problems.append(f"revision must be a 40-character commit hash, got {self.revision!r}")
        if self.resize not in ("bicubic", "bilinear"):
            problems.append(f"resize must be 'bicubic' or 'bilinear', got {self.resize!r}")
        kwargs_problems = _kwargs_problems(self.model_kwargs)
        if problems or kwargs_problems:
            raise InputError(
                f"invalid EncoderSpec {self.name!r}: " + "; ".join(problems + kwargs_problems),
                fix=_KWARGS_FIX if kwargs_problems else "correct the EncoderSpec fields",
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
        """Build a spec from `to_dict` output (e.g. a folder's ``pixgen_encoder.json``).

        Keys this pixgen version does not know are ignored, and so are ``remote_code`` and
        ``revision``: a file can never ask for custom code to run.
        """
        known = {f.name for f in dataclasses.fields(cls)} - {"remote_code", "revision"}
        return cls(**{k: v for k, v in data.items() if k in known})


def is_pinned(revision: str | None) -> bool:
    """True for a full 40-hex commit hash (a branch or tag name can move; a commit cannot)."""
    return isinstance(revision, str) and _COMMIT.fullmatch(revision) is not None


def check_model_kwargs(kwargs: Any, where: str) -> None:
    """Raise `InputError` unless ``kwargs`` (from a spec or a config file) are plain data.

    Example:
        >>> check_model_kwargs({"img_size": 224, "mlp_layer": "timm.layers.SwiGLUPacked"}, "spec")
        >>> check_model_kwargs({"trust_remote_code": True}, "spec")  # doctest: +SKIP
        InputError: spec: model_kwargs may not set trust_remote_code ...
    """
    problems = _kwargs_problems(kwargs)
    if problems:
        raise InputError(f"{where}: " + "; ".join(problems), fix=_KWARGS_FIX)


_KWARGS_FIX = (
    "pixgen never runs code named by a model file: model arguments may only be data (sizes, flags) and layer classes "
    "from pixgen's allow-list; custom model code needs a registry entry with remote_code=True pinned to a commit, "
    "loaded with --trust-remote-code"
)


def _kwargs_problems(kwargs: Any) -> list[str]:
    if not isinstance(kwargs, dict):
        return [f"model_kwargs must be a JSON object, got {type(kwargs).__name__}"]
    problems = []
    for key, value in kwargs.items():
        if key in FORBIDDEN_KWARGS:
            problems.append(f"model_kwargs may not set {key!r} (a loader argument that can fetch files or run code)")
        elif key in LAYER_KWARGS and isinstance(value, str) and "." in value and value not in LAYER_CLASSES:
            problems.append(f"model_kwargs {key}={value!r} is not one of the allowed layer classes "
                            f"({', '.join(sorted(LAYER_CLASSES))})")
        elif not _is_data(value):
            problems.append(f"model_kwargs {key!r} holds a {type(value).__name__}, not JSON data")
    return problems


def _is_data(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_data(v) for k, v in value.items())
    return value is None or isinstance(value, (str, int, float, bool))


def _triple(values: Any, what: str, name: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) != 3:
        raise InputError(
            f"EncoderSpec {name!r}: {what} needs 3 values (R, G, B), got {len(vals)}",
            fix=f"give {what} as a tuple of three floats",
        )
    return vals  # type: ignore[return-value]
