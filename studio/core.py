"""What every studio page shares: settings, the per-session work folder, paths under ``--root``,
uploads, models cached per session, progress with cancel, errors as messages, zips.

The pages call the library; this module only adapts it to Streamlit (widgets, session state).
Settings come from the environment that ``pixgen studio`` sets (``PIXGEN_STUDIO_ROOT``,
``PIXGEN_STUDIO_WORK``, ``PIXGEN_STUDIO_MAX_UPLOAD_MB``), so a page also runs under
``streamlit.testing.v1.AppTest`` without the command.

Example:
    >>> folder = under_root("lc25000-lung/lung_aca")        # doctest: +SKIP
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import threading
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from pixgen.errors import InputError, PixgenError

__all__ = [
    "MODEL_SOURCES",
    "Settings",
    "StepProgress",
    "cancel_button",
    "cancelled_notice",
    "load_generator",
    "model_picker",
    "new_run_folder",
    "running",
    "save_upload",
    "session_folder",
    "settings",
    "settled",
    "show_report",
    "shown_errors",
    "under_root",
    "zip_folder",
]

ROOT_ENV, WORK_ENV, UPLOAD_ENV = "PIXGEN_STUDIO_ROOT", "PIXGEN_STUDIO_WORK", "PIXGEN_STUDIO_MAX_UPLOAD_MB"
DEFAULT_MAX_UPLOAD_MB = 20
MODEL_SOURCES = ("bundled", "local folder", "hub id")
_CANCEL = "_studio_cancel_requested"


@dataclass(frozen=True)
class Settings:
    """``root``: the only folder the studio reads user folders from; ``work``: where each session
    gets its own folder (uploads and outputs); ``max_upload_mb``: the per-file upload limit."""

    root: Path
    work: Path
    max_upload_mb: int


def settings() -> Settings:
    """The studio's settings, from the environment ``pixgen studio`` sets (defaults: the current
    folder as root, a ``pixgen-studio`` folder in the system's temporary folder as work)."""
    root = Path(os.environ.get(ROOT_ENV) or Path.cwd()).expanduser().resolve()
    work = Path(os.environ.get(WORK_ENV) or Path(tempfile.gettempdir()) / "pixgen-studio").expanduser().resolve()
    return Settings(root, work, int(os.environ.get(UPLOAD_ENV) or DEFAULT_MAX_UPLOAD_MB))


def session_folder() -> Path:
    """This browser session's own work folder (created on first use); nothing else is written."""
    if "_studio_session" not in st.session_state:
        st.session_state["_studio_session"] = uuid.uuid4().hex[:16]
    folder = settings().work / st.session_state["_studio_session"]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def new_run_folder(kind: str) -> Path:
    """A fresh, not yet existing folder ``SESSION/kind/NNN`` for one run's outputs."""
    parent = session_folder() / kind
    parent.mkdir(exist_ok=True)
    taken = [int(p.name) for p in parent.iterdir() if p.name.isdigit()]
    return parent / f"{max(taken, default=0) + 1:03d}"


def under_root(text: str, kind: str = "folder") -> Path:
    """``text`` (relative to the root, or absolute) as an existing path inside the studio's root;
    anything outside it (``..``, absolute paths elsewhere, links leading out) is refused."""
    root = settings().root
    if not text or not text.strip():
        raise InputError(f"no {kind} given", fix=f"type a path relative to the data root {root}")
    path = Path(text.strip()).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root):
        raise InputError(f"{text} is outside the studio's data root {root}",
                         fix=f"choose a {kind} under {root}, or start `pixgen studio --root DIR` with a root that holds it")
    if not path.exists():
        raise InputError(f"no {kind} at {text} (under the data root {root})", fix="check the path")
    return path


def save_upload(upload: Any, subfolder: str = "uploads") -> Path:
    """Write an uploaded file into this session's folder (size-checked, name sanitised); returns its path."""
    limit = settings().max_upload_mb
    if upload.size > limit * 1024 * 1024:
        raise InputError(f"{upload.name} is {upload.size / 2**20:.1f} MB, over the studio's {limit} MB upload limit",
                         fix="upload a smaller file, or start `pixgen studio --max-upload-mb N`")
    folder = session_folder() / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(upload.name).name).lstrip(".") or "upload"
    path = folder / name
    path.write_bytes(upload.getvalue())
    return path


def model_picker(key: str = "model") -> tuple[str, str | None]:
    """Sidebar widgets choosing a model: the bundled one, a folder under the root, or a hub id
    (with an optional token). Returns ``(source, token)`` for :func:`load_generator`."""
    with st.sidebar:
        kind = st.radio("Model", MODEL_SOURCES, key=f"{key}_kind", help="a hub id is the only thing ever fetched")
        if kind == "local folder":
            return str(under_root(st.text_input("Model folder (under the data root)", key=f"{key}_dir"), "model folder")), None
        if kind == "hub id":
            hub = st.text_input("Hub id (owner/name)", key=f"{key}_hub")
            token = st.text_input("Hub token (gated models)", type="password", key=f"{key}_token") or None
            if not hub.strip():
                raise InputError("no hub id given", fix="type owner/name, or choose the bundled model")
            return "hub:" + hub.strip(), token
    return "bundled", None


@st.cache_resource(scope="session", show_spinner="loading the model ...", max_entries=4)
def load_generator(source: str, token: str | None = None) -> Any:
    """The model for ``source`` (``bundled``, a folder path, or ``hub:owner/name``), loaded once per
    session. Only a hub id may touch the network."""
    from pixgen.commands import DEFAULT_MODEL
    from pixgen.pipeline import Generator

    if source.startswith("hub:"):
        return Generator.from_pretrained(source[4:], token=token, local_files_only=False)
    return Generator.from_pretrained(DEFAULT_MODEL if source == "bundled" else source, local_files_only=True)


def model_path(source: str) -> str:
    """What the CLI calls the model: the bundled folder, the local folder or the hub id."""
    from pixgen.commands import DEFAULT_MODEL

    return str(DEFAULT_MODEL) if source == "bundled" else source.removeprefix("hub:")


@contextmanager
def shown_errors() -> Iterator[None]:
    """Show any failure inside as one ``st.error`` message (a cancelled run as a warning), never
    a traceback. Streamlit's own rerun / stop signals pass through (they are not ``Exception``)."""
    from pixgen.sampling import SamplingCancelled

    try:
        yield
    except SamplingCancelled:
        st.warning("Cancelled: what was finished is kept, the set is marked incomplete.")
    except PixgenError as err:
        st.error(str(err))
    except Exception as err:  # noqa: BLE001 - anything else: one line, no traceback in the page
        st.error(f"Unexpected error ({type(err).__name__}): {str(err).splitlines()[0] if str(err) else ''}")


def cancel_button(key: str) -> None:
    """A Cancel button shown while long work runs: clicking it stops the run at its next step
    (Streamlit interrupts the running script at its next progress update); the rerun that
    follows shows :func:`cancelled_notice`."""
    st.button("Cancel", key=key, on_click=lambda: st.session_state.__setitem__(_CANCEL, True))


def _work_lock() -> threading.Lock:
    return st.session_state.setdefault("_studio_work_lock", threading.Lock())


@contextmanager
def running(key: str, total: int, text: str = "denoising") -> Iterator[StepProgress]:
    """A Cancel button and a progress bar (a :class:`StepProgress` for the sampler's callback) for
    the work inside; both disappear when it ends. The work holds this session's work lock (see
    :func:`settled`)."""
    with _work_lock():
        box = st.empty()
        with box.container():
            cancel_button(key)
            progress = StepProgress(total, text)
        try:
            yield progress
        finally:
            box.empty()


@contextmanager
def settled(timeout: float = 120.0) -> Iterator[None]:
    """Wait (up to ``timeout`` s) until no work of this session is still winding down, then read.

    A click during a run (Cancel) makes Streamlit start the next script run at once (its default
    ``runner.fastReruns``) while the interrupted one still runs up to its next progress update,
    where it stops and its set writer saves what was finished. Reading a set inside this shows it
    as it was left, not as it was a moment before."""
    lock = _work_lock()
    held = lock.acquire(timeout=timeout)
    try:
        yield
    finally:
        if held:
            lock.release()


def cancelled_notice() -> None:
    """At the top of a page: say that the last run was cancelled (once)."""
    if st.session_state.pop(_CANCEL, False):
        st.warning("Cancelled: what was finished is kept; a set broken off is marked incomplete.")


class StepProgress:
    """A progress bar fed by the sampler's per-step callback ``(step, t, latents, x0)``; returns
    False (cancel) once a cancel was requested."""

    def __init__(self, total: int, text: str = "denoising"):
        self.total, self.text, self.done = max(1, total), text, 0
        self.bar = st.progress(0.0, text=f"{text}: 0 / {self.total}")

    def __call__(self, *_: Any) -> bool:
        self.done += 1
        self.bar.progress(min(1.0, self.done / self.total), text=f"{self.text}: {self.done} / {self.total}")
        return not st.session_state.get(_CANCEL, False)


_IMAGE_LINE = re.compile(r"^!\[[^\]]*\]\(([^)]+)\)\s*$")


def show_report(folder: Path) -> None:
    """``report.md`` as ``pixgen eval`` writes it, its plots shown where it links them (links
    leading out of ``folder`` are not followed)."""
    report = folder / "report.md"
    if not report.is_file():
        raise InputError(f"no report.md in {folder}", fix="choose a folder written by `pixgen eval --out DIR`")
    chunk: list[str] = []
    for line in report.read_text().splitlines() + [""]:
        link = _IMAGE_LINE.match(line)
        if link and (folder / link.group(1)).resolve().is_relative_to(folder.resolve()):
            st.markdown("\n".join(chunk))
            chunk = []
            st.image(str(folder / link.group(1)), caption=link.group(1))
        elif not link:
            chunk.append(line)
    st.markdown("\n".join(chunk))


def zip_folder(folder: Path) -> bytes:
    """The files under ``folder`` as a zip (paths relative to it), for a download button."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            zf.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()
