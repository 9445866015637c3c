"""Nuclei drawn on the Paint page's canvas (streamlit-drawable-canvas circles) as a layout.

Each circle or ellipse (Fabric.js ``Circle`` / ``Ellipse`` objects) is one nucleus (an instance of its own, so touching nuclei stay two); its
fill colour is its class in :data:`pixgen.masks.PALETTE`. Read from the canvas's Fabric.js JSON,
not its pixels: anti-aliased edges would not be palette colours.

Example:
    >>> obj = {"type": "circle", "left": 30, "top": 30, "radius": 6, "fill": "#ff0000"}
    >>> lay = layout_from_canvas({"objects": [obj]}, canvas_px=96, size=32)
    >>> int(lay.inst.max()), int(lay.types[lay.inst == 1][0])
    (1, 2)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage.draw import ellipse

from pixgen.errors import InputError
from pixgen.masks import CLASSES, PALETTE, Layout

__all__ = ["CLASS_COLOURS", "layout_from_canvas"]

#: class name -> CSS hex colour of the canvas fill (the mask palette)
CLASS_COLOURS = {CLASSES[k]: "#{:02x}{:02x}{:02x}".format(*PALETTE[k]) for k in range(1, len(CLASSES))}
_ORIGIN = {"left": 0.0, "top": 0.0, "center": 0.5, "right": 1.0, "bottom": 1.0}


def _class_of(fill: str) -> int:
    colour = str(fill).lower()
    for k, hex_colour in enumerate(CLASS_COLOURS.values(), start=1):
        if colour == hex_colour:
            return k
    raise InputError(f"a nucleus on the canvas has the colour {fill!r}, which is no class of the mask palette",
                     fix="draw with the class picker's colours (clear the canvas and draw again)")


def layout_from_canvas(json_data: dict[str, Any] | None, canvas_px: int, size: int, name: str = "drawn") -> Layout:
    """The circles of a square ``canvas_px`` canvas as a ``size`` x ``size`` layout (scaled)."""
    objects = [o for o in (json_data or {}).get("objects", []) if str(o.get("type")).lower() in ("circle", "ellipse")]
    if not objects:
        raise InputError("the canvas has no nuclei", fix="draw circles on the canvas (or load or sample a mask)")
    scale = size / canvas_px
    inst = np.zeros((size, size), np.uint16)
    types = np.zeros((size, size), np.uint8)
    for i, o in enumerate(objects, start=1):
        rx = o.get("rx", o.get("radius", 0)) * o.get("scaleX", 1)
        ry = o.get("ry", o.get("radius", 0)) * o.get("scaleY", 1)
        cx = o.get("left", 0) - _ORIGIN[o.get("originX", "left")] * 2 * rx + rx
        cy = o.get("top", 0) - _ORIGIN[o.get("originY", "top")] * 2 * ry + ry
        rr, cc = ellipse(cy * scale, cx * scale, max(ry * scale, 0.5), max(rx * scale, 0.5), shape=inst.shape,
                         rotation=-np.deg2rad(o.get("angle", 0)))
        inst[rr, cc] = i  # a later nucleus drawn over an earlier one covers it, as on the canvas
        types[rr, cc] = _class_of(o.get("fill", ""))
    kept = np.unique(inst[inst > 0])
    relabelled = np.zeros(int(inst.max()) + 1, np.uint16)
    relabelled[kept] = np.arange(1, len(kept) + 1)
    return Layout(relabelled[inst], types, name)
