"""The `pixgen` command.

The library's own subcommands live here; `training`, `metrics` and `studio` add theirs through
the ``pixgen.commands`` entry-point group, so the library never imports them. Each entry point
is a function ``add_parser(subparsers) -> None`` that adds one subparser and sets
``func=callable(args) -> int`` with ``parser.set_defaults``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from importlib.metadata import entry_points

from pixgen.errors import PixgenError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser: the library's commands plus every registered plugin."""
    from pixgen import __version__

    parser = argparse.ArgumentParser(
        prog="pixgen",
        description="Diffusion generative models and synthetic data for histopathology.",
    )
    parser.add_argument("--version", action="version", version=f"pixgen {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from pixgen import commands, commands_stain

    commands.add_parsers(sub)
    commands_stain.add_parser(sub)
    for ep in sorted(entry_points(group="pixgen.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pixgen` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():  # restores the default display when main returns (tests call it in-process)
            if not args.debug:
                warnings.showwarning = _one_line_warning
            return int(args.func(args) or 0)
    except PixgenError as err:
        if args.debug:
            raise
        print(f"pixgen: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pixgen: interrupted", file=sys.stderr)
        return 130


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr, like errors (the source line and location only with --debug)."""
    print(f"pixgen: warning: {message}", file=sys.stderr if file is None else file)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
