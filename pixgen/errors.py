"""Errors that pixgen shows to people: what went wrong, and how to fix it."""

from __future__ import annotations


class PixgenError(Exception):
    """An error with a one-line explanation and a suggested fix.

    The CLI prints ``str(err)`` as a single line (no traceback unless ``--debug``).

    Example:
        >>> raise PixgenError("no model at ./m", fix="pass --model with a Generator directory")
    """

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(f"{message} (fix: {fix})" if fix else message)


class InputError(PixgenError, ValueError):
    """Bad user input: a corrupt image, a wrong-size tensor, NaN values, an unknown name."""


class ModelLoadError(PixgenError, OSError):
    """A model, encoder or weight file could not be found or read."""


class EncoderMismatchError(InputError):
    """Embeddings that come from another encoder, or have another dimension, than a model expects."""
