"""The encoder registry: named `EncoderSpec` entries, filled by `register_encoder`."""

from __future__ import annotations

from pixgen.encoders.spec import EncoderSpec
from pixgen.errors import InputError

__all__ = ["ENCODERS", "get_encoder_spec", "list_encoders", "register_encoder"]

ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec, *, overwrite: bool = False) -> EncoderSpec:
    """Add ``spec`` to the registry under ``spec.name`` (lower-cased) and return it.

    Example:
        >>> register_encoder(EncoderSpec(name="my-vit", dim=384, input_size=224, mean=IMAGENET_MEAN,
        ...     std=IMAGENET_STD, mpp=0.5, source="hf-hub:me/my-vit", library="timm"))  # doctest: +SKIP
    """
    key = spec.name.lower()
    if key in ENCODERS and not overwrite and ENCODERS[key] != spec:
        raise InputError(
            f"an encoder named {spec.name!r} is already registered",
            fix="choose another name, or pass overwrite=True to replace it",
        )
    ENCODERS[key] = spec
    return spec


def get_encoder_spec(name: str) -> EncoderSpec:
    """The registered spec for ``name`` (case-insensitive); `InputError` listing known names if none.

    Example:
        >>> get_encoder_spec("UNI2-h").dim
        1536
    """
    try:
        return ENCODERS[name.lower()]
    except KeyError:
        raise InputError(
            f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))}",
            fix="use one of the names above, or a directory that contains pixgen_encoder.json",
        ) from None


def list_encoders() -> list[EncoderSpec]:
    """All registered specs, sorted by name (``str(spec)`` is the name).

    Example:
        >>> [(s.name, s.dim) for s in list_encoders()][:2]
        [('dinov2-vitb14', 768), ('dinov2-vitg14', 1536)]
    """
    return [ENCODERS[key] for key in sorted(ENCODERS)]
