"""A pan / zoom viewer for a pyramidal OME-TIFF (the Large image page's result), self-contained.

Why our own: OpenSeadragon would be fetched from a CDN at run time (the studio fetches nothing;
no installed package ships it), and the Streamlit image-zoom components on PyPI
(streamlit-image-zoom and the like) take one in-memory image, not a pyramid. So the tiles are read here from the file's pyramid levels through
:mod:`pixgen.io.slides` (the reader every other slide path uses), embedded as JPEG data URIs, and a
few lines of canvas JavaScript draw the level that matches the zoom: wheel or +/- to zoom around a
point, drag to pan, *fit* to see it whole. Levels above ``max_level_pixels`` are not embedded (the
page stays small); zooming past the finest embedded level upsamples it, and the OME-TIFF download
holds every pixel.

Example:
    >>> with open_slide("large.ome.tiff") as slide:                  # doctest: +SKIP
    ...     levels = pyramid_tiles(slide)
    >>> st.html(viewer_html(levels, slide.dimensions), unsafe_allow_javascript=True)   # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
import json
import math
import uuid
from dataclasses import dataclass

from PIL import Image

from pixgen.io.slides import Slide

__all__ = ["TileLevel", "pyramid_tiles", "viewer_html"]


@dataclass
class TileLevel:
    """One pyramid level: its ``index`` in the file, size in px, ``downsample`` from level 0, and
    ``tiles[row][col]`` as JPEG data URIs of ``tile`` x ``tile`` px (smaller at the right and bottom edges)."""

    index: int
    width: int
    height: int
    downsample: float
    tile: int
    tiles: list[list[str]]


def _jpeg_uri(arr) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def pyramid_tiles(slide: Slide, tile: int = 256, max_level_pixels: int = 4096 * 4096) -> list[TileLevel]:
    """Every level of ``slide`` with at most ``max_level_pixels`` pixels, cut into ``tile`` px tiles
    (coarsest level first). The coarsest level is always kept.

    Example:
        >>> [(lv.index, lv.width) for lv in pyramid_tiles(slide)]      # doctest: +SKIP
        [(2, 128), (1, 256), (0, 512)]
    """
    order = sorted(range(len(slide.level_dimensions)), key=lambda i: -slide.level_downsamples[i])
    levels = []
    for i in order:
        w, h = slide.level_dimensions[i]
        if levels and w * h > max_level_pixels:
            break
        d = slide.level_downsamples[i]
        rows = [[_jpeg_uri(slide.read(round(tx * tile * d), round(ty * tile * d), i, min(tile, w - tx * tile),
                                      min(tile, h - ty * tile)))
                 for tx in range(math.ceil(w / tile))] for ty in range(math.ceil(h / tile))]
        levels.append(TileLevel(i, w, h, d, tile, rows))
    return levels


def viewer_html(levels: list[TileLevel], size: tuple[int, int], mpp: float | None = None, height: int = 520) -> str:
    """The viewer for ``levels`` (from :func:`pyramid_tiles`) of an image of ``size`` = (width,
    height) level-0 px, ``height`` px tall, for ``st.html(..., unsafe_allow_javascript=True)``.
    Its status line (``.pixgen-viewer-status``) says the level drawn, the zoom and the visible
    region in level-0 px; the container's ``data-level`` / ``data-zoom`` attributes hold the same."""
    uid = "v" + uuid.uuid4().hex[:8]
    data = {"width": size[0], "height": size[1], "mpp": mpp,
            "levels": [{"index": lv.index, "downsample": lv.downsample, "tile": lv.tile, "tiles": lv.tiles}
                       for lv in levels]}
    button = "padding:2px 10px;margin-right:4px;border:1px solid #bbb;border-radius:4px;background:#fff;cursor:pointer"
    return f"""
<div id="{uid}" class="pixgen-viewer" style="font:13px sans-serif">
  <div style="margin-bottom:4px">
    <button class="pixgen-zoom-in" style="{button}" title="zoom in">+</button>
    <button class="pixgen-zoom-out" style="{button}" title="zoom out">&minus;</button>
    <button class="pixgen-fit" style="{button}" title="the whole image">fit</button>
    <span style="color:#666">wheel: zoom at the cursor &middot; drag: pan</span>
  </div>
  <canvas style="width:100%;height:{height}px;background:#f4f4f4;border:1px solid #ddd;cursor:grab;touch-action:none"></canvas>
  <div class="pixgen-viewer-status" style="color:#333;margin-top:4px"></div>
</div>
<script>
(() => {{
  const data = {json.dumps(data)};
  const root = document.getElementById("{uid}");
  const canvas = root.querySelector("canvas"), ctx = canvas.getContext("2d");
  const status = root.querySelector(".pixgen-viewer-status");
  const cache = new Map();
  let scale = 1, ox = 0, oy = 0;  // screen px per level-0 px; level-0 px at the canvas's top-left
  const image = (src) => {{
    if (!cache.has(src)) {{ const im = new Image(); im.onload = draw; im.src = src; cache.set(src, im); }}
    return cache.get(src);
  }};
  const finest = data.levels[data.levels.length - 1];
  const pick = () => data.levels.filter(l => l.downsample <= 1 / scale + 1e-9)[0] || finest;  // coarsest sharp enough
  function fit() {{
    canvas.width = canvas.clientWidth; canvas.height = canvas.clientHeight;
    scale = Math.min(canvas.width / data.width, canvas.height / data.height);
    ox = (data.width - canvas.width / scale) / 2; oy = (data.height - canvas.height / scale) / 2;
    draw();
  }}
  function drawLevel(l) {{
    const d = l.downsample, t = l.tile;
    l.tiles.forEach((row, ty) => row.forEach((src, tx) => {{
      const im = image(src);
      if (!im.complete || !im.naturalWidth) return;
      const x = (tx * t * d - ox) * scale, y = (ty * t * d - oy) * scale;
      const w = im.naturalWidth * d * scale, h = im.naturalHeight * d * scale;
      if (x > canvas.width || y > canvas.height || x + w < 0 || y + h < 0) return;
      ctx.drawImage(im, x, y, w + 0.5, h + 0.5);
    }}));
  }}
  function draw() {{
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.imageSmoothingEnabled = scale < 2;  // past 2x, show the pixels
    const l = pick();
    drawLevel(data.levels[0]);  // the coarsest level first: no holes while finer tiles decode
    if (l !== data.levels[0]) drawLevel(l);
    const x1 = Math.min(data.width, ox + canvas.width / scale), y1 = Math.min(data.height, oy + canvas.height / scale);
    const um = data.mpp ? ` (${{((x1 - Math.max(0, ox)) * data.mpp).toFixed(0)}} um wide)` : "";
    status.textContent = `level ${{l.index}} (${{l.downsample}}x down) · zoom ${{scale.toFixed(3)}} · ` +
      `view x ${{Math.max(0, ox).toFixed(0)}}-${{x1.toFixed(0)}}, y ${{Math.max(0, oy).toFixed(0)}}-${{y1.toFixed(0)}} px${{um}}`;
    root.dataset.level = l.index; root.dataset.zoom = scale.toFixed(4);
  }}
  function zoomAt(factor, sx, sy) {{
    const fitScale = Math.min(canvas.width / data.width, canvas.height / data.height);
    const next = Math.max(fitScale / 4, Math.min(16, scale * factor));
    ox += sx / scale - sx / next; oy += sy / scale - sy / next; scale = next;
    draw();
  }}
  canvas.addEventListener("wheel", e => {{
    e.preventDefault();
    const r = canvas.getBoundingClientRect();
    zoomAt(e.deltaY < 0 ? 1.25 : 0.8, e.clientX - r.left, e.clientY - r.top);
  }}, {{passive: false}});
  let drag = null;
  canvas.addEventListener("pointerdown", e => {{ drag = [e.clientX, e.clientY]; canvas.setPointerCapture(e.pointerId); }});
  canvas.addEventListener("pointermove", e => {{
    if (!drag) return;
    ox -= (e.clientX - drag[0]) / scale; oy -= (e.clientY - drag[1]) / scale; drag = [e.clientX, e.clientY];
    draw();
  }});
  canvas.addEventListener("pointerup", () => {{ drag = null; }});
  root.querySelector(".pixgen-zoom-in").onclick = () => zoomAt(2, canvas.width / 2, canvas.height / 2);
  root.querySelector(".pixgen-zoom-out").onclick = () => zoomAt(0.5, canvas.width / 2, canvas.height / 2);
  root.querySelector(".pixgen-fit").onclick = fit;
  fit();
}})();
</script>
"""
