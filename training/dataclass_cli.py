"""One ``--flag`` per field of a config dataclass (the CLIs of ``training.autoencoder`` and ``training.ssl``).

Example:
    >>> import argparse, dataclasses
    >>> @dataclasses.dataclass
    ... class Cfg:
    ...     steps: int = 10
    ...     bf16: bool = True
    ...     channels: tuple[int, ...] = (32, 64)
    >>> p = add_dataclass_flags(argparse.ArgumentParser(), Cfg, int_lists=("channels",))
    >>> vars(p.parse_args(["--steps", "5", "--no-bf16", "--channels", "8", "16"]))
    {'steps': 5, 'bf16': False, 'channels': [8, 16]}
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

__all__ = ["add_dataclass_flags"]

SCALARS = {"int": int, "float": float, "str": str, "str | None": str}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, int_lists: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Booleans as ``--x/--no-x``, scalar fields typed, ``int_lists`` fields as ``nargs="+"``;
    other fields (dicts, float pairs) stay config-file only. Every default is None (= keep)."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool" or f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name in int_lists:
            parser.add_argument(flag, type=int, nargs="+", default=None)
        elif kind in SCALARS:
            parser.add_argument(flag, type=SCALARS[kind], default=None)
    return parser
