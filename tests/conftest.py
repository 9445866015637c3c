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


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after: tiny models run fastest on one thread, and on a
    shared 2-core machine two OpenMP threads that wait on each other are ~100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
