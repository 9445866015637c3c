"""``pixgen studio``: start the Streamlit studio (``streamlit run studio/app.py`` underneath).

Registered through the ``pixgen.commands`` entry point (pyproject.toml); needs the ``studio`` extra.

Example:
    $ pixgen studio --root ../shared/data --port 8501
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.util import find_spec
from pathlib import Path

from pixgen.errors import InputError

__all__ = ["add_parser", "run_studio", "streamlit_command"]

APP = Path(__file__).parent / "app.py"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``studio`` to the ``pixgen`` parser."""
    p = sub.add_parser("studio", help="the Streamlit studio: generate, paint, augment, large images, stain, explore")
    p.add_argument("--root", default=".", help="the only folder whose contents the studio reads (default: the current one)")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.add_argument("--host", default="localhost", help="address to listen on (default: this machine only)")
    p.add_argument("--work", help="where each browser session gets its own folder for uploads and outputs "
                                  "(default: pixgen-studio in the system's temporary folder)")
    p.add_argument("--max-upload-mb", type=int, default=20, help="largest upload in MB (default 20)")
    p.set_defaults(func=run_studio)


def streamlit_command(args: argparse.Namespace) -> list[str]:
    """The ``streamlit run`` command line for ``args``: headless, no usage statistics, errors shown
    without tracebacks, the upload limit enforced by the server too."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(args.port),
            "--server.address", args.host, "--server.headless", "true", "--server.maxUploadSize", str(args.max_upload_mb),
            "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
            "--client.showErrorDetails", "none", "--client.toolbarMode", "viewer"]


def run_studio(args: argparse.Namespace) -> int:
    root = Path(args.root).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"--root {args.root} is not a folder", fix="pass the folder that holds your data")
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must be 1..65535, got {args.port}")
    if args.max_upload_mb < 1:
        raise InputError(f"--max-upload-mb must be >= 1, got {args.max_upload_mb}")
    missing = [m for m in ("streamlit", "streamlit_drawable_canvas") if find_spec(m) is None]
    if missing:
        raise InputError(f"the studio needs {', '.join(missing)}, which is not installed",
                         fix='pip install "pixgen[studio]"')
    env = {**os.environ, "PIXGEN_STUDIO_ROOT": str(root), "PIXGEN_STUDIO_MAX_UPLOAD_MB": str(args.max_upload_mb)}
    if args.work:
        env["PIXGEN_STUDIO_WORK"] = str(Path(args.work).expanduser().resolve())
    print(f"pixgen studio: http://{args.host}:{args.port} (data root {root}; Ctrl-C stops it)", flush=True)
    cmd = streamlit_command(args)
    os.execve(cmd[0], cmd, env)  # this process becomes the server: signals (Ctrl-C, terminate) reach it directly
    return 0  # not reached
