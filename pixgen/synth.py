"""Synthetic training sets from one spec: ``pixgen synth SPEC --out DIR``.

A spec (TOML) names the model, the classes (each with a count and one condition source), the
sampler settings, the output layout and a seed::

    seed = 0
    model = "bundled"                    # or a model folder (relative to the spec) / hub id

    [sampler]
    quality = "balanced"                 # optional: fast, balanced or best (docs/benchmarks.md);
                                         # sampler = "dpm++2m" replaces its solver; absent: the model's
    steps = 12
    guidance = 2.0
    batch_size = 8                       # images per forward; part of the set's identity

    [output]
    layout = "imagefolder"               # CLASS/0000.png; "segmentation": images/ inst/ types/

    [classes.lung_aca]
    count = 64
    label = "lung_aca"                   # or reference = "refs/aca/", embeddings = "e.safetensors",
                                         # prompt = "...", masks = "masks/" or "sampled:consep"
                                         # (masks may come with a label; layout "segmentation")
                                         # a reference class may add strength = 0.5: img2img from
                                         # the reference (distance from the originals; 1 = from noise)

Determinism: image ``i`` of class ``c`` has the seed :func:`image_seed` ``(seed, c, i)``, and
the images are generated in fixed batches (``batch_size`` consecutive images of one class), so
the bytes of every file are the same whatever the number of processes and however often the
run was interrupted. Batch *composition* matters because the float arithmetic of a batched
forward differs in the last bit from one of another size (measured: +-1 grey level on the
bundled model); this is why ranks take whole batches (batch ``k`` goes to rank ``k mod world``)
rather than single images, and why ``batch_size`` is part of the spec's hash.

Resume: every file is written atomically and carries its record (seed, condition, attempts)
in its PNG provenance; a rerun regenerates only the batches that miss a file. At the end
rank 0 builds ``manifest.json`` from those records, the conditions tensor and one contact
sheet per class. A folder holding another spec's set is refused (the spec's hash is in the
manifest).

Layering: the library does not import :mod:`metrics`; ``--eval`` and ``--reject-near-copies``
import it lazily inside :func:`run_synth` only when asked for (see docs/architecture.md).

Example:
    >>> spec = load_spec("lc25000.toml")                      # doctest: +SKIP
    >>> build_set(spec, "out/lc25000-synth")                   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pixgen.errors import InputError

if TYPE_CHECKING:
    from pixgen.conditioning import PriorSample
    from pixgen.embeddings import Embeddings
    from pixgen.io.manifest import SetManifest
    from pixgen.pipeline import Generator
    from pixgen.sampling import StepCallback

__all__ = [
    "SynthSpec", "ClassSpec", "SamplerSpec", "OutputSpec", "Layout", "load_spec", "parse_spec", "image_seed",
    "plan_batches", "build_set", "near_copy_rejecter", "add_parser", "run_synth", "CONDITION_KINDS",
    "cut_reference_tiles",
]

CONDITION_KINDS = ("label", "reference", "embeddings", "prompt", "masks")
LAYOUTS = ("imagefolder", "segmentation")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOP_KEYS = {"seed", "model", "mask_model", "sampler", "output", "classes"}
_CLASS_KEYS = {"count", "from_bank", "strength", *CONDITION_KINDS}
_SAMPLER_KEYS = {"quality", "sampler", "steps", "guidance", "batch_size", "device", "dtype"}
_OUTPUT_KEYS = {"layout"}
MAX_ATTEMPTS = 4  # --reject-near-copies: regenerations per image before it is kept and reported


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------
@dataclass
class ClassSpec:
    """One class of the set: its folder ``name``, ``count`` images and one condition source
    (``masks`` may come with a ``label``: the tissue the layouts are generated as)."""

    name: str
    count: int
    label: str | None = None
    reference: str | None = None
    embeddings: str | None = None
    prompt: str | None = None
    masks: str | None = None
    from_bank: bool = False  # a label's embeddings from the bank, not the model's prior
    strength: float | None = None  # a reference class: img2img from the reference itself (1 or None: from noise)

    @property
    def kind(self) -> str:
        if self.masks is not None:
            return "masks"
        return next(k for k in CONDITION_KINDS if getattr(self, k) is not None)

    @property
    def source(self) -> str:
        return str(getattr(self, self.kind))


@dataclass
class SamplerSpec:
    """Sampler settings; ``quality`` / ``sampler`` / ``steps`` / ``guidance`` None mean the model's own."""

    quality: str | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"


@dataclass
class OutputSpec:
    """``imagefolder``: ``CLASS/0000.png``; ``segmentation``: ``images/``, ``inst/``, ``types/``."""

    layout: str = "imagefolder"


@dataclass
class SynthSpec:
    """A validated dataset spec (see the module docstring); paths are resolved against ``root``."""

    model: str
    classes: list[ClassSpec]
    seed: int = 0
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    source: str = "spec"
    root: str = "."
    mask_model: str | None = None  # a mask model folder; None: the bundled one when the model has no ControlNet

    def to_dict(self) -> dict[str, Any]:
        """The spec's content (no file location): what its hash covers."""
        d = {"model": self.model, "seed": self.seed, "sampler": asdict(self.sampler), "output": asdict(self.output),
             "classes": [asdict(c) for c in self.classes]}
        return d if self.mask_model is None else {**d, "mask_model": self.mask_model}  # older specs keep their hash

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def path(self, value: str) -> Path:
        """A path of the spec, relative to the spec file's folder unless absolute."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.root) / p

    @property
    def total(self) -> int:
        return sum(c.count for c in self.classes)


def _line_of(text: str, keys: Sequence[str]) -> int | None:
    """The line of ``keys`` (a table path then a key) in the TOML text, for error messages."""
    lines = text.splitlines()
    start = 0
    if len(keys) > 1:
        header = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(re.escape(k) for k in keys[:-1]) + r"\s*\]")
        start = next((n for n, line in enumerate(lines) if header.match(line)), 0)
    key = re.compile(r"^\s*" + re.escape(keys[-1]) + r"\s*=")
    return next((n + 1 for n, line in enumerate(lines[start:], start) if key.match(line)), start + 1 if start else None)


class _Checker:
    """Spec errors that name the file, line and key."""

    def __init__(self, text: str, source: str):
        self.text, self.source = text, source

    def fail(self, keys: Sequence[str], problem: str, fix: str | None = None) -> InputError:
        line = _line_of(self.text, keys)
        where = f"{self.source}" + (f", line {line}" if line else "")
        return InputError(f"{where}: {'.'.join(keys)}: {problem}", fix=fix)

    def unknown(self, table: dict, allowed: set[str], keys: Sequence[str]) -> None:
        extra = sorted(set(table) - allowed)
        if extra:
            raise self.fail([*keys, extra[0]], "unknown key", fix=f"use {', '.join(sorted(allowed))}")

    def typed(self, table: dict, key: str, types: type | tuple[type, ...], keys: Sequence[str], default: Any = None) -> Any:
        value = table.get(key, default)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in _tuple(types)):
            names = "/".join(t.__name__ for t in _tuple(types))
            raise self.fail([*keys, key], f"must be {names}, got {value!r}")
        return value


def _tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def parse_spec(text: str, source: str = "spec", root: str | Path = ".") -> SynthSpec:
    """Validate TOML ``text`` into a :class:`SynthSpec`; :class:`InputError` names the line and key.

    Example:
        >>> s = parse_spec('model = "bundled"\\n[classes.a]\\ncount = 2\\nlabel = "lung_aca"\\n')
        >>> (s.classes[0].name, s.classes[0].kind, s.total)
        ('a', 'label', 2)
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{source}: not valid TOML: {err}", fix="see docs/synthetic-sets.md for the spec format") from None
    ck = _Checker(text, source)
    ck.unknown(data, _TOP_KEYS, [])
    model = ck.typed(data, "model", str, [], "bundled")
    mask_model = ck.typed(data, "mask_model", str, [])
    seed = ck.typed(data, "seed", int, [], 0)
    sampler_t, output_t = data.get("sampler", {}), data.get("output", {})
    for name, table, allowed in (("sampler", sampler_t, _SAMPLER_KEYS), ("output", output_t, _OUTPUT_KEYS)):
        if not isinstance(table, dict):
            raise ck.fail([name], "must be a table", fix=f"write [{name}]")
        ck.unknown(table, allowed, [name])
    sampler = SamplerSpec(
        quality=ck.typed(sampler_t, "quality", str, ["sampler"]),
        sampler=ck.typed(sampler_t, "sampler", str, ["sampler"]),
        steps=ck.typed(sampler_t, "steps", int, ["sampler"]),
        guidance=ck.typed(sampler_t, "guidance", (int, float), ["sampler"]),
        batch_size=ck.typed(sampler_t, "batch_size", int, ["sampler"], 8),
        device=ck.typed(sampler_t, "device", str, ["sampler"], "cpu"),
        dtype=ck.typed(sampler_t, "dtype", str, ["sampler"], "float32"),
    )
    from pixgen.sampling import QUALITY_PRESETS, SAMPLERS  # torch: only once a spec is read

    if sampler.quality is not None and sampler.quality not in QUALITY_PRESETS:
        raise ck.fail(["sampler", "quality"], f"unknown quality {sampler.quality!r}", fix=f"use {', '.join(QUALITY_PRESETS)}")
    if sampler.sampler is not None and sampler.sampler not in SAMPLERS:
        raise ck.fail(["sampler", "sampler"], f"unknown sampler {sampler.sampler!r}", fix=f"use {', '.join(SAMPLERS)}")
    if sampler.steps is not None and sampler.steps < 1:
        raise ck.fail(["sampler", "steps"], f"must be >= 1, got {sampler.steps}")
    if sampler.guidance is not None and not math.isfinite(sampler.guidance):
        raise ck.fail(["sampler", "guidance"], f"must be a finite number, got {sampler.guidance}")
    if sampler.batch_size < 1:
        raise ck.fail(["sampler", "batch_size"], f"must be >= 1, got {sampler.batch_size}")
    if sampler.dtype not in ("float32", "bfloat16", "float16"):
        raise ck.fail(["sampler", "dtype"], f"unknown dtype {sampler.dtype!r}", fix="float32, bfloat16 or float16")
    sampler.guidance = None if sampler.guidance is None else float(sampler.guidance)
    layout = ck.typed(output_t, "layout", str, ["output"], "imagefolder")
    if layout not in LAYOUTS:
        raise ck.fail(["output", "layout"], f"unknown layout {layout!r}", fix=f"use {' or '.join(LAYOUTS)}")
    classes_t = data.get("classes")
    if not isinstance(classes_t, dict) or not classes_t:
        raise ck.fail(["classes"], "no classes", fix='add one table per class: [classes.NAME] with count and label = "..."')
    classes = [_parse_class(ck, name, table) for name, table in classes_t.items()]
    if layout == "segmentation" and any(c.kind != "masks" for c in classes):
        bad = next(c for c in classes if c.kind != "masks")
        raise ck.fail(["classes", bad.name, bad.kind], "the segmentation layout needs a mask source per class",
                      fix='give masks = "..." or use layout = "imagefolder"')
    if layout != "segmentation" and any(c.kind == "masks" for c in classes):
        bad = next(c for c in classes if c.kind == "masks")
        raise ck.fail(["classes", bad.name, "masks"], "a masks class needs the segmentation layout (its masks are written)",
                      fix='add [output] layout = "segmentation"')
    return SynthSpec(model=model, classes=classes, seed=seed, sampler=sampler, output=OutputSpec(layout),
                     source=source, root=str(root), mask_model=mask_model)


def _parse_class(ck: _Checker, name: str, table: Any) -> ClassSpec:
    keys = ["classes", name]
    if not isinstance(table, dict):
        raise ck.fail(keys, "must be a table", fix=f"write [classes.{name}] with count = N and a condition")
    if not _NAME.match(name):
        raise ck.fail(keys, f"class name {name!r} is not a safe folder name", fix="use letters, digits, _ . -")
    ck.unknown(table, _CLASS_KEYS, keys)
    count = ck.typed(table, "count", int, keys)
    if count is None:
        raise ck.fail([*keys, "count"], "missing", fix="give count = N (images of this class)")
    if count < 1:
        raise ck.fail([*keys, "count"], f"must be >= 1, got {count}")
    given = [k for k in CONDITION_KINDS if k in table]
    if len(given) != 1 and given != ["label", "masks"]:  # a masks class may name its tissue label
        raise ck.fail(keys, f"give exactly one condition source of {', '.join(CONDITION_KINDS)} (or masks with a label), "
                      f"got {given or 'none'}")
    for k in given:
        ck.typed(table, k, str, keys)
    from_bank = ck.typed(table, "from_bank", bool, keys, False)
    if from_bank and given[0] != "label":
        raise ck.fail([*keys, "from_bank"], "only applies to a label", fix="remove it, or use label = \"...\"")
    strength = ck.typed(table, "strength", (int, float), keys)
    if strength is not None and given[0] != "reference":
        raise ck.fail([*keys, "strength"], "only applies to a reference class", fix="remove it, or use reference = \"DIR\"")
    if strength is not None and not 0 < strength <= 1:
        raise ck.fail([*keys, "strength"], f"must be in (0, 1], got {strength}", fix="e.g. 0.5: half the trajectory from the reference")
    return ClassSpec(name=name, count=count, from_bank=from_bank, strength=None if strength is None else float(strength),
                     **{k: table[k] for k in given})


def load_spec(path: str | Path) -> SynthSpec:
    """Read and validate a spec file (TOML); relative paths in it are relative to its folder.

    Example:
        >>> load_spec("specs/lc25000.toml").total  # doctest: +SKIP
        192
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the spec {path}: {err}", fix="pass a TOML spec file") from None
    return parse_spec(text, str(path), path.parent)


# ---------------------------------------------------------------------------------------------
# The plan: per-image seeds and fixed batches
# ---------------------------------------------------------------------------------------------
def image_seed(seed: int, class_name: str, index: int, attempt: int = 0) -> int:
    """The seed of image ``index`` of ``class_name`` (63 bits of a SHA-256; ``attempt`` > 0 for
    regenerations): independent of processes, batch size and the other classes' counts.

    Example:
        >>> image_seed(0, "lung_aca", 0) == image_seed(0, "lung_aca", 0) != image_seed(0, "lung_aca", 1)
        True
    """
    digest = hashlib.sha256(f"pixgen-synth/{seed}/{class_name}/{index}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class Layout:
    """Where image ``i`` of a class goes (and its masks, for the segmentation layout)."""

    kind: str = "imagefolder"

    def image(self, class_name: str, index: int) -> str:
        return f"{class_name}/{index:04d}.png" if self.kind == "imagefolder" else f"images/{class_name}_{index:05d}.png"

    def masks(self, class_name: str, index: int) -> tuple[str, str] | None:
        if self.kind != "segmentation":
            return None
        return f"inst/{class_name}_{index:05d}.png", f"types/{class_name}_{index:05d}.png"

    def sheet(self, class_name: str) -> str:
        # top-level files: an ImageFolder reader takes only folders as classes
        return f"contact_sheet_{class_name}.png"


@dataclass(frozen=True)
class Batch:
    """``indices`` of class ``klass`` generated in one forward; ``number`` orders all batches."""

    number: int
    klass: int
    indices: tuple[int, ...]


def plan_batches(spec: SynthSpec) -> list[Batch]:
    """All batches of the set, class by class, ``batch_size`` consecutive images each.

    Example:
        >>> s = parse_spec('[sampler]\\nbatch_size = 2\\n[classes.a]\\ncount = 3\\nlabel = "x"\\n')
        >>> [b.indices for b in plan_batches(s)]
        [(0, 1), (2,)]
    """
    out, bs = [], spec.sampler.batch_size
    for k, c in enumerate(spec.classes):
        for lo in range(0, c.count, bs):
            out.append(Batch(len(out), k, tuple(range(lo, min(lo + bs, c.count)))))
    return out


# ---------------------------------------------------------------------------------------------
# Conditions per class
# ---------------------------------------------------------------------------------------------
def _check_start_sizes(files: Sequence[Path], gen: Generator, where: str) -> None:
    """img2img starts from the reference itself, so each must be a tile of the model's output size."""
    from PIL import Image

    f = gen.vae.downsample_factor
    _, h, w = gen._latent_shape(None, None)
    for path in files:
        with Image.open(path) as im:
            if im.size != (w * f, h * f):
                raise InputError(f"{where}: {path.name} is {im.size[0]}x{im.size[1]} px; with strength < 1 each "
                                 f"reference is the start image and must be the output size {w * f}x{h * f}",
                                 fix="cut tiles at the model's size and mpp (pixgen tile), or drop strength")


def cut_reference_tiles(images: Sequence[str | Path], out: str | Path, *, size: int, mpp: float,
                        source_mpp: float) -> list[Path]:
    """Start tiles for a reference class with ``strength`` < 1, from images of any size and resolution.

    Each image (read by :func:`pixgen.io.load_rgb`) is resampled from ``source_mpp`` to ``mpp``
    um/px (Lanczos, as :func:`pixgen.io.slides.read_region` resamples slide regions) and cut into
    the whole ``size`` x ``size`` tiles of a grid centred on it (the partial margins are dropped:
    a 224 px image at the same mpp gives its central 128 px tile), written to
    ``out/STEM_rRcC.png``. An image smaller than one tile at ``mpp`` is refused, named.

    Example:
        >>> cut_reference_tiles(["a.jpeg"], "tiles/a", size=128, mpp=0.5, source_mpp=0.5)  # doctest: +SKIP
        [PosixPath('tiles/a/a_r0c0.png')]
    """
    import numpy as np
    from PIL import Image

    from pixgen.io import load_rgb, save_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tiles = []
    for path in map(Path, images):
        arr = load_rgb(path)
        h, w = (round(n * source_mpp / mpp) for n in arr.shape[:2])
        if min(h, w) < size:
            raise InputError(f"{path.name} is {arr.shape[1]}x{arr.shape[0]} px at {source_mpp} um/px: smaller than one "
                             f"{size} px tile at {mpp} um/px ({size * mpp:g} um)",
                             fix="use larger originals, or check their resolution (um/px)")
        if (h, w) != arr.shape[:2]:
            arr = np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.LANCZOS))
        rows, cols = h // size, w // size
        y0, x0 = (h - rows * size) // 2, (w - cols * size) // 2
        for r in range(rows):
            for c in range(cols):
                tile = arr[y0 + r * size : y0 + (r + 1) * size, x0 + c * size : x0 + (c + 1) * size]
                tiles.append(save_png(tile, out / f"{path.stem}_r{r}c{c}.png",
                                      provenance={"original": path.name, "row": r, "col": c, "mpp": mpp}))
    return tiles


class _ClassConditions:
    """Condition tokens and records for one class: label or prompt -> a prior sample per image seed
    (a label: a bank draw instead when the model has no prior or the class says ``from_bank``);
    reference folder -> image i uses reference ``i mod n``; embeddings -> row ``i mod N``; masks ->
    a label's tokens (bank draws from all labels without one) and layout i (:class:`_MaskSource`)."""

    def __init__(self, spec: SynthSpec, c: ClassSpec, gen: Generator):
        from pixgen.embeddings import load_embeddings
        from pixgen.io import list_images, sha256_file

        self.c, self.gen = c, gen
        self.fixed: Embeddings | None = None
        self.prior: PriorSample | None = None
        self.ids: list[str] = []
        self.hashes: dict[str, str] = {}
        self.masks: _MaskSource | None = None
        self.files: list[Path] = []
        where = f"{spec.source}: classes.{c.name}.{c.kind}"
        if c.kind == "prompt" and gen.prior is None:
            raise InputError(f"{where}: prompt conditions are not available in this model (it has no text prior)",
                             fix="use label, reference or embeddings for this class")
        if c.kind == "masks":
            self.masks = _MaskSource(spec, c, gen, where)
        if c.kind == "prompt" or (c.label is not None and gen.prior is not None and not c.from_bank):
            from pixgen.conditioning import PriorSample

            try:
                gen.prior.condition(c.label, c.prompt)  # unknown labels and words, before any image
            except InputError as err:
                raise InputError(f"{where}: {err.message}", fix=err.fix) from None
            self.prior = PriorSample(label=c.label, prompt=c.prompt)
        elif c.kind in ("label", "masks"):
            bank = gen.embedding_bank
            if bank is None:
                raise InputError(f"{where}: this model has no embedding bank, so labels cannot be used",
                                 fix="use reference or embeddings for this class")
            if c.label is not None and c.label not in bank.labels:
                raise InputError(f"{where}: unknown label {c.label!r}", fix=f"use one of: {', '.join(bank.labels)}")
        elif c.kind == "reference":
            folder = spec.path(c.reference)
            files = list_images(folder) if folder.is_dir() else []
            if not files:
                raise InputError(f"{where}: no images in {folder}", fix="give a folder of reference tiles")
            if c.strength is not None and c.strength < 1:
                _check_start_sizes(files, gen, where)
            self.fixed = gen.embed_references(files)
            self.files = files
            self.ids = [str(f.relative_to(folder)) for f in files]
            self.hashes = {i: sha256_file(f) for i, f in zip(self.ids, files)}
        else:
            path = spec.path(c.embeddings)
            if not path.is_file():
                raise InputError(f"{where}: no file {path}", fix="give an embeddings file (.safetensors, .npy, .pt)")
            self.fixed = load_embeddings(path)
            self.ids = [f"{c.embeddings}[{i}]" for i in range(len(self.fixed))]
            gen.check_conditions(self.fixed)

    def tokens(self, indices: Sequence[int], seeds: Sequence[int]) -> tuple[Embeddings, list[dict[str, Any]]]:
        """Tokens (one row per image) and the manifest's condition record of each image."""
        from pixgen.embeddings import Embeddings

        c = self.c
        if self.prior is not None:
            drawn = self.prior.resolve(self.gen, list(seeds))
            label = c.label if c.label is not None else c.name
            return drawn, [{"kind": "prior", "id": i, "label": label, "reference_sha256": None} for i in drawn.ids]
        if self.fixed is None:  # a label's bank draws; a masks class without a label: all labels pooled
            drawn = self.gen.embedding_bank.draw(c.label, list(seeds))
            return drawn, [{"kind": "label" if c.label else "bank", "id": i, "label": c.label or i.rsplit("[", 1)[0],
                            "reference_sha256": None} for i in drawn.ids]
        rows = [i % len(self.fixed) for i in indices]
        emb = Embeddings(self.fixed.values[rows], encoder=self.fixed.encoder, domain=self.fixed.domain,
                         ids=[self.ids[r] for r in rows])
        return emb, [{"kind": c.kind, "id": self.ids[r], "label": c.name, "reference_sha256": self.hashes.get(self.ids[r])}
                     for r in rows]


class _MaskSource:
    """Layout ``i`` of a masks class at the model's image size: file ``i mod n`` of a mask file or
    folder (:func:`pixgen.masks.load_layouts`), or ``sampled:TISSUE``: the mask sampler drawn with
    image ``i``'s seed (attempt 0, so a regenerated near-copy keeps its layout)."""

    def __init__(self, spec: SynthSpec, c: ClassSpec, gen: Generator, where: str):
        from pixgen.mask_sampler import MaskSampler
        from pixgen.masks import fit_layout, load_layouts

        self.spec, self.c, self.size = spec, c, gen.config["image_size"]
        self.layouts: list[Any] = []
        self.sampler: MaskSampler | None = None
        if gen.controlnet is None or getattr(gen.controlnet, "mask_encoder", None) is None:
            raise InputError(f"{where}: this model has no mask ControlNet",
                             fix='give mask_model = "DIR" (a mask model, docs/masks.md) at the top of the spec')
        try:
            if c.masks.startswith("sampled:"):
                self.sampler = MaskSampler.from_json(_mask_model_dir(spec) / "mask_stats.json", c.masks.split(":", 1)[1])
            else:
                self.layouts = [fit_layout(lay, self.size) for lay in load_layouts(spec.path(c.masks))]
        except InputError as err:
            raise InputError(f"{where}: {err.message}", fix=err.fix) from None

    def layout(self, index: int) -> Any:
        from pixgen.masks import fit_layout

        if self.sampler is not None:
            return fit_layout(self.sampler.sample(image_seed(self.spec.seed, self.c.name, index)), self.size)
        return self.layouts[index % len(self.layouts)]


def _mask_model_dir(spec: SynthSpec) -> Path:
    from pixgen.masks import BUNDLED_MASK_MODEL

    return spec.path(spec.mask_model) if spec.mask_model else BUNDLED_MASK_MODEL


def _attach_mask_model(spec: SynthSpec, gen: Generator) -> None:
    """A spec with masks classes: the spec's ``mask_model``, else the bundled one when the model
    has no ControlNet (as ``pixgen generate --mask`` does)."""
    from pixgen.masks import attach_mask_model

    if any(c.kind == "masks" for c in spec.classes) and (spec.mask_model or gen.controlnet is None):
        attach_mask_model(gen, _mask_model_dir(spec))


# ---------------------------------------------------------------------------------------------
# Building the set
# ---------------------------------------------------------------------------------------------
def _load_model(spec: SynthSpec, device: str | None = None) -> tuple[Generator, str, Path | None]:
    import torch

    from pixgen.commands import DEFAULT_MODEL, _check_default_model
    from pixgen.pipeline import Generator

    name = str(DEFAULT_MODEL) if spec.model == "bundled" else spec.model
    local = spec.path(name)
    name = str(local) if local.exists() else name
    _check_default_model(name)
    gen = Generator.from_pretrained(name, device=device or spec.sampler.device, dtype=getattr(torch, spec.sampler.dtype))
    if spec.sampler.quality or spec.sampler.sampler:
        gen.use_sampling(spec.sampler.quality, spec.sampler.sampler)
    return gen, name, gen.source


def _check_out(out: Path, spec: SynthSpec) -> SetManifest | None:
    """Read-only checks on every rank: a new folder, or one holding this spec's set (resume)."""
    from pixgen.io import SetManifest, check_output_folder

    if SetManifest.exists(out):
        m = SetManifest.load(out)
        held = (m.spec or {}).get("sha256")
        if held != spec.sha256():
            what = f"the set of another spec ({m.spec.get('file')})" if m.spec else "a set written by `pixgen generate`"
            raise InputError(f"{out} holds {what}; sets are not mixed",
                             fix="choose another --out, or remove that folder first")
        return m
    check_output_folder(out)
    return None


def _check_same_model(out: Path, held: SetManifest, model_name: str, root: Path | None) -> None:
    """A set is resumed only with the weights it was started with (same spec, changed model file)."""
    from pixgen.io.manifest import weights_sha256

    now = weights_sha256(root)[0] if root is not None else None
    if held.model.weights_sha256 and now != held.model.weights_sha256:
        raise InputError(f"{out} was started with other weights of {model_name} ({held.model.weights_sha256[:12]}...)",
                         fix="resume with the same model files, or choose another --out")


def _write_failed(path: Path, err: OSError) -> InputError:
    import errno

    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    return InputError(f"could not write {path}: {'disk full' if full else err.strerror or err}",
                      fix="free space (or choose another --out) and rerun the same command: finished images are kept, "
                      "nothing half-written remains")


def build_set(spec: SynthSpec, out: str | Path, *, rejecter: Callable[[Generator], Callable[[list[Any]], list[bool]]] | None = None,
              progress: bool = True, state: Any = None, callback: StepCallback | None = None) -> SetManifest | None:
    """Generate (or finish) ``spec``'s set in ``out``; call it on every process of a launch.

    Process ``rank`` of ``world`` generates batches ``k`` with ``k mod world == rank``;
    ``rejecter(generator)`` gives ``flags(images) -> list[bool]`` (``--reject-near-copies``):
    flagged images are regenerated with the next attempt's seed. Rank 0 returns the finished manifest; other ranks return None.

    Args:
        callback: the sampler's per-step callback, ``callback(step, timestep, latents, x0)`` per
            step of each batch (:meth:`~pixgen.pipeline.Generator.generate_batches`; a batch of a
            ``strength`` < 1 class runs only its img2img steps). Returning False raises
            :class:`~pixgen.sampling.SamplingCancelled`: the finished batches' images are kept, the
            manifest stays ``complete: false``, and a rerun finishes the set (see Resume above).

    Example:
        >>> build_set(load_spec("spec.toml"), "out/set")  # doctest: +SKIP
        >>> build_set(load_spec("spec.toml"), "out/set", callback=lambda *step: not stop.is_set())  # doctest: +SKIP
    """
    from accelerate import PartialState

    state = state or PartialState(cpu=spec.sampler.device == "cpu")
    out = Path(out)
    t0 = time.perf_counter()
    held = _check_out(out, spec)
    state.wait_for_everyone()  # every rank has looked at the folder before rank 0 writes to it
    # "cuda" means each rank's own GPU (accelerate sets it); an explicit "cuda:1" is kept
    gen, model_name, root = _load_model(spec, str(state.device) if spec.sampler.device == "cuda" else None)
    if held is not None:
        _check_same_model(out, held, model_name, root)
    _attach_mask_model(spec, gen)
    conds = [_ClassConditions(spec, c, gen) for c in spec.classes]  # refuses bad classes before any write
    flags = rejecter(gen) if rejecter is not None else None
    layout = Layout(spec.output.layout)
    if state.is_main_process:
        _start(out, spec, gen, model_name, root, held)
    state.wait_for_everyone()
    batches = plan_batches(spec)
    todo = [b for b in batches if any(not (out / layout.image(spec.classes[b.klass].name, i)).is_file() for i in b.indices)]
    mine = [b for b in todo if b.number % state.num_processes == state.process_index]
    bar = _progress(spec, todo, progress and state.is_main_process)
    for b in mine:
        _generate_batch(spec, gen, conds[b.klass], layout, b, out, flags, callback)
        bar.update(min(len(b.indices) * state.num_processes, bar.total - bar.n))
    bar.close()
    state.wait_for_everyone()
    result = _finish(out, spec, gen, conds, layout, time.perf_counter() - t0) if state.is_main_process else None
    state.wait_for_everyone()
    return result


def _progress(spec: SynthSpec, todo: list[Batch], enabled: bool):
    """One bar over the whole set; rank 0 counts its own images times the number of processes."""
    from tqdm.auto import tqdm

    done = spec.total - sum(len(b.indices) for b in todo)
    return tqdm(total=spec.total, initial=done, desc="synth", unit="img", disable=not enabled)


def _start(out: Path, spec: SynthSpec, gen: Generator, model_name: str, root: Path | None,
           held: SetManifest | None) -> None:
    """Rank 0: write the manifest (``complete: false``) and clear part files a kill left behind."""
    from pixgen.io.atomic import PART_SUFFIX

    out.mkdir(parents=True, exist_ok=True)
    for part in out.rglob(f"*{PART_SUFFIX}"):
        part.unlink(missing_ok=True)
    manifest = held or _manifest(spec, gen, model_name, root)
    if held is None or held.complete:
        manifest.complete = False
        manifest.save(out)


def _manifest(spec: SynthSpec, gen: Generator, model_name: str, root: Path | None) -> SetManifest:
    from datetime import datetime, timezone
    import platform

    from pixgen.io import SamplerSettings, SetManifest
    from pixgen.io.manifest import library_versions, model_id

    s = spec.sampler
    return SetManifest(
        model=model_id(model_name, root, gen.config.get("encoder")),
        sampler=SamplerSettings(steps=int(s.steps or gen.config["num_inference_steps"]),
                                guidance=float(gen.config["guidance_scale"] if s.guidance is None else s.guidance),
                                scheduler=type(gen.scheduler).__name__, batch_size=s.batch_size, n=spec.total,
                                seed=spec.seed, device=s.device, dtype=s.dtype),
        spec={"file": Path(spec.source).name, "sha256": spec.sha256(), "spec": spec.to_dict(), "layout": spec.output.layout,
              "classes": {c.name: {"count": c.count, "kind": c.kind, "source": c.source} for c in spec.classes}},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), host=platform.node(),
        versions=library_versions(),
    )


def _generate_batch(spec: SynthSpec, gen: Generator, cond: _ClassConditions, layout: Layout, b: Batch, out: Path,
                    rejecter: Callable[[list[Any]], list[bool]] | None, callback: StepCallback | None = None) -> None:
    """Generate one batch; with ``rejecter``, regenerate flagged images (next attempt's seed),
    up to :data:`MAX_ATTEMPTS`; write the images this folder does not hold yet."""
    name = spec.classes[b.klass].name
    pending = list(b.indices)
    attempts = {i: 0 for i in pending}
    images: dict[int, Any] = {}
    records: dict[int, dict[str, Any]] = {}
    while pending:
        seeds = [image_seed(spec.seed, name, i, attempts[i]) for i in pending]
        imgs, recs = _sample(spec, gen, cond, pending, seeds, callback)
        flags = rejecter(imgs) if rejecter is not None else [False] * len(imgs)
        again = []
        for i, img, rec, flagged in zip(pending, imgs, recs, flags):
            images[i], records[i] = img, {**rec, "seed": seeds[pending.index(i)], "attempts": attempts[i] + 1,
                                          "near_copy": bool(flagged)}
            if flagged and attempts[i] + 1 < MAX_ATTEMPTS:
                attempts[i] += 1
                again.append(i)
        pending = again
    for i in b.indices:
        if cond.masks is not None:  # before the image: a file that exists means its masks do too
            _save_masks(out, layout.masks(name, i), cond.masks.layout(i))
        _save(out, layout.image(name, i), images[i], {"class": name, "index": i, "spec_sha256": spec.sha256(), **records[i]})


def _sample(spec: SynthSpec, gen: Generator, cond: _ClassConditions, indices: list[int], seeds: list[int],
            callback: StepCallback | None = None):
    """Images for ``indices`` with their own seeds: the seeds' bank draws / rows as tokens and
    the seeds' noise as starting latents (generate() numbers seeds consecutively; we do not)."""
    import torch

    from pixgen.conditioning import RawEmbeddings

    tokens, records = cond.tokens(indices, seeds)
    shape = gen._latent_shape(None, None)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    control = None if cond.masks is None else [cond.masks.layout(i) for i in indices]  # one per image of this batch
    strength = cond.c.strength or 1.0
    start = [cond.files[i % len(cond.files)] for i in indices] if strength < 1 else None  # img2img from image i's reference
    result = gen.generate(RawEmbeddings(tokens), num_images=1, latents=noise, batch_size=len(indices), control_image=control,
                          image=start, strength=strength, num_inference_steps=spec.sampler.steps,
                          guidance_scale=spec.sampler.guidance, output_type="pil", progress=False, callback=callback)
    return result.images, records


def _save(out: Path, rel: str, image: Any, record: dict[str, Any]) -> None:
    from pixgen.io import save_png

    path = out / rel
    if path.is_file():  # finished before an interruption: same bytes, keep it
        return
    try:
        save_png(image, path, provenance=record)
    except OSError as err:
        raise _write_failed(path, err) from None


def _save_masks(out: Path, rels: tuple[str, str] | None, lay: Any) -> None:
    """The layout's instance map (uint16) and class map (uint8; 0 without classes), atomically."""
    import numpy as np

    from pixgen.io import save_png

    types = lay.types if lay.types is not None else np.zeros(lay.shape, np.uint8)
    for rel, arr in zip(rels or (), (lay.inst.astype(np.uint16), types.astype(np.uint8))):
        path = out / rel
        if not path.is_file():
            try:
                save_png(arr, path)
            except OSError as err:
                raise _write_failed(path, err) from None


def _write(path: Path, write: Callable[[Any], Any]) -> str:
    from pixgen.io.atomic import atomic_write

    try:
        with atomic_write(path) as fh:
            write(fh)
    except OSError as err:
        raise _write_failed(path, err) from None
    return path.name


def _finish(out: Path, spec: SynthSpec, gen: Generator, conds: list[_ClassConditions], layout: Layout,
            seconds: float) -> SetManifest:
    """Rank 0: the manifest from the files' own records, the conditions tensor and the sheets."""
    import torch
    from safetensors.torch import save

    from pixgen.io import Condition, ImageEntry, SetManifest, contact_sheet, load_image, read_provenance
    from pixgen.io.manifest import CONDITIONS_FILE

    m = SetManifest.load(out)
    entries, values, sheets, rejected, kept_flagged = [], [], {}, 0, 0
    for c, cond in zip(spec.classes, conds):
        records = [read_provenance(out / layout.image(c.name, i)) for i in range(c.count)]
        for r in records:
            rejected += r["attempts"] - 1
            kept_flagged += int(r["near_copy"])
            inst = (layout.masks(c.name, r["index"]) or (None,))[0] if c.kind == "masks" else None
            entries.append(ImageEntry(layout.image(c.name, r["index"]), r["seed"],
                                      Condition(r["kind"], r["id"], r["label"], r["reference_sha256"]), inst))
        tokens, _ = cond.tokens(range(c.count), [r["seed"] for r in records])
        values.append(tokens.values)
        sheet = contact_sheet([load_image(out / layout.image(c.name, i)) for i in range(min(c.count, 64))])
        sheets[c.name] = _write(out / layout.sheet(c.name), lambda fh, s=sheet: s.save(fh, format="PNG"))
    data = save({"embeddings": torch.cat(values).float().contiguous()})
    _write(out / CONDITIONS_FILE, lambda fh: fh.write(data))
    m.files = entries
    m.conditions = {"file": CONDITIONS_FILE, "key": "embeddings", "encoder": gen.config.get("encoder")}
    m.spec = {**(m.spec or {}), "contact_sheets": sheets, "rejected_near_copies": rejected,
              "kept_near_copies": kept_flagged}
    m.seconds = round(seconds, 2)
    m.complete = True
    m.save(out)
    return m


# ---------------------------------------------------------------------------------------------
# --reject-near-copies and --eval (metrics, imported only when asked for)
# ---------------------------------------------------------------------------------------------
def near_copy_rejecter(train: str | Path | None, baseline: str | Path) -> Callable[[Generator], Callable[[list[Any]], list[bool]]]:
    """``images -> flags`` from :func:`metrics.memorisation.memorisation_audit` in the model's
    encoder space: the training set is ``train`` (a folder, classes or not) or else the model's
    embedding bank; ``baseline`` is real held-out images (their distances set the threshold).
    Returns a factory ``rejecter(generator) -> flags`` for :func:`build_set`."""
    import numpy as np

    from metrics.memorisation import memorisation_audit  # lazy: pixgen does not import metrics at load
    from pixgen.io import list_images, load_image

    def make(gen: Generator) -> Callable[[list[Any]], list[bool]]:
        def embed(images: list[Any]) -> np.ndarray:
            return gen.encoder.embed(images).reshape(len(images), -1).float().cpu().numpy()

        def folder(path: str | Path) -> np.ndarray:
            root = Path(path)  # class subfolders if any (a set's top-level files are its sheets), else the folder
            subs = sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []
            files = [f for d in subs or ([root] if root.is_dir() else []) for f in list_images(d)]
            if not files:
                raise InputError(f"no images in {path}", fix="give a folder of real tiles")
            return np.concatenate([embed([load_image(f) for f in files[i : i + 64]]) for i in range(0, len(files), 64)])

        if train is not None:
            train_f = folder(train)
        elif gen.embedding_bank is not None:
            bank = gen.embedding_bank
            train_f = np.concatenate([bank.entries[k].reshape(len(bank.entries[k]), -1).float().numpy() for k in bank.labels])
        else:
            raise InputError("--reject-near-copies needs the training set: --train DIR, or a model with an embedding bank")
        base_f = folder(baseline)

        def flags(images: list[Any]) -> list[bool]:
            hit = set(memorisation_audit(embed(images), train_f, base_f, n_boot=0)["suspects"])
            return [i in hit for i in range(len(images))]

        return flags

    return make


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``pixgen synth`` to the ``pixgen`` parser."""
    p = sub.add_parser("synth", help="build a synthetic training set from a spec (sharded with accelerate, resumable)",
                       description="Build the set a TOML spec describes; run under `accelerate launch -m pixgen.cli synth` "
                       "to shard it over processes. A rerun of the same command finishes an interrupted set.")
    p.add_argument("spec", help="the dataset spec (TOML, see docs/synthetic-sets.md)")
    p.add_argument("--out", required=True, help="the set's folder (created; an interrupted set of this spec is resumed)")
    p.add_argument("--eval", metavar="REAL_DIR", help="then run `pixgen eval` against these real held-out images (report in OUT/eval)")
    p.add_argument("--train", metavar="TRAIN_DIR", help="the generator's training images (eval floor/memorisation; near-copy rejection)")
    p.add_argument("--reject-near-copies", action="store_true",
                   help="drop and regenerate images the memorisation audit flags against the training set "
                   "(--train, else the model's bank; the threshold comes from the --eval real images)")
    p.add_argument("--eval-utility", default="linear-probe", help="learners for the eval's utility section (or none)")
    p.add_argument("--eval-max-images", type=int, help="at most this many images per eval folder (seeded, class-stratified)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace, *, callback: StepCallback | None = None) -> int:
    """``pixgen synth`` with its parsed ``args``; ``callback`` is :func:`build_set`'s (the sampler's
    per-step callback; not called by ``--eval``, which runs after the set is finished).

    Example:
        >>> run_synth(args, callback=lambda *step: not stop.is_set())  # doctest: +SKIP
    """
    spec = load_spec(args.spec)
    rejecter = None
    if args.reject_near_copies:
        if not args.eval:
            raise InputError("--reject-near-copies needs real held-out images for its threshold",
                             fix="pass --eval REAL_DIR (and --train TRAIN_DIR, or use a model with a bank)")
        rejecter = near_copy_rejecter(args.train, args.eval)
    manifest = build_set(spec, args.out, rejecter=rejecter, progress=not args.no_progress, callback=callback)
    if manifest is None:  # not rank 0
        return 0
    extra = manifest.spec or {}
    print(f"wrote {len(manifest.files)} images of {len(spec.classes)} classes to {args.out} "
          f"({extra.get('rejected_near_copies', 0)} near-copies regenerated) in {manifest.seconds:.0f} s")
    if args.eval:
        report = Path(args.out) / "eval"
        _evaluate(args, report)
        manifest.spec = {**extra, "eval_report": "eval/report.md"}
        manifest.save(args.out)
        print(f"report: {report / 'report.md'}")
    return 0


def _evaluate(args: argparse.Namespace, report: Path) -> None:
    from metrics.report import evaluate  # lazy: only `--eval` needs metrics (docs/architecture.md)

    utility = [] if args.eval_utility in ("", "none") else [u.strip() for u in args.eval_utility.split(",")]
    print(f"evaluating against {args.eval} ...", file=sys.stderr)
    evaluate(args.eval, args.out, args.train, utility=utility, max_images=args.eval_max_images, out=report)
