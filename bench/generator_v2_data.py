"""Training tiles for generator v2: the default tiles, with CoNSeP and MoNuSeg balanced by their
8 dihedral copies (flips x 90-degree rotations: label-preserving for H&E, and real new latents).

The default tiles (``training.default_models.write_tiles``) are 93 % LC25000 (9 953 of 10 655),
and CoNSeP / MoNuSeg, the sharp sources where the bundled generator is furthest from real
(C2ST 0.885 / 0.975), get 4 % / 2.5 % of the steps. Here they get 22 % / 14 %. LC25000 tiles
are linked, not copied.

    python bench/generator_v2_data.py --tiles /work/runs/gen-v2/tiles --out /work/runs/gen-v2/tiles-v2
    pixgen features /work/runs/gen-v2/tiles-v2 --vae pixgen/weights/pixgen-default/vae \\
        --encoder pixgen-ssl --mpp 0.5 --size 128 --out /work/runs/gen-v2/cache-v2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from PIL import Image

AUGMENTED = ("consep", "monuseg")
# The 8 elements of the dihedral group of the square, as PIL transposes (identity first).
DIHEDRAL = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
            Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.TRANSPOSE,
            Image.Transpose.TRANSVERSE)


def build(tiles: Path, out: Path) -> dict[str, int]:
    """Write ``out`` (complete or not at all: built in ``out.tmp`` and renamed); returns the counts."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    for label_dir in sorted(p for p in tiles.iterdir() if p.is_dir()):
        dest = tmp / label_dir.name
        dest.mkdir(parents=True)
        for path in sorted(label_dir.glob("*.png")):
            if label_dir.name not in AUGMENTED:
                os.symlink(path.resolve(), dest / path.name)
                continue
            img = Image.open(path)
            for k, op in enumerate(DIHEDRAL):
                (img if op is None else img.transpose(op)).save(dest / f"{path.stem}-d{k}.png")
        counts[label_dir.name] = len(list(dest.iterdir()))
    (tmp / "tiles.json").write_text(json.dumps({"from": str(tiles), "dihedral": list(AUGMENTED), "counts": counts},
                                               indent=2))
    os.replace(tmp, out)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=Path, required=True, help="training tiles, a folder per label")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    print(build(args.tiles, args.out))


if __name__ == "__main__":
    main()
