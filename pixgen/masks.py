"""Nuclei masks as ControlNet inputs: an instance map plus a class map, encoded so that touching
nuclei stay separate.

A layout is two (H, W) maps: ``inst`` (0 background, 1..N one id per nucleus) and ``types``
(0 background, 1..4 the CoNSeP classes, see :data:`CLASSES`; all-zero / absent for binary
datasets such as MoNuSeg or PixCell's cell masks). :func:`encode_masks` turns it into
:data:`MASK_CHANNELS` channels at the image's pixel grid:

====  =====================================================================
 0    nucleus (any class): 1 inside every nucleus
1-4   class one-hot (other, inflammatory, epithelial, spindle); all 0 when the class is unknown
 5    boundary: the inner contour of every instance, so two touching nuclei are two blobs
====  =====================================================================

The ControlNet's small conv mask encoder reads these channels at the pixel grid and brings them
to the latent grid (``PixgenControlNet(conditioning_channels=6, conditioning_downsample=4)``):
at the latent grid (f4: a 128 px tile is 32x32) a 1-px boundary between touching nuclei would
be averaged away, so the downsampling is learned instead of fixed.

Example:
    >>> inst = np.zeros((8, 8), np.uint16); inst[1:4, 1:4] = 1; inst[1:4, 4:7] = 2
    >>> x = encode_masks(inst, types=np.where(inst > 0, 3, 0))
    >>> x.shape, int(x[3].sum()), int(x[5, 2, 3]), int(x[5, 2, 2])
    ((6, 8, 8), 18, 1, 0)
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from skimage.measure import label as connected_components
from skimage.segmentation import find_boundaries

from pixgen.errors import InputError, ModelLoadError
from pixgen.io.int8 import INT8_WEIGHTS, load_model

if TYPE_CHECKING:
    from pixgen.sampling import StepCallback

__all__ = [
    "CLASSES", "MASK_CHANNELS", "PALETTE", "MaskFormat", "Layout", "encode_masks", "check_layout",
    "downsample_layout", "fit_layout", "load_layout", "load_layouts", "control_channels", "colour_layout",
    "BUNDLED_MASK_MODEL", "attach_mask_model", "mask_control_scale", "default_control_scale", "base_digest",
    "generate_pairs", "write_pair_set", "run_mask_generate",
]

CLASSES = ("background", "other", "inflammatory", "epithelial", "spindle-shaped")
MASK_CHANNELS = 2 + len(CLASSES) - 1  # nucleus + 4 classes + boundary
#: Colour-coded class PNGs (``--mask-format colour``): exact RGB values, class id -> colour;
#: white is a nucleus of unknown class. Touching nuclei of one colour are one nucleus unless a
#: black (background) line separates them: use an instance map to keep them apart.
PALETTE = {0: (0, 0, 0), 1: (255, 255, 0), 2: (255, 0, 0), 3: (0, 255, 0), 4: (0, 0, 255)}
UNKNOWN_CLASS_COLOUR = (255, 255, 255)
MaskFormat = Literal["instance", "types", "colour", "binary"]
BUNDLED_MASK_MODEL = Path(__file__).parent / "weights" / "pixgen-masks"


@dataclass
class Layout:
    """A nuclei layout: ``inst`` (H, W) ids (0 background), ``types`` (H, W) classes 0..4 or None
    (binary datasets), ``name`` (file stem, for paired outputs)."""

    inst: np.ndarray
    types: np.ndarray | None = None
    name: str = "mask"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.inst.shape)


def check_layout(inst: np.ndarray, types: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate one layout -> (inst uint32 (H, W), types uint8 (H, W), zeros when absent).

    Refused (``InputError``): non-2-D maps, float maps (masks are labels: a float mask is usually
    a resized or normalised copy), negative ids, class ids outside 0..4, maps of different sizes,
    class labels on background pixels. An empty mask (no nucleus) is allowed: it asks for tissue
    without nuclei.

    Example:
        >>> check_layout(np.eye(3, dtype=np.uint8))[0].max()
        1
    """
    inst = _label_array(inst, "instance map")
    if types is None:
        return inst, np.zeros(inst.shape, np.uint8)
    types = _label_array(types, "class map")
    if types.shape != inst.shape:
        raise InputError(f"class map is {types.shape}, instance map {inst.shape}", fix="pass maps of the same size")
    bad = np.setdiff1d(np.unique(types), np.arange(len(CLASSES)))
    if bad.size:
        raise InputError(f"unknown class ids {bad[:5].tolist()} in the class map",
                         fix=f"use 0 (background) and 1..4 ({', '.join(CLASSES[1:])})")
    if (types[inst == 0] > 0).any():
        raise InputError("the class map labels background pixels (instance id 0)",
                         fix="label classes only inside nuclei, or pass the instance map that matches")
    return inst, types.astype(np.uint8)


def _label_array(arr: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise InputError(f"the {what} must be (H, W), got shape {arr.shape}")
    if arr.dtype.kind == "f":
        raise InputError(f"the {what} is a float array ({arr.dtype}); masks are integer labels",
                         fix="pass integer ids (e.g. arr.round().astype(np.uint16)) or a bool mask")
    if arr.dtype.kind not in "uib":
        raise InputError(f"the {what} has dtype {arr.dtype}; expected integers or bool")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise InputError(f"the {what} has negative ids", fix="use 0 for background and positive ids")
    return arr.astype(np.uint32)


def encode_masks(inst: np.ndarray, types: np.ndarray | None = None) -> np.ndarray:
    """One layout -> (6, H, W) uint8 control channels (see the module docstring).

    Example:
        >>> encode_masks(np.eye(4, dtype=np.uint8)).shape
        (6, 4, 4)
    """
    inst, types = check_layout(inst, types)
    out = np.zeros((MASK_CHANNELS, *inst.shape), np.uint8)
    out[0] = inst > 0
    for k in range(1, len(CLASSES)):
        out[k] = types == k
    out[MASK_CHANNELS - 1] = find_boundaries(inst, connectivity=1, mode="inner") & (inst > 0)
    return out


def downsample_layout(inst: np.ndarray, types: np.ndarray | None, factor: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Nearest-neighbour downsampling of a layout by an integer ``factor`` (the pixel at each
    block's centre): ids and classes are never mixed. Nuclei smaller than the new pixel may vanish.

    Example:
        >>> downsample_layout(np.arange(16).reshape(4, 4), None, 2)[0]
        array([[ 5,  7],
               [13, 15]])
    """
    off = factor // 2
    return inst[off::factor, off::factor], None if types is None else types[off::factor, off::factor]


def fit_layout(layout: Layout, size: int | tuple[int, int]) -> Layout:
    """The layout at the output size: as is when it matches; an exact integer multiple (e.g. a
    256 px CoNSeP tile at 0.25 um/px for a 128 px model at 0.5 um/px) is downsampled
    nearest-neighbour with a warning; any other size is refused (``InputError``). The instances
    are renumbered 1..N and an empty result warns (tissue without nuclei is then asked for).

    Example:
        >>> fit_layout(Layout(np.ones((4, 4), np.uint16)), 4).shape
        (4, 4)
    """
    from skimage.segmentation import relabel_sequential

    height, width = (size, size) if isinstance(size, int) else size
    inst, types = check_layout(layout.inst, layout.types)
    h, w = inst.shape
    if (h, w) != (height, width):
        factor = h // height
        if factor < 2 or (h, w) != (height * factor, width * factor):
            raise InputError(f"mask {layout.name!r} is {h}x{w}, the images are {height}x{width}",
                             fix=f"pass {height}x{width} masks (or an integer multiple, downsampled nearest-neighbour)")
        warnings.warn(f"mask {layout.name!r} is {h}x{w}: downsampled nearest-neighbour by {factor} to {height}x{width}",
                      stacklevel=2)
        inst, types = downsample_layout(inst, types, factor)
    if not inst.any():
        warnings.warn(f"mask {layout.name!r} has no nuclei: the image will be asked to have none", stacklevel=2)
    inst = relabel_sequential(inst)[0].astype(np.uint16)
    return Layout(inst, None if layout.types is None else types, layout.name)


def colour_layout(rgb: np.ndarray, name: str = "mask") -> Layout:
    """A colour-coded class image (:data:`PALETTE`) -> Layout; instances are the 4-connected
    components of each colour. Any colour outside the palette is refused with the first few
    offenders and their pixel counts (anti-aliased or JPEG edges: save a lossless PNG without
    smoothing).

    Example:
        >>> img = np.zeros((4, 4, 3), np.uint8); img[1:3, 1:3] = PALETTE[2]
        >>> lay = colour_layout(img); int(lay.inst.max()), int(lay.types.max())
        (1, 2)
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise InputError(f"colour mask {name!r} must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    codes = {(*c,): k for k, c in PALETTE.items()} | {UNKNOWN_CLASS_COLOUR: -1}
    colours, inverse, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True, return_counts=True)
    bad = [(tuple(int(v) for v in c), int(n)) for c, n in zip(colours, counts) if tuple(c) not in codes]
    if bad:
        shown = ", ".join(f"{c}: {n} px" for c, n in sorted(bad, key=lambda b: -b[1])[:4])
        raise InputError(f"colour mask {name!r} has colours outside the palette ({shown})",
                         fix="use exactly the colours of pixgen.masks.PALETTE (docs/masks.md), no anti-aliasing")
    per_pixel = np.array([codes[tuple(c)] for c in colours])[inverse.reshape(-1)].reshape(rgb.shape[:2])
    inst = np.zeros(per_pixel.shape, np.uint32)
    for code in np.unique(per_pixel[per_pixel != 0]):
        comp = connected_components(per_pixel == code, connectivity=1)
        inst[comp > 0] = comp[comp > 0] + inst.max()
    types = np.clip(per_pixel, 0, None).astype(np.uint8)  # unknown-class nuclei: class 0
    return Layout(inst, types if types.any() else None, name)


def _read(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("F", "I;16F"):
                raise InputError(f"mask {path} is a float image (mode {img.mode}); masks are integer labels",
                                 fix="save an integer PNG: instance ids (uint16) or 0/255 binary")
            return np.asarray(img.convert("RGB") if img.mode in ("P", "RGBA", "CMYK", "YCbCr") else img)
    except FileNotFoundError:
        raise InputError(f"mask file not found: {path}") from None
    except OSError as err:
        raise InputError(f"cannot read mask {path}: {err}",
                         fix="pass an integer PNG/TIFF mask (instance ids, class ids, palette colours or 0/255)") from None


def _gray(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3:
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise InputError(f"mask {path} is a colour image", fix="use --mask-format colour for colour-coded classes")
        arr = arr[..., 0]
    return arr


def load_layout(path: str | Path, fmt: MaskFormat | None = None, types: str | Path | None = None) -> Layout:
    """Read one mask file.

    Formats: ``instance`` (integer ids, 0 background; with ``types`` a class-map PNG),
    ``types`` (a CoNSeP ``types/`` PNG alone: classes 0..4, nuclei = connected components per
    class), ``colour`` (:data:`PALETTE`), ``binary`` (0/1 or 0/255, nuclei = 4-connected
    components; touching nuclei merge). ``None`` guesses: colour for RGB files, binary for
    {0, 1} / {0, 255} files, else instance.

    Example:
        >>> load_layout("consep/test/inst/test_1_000.png", "instance",
        ...             types="consep/test/types/test_1_000.png")                  # doctest: +SKIP
    """
    path = Path(path)
    arr = _read(path)
    if fmt is None:
        colour = arr.ndim == 3 and not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]))
        fmt = "colour" if colour else ("binary" if set(np.unique(_gray(arr, path)).tolist()) <= {0, 1, 255} else "instance")
    if fmt == "colour":
        return colour_layout(arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, -1), path.stem)
    arr = _gray(arr, path)
    if fmt == "binary":
        values = set(np.unique(arr).tolist())
        if not values <= {0, 1, 255} and not values <= {0, 1} | {int(arr.max())}:
            raise InputError(f"binary mask {path} has values {sorted(values)[:6]}", fix="use 0 and 1 (or 255)")
        return Layout(connected_components(arr > 0, connectivity=1).astype(np.uint32), None, path.stem)
    if fmt == "types":
        inst, cls = check_layout(np.zeros(arr.shape, np.uint8), None)[0], _label_array(arr, "class map")
        for k in np.unique(cls[cls > 0]):
            comp = connected_components(cls == k, connectivity=1)
            inst[comp > 0] = comp[comp > 0] + inst.max()
        check_layout(inst, cls)
        return Layout(inst, cls.astype(np.uint8), path.stem)
    if fmt != "instance":
        raise InputError(f"unknown mask format {fmt!r}", fix="use instance, types, colour or binary")
    cls = _gray(_read(Path(types)), Path(types)) if types is not None else None
    inst, cls_checked = check_layout(arr, cls)
    return Layout(inst, cls_checked if cls is not None else None, path.stem)


def load_layouts(source: str | Path, fmt: MaskFormat | None = None) -> list[Layout]:
    """Masks from a file or a folder: a CoNSeP/MoNuSeg-style folder (``inst/`` with optional
    ``types/`` of the same stems, or a split folder holding them) or a folder of mask files
    read with ``fmt``.

    Example:
        >>> [l.name for l in load_layouts("consep/test")][:1]                       # doctest: +SKIP
        ['test_10_000']
    """
    from pixgen.io import list_images

    root = Path(source)
    if root.is_file():
        return [load_layout(root, fmt)]
    if not root.is_dir():
        raise InputError(f"no mask file or folder at {root}")
    if (root / "inst").is_dir():
        types = {p.stem: p for p in list_images(root / "types")} if (root / "types").is_dir() else {}
        files = list_images(root / "inst")
        layouts = [load_layout(p, "instance", types.get(p.stem)) for p in files]
    else:
        layouts = [load_layout(p, fmt) for p in list_images(root)]
    if not layouts:
        raise InputError(f"no mask images in {root}", fix="pass PNG masks, or a folder with inst/ (and types/)")
    return layouts


def control_channels(masks: Any, size: int | tuple[int, int]) -> torch.Tensor:
    """Layouts -> (N, 6, H, W) float control input of a mask-encoder ControlNet.

    Accepts a :class:`Layout`, an ``(inst, types)`` pair, a 2-D integer array (instance ids;
    0/1 or bool binary masks become connected components), pre-encoded (6, H, W) channels, or a
    list of these; each is checked and fitted to ``size`` (:func:`fit_layout`).

    Example:
        >>> control_channels(np.eye(8, dtype=np.uint8), 8).shape
        torch.Size([1, 6, 8, 8])
    """
    items = list(masks) if isinstance(masks, list) else [masks]
    if not items:
        raise InputError("no control masks given", fix="pass one mask per image, or one for all")
    out = []
    for item in items:
        if isinstance(item, np.ndarray) and item.ndim == 3 and item.shape[0] == MASK_CHANNELS:
            out.append(item.astype(np.float32))
            continue
        out.append(encode_masks(*_fitted(item, size)).astype(np.float32))
    shapes = {o.shape[1:] for o in out}
    want = (size, size) if isinstance(size, int) else tuple(size)
    if shapes != {want}:
        raise InputError(f"control channels are {sorted(shapes)}, the images are {want}")
    return torch.from_numpy(np.stack(out))


def _fitted(item: Any, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(item, tuple) and len(item) == 2:
        item = Layout(np.asarray(item[0]), None if item[1] is None else np.asarray(item[1]))
    elif not isinstance(item, Layout):
        arr = np.asarray(item.detach().cpu() if isinstance(item, torch.Tensor) else item)
        if arr.ndim == 2 and arr.dtype.kind in "uib" and set(np.unique(arr).tolist()) <= {0, 1, 255} and arr.dtype != np.uint16:
            arr = connected_components(arr > 0, connectivity=1)
        item = Layout(arr)
    lay = fit_layout(item, size)
    return lay.inst, lay.types


def base_digest(generator_dir: str | Path) -> str:
    """sha256 of a Generator folder's transformer weights: ties a mask model to its base."""
    folder = Path(generator_dir) / "transformer"
    path = next((p for p in (folder / INT8_WEIGHTS, folder / "diffusion_pytorch_model.safetensors") if p.is_file()), None)
    if path is None:
        raise ModelLoadError(f"no transformer weights in {folder}", fix="pass a Generator folder")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mask_control_scale(folder: str | Path = BUNDLED_MASK_MODEL) -> float:
    """The ControlNet scale a mask model was calibrated for (``base.json``'s ``control_scale``; 1 if unsaid)."""
    info = Path(folder) / "base.json"
    return float(json.loads(info.read_text()).get("control_scale", 1.0)) if info.is_file() else 1.0


def attach_mask_model(gen: Any, folder: str | Path = BUNDLED_MASK_MODEL, check_base: bool = True) -> Any:
    """Give a Generator the mask ControlNet of ``folder`` (``controlnet/``, ``base.json``,
    ``mask_stats.json``); with ``check_base`` the base digest must match the generator's source.
    ``gen.mask_control_scale`` becomes the model's calibrated scale (:func:`mask_control_scale`).

    Example:
        >>> gen = attach_mask_model(Generator.from_pretrained("pixgen-default"))    # doctest: +SKIP
    """
    from pixgen.models.controlnet import PixgenControlNet

    folder = Path(folder)
    if not (folder / "controlnet" / "config.json").is_file():
        raise ModelLoadError(f"no mask model at {folder}",
                             fix="train one: python -m recipes.mask_controlnet --base MODEL --export DIR (docs/masks.md)")
    if check_base and (folder / "base.json").is_file() and getattr(gen, "source", None):
        want = json.loads((folder / "base.json").read_text()).get("transformer_sha256")
        have = base_digest(gen.source) if (Path(gen.source) / "transformer").is_dir() else None
        if want and have and want != have:
            raise ModelLoadError(f"the mask model in {folder} was trained for another generator than {gen.source}",
                                 fix="retrain it for this base: python -m recipes.mask_controlnet --base "
                                     f"{gen.source} --work runs/masks --export DIR")
    controlnet = load_model(PixgenControlNet, folder / "controlnet").to(gen.device)
    gen.controlnet = (controlnet if controlnet.dtype == gen.dtype else controlnet.to(dtype=gen.dtype)).eval()
    gen.mask_control_scale = mask_control_scale(folder)
    return gen


def generate_pairs(gen: Any, layouts: Sequence[Layout], writer: Any, *, label: str | None = None,
                   prompt: str | None = None, from_bank: bool = False, mask_terms: bool = True, n: int = 1,
                   seed: int = 0, control_scale: float | None = None, steps: int | None = None,
                   guidance: float | None = None, batch_size: int = 8, progress: bool = False,
                   callback: StepCallback | None = None) -> Any:
    """Generate ``n`` images per layout and write a paired set in the CoNSeP layout through a
    :class:`pixgen.io.SetWriter`: ``images/NAME.png``, ``inst/NAME.png`` (uint16 ids),
    ``types/NAME.png`` (uint8 classes, when any layout has classes); the manifest's entry of each
    image names its instance map (``control_image``). Returns the generation output.

    Args:
        label, prompt: the condition: the model's prior for the label or prompt (a label draws from
            the bank instead with ``from_bank``, or when the model has no prior); neither: bank draws
            from all labels.
        control_scale: the ControlNet's strength (0: off); None: the mask model's calibrated
            ``gen.mask_control_scale`` (:func:`attach_mask_model`), else 1.
        mask_terms: with the prior, add each layout's density / composition terms
            (:func:`pixgen.prior.mask_terms`) to its image's condition, so the embedding agrees with
            the mask (an epithelial layout gets an epithelial embedding; docs/masks.md measures it).
        callback: the sampler's per-step callback, ``callback(step, timestep, latents, x0)`` per
            step of each batch (:meth:`~pixgen.pipeline.Generator.generate_batches`); returning
            False raises :class:`~pixgen.sampling.SamplingCancelled` before any pair is written.

    Example:
        >>> with SetWriter.create("pairs", manifest) as w:                                # doctest: +SKIP
        ...     generate_pairs(attach_mask_model(gen), load_layouts("consep/test"), w, label="consep")
        >>> generate_pairs(gen, layouts, w, callback=lambda *step: not stop.is_set())     # doctest: +SKIP
    """
    from pixgen.conditioning import BankDraw
    from pixgen.io import Condition, ImageEntry, save_png

    if gen.controlnet is None or gen.controlnet.mask_encoder is None:
        raise ModelLoadError("this model has no mask ControlNet",
                             fix="pass --mask-model DIR (python -m recipes.mask_controlnet ... --export DIR)")
    fitted = [fit_layout(lay, gen.config["image_size"]) for lay in layouts]
    per_image = [lay for lay in fitted for _ in range(n)]
    condition = _pair_condition(gen, per_image, label, prompt, from_bank, mask_terms)
    result = gen.generate(condition, num_images=len(per_image), control_image=per_image, seed=seed,
                          controlnet_conditioning_scale=default_control_scale(gen, control_scale), num_inference_steps=steps,
                          guidance_scale=guidance, batch_size=batch_size, progress=progress, callback=callback)
    typed = any(lay.types is not None for lay in fitted)
    kind = "prompt" if prompt else "bank" if condition is None else "label" if isinstance(condition, BankDraw) else "prior"
    for i, (img, lay, s, cid) in enumerate(zip(result.images, per_image, result.seeds, result.condition_ids)):
        name = lay.name if n == 1 else f"{lay.name}_{i % n}"
        for folder in ("images", "inst", "types") if typed else ("images", "inst"):
            (writer.out / folder).mkdir(exist_ok=True)
        save_png(lay.inst.astype(np.uint16), writer.out / "inst" / f"{name}.png")
        if typed:
            types = lay.types if lay.types is not None else np.zeros(lay.shape, np.uint8)
            save_png(types.astype(np.uint8), writer.out / "types" / f"{name}.png")
        cond = Condition(kind, cid, label or (None if prompt else cid.rsplit("[", 1)[0]))
        writer.add(img, ImageEntry(f"images/{name}.png", s, cond, f"inst/{name}.png"))
    return result


def default_control_scale(gen: Any, control_scale: float | None) -> float:
    """``control_scale``, or the attached mask model's calibrated scale when it is None (1 without one)."""
    return float(control_scale) if control_scale is not None else float(getattr(gen, "mask_control_scale", 1.0))


def _pair_condition(gen: Any, per_image: Sequence[Layout], label: str | None, prompt: str | None, from_bank: bool,
                    with_mask_terms: bool) -> Any:
    """:func:`generate_pairs`' condition (None: bank draws from all labels)."""
    from pixgen.conditioning import BankDraw, PriorSample
    from pixgen.prior import mask_terms

    if label and prompt:
        raise InputError("give a label or a prompt, not both")
    if prompt or (label and gen.prior is not None and not from_bank):
        extra = [mask_terms(lay.inst, lay.types) for lay in per_image] if with_mask_terms else None
        return PriorSample(label, prompt, extra_terms=extra)
    return BankDraw(label) if label else None


def write_pair_set(gen: Any, layouts: Sequence[Layout], out: str | Path, manifest: Any = None, *,
                   overwrite: bool = False, started: float | None = None, **pairs: Any) -> Any:
    """A finished paired set in ``out`` (refused if it exists, unless ``overwrite``): the
    :class:`pixgen.io.SetWriter` around :func:`generate_pairs` (``pairs``: its keywords), with
    ``manifest`` (default: the model's identity and these sampler settings) and the wall time since
    ``started`` (``time.perf_counter()``; default: now). ``pixgen generate --mask`` and the
    studio's Paint page write their sets here.

    Args:
        pairs: :func:`generate_pairs`' keywords, ``callback`` (the sampler's per-step callback)
            among them. The pairs are written once all are generated, so a run cancelled by the
            callback (:class:`~pixgen.sampling.SamplingCancelled`) leaves nothing: a folder it
            created is removed, like any refused request (:class:`pixgen.io.SetWriter`).

    Example:
        >>> write_pair_set(attach_mask_model(gen), load_layouts("consep/test"), "pairs", manifest, label="consep")  # doctest: +SKIP
        >>> write_pair_set(gen, layouts, "pairs", manifest, callback=lambda *step: not stop.is_set())  # doctest: +SKIP
    """
    import time

    from pixgen.io import SetWriter, check_output_folder

    started = time.perf_counter() if started is None else started
    out = check_output_folder(out, overwrite)
    manifest = manifest or _pair_manifest(gen, len(layouts), pairs)
    with SetWriter.create(out, manifest, overwrite=overwrite) as writer:
        result = generate_pairs(gen, layouts, writer, **pairs)
        writer.finish(conditions=result.conditions.values, encoder=result.conditions.encoder,
                      seconds=time.perf_counter() - started)
    return result


def _pair_manifest(gen: Any, count: int, pairs: dict[str, Any]) -> Any:
    """A manifest for :func:`write_pair_set` called without one (the API, not the CLI)."""
    from pixgen.io import SamplerSettings, SetManifest
    from pixgen.io.manifest import model_id

    name = gen.source.name if gen.source else "in-memory"
    settings = SamplerSettings(int(pairs.get("steps") or gen.config["num_inference_steps"]),
                               float(pairs.get("guidance") or gen.config["guidance_scale"]), type(gen.scheduler).__name__,
                               batch_size=pairs.get("batch_size", 8), n=count * pairs.get("n", 1), seed=pairs.get("seed", 0),
                               control_scale=default_control_scale(gen, pairs.get("control_scale")))
    return SetManifest(model_id(name, gen.source, gen.config.get("encoder")), settings)


def run_mask_generate(args: Any, set_manifest: Any) -> int:
    """``pixgen generate --mask FILE_OR_DIR`` (``--n`` images per mask) / ``--sample-masks N``
    (N layouts, one image each): a paired set (see :func:`generate_pairs`);
    ``set_manifest(args, gen)`` builds the set's manifest."""
    import time

    import torch

    from pixgen.io import check_output_folder
    from pixgen.pipeline import Generator

    if args.mask and args.sample_masks:
        raise InputError("--mask and --sample-masks are exclusive", fix="load masks or sample them, not both")
    out = check_output_folder(args.out, args.overwrite)  # before the model loads: fail fast
    t0 = time.perf_counter()
    gen = Generator.from_pretrained(args.model, token=args.token, vae_path=args.vae_path, encoder_path=args.encoder_path,
                                    device=args.device, dtype=getattr(torch, args.dtype),
                                    trust_remote_code=args.trust_remote_code)
    if args.quality or args.sampler:  # only when asked: adherence (docs/masks.md) is measured with the model's sampler
        gen.use_sampling(args.quality, args.sampler)
    if args.mask_model or gen.controlnet is None:
        attach_mask_model(gen, args.mask_model or BUNDLED_MASK_MODEL)
    if args.mask:
        layouts = load_layouts(args.mask, args.mask_format)
        label = args.label
    else:
        from pixgen.mask_sampler import MaskSampler

        stats = Path(args.mask_model or BUNDLED_MASK_MODEL) / "mask_stats.json"
        sampler = MaskSampler.from_json(stats, args.tissue)
        layouts = [sampler.sample(args.seed + i) for i in range(args.sample_masks)]
        known = {*(gen.embedding_bank.entries if gen.embedding_bank else ()), *(gen.prior.labels if gen.prior else ())}
        label = args.label or (args.tissue if not args.prompt and args.tissue in known else None)
    args.control_image = [args.mask or f"sampled:{args.tissue}"]  # recorded as the set's control input
    args.control_scale = default_control_scale(gen, args.control_scale)
    result = write_pair_set(gen, layouts, out, set_manifest(args, gen), overwrite=args.overwrite, started=t0,
                            label=label, prompt=args.prompt, from_bank=args.from_bank,
                            mask_terms=not args.no_mask_terms, n=1 if args.sample_masks else args.n, seed=args.seed,
                            control_scale=args.control_scale, steps=args.steps, guidance=args.guidance,
                            batch_size=args.batch_size)
    print(f"wrote {len(result.images)} paired images (images/, inst/{', types/' if (out / 'types').is_dir() else ''}) "
          f"and manifest.json to {out}")
    return 0
