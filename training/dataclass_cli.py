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
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_dataclass_flags", "add_run_flags", "saved_config"]

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


def add_run_flags(parser: argparse.ArgumentParser, evaluates: str, exports: str) -> argparse.ArgumentParser:
    """``--resume``, ``--eval-only`` (what it ``evaluates``) and ``--export`` (what it ``exports``)."""
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint/ (or a pre-engine <out>/checkpoint.pt)")
    parser.add_argument("--eval-only", action="store_true", help=f"evaluate the checkpoint{evaluates}")
    parser.add_argument("--export", default=None, help=f"with --eval-only: write the fp16 {exports} here")
    return parser


def saved_config(out: str, wanted: bool) -> dict[str, Any]:
    """The run's saved ``config.json`` when resuming or evaluating (``wanted``), else ``{}``."""
    path = Path(out) / "config.json"
    return json.loads(path.read_text()) if wanted and path.is_file() else {}
