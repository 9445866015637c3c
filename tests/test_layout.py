"""Dependency arrows point one way: studio -> (pixgen, metrics); training -> pixgen;
metrics -> pixgen; recipes -> all; pixgen -> none of ours.

Each package's modules are imported in a fresh interpreter and ``sys.modules`` is inspected, so
a lazy import inside a function is allowed (it is how the library calls plugins), an import at
module level is not.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest

OURS = ("pixgen", "training", "metrics", "studio", "recipes")
ALLOWED = {
    "pixgen": set(),
    "training": {"pixgen"},
    "metrics": {"pixgen"},
    "studio": {"pixgen", "metrics"},
    "recipes": {"pixgen", "training", "metrics"},
}


@functools.cache
def _imported_packages(package: str) -> tuple[list[str], set[str]]:
    """(modules of ``package``, our top-level packages in sys.modules after importing them all)."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        "names = [pkg.__name__] + [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(','.join(names))\n"
        f"print(','.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({OURS!r}))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    modules, packages = out.stdout.strip().splitlines()
    return modules.split(","), set(packages.split(",")) - {package}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package):
    modules, imported = _imported_packages(package)
    assert len(modules) >= 1
    assert imported <= ALLOWED[package], f"{package} imports {sorted(imported - ALLOWED[package])}"


def test_every_module_of_the_library_is_checked():
    modules, _ = _imported_packages("pixgen")
    for name in ("pixgen.io.images", "pixgen.io.manifest", "pixgen.io.slides", "pixgen.pipeline", "pixgen.testing"):
        assert name in modules


def test_import_pixgen_is_cheap():
    code = "import sys, pixgen, pixgen.io; print(int('torch' in sys.modules), int('diffusers' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"]
