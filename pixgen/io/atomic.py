"""Atomic writes: a file (or folder) appears whole under its final name, or not at all.

Every file pixgen writes goes through :func:`atomic_write` (or the helpers built on it), so an
interrupt, a crash or a full disk never leaves a half-written file under the real name, and no
``.part`` file is left behind on an error. Files are created with mode ``0o666`` minus the
user's umask, like any other tool (``tempfile`` would make them ``0o600``).

Example:
    >>> with atomic_write("out/notes.txt", "w") as fh:              # doctest: +SKIP
    ...     fh.write("hello")
    >>> write_json_atomic("out/run.json", {"step": 10})              # doctest: +SKIP
    >>> with atomic_dir("out/final") as tmp:                         # doctest: +SKIP
    ...     model.save_pretrained(tmp)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_dir", "write_bytes_atomic", "write_text_atomic", "write_json_atomic", "PART_SUFFIX"]

PART_SUFFIX = ".part"


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", fsync: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary ``NAME.XXXXXXXX.part`` beside ``path`` for writing; on success it is renamed
    to ``path`` (replacing it), on any error it is removed and the old ``path`` stays as it was.

    ``mode`` is ``"wb"`` or ``"w"`` (UTF-8 text). ``fsync`` flushes the data to disk before the
    rename (checkpoints); parent folders are created.

    Example:
        >>> with atomic_write("out/x.png") as fh:           # doctest: +SKIP
        ...     image.save(fh, format="PNG")
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write writes only, mode 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}{PART_SUFFIX}")
    # os.open with 0o666 lets the umask decide the permissions (tempfile would force 0o600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (e.g. ``safetensors.torch.save(...)`` output)."""
    with atomic_write(path) as fh:
        fh.write(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return Path(path)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented, key-sorted JSON; non-finite floats are refused (not valid JSON).

    Example:
        >>> write_json_atomic("run/config.json", {"lr": 1e-4})       # doctest: +SKIP
    """
    text = json.dumps(data, indent=2, sort_keys=True, default=str, allow_nan=False)
    return write_text_atomic(path, text + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder ``.NAME.XXXXXXXX.part`` beside ``path``; when the block ends
    without error it replaces ``path``, otherwise it is deleted. An old folder of that name is
    moved aside before the rename and deleted after it, so a crash at any moment leaves a complete
    folder (the old one under ``.NAME.old`` at worst). For outputs that are folders: checkpoints,
    exported models, cache shards.

    Example:
        >>> with atomic_dir("run/final") as tmp:            # doctest: +SKIP
        ...     generator.save_pretrained(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{PART_SUFFIX}")
    tmp.mkdir()
    try:
        yield tmp
        aside = path.with_name(f".{path.name}.old")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
        os.replace(tmp, path)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
