"""Large images of any size: a layout of condition embeddings, overlapping-window sampling with x0
averaging, and blended tiled decoding streamed to a pyramidal OME-TIFF (or a PNG).

**Layouts.** A :class:`Layout` is a (rows, cols, D) grid of condition embeddings, one per *cell*
of ``cell`` pixels, where a cell is what one condition token describes in the model's native
window (the whole window for 1-token models; a quarter of it for PixCell-1024's 4x4 grids).

* :func:`layout_from_slide`: a real slide region tiled at the model's mpp, each tile embedded by
  the model's encoder: the synthetic twin of that region.
* :func:`layout_from_condition`: one condition (a label's bank draws, a reference) drawn at
  anchors every ``period`` cells and slerped between neighbouring anchors (smooth variation).
* :func:`layout_from_label_map`: a small image whose colours name labels; each connected region
  gets one condition from ``region_condition(label)``: by default what ``generate(label=...)``
  uses (the model's prior when it has one, else a bank draw).

**Sampling** (:func:`sample_canvas`). The canvas latents are denoised by the one sampler,
:func:`pixgen.sampling.sample`, with its ``predict`` hook: at each step every window of the model's
native latent size (stride ``window - overlap``; the last window flush with the edge, so any
size works) gets its guided prediction, the predicted x0 of all windows are averaged with
feathered weights, and the scheduler steps with the prediction that implies the averaged x0
(:func:`~pixgen.sampling.prediction_from_x0`). A window's tokens are the layout interpolated at
its token centres (bilinear, norms kept).

**Decoding and streaming** (:func:`decode_rows`). Windows of latents are decoded row by row and
blended with the same feathered weights; pixel rows that no later window touches are final and
written at once, so decoding holds one row of windows. Memory: the whole canvas is kept as
latents only (4 channels at 1/f resolution: 16 MB for a 4096 px canvas with the bundled f4 model)
because x0 averaging couples neighbouring windows at every step; the decoded pixels, the part
that dominates, are streamed (see docs/large-images.md for the measured peak RSS).

**Resume** (:func:`generate_large`). Work lives in ``OUT.partial/``: the sampled latents once the
sampling finishes, and the decoded rows as they are written. A killed run started again with the
same arguments skips the sampling if it had finished and the rows already written; an interrupted
*sampling* (a kill, or a step ``callback`` returning False: :class:`~pixgen.sampling.SamplingCancelled`)
restarts from its seed (same result). ``out`` itself is written only at the end, atomically.

Example:
    >>> gen = Generator.from_pretrained(DEFAULT_MODEL)                                   # doctest: +SKIP
    >>> layout, real = layout_from_slide(gen, "slide.svs", region=(0, 0, 1024, 1024))    # doctest: +SKIP
    >>> generate_large(gen, layout, "twin.ome.tiff", num_inference_steps=10, seed=0)      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pixgen.conditioning import Condition
from pixgen.errors import InputError
from pixgen.io.atomic import write_bytes_atomic, write_json_atomic
from pixgen.io.ome import RawCanvas, tiff_bytes_estimate, write_png, write_pyramid_tiff
from pixgen.pipeline import Generator
from pixgen.sampling import (SamplingCancelled, StepCallback, check_sampling_args, guided_prediction, predicted_x0,
                             prediction_from_x0, sample)

__all__ = [
    "Layout", "build_layout", "layout_from_slide", "layout_from_condition", "layout_from_label_map", "window_starts",
    "feather", "slerp", "sample_canvas", "decode_rows", "generate_large", "canvas_size", "PNG_MAX_SIDE",
]

PNG_MAX_SIDE = 4096  # PNG output holds the whole image in memory


@dataclass
class Layout:
    """A (rows, cols, D) grid of condition embeddings, one per ``cell`` x ``cell`` pixels."""

    grid: torch.Tensor
    cell: int
    encoder: str | None = None
    domain: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the canvas this layout describes, in pixels."""
        return self.grid.shape[0] * self.cell, self.grid.shape[1] * self.cell

    def tokens_at(self, top: int, left: int, g: int) -> torch.Tensor:
        """(g*g, D) tokens for a window whose top-left pixel is (top, left): the grid bilinearly
        interpolated at each token's centre, rescaled to the interpolated norm (a slerp-like blend
        that keeps embeddings on their sphere; exactly the cells for aligned windows)."""
        rows, cols, _ = self.grid.shape
        centres = (torch.arange(g, dtype=torch.float64) + 0.5) * self.cell
        ys = ((top + centres) / self.cell - 0.5).clamp(0, rows - 1)
        xs = ((left + centres) / self.cell - 0.5).clamp(0, cols - 1)
        out = torch.stack([_bilinear(self.grid, float(y), float(x)) for y in ys for x in xs])
        return out


def _bilinear(grid: torch.Tensor, y: float, x: float) -> torch.Tensor:
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, grid.shape[0] - 1), min(x0 + 1, grid.shape[1] - 1)
    dy, dx = y - y0, x - x0
    corners = [(y0, x0, (1 - dy) * (1 - dx)), (y0, x1, (1 - dy) * dx), (y1, x0, dy * (1 - dx)), (y1, x1, dy * dx)]
    vec = sum(w * grid[a, b].double() for a, b, w in corners)
    norm = sum(w * grid[a, b].double().norm() for a, b, w in corners)
    return (vec / vec.norm().clamp_min(1e-12) * norm).float()


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between embeddings (norm interpolated linearly).

    Example:
        >>> slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), 0.5)
        tensor([1.0607, 1.0607])
    """
    na, nb = a.norm(), b.norm()
    ua, ub = a / na, b / nb
    omega = torch.arccos((ua * ub).sum().clamp(-1, 1))
    if omega < 1e-6:
        u = ua
    else:
        u = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / torch.sin(omega)
    return u * ((1 - t) * na + t * nb)


def _cell_size(gen: Generator) -> tuple[int, int]:
    """(cell px, tokens per side g) of the model: a window is g x g cells."""
    g = round(gen.transformer.config.caption_num_tokens ** 0.5)
    return gen.config["image_size"] // g, g


# ------------------------------------------------------------------ layouts
def layout_from_slide(gen: Generator, slide: str | Path, region: tuple[int, int, int, int] | None = None, *,
                      slide_mpp: float | None = None, batch_size: int = 64) -> tuple[Layout, np.ndarray]:
    """The synthetic-twin layout of a slide region, and the region itself at the model's mpp.

    ``region`` is (x, y, w, h) in level-0 pixels (default: the whole slide). It is read at the
    model's mpp and cut into cells (whole cells only: the last partial row / column is dropped).

    Example:
        >>> layout, real = layout_from_slide(gen, "CMU-1-small-region.svs", (0, 0, 1000, 1000))  # doctest: +SKIP
    """
    from pixgen.io.slides import open_slide, region_at_mpp

    mpp = gen.config.get("mpp")
    if not mpp:
        raise InputError("this model does not record the resolution it generates at (mpp)",
                         fix="set 'mpp' in the model's model_index.json")
    cell, _ = _cell_size(gen)
    with open_slide(slide) as s:
        base = s.mpp(slide_mpp)
        width0, height0 = s.dimensions
        x, y, w, h = region or (0, 0, width0, height0)
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width0 or y + h > height0:
            raise InputError(f"region x={x} y={y} w={w} h={h} is outside the slide ({width0}x{height0} level-0 px)",
                             fix=f"use x + w <= {width0} and y + h <= {height0}")
        cell0 = cell * mpp / base  # one cell in level-0 pixels
        rows, cols = int(h // cell0), int(w // cell0)
        if rows < 1 or cols < 1:
            raise InputError(f"region {w}x{h} level-0 px is smaller than one {cell} px tile at {mpp} um/px "
                             f"({cell0:.0f} level-0 px)", fix="choose a larger region")
        tiles = [region_at_mpp(s, round(x + c * cell0), round(y + r * cell0), cell, mpp, slide_mpp)
                 for r in range(rows) for c in range(cols)]
    enc = gen.encoder
    emb = enc.embed(tiles, batch_size=batch_size).reshape(rows, cols, -1)
    real = np.concatenate([np.concatenate(tiles[r * cols : (r + 1) * cols], axis=1) for r in range(rows)], axis=0)
    return Layout(emb, cell, encoder=enc.spec.name, domain=gen.config.get("domain")), real


def layout_from_condition(gen: Generator, condition: Condition, height: int, width: int, *, period: int = 4,
                          seed: int = 0) -> Layout:
    """A layout covering ``height`` x ``width`` px from one condition, varying smoothly.

    Anchors every ``period`` cells draw the condition with their own seeds (a label's bank draws
    differ per seed; a reference is the same at every anchor, so only the noise varies); each cell
    is the slerp of its neighbouring anchors, bilinearly in rows and columns.

    Example:
        >>> layout_from_condition(gen, BankDraw("lung_aca"), 1024, 1024, period=4, seed=0)  # doctest: +SKIP
    """
    if period < 1:
        raise InputError(f"period must be >= 1 cell, got {period}")
    cell, _ = _cell_size(gen)
    rows, cols = -(-height // cell), -(-width // cell)
    ar, ac = -(-(rows - 1) // period) + 1, -(-(cols - 1) // period) + 1
    seeds = [seed + i for i in range(ar * ac)]
    emb = condition.resolve(gen, seeds)
    anchors = emb.values.reshape(ar, ac, -1, emb.values.shape[-1])[:, :, 0]  # first token of each draw
    grid = torch.empty(rows, cols, anchors.shape[-1])
    for r in range(rows):
        for c in range(cols):
            i, ty = divmod(r, period)
            j, tx = divmod(c, period)
            i1, j1 = min(i + 1, ar - 1), min(j + 1, ac - 1)
            top = slerp(anchors[i, j], anchors[i, j1], tx / period)
            bottom = slerp(anchors[i1, j], anchors[i1, j1], tx / period)
            grid[r, c] = slerp(top, bottom, ty / period)
    return Layout(grid, cell, encoder=emb.encoder, domain=emb.domain)


def layout_from_label_map(gen: Generator, label_map: Any, colours: dict[tuple[int, int, int], str], *,
                          cell_pixels: int = 1, seed: int = 0,
                          region_condition: Callable[[str], Condition] | None = None) -> Layout:
    """A layout from a small image whose colours name labels or prompts; each map pixel becomes
    ``cell_pixels`` x ``cell_pixels`` cells of the model's window (or window part).

    Each connected region of one colour gets one condition, ``region_condition(text)`` resolved
    with its own seed; by default :func:`~pixgen.conditioning.label_or_prompt`: a label samples
    the model's prior when it has one, else draws from its bank (as ``generate(label=...)``), and
    any other text is a prompt for the prior; pass ``BankDraw`` to force bank draws.

    Example:
        >>> layout_from_label_map(gen, "map.png", {(255, 0, 0): "lung_aca", (0, 0, 255): "colon, spindle"})  # doctest: +SKIP
    """
    from scipy import ndimage

    from pixgen.conditioning import label_or_prompt
    from pixgen.io import load_rgb

    region_condition = region_condition or (lambda text: label_or_prompt(gen, text))
    rgb = load_rgb(label_map) if isinstance(label_map, (str, Path)) else np.asarray(label_map)[..., :3]
    rgb = rgb.repeat(cell_pixels, 0).repeat(cell_pixels, 1)
    cell, _ = _cell_size(gen)
    known = np.zeros(rgb.shape[:2], bool)
    grid: torch.Tensor | None = None
    region_seed = seed
    for colour, label in colours.items():
        mask = np.all(rgb == np.asarray(colour, np.uint8), axis=-1)
        known |= mask
        parts, n = ndimage.label(mask)
        for k in range(1, n + 1):
            emb = region_condition(label).resolve(gen, [region_seed]).values[0, 0]
            region_seed += 1
            if grid is None:
                grid = torch.zeros(*rgb.shape[:2], emb.shape[-1])
            grid[torch.from_numpy(parts == k)] = emb
    if grid is None or not known.all():
        bad = sorted({tuple(int(v) for v in p) for p in rgb[~known][:1000]})[:5]
        raise InputError(f"the label map has colours with no label: {bad}",
                         fix="map every colour with --colours 'R,G,B=label' (or repaint those pixels)")
    return Layout(grid, cell, encoder=gen.transformer.config.encoder_name, domain=gen.config.get("domain"))


# ------------------------------------------------------------------ windows
def build_layout(gen: Generator, *, slide: str | Path | None = None, region: tuple[int, int, int, int] | None = None,
                 slide_mpp: float | None = None, label_map: Any = None,
                 colours: dict[tuple[int, int, int], str] | None = None, cells_per_pixel: int = 1,
                 label: str | None = None, reference: Any = None, prompt: str | None = None,
                 size: tuple[int, int] | None = None, period: int = 4, seed: int = 0) -> tuple[Layout, np.ndarray | None]:
    """The layout of one large image from one source, and the real region for a slide (else None):

    - ``slide`` (+ ``region`` x, y, w, h in level-0 px, ``slide_mpp``): its synthetic twin
      (:func:`layout_from_slide`);
    - ``label_map`` + ``colours``: painted regions, each colour a label or a prompt
      (:func:`layout_from_label_map`);
    - ``label`` (the model's prior when it has one, else bank draws), ``prompt`` (the prior's
      vocabulary) or ``reference`` (an image), varying smoothly over ``size`` = (height, width)
      (:func:`layout_from_condition`).

    ``pixgen large`` and the studio's Large image page both build their layout here.

    Example:
        >>> layout, real = build_layout(gen, label="lung_aca", size=(512, 512))        # doctest: +SKIP
        >>> layout, real = build_layout(gen, prompt="colon, inflammatory-rich", size=(512, 512))  # doctest: +SKIP
        >>> layout, real = build_layout(gen, slide="cmu-1-small-region.svs", region=(0, 0, 512, 512))  # doctest: +SKIP
    """
    from pixgen.conditioning import PriorSample, Reference, from_keywords

    if slide is not None:
        return layout_from_slide(gen, slide, region, slide_mpp=slide_mpp)
    if label_map is not None:
        if not colours:
            raise InputError("a label map needs its colours (--colours 'R,G,B=label' for each colour)")
        return layout_from_label_map(gen, label_map, colours, cell_pixels=cells_per_pixel, seed=seed), None
    if size is None:
        raise InputError("a label, prompt or reference layout needs a size (--size)", fix="e.g. --size 2048 or --size 2048x1024")
    if prompt is not None:
        cond = PriorSample(prompt=prompt)
    else:
        cond = from_keywords(gen, label=label) if label else Reference([reference])  # prior if the model has one
    return layout_from_condition(gen, cond, *size, period=period, seed=seed), None


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering ``length``: every ``stride``, plus one flush with the end.

    Example:
        >>> window_starts(40, 16, 12)
        [0, 12, 24]
        >>> window_starts(44, 16, 12)
        [0, 12, 24, 28]
    """
    if length < window:
        raise InputError(f"the canvas ({length}) is smaller than one window ({window})")
    starts = list(range(0, length - window + 1, stride))
    return starts if starts[-1] == length - window else [*starts, length - window]


def feather(window: int, overlap: int, floor: float = 1e-2) -> torch.Tensor:
    """(window, window) blending weights: linear ramps over ``overlap`` at each side, 1 inside.

    Example:
        >>> feather(6, 2)[2].tolist()  # the middle row: ramps over 2 px at each side
        [0.25, 0.75, 1.0, 1.0, 0.75, 0.25]
    """
    i = torch.arange(window, dtype=torch.float32)
    edge = torch.minimum(i + 0.5, window - i - 0.5)
    ramp = (edge / max(overlap, 1)).clamp(floor, 1.0) if overlap > 0 else torch.ones(window)
    return ramp[:, None] * ramp[None, :]


def canvas_size(gen: Generator, height: int, width: int) -> tuple[int, int]:
    """The sampled canvas for a requested size: rounded up to the latent unit (the output is then
    cropped to the request); refused below one window.

    Example:
        >>> canvas_size(gen, 1000, 1000)  # doctest: +SKIP
        (1008, 1008)
    """
    unit = gen.vae.downsample_factor * gen.transformer.config.patch_size
    window = gen.config["image_size"]
    if height < window or width < window:
        raise InputError(f"{height}x{width} px is smaller than the model's {window} px window",
                         fix=f"use pixgen generate for images up to {window} px, or ask for >= {window} px")
    return -(-height // unit) * unit, -(-width // unit) * unit


@dataclass
class _Window:
    top: int  # latent rows / cols
    left: int
    tokens: torch.Tensor


def _windows(gen: Generator, layout: Layout, shape: tuple[int, int], stride: int) -> list[_Window]:
    f = gen.vae.downsample_factor
    win = gen.transformer.config.sample_size
    _, g = _cell_size(gen)
    return [_Window(y, x, layout.tokens_at(y * f, x * f, g))
            for y in window_starts(shape[0], win, stride) for x in window_starts(shape[1], win, stride)]


def _x0_averaging_predictor(gen: Generator, windows: list[_Window], guidance: float, overlap: int, batch_size: int,
                            on_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None],
                            ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``predict(x, t)`` for :func:`pixgen.sampling.sample`: guided predictions per window, their
    x0 averaged with feathered weights, returned as the prediction implying the averaged x0.
    ``on_batch(t, latents, x0)`` sees each window batch (its latents and predicted x0)."""
    model, sched = gen.transformer, gen.scheduler
    ptype = model.config.prediction_type
    win = model.config.sample_size
    weight = feather(win, overlap).to(gen.device)

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # x is the model input; FlowMatchEuler and DPM-Solver++ do not scale it, so it is also x_t
        x0_sum = torch.zeros_like(x)
        w_sum = torch.zeros_like(x[:, :1])
        for lo in range(0, len(windows), batch_size):
            part = windows[lo : lo + batch_size]
            xs = torch.cat([x[:, :, w.top : w.top + win, w.left : w.left + win] for w in part])
            tokens = torch.stack([w.tokens for w in part])
            pred = guided_prediction(model, xs, t, tokens, guidance)
            x0 = predicted_x0(sched, ptype, xs, pred, t)
            for w, one in zip(part, x0):
                x0_sum[0, :, w.top : w.top + win, w.left : w.left + win] += one * weight
                w_sum[0, :, w.top : w.top + win, w.left : w.left + win] += weight
            on_batch(t, xs, x0)
        return prediction_from_x0(sched, ptype, x, x0_sum / w_sum, t)

    return predict


def sample_canvas(gen: Generator, layout: Layout, height: int, width: int, *, num_inference_steps: int,
                  guidance_scale: float, seed: int = 0, overlap: int | None = None, batch_size: int = 16,
                  progress: bool = True, callback: StepCallback | None = None) -> torch.Tensor:
    """Clean latents (1, C, h, w) of a ``height`` x ``width`` canvas (multiples of the latent unit).

    ``overlap`` is in latents (default: a quarter of the window: seamless in the bench, 2.25x fewer windows than half). Noise comes from ``seed``.
    ``callback(step, timestep, latents, x0)`` is called after each window batch of each step (a
    2nd-order sampler: of each model evaluation) with that batch's window latents and predicted x0;
    returning False raises :class:`~pixgen.sampling.SamplingCancelled`.

    Example:
        >>> lat = sample_canvas(gen, layout, 512, 512, num_inference_steps=10, guidance_scale=2.0)  # doctest: +SKIP
        >>> sample_canvas(gen, layout, 512, 512, num_inference_steps=10, guidance_scale=2.0,
        ...               callback=lambda step, t, x, x0: step < 3)  # cancelled in step 4   # doctest: +SKIP
    """
    f = gen.vae.downsample_factor
    win = gen.transformer.config.sample_size
    overlap = win // 4 if overlap is None else overlap
    if not 0 <= overlap < win:
        raise InputError(f"overlap must be in 0..{win - 1} latents (the window is {win}), got {overlap}")
    shape = (height // f, width // f)
    windows = _windows(gen, layout, shape, win - overlap)
    noise = torch.randn((1, gen.vae.latent_channels, *shape), generator=torch.Generator().manual_seed(seed))
    bar = tqdm(total=len(windows) * num_inference_steps, desc="sampling windows", unit="win", disable=not progress)
    step = [0]  # the sampler's step index, advanced by its own per-step callback

    def on_batch(t: torch.Tensor, xs: torch.Tensor, x0: torch.Tensor) -> None:
        bar.update(len(xs))
        if callback is not None and callback(step[0], t, xs, x0) is False:
            raise SamplingCancelled(f"sampling cancelled by the step callback at step {step[0] + 1} of {num_inference_steps}")

    try:
        predict = _x0_averaging_predictor(gen, windows, guidance_scale, overlap, batch_size, on_batch)
        unused = torch.zeros(1, 1, layout.grid.shape[-1])  # the predictor conditions each window itself
        return sample(gen.transformer, gen.scheduler, noise, unused, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, predict=predict,
                      callback=None if callback is None else lambda i, *_: step.__setitem__(0, i + 1))
    finally:
        bar.close()


@torch.no_grad()
def decode_rows(gen: Generator, latents: torch.Tensor, *, overlap: int | None = None, start_row: int = 0,
                batch_size: int = 8, progress: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """Decode canvas latents in overlapping windows blended with feathered weights; yield
    ``(top_row, rows)`` uint8 (n, W, 3) bands of final pixel rows, top to bottom, as soon as no
    later window touches them. ``start_row`` skips rows already written (resume).

    Example:
        >>> for top, rows in decode_rows(gen, latents):   # doctest: +SKIP
        ...     canvas.write_rows(top, rows)
    """
    f = gen.vae.downsample_factor
    win = gen.transformer.config.sample_size
    overlap = win // 4 if overlap is None else overlap
    _, _, h, w = latents.shape
    ys, xs = window_starts(h, win, win - overlap), window_starts(w, win, win - overlap)
    weight = feather(win * f, overlap * f)
    vae_dtype = next(gen.vae.parameters()).dtype
    top = start_row  # first pixel row not yet written
    acc = torch.zeros(3, 0, w * f)
    wacc = torch.zeros(1, 0, w * f)
    todo = [i for i, y in enumerate(ys) if (y + win) * f > start_row]
    bar = tqdm(total=len(todo) * len(xs), desc="decoding windows", unit="win", disable=not progress)
    try:
        for i in todo:
            y = ys[i]
            end = (y + win) * f
            grow = end - top - acc.shape[1]
            if grow > 0:
                acc = torch.cat([acc, torch.zeros(3, grow, w * f)], 1)
                wacc = torch.cat([wacc, torch.zeros(1, grow, w * f)], 1)
            for lo in range(0, len(xs), batch_size):
                part = xs[lo : lo + batch_size]
                z = torch.cat([latents[:, :, y : y + win, x : x + win] for x in part]).to(gen.device, vae_dtype)
                pix = gen.vae.decode(z).float().cpu()
                skip = max(0, top - y * f)  # rows above `top` are written already
                for x, p in zip(part, pix):
                    region = (slice(None), slice(y * f + skip - top, end - top), slice(x * f, (x + win) * f))
                    acc[region] += p[:, skip:] * weight[skip:]
                    wacc[region] += weight[skip:]
                bar.update(len(part))
            final = ys[i + 1] * f if i + 1 < len(ys) else h * f
            if final > top:
                n = final - top
                rows = ((acc[:, :n] / wacc[:, :n] + 1) / 2).clamp(0, 1)
                yield top, (rows.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                acc, wacc, top = acc[:, n:], wacc[:, n:], final
    finally:
        bar.close()


# ------------------------------------------------------------------ the whole run
def _fingerprint(gen: Generator, layout: Layout, settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(layout.grid.numpy().tobytes())
    for p in gen.transformer.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes()[:4096])  # enough to tell models apart
    return h.hexdigest()[:16]


def generate_large(gen: Generator, layout: Layout, out: str | Path, *, height: int | None = None,
                   width: int | None = None, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                   seed: int = 0, overlap: int | None = None, batch_size: int = 16, tile: int = 256,
                   compression: str = "jpeg", progress: bool = True, keep_work: bool = False,
                   callback: StepCallback | None = None) -> dict[str, Any]:
    """Generate a large image from ``layout`` into ``out`` (``.ome.tif[f]``/``.tif[f]`` or ``.png``).

    The size defaults to the layout's; it is rounded up to the latent unit for sampling and the
    output is cropped back. Work goes to ``OUT.partial/`` (see the module docstring: resume);
    it is removed when ``out`` is written. Returns a summary (sizes, timings, windows).

    Args:
        callback: ``callback(step, timestep, latents, x0)`` after each window batch of each
            sampling step (see :func:`sample_canvas`; ``ceil(windows / batch_size) * steps`` calls);
            returning False raises :class:`~pixgen.sampling.SamplingCancelled`, leaving ``out``
            unwritten and ``OUT.partial/`` for a rerun with the same arguments (same image).
            Not called when the sampled latents are resumed, nor while decoding.

    Example:
        >>> generate_large(gen, layout, "twin.ome.tiff", num_inference_steps=10)  # doctest: +SKIP
        >>> generate_large(gen, layout, "twin.ome.tiff", callback=lambda *step: not stop.is_set())  # doctest: +SKIP
    """
    out = Path(out)
    suffix = "".join(out.suffixes[-2:]).lower()
    is_png = out.suffix.lower() == ".png"
    if not is_png and out.suffix.lower() not in (".tif", ".tiff"):
        raise InputError(f"unknown output type {suffix or out.name!r}", fix="name the output .ome.tiff, .tif or .png")
    steps, guidance, _ = check_sampling_args(
        gen.config["num_inference_steps"] if num_inference_steps is None else num_inference_steps,
        gen.config["guidance_scale"] if guidance_scale is None else guidance_scale)
    lh, lw = layout.size
    height, width = height or lh, width or lw
    if is_png and max(height, width) > PNG_MAX_SIDE:
        raise InputError(f"{height}x{width} px is too large for a PNG (held in memory)",
                         fix=f"write .ome.tiff above {PNG_MAX_SIDE} px")
    ch, cw = canvas_size(gen, height, width)
    f = gen.vae.downsample_factor
    mpp = gen.config.get("mpp")
    if not is_png and not mpp:
        raise InputError("this model does not record its resolution (mpp), which the OME-TIFF must state",
                         fix="set 'mpp' in the model's model_index.json, or write a .png")
    _check_disk(out, height, width, compression)
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    settings = {"height": height, "width": width, "steps": steps, "guidance": guidance, "seed": seed,
                "overlap": overlap, "cell": layout.cell}
    state_file = work / "state.json"
    key = _fingerprint(gen, layout, settings)
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("key") != key:
        state = {"key": key, "rows_done": 0, "sampled": False}
        (work / "latents.pt").unlink(missing_ok=True)
    summary: dict[str, Any] = {"height": height, "width": width, "canvas": [ch, cw], "steps": steps,
                               "guidance": guidance, "resumed_rows": state["rows_done"], "resumed_latents": state["sampled"]}
    t0 = time.perf_counter()
    if state["sampled"]:
        latents = torch.load(work / "latents.pt", weights_only=True)
    else:
        latents = sample_canvas(gen, layout, ch, cw, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                                overlap=overlap, batch_size=batch_size, progress=progress, callback=callback)
        import io

        buf = io.BytesIO()
        torch.save(latents.cpu(), buf)
        write_bytes_atomic(work / "latents.pt", buf.getvalue())
        state["sampled"] = True
        write_json_atomic(state_file, state)
    summary["sample_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    canvas = RawCanvas.create(work / "level0.raw", height, width)
    for top, rows in decode_rows(gen, latents, overlap=overlap, start_row=state["rows_done"],
                                 batch_size=max(1, batch_size // 2), progress=progress):
        rows = rows[: max(0, height - top), :width]
        if len(rows):
            canvas.write_rows(top, rows)
        state["rows_done"] = min(height, top + len(rows)) if len(rows) else state["rows_done"]
        write_json_atomic(state_file, state)
    summary["decode_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    if is_png:
        write_png(canvas, out)
    else:
        write_pyramid_tiff(canvas, out, mpp, tile=tile, compression=compression,
                           work_dir=work, name=out.name.split(".")[0])
    summary["write_s"] = time.perf_counter() - t2
    summary["latent_window"] = gen.transformer.config.sample_size
    summary["pixel_window"] = gen.transformer.config.sample_size * f
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _check_disk(out: Path, height: int, width: int, compression: str) -> None:
    """Refuse before any work when the output folder cannot hold the work files and the output."""
    out.parent.mkdir(parents=True, exist_ok=True)
    need = height * width * 3 * 2 + (0 if out.suffix.lower() == ".png" else tiff_bytes_estimate(height, width, compression))
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise InputError(f"not enough disk space in {out.parent}: {need / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free",
                         fix="free space or write the output elsewhere")
