"""SSL encoders: the registry of pathology foundation models and one `Encoder` interface.

Importing this package is cheap: timm and transformers load only when an encoder is loaded.

Example:
    >>> from pixgen.encoders import list_encoders, get_encoder_spec, load_encoder
    >>> get_encoder_spec("uni2-h").dim
    1536
    >>> enc = load_encoder("uni2-h", token="hf_...")      # doctest: +SKIP
    >>> emb = enc.embed(images)                             # (N, 1536) float32  # doctest: +SKIP
    >>> grid = enc.embed_grid(images_1024px, grid=4)        # (N, 16, 1536)      # doctest: +SKIP

Plugging in another backbone family (e.g. the bundled encoder):
    >>> register_loader("bundled", my_loader)                                    # doctest: +SKIP
    >>> register_encoder(EncoderSpec(name="pixgen-bundled", library="bundled", ...))  # doctest: +SKIP
"""

from __future__ import annotations

from pixgen.encoders import catalog as _catalog  # noqa: F401  (registers the built-in encoders)
from pixgen.encoders.backbones import (
    TimmEncoder,
    TransformersEncoder,
    load_timm,
    load_transformers,
)
from pixgen.encoders.base import Encoder
from pixgen.encoders.images import to_uint8_batch
from pixgen.encoders.loading import (
    EncoderLoader,
    load_encoder,
    read_saved_spec,
    register_loader,
)
from pixgen.encoders.registry import (
    ENCODERS,
    get_encoder_spec,
    list_encoders,
    register_encoder,
)
from pixgen.encoders.spec import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec

__all__ = [
    "ENCODERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Encoder",
    "EncoderLoader",
    "EncoderSpec",
    "TimmEncoder",
    "TransformersEncoder",
    "get_encoder_spec",
    "list_encoders",
    "load_encoder",
    "read_saved_spec",
    "register_encoder",
    "register_loader",
    "to_uint8_batch",
]

register_loader("timm", load_timm)
register_loader("transformers", load_transformers)
from pixgen.encoders import bundled as _bundled  # noqa: E402,F401  (registers pixgen-ssl and the "bundled" loader)
