"""Dependency arrows point one way: the library imports none of training/, metrics/, studio/."""

from __future__ import annotations

import subprocess
import sys

LIBRARY_MODULES = [
    "pixgen", "pixgen.cli", "pixgen.commands", "pixgen.pipeline", "pixgen.models", "pixgen.encoders",
    "pixgen.embeddings", "pixgen.io", "pixgen.formats", "pixgen.testing",
]


def test_library_imports_no_upper_package():
    code = (
        "import importlib, sys\n"
        f"for m in {LIBRARY_MODULES!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('training', 'metrics', 'studio'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_import_pixgen_is_cheap():
    code = "import sys, pixgen; print(int('torch' in sys.modules), int('diffusers' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"]
