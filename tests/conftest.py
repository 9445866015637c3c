"""Shared fixtures: the real data in ../shared/data, and seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real H&E data (../shared/data from the repo root, or $PIXGEN_DATA)."""
    path = Path(os.environ.get("PIXGEN_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.fail(f"real data not found at {path}; set PIXGEN_DATA to the shared/data folder")
    return path


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
