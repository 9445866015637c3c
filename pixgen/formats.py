"""Published model layouts that ``Generator.from_pretrained`` recognises besides its own.

Each adapter is ``load(root, index, *, token, vae_path, encoder_path, local_files_only) -> Generator``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def detect(root: Path, index: dict[str, Any]) -> Callable | None:
    """The adapter for the layout at ``root``, or None for pixgen's own layout."""
    if index.get("_class_name") == "Generator":
        return None
    config = root / "transformer" / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("_class_name", "").startswith("PixCellTransformer2DModel"):
        from pixgen.pixcell import load_pixcell  # PixCell-256/-1024 and the Cell-ControlNet repo

        return load_pixcell
    return None
