"""pixgen: diffusion generative models and synthetic data for histopathology.

Heavy submodules (torch, diffusers) load on first use, so ``import pixgen`` stays cheap.

Example:
    >>> from pixgen import Generator
    >>> gen = Generator.from_pretrained("path/to/model")      # doctest: +SKIP
    >>> images = gen.generate(label="lung_scc", num_images=4)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Generator": "pixgen.pipeline",
    "Embeddings": "pixgen.embeddings",
    "PixgenTransformer": "pixgen.models.transformer",
    "load_encoder": "pixgen.encoders",
    "list_encoders": "pixgen.encoders",
    "PixgenError": "pixgen.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pixgen' has no attribute {name!r}")
