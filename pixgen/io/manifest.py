"""The synthetic-set manifest: what a folder of generated images is, and how to make it again.

``pixgen generate`` writes ``manifest.json`` beside its images; ``pixgen eval`` (and the studio)
read it instead of guessing from file names. Schema (version 1), as JSON::

    {"format": "pixgen-synthetic-set", "version": 1, "complete": true,
     "files": [{"file": "0000.png", "seed": 7,
                "condition": {"kind": "reference", "id": "refs/a.png", "label": null,
                              "reference_sha256": "..."},
                "control_image": null}, ...],
     "model": {"name": "pixgen-default", "weights_sha256": "...", "weights_files": 3,
               "encoder": "pixgen-ssl", "overrides": {"vae_path": "<sha256>"}},
     "sampler": {"steps": 20, "guidance": 2.0, "scheduler": "DPMSolverMultistepScheduler",
                 "batch_size": 8, "n": 4, "seed": 7, "device": "cpu", "dtype": "float32",
                 "control_scale": null},
     "embeddings": {"path": "e.safetensors", "sha256": "..."} | null,
     "references": {"refs/a.png": "<sha256>"},
     "conditions": {"file": "conditions.safetensors", "key": "embeddings", "encoder": "pixgen-ssl"} | null,
     "contact_sheet": "contact_sheet.png" | null,
     "versions": {"pixgen": "0.1.0", "torch": "...", "diffusers": "...", "python": "..."},
     "created": "2026-12-04T22:00:00+00:00", "host": "...", "seconds": 12.3,
     "spec": null | {"file": "lc.toml", "sha256": "...", "spec": {...}, "layout": "imagefolder",
              "classes": {"lung_aca": {"count": 64, "kind": "label", "source": "lung_aca"}},
              "contact_sheets": {"lung_aca": "contact_sheet_lung_aca.png"}, "rejected_near_copies": 0}}

``spec`` is set by ``pixgen synth`` (files are then ``CLASS/0000.png``); ``files`` lists exactly the images of the set, in order; row *i* of the ``conditions`` tensor
(N, tokens, D) is the condition of ``files[i]``. ``complete`` is false from the moment a set
starts until its last file is written, so an interrupted set is recognisable as such.
Paths (references, embeddings) are stored as typed; their content hashes identify them.

Example:
    >>> writer = SetWriter.create("out/", manifest)                        # doctest: +SKIP
    >>> writer.add(image, ImageEntry("0000.png", seed=0, condition=Condition("label", "tumour[3]", "tumour")))  # doctest: +SKIP
    >>> writer.finish(conditions=emb.values)                               # doctest: +SKIP
    >>> SetManifest.load("out/").complete                                  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pixgen.errors import InputError
from pixgen.io.atomic import PART_SUFFIX, write_bytes_atomic, write_json_atomic

__all__ = [
    "MANIFEST_FILE", "MANIFEST_FORMAT", "MANIFEST_VERSION", "CONDITIONS_FILE", "CONTACT_SHEET",
    "Condition", "ImageEntry", "ModelId", "SamplerSettings", "FileHash", "SetManifest", "SetWriter",
    "sha256_file", "weights_sha256", "model_id", "library_versions", "check_output_folder",
]

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "pixgen-synthetic-set"
MANIFEST_VERSION = 1
CONDITIONS_FILE = "conditions.safetensors"
CONTACT_SHEET = "contact_sheet.png"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
# Files an earlier `pixgen generate` wrote (version 0 sets had provenance.json, no manifest).
_OWN_FILES = re.compile(r"^(\d{4,}\.png|contact_sheet\.png|provenance\.json|conditions\.safetensors|manifest\.json)$")


@dataclass
class Condition:
    """What one image was conditioned on: ``kind`` is ``reference``, ``embeddings``, ``label``
    (a bank draw of that label) or ``bank`` (a draw from all labels); ``id`` names the row
    (reference path as typed, embeddings id, ``label[index]`` of the bank)."""

    kind: str
    id: str
    label: str | None = None
    reference_sha256: str | None = None


@dataclass
class ImageEntry:
    """One image of the set: its file name (relative to the set folder), seed and condition."""

    file: str
    seed: int | None
    condition: Condition
    control_image: str | None = None


@dataclass
class ModelId:
    """The model by content: ``weights_sha256`` over its weight files (see :func:`weights_sha256`);
    ``overrides`` maps ``vae_path`` / ``encoder_path`` to the hash of the folder used instead."""

    name: str
    weights_sha256: str | None = None
    weights_files: int = 0
    encoder: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)


@dataclass
class SamplerSettings:
    """How the images were sampled (enough to run the same command again)."""

    steps: int
    guidance: float
    scheduler: str
    batch_size: int
    n: int
    seed: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    control_scale: float | None = None


@dataclass
class FileHash:
    """A file as typed by the user and the SHA-256 of its content."""

    path: str
    sha256: str


@dataclass
class SetManifest:
    """The declared contents of a synthetic-set folder (see the module docstring for the JSON)."""

    model: ModelId
    sampler: SamplerSettings
    files: list[ImageEntry] = field(default_factory=list)
    embeddings: FileHash | None = None
    references: dict[str, str] = field(default_factory=dict)
    conditions: dict[str, Any] | None = None
    contact_sheet: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    complete: bool = False
    created: str = ""
    host: str = ""
    seconds: float | None = None
    spec: dict[str, Any] | None = None  # `pixgen synth`: the spec's sha256 and content, per-class counts and sheets
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> SetManifest:
        """Parse a manifest dict; a newer version or another format is refused with a clear error."""
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise InputError(f"{source} is not a pixgen synthetic-set manifest",
                             fix=f"a set folder's {MANIFEST_FILE} is written by `pixgen generate`")
        if int(data.get("version", 0)) > MANIFEST_VERSION:
            raise InputError(f"{source} has manifest version {data['version']}, this pixgen reads up to {MANIFEST_VERSION}",
                             fix="upgrade pixgen")
        try:
            kw = {f.name: data[f.name] for f in fields(cls) if f.name in data}
            kw["model"] = ModelId(**kw["model"])
            kw["sampler"] = SamplerSettings(**kw["sampler"])
            kw["files"] = [ImageEntry(**{**e, "condition": Condition(**e["condition"])}) for e in kw.get("files", [])]
            kw["embeddings"] = FileHash(**kw["embeddings"]) if kw.get("embeddings") else None
            return cls(**kw)
        except (KeyError, TypeError) as err:
            raise InputError(f"{source} is malformed: {err}", fix="regenerate the set with `pixgen generate`") from None

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/manifest.json`` atomically."""
        return write_json_atomic(Path(folder) / MANIFEST_FILE, self.to_dict())

    @classmethod
    def load(cls, folder: str | Path) -> SetManifest:
        """Read ``folder/manifest.json``; :class:`InputError` when missing or unreadable."""
        path = Path(folder) / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"no {MANIFEST_FILE} in {folder}", fix="generate the set with `pixgen generate`") from None
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read {path}: {err}", fix="regenerate the set with `pixgen generate`") from None
        return cls.from_dict(data, str(path))

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / MANIFEST_FILE).is_file()

    def image_paths(self, folder: str | Path) -> list[Path]:
        """The set's images, in order; :class:`InputError` when the set is incomplete or a file is missing."""
        folder = Path(folder)
        if not self.complete:
            raise InputError(f"the synthetic set in {folder} is incomplete (generation was interrupted)",
                             fix="generate it again with `pixgen generate --out DIR --overwrite`")
        paths = [folder / e.file for e in self.files]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise InputError(f"{folder} lacks {len(missing)} file(s) its manifest lists: {missing[:5]}",
                             fix="restore the files or generate the set again")
        return paths


# ---------------------------------------------------------------------------------------------
# Hashes and versions
# ---------------------------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content.

    Example:
        >>> sha256_file("refs/a.png")[:12]  # doctest: +SKIP
        '3b1f0c9a2e7d'
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_sha256(folder: str | Path) -> tuple[str | None, int]:
    """(SHA-256 over the weight files under ``folder``, number of files): a model's identity by
    content, independent of where it lies. The digest covers each file's relative path and
    content hash, in sorted order; (None, 0) when there are no weight files.

    Example:
        >>> weights_sha256("pixgen/weights/pixgen-default")  # doctest: +SKIP
        ('9c0e...', 3)
    """
    folder = Path(folder)
    if folder.is_file():
        return sha256_file(folder), 1
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        return None, 0
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}\t{sha256_file(p)}\n".encode())
    return h.hexdigest(), len(files)


def model_id(name: str, folder: str | Path | None, encoder: str | None = None,
             overrides: dict[str, str | Path | None] | None = None) -> ModelId:
    """A :class:`ModelId`: ``name`` (a folder is reduced to its last part: the path is not part of
    a model's identity) and the weights hash of ``folder``; ``overrides`` (e.g. ``vae_path``)
    are hashed too.

    Example:
        >>> model_id("runs/a/final", "runs/a/final", "pixgen-ssl").name  # doctest: +SKIP
        'final'
    """
    digest, n_files = weights_sha256(folder) if folder is not None else (None, 0)
    hashed = {k: weights_sha256(v)[0] for k, v in (overrides or {}).items() if v and Path(v).exists()}
    shown = Path(name).name if Path(name).exists() else str(name)
    return ModelId(shown, digest, n_files, encoder, {k: v for k, v in hashed.items() if v})


def library_versions() -> dict[str, str]:
    """Versions of pixgen, torch, diffusers and Python (those imported or importable)."""
    from importlib.metadata import PackageNotFoundError, version

    from pixgen import __version__

    out = {"pixgen": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# ---------------------------------------------------------------------------------------------
# Writing a set
# ---------------------------------------------------------------------------------------------
def check_output_folder(out: str | Path, overwrite: bool = False) -> Path:
    """Check before any compute that ``out`` can take a new set: not a file, not holding another
    set (unless ``overwrite``), and writable (a probe file is created and removed there, or in
    its nearest existing parent when ``out`` does not exist yet). Creates nothing.

    Example:
        >>> check_output_folder("out/run1")  # doctest: +SKIP
        PosixPath('out/run1')
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file", fix="pass a folder (it is created if missing)")
    if out.is_dir() and not overwrite:
        held = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if held:
            raise InputError(f"{out} is not empty ({', '.join(held[:3])}{' ...' if len(held) > 3 else ''})",
                             fix="choose another --out, or pass --overwrite to replace the set in it")
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    probe = probe_dir / f".pixgen-write-test.{secrets.token_hex(4)}{PART_SUFFIX}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as err:
        raise InputError(f"cannot write to {probe_dir}: {err.strerror or err}",
                         fix="choose an --out on a writable disk with free space") from None
    return out


def _clear_old_set(out: Path) -> None:
    """Remove an earlier set's files from ``out`` (those its manifest lists, and the names pixgen
    writes); other files are left alone."""
    names = set()
    if SetManifest.exists(out):
        try:
            names = {e.file for e in SetManifest.load(out).files}
        except InputError:
            pass
    for p in out.iterdir():
        if p.is_file() and (p.name in names or _OWN_FILES.match(p.name)):
            p.unlink()


class SetWriter:
    """Writes a synthetic set so that it is always either complete or marked incomplete.

    :meth:`create` checks the folder and writes the manifest with ``complete: false``;
    :meth:`add` saves one image (atomically, its provenance in the PNG) and records it;
    :meth:`finish` writes the conditions tensor and the contact sheet, then flips ``complete``.
    Used as a context manager, an error or interrupt saves the manifest as it stands (the files
    written so far, ``complete: false``), except a :class:`~pixgen.errors.PixgenError` raised
    before any image was written: a refused request, after which :meth:`abandon` removes the
    writer's files. The manifest is also saved every ``save_every`` seconds while images come in.

    Example:
        >>> w = SetWriter.create("out", SetManifest(ModelId("m"), SamplerSettings(2, 1.0, "Euler", 8, 1)))  # doctest: +SKIP
        >>> w.add(img, ImageEntry("0000.png", 0, Condition("embeddings", "condition[0]")))                  # doctest: +SKIP
        >>> w.finish()                                                                                      # doctest: +SKIP
    """

    save_every = 5.0  # seconds between manifest saves while images are added

    def __init__(self, out: Path, manifest: SetManifest, created_folder: bool):
        self.out, self.manifest, self._created_folder = out, manifest, created_folder
        self._images: list[Any] = []
        self._saved_at = time.monotonic()

    def __enter__(self) -> SetWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        from pixgen.errors import PixgenError

        if exc is not None and isinstance(exc, PixgenError) and not self.manifest.files:
            self.abandon()
        elif not self.manifest.complete:
            self.manifest.save(self.out)

    @classmethod
    def create(cls, out: str | Path, manifest: SetManifest, overwrite: bool = False) -> SetWriter:
        out = check_output_folder(out, overwrite)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            _clear_old_set(out)
        manifest.complete = False
        manifest.created = manifest.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest.host = manifest.host or platform.node()
        manifest.versions = manifest.versions or library_versions()
        manifest.save(out)
        return cls(out, manifest, created)

    def add(self, image: Any, entry: ImageEntry, provenance: dict[str, Any] | None = None) -> Path:
        """Save ``image`` (PIL or uint8 HWC) as ``entry.file`` with the image's provenance in the
        PNG (the model id, sampler settings and this entry, plus ``provenance``)."""
        from pixgen.io.images import save_png

        prov = {"model": asdict(self.manifest.model), "sampler": asdict(self.manifest.sampler),
                "pixgen": self.manifest.versions.get("pixgen"), **asdict(entry), **(provenance or {})}
        path = save_png(image, self.out / entry.file, provenance=prov)
        self.manifest.files.append(entry)
        self._images.append(image)
        if time.monotonic() - self._saved_at > self.save_every:
            self.manifest.save(self.out)
            self._saved_at = time.monotonic()
        return path

    def finish(self, conditions: Any | None = None, encoder: str | None = None, contact_sheet: bool = True,
               seconds: float | None = None) -> SetManifest:
        """Write ``conditions`` (a tensor, row i = file i) and the contact sheet, then mark the set complete."""
        if conditions is not None:
            from safetensors.torch import save

            if len(conditions) != len(self.manifest.files):
                raise InputError(f"{len(conditions)} conditions for {len(self.manifest.files)} images")
            write_bytes_atomic(self.out / CONDITIONS_FILE, save({"embeddings": conditions.detach().float().cpu().contiguous()}))
            self.manifest.conditions = {"file": CONDITIONS_FILE, "key": "embeddings", "encoder": encoder}
        if contact_sheet and self._images:
            from PIL import Image

            from pixgen.io.atomic import atomic_write
            from pixgen.io.images import contact_sheet as sheet

            imgs = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in self._images]
            with atomic_write(self.out / CONTACT_SHEET) as fh:
                sheet(imgs).save(fh, format="PNG")
            self.manifest.contact_sheet = CONTACT_SHEET
        self.manifest.seconds = None if seconds is None else round(seconds, 2)
        self.manifest.complete = True
        self.manifest.save(self.out)
        return self.manifest

    def abandon(self) -> None:
        """Remove this writer's files (and the folder if it created it and it is now empty)."""
        for name in [e.file for e in self.manifest.files] + [MANIFEST_FILE, CONDITIONS_FILE, CONTACT_SHEET]:
            (self.out / name).unlink(missing_ok=True)
        if self._created_folder and not any(self.out.iterdir()):
            os.rmdir(self.out)
