"""Does the bundled autoencoder keep nuclei and chromatin at the generator's 128 px / 0.5 um/px?

Reconstructs held-out tiles (CoNSeP test, MoNuSeg test, LC25000 grouped test) cut exactly as the
generator's training tiles are cut, prints PSNR per source (skimage, uint8) and writes a
side-by-side sheet per source (top row real, bottom row reconstruction, 2x nearest-neighbour zoom).

    python bench/ae_check.py --out /work/runs/calib/ae-check [--n 8]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from pixgen.models.autoencoders import load_autoencoder
from training.default_models import _sources

DATA = Path("/work/shared/data")


def reconstruct(vae, tiles: list[Image.Image]) -> list[np.ndarray]:
    x = torch.from_numpy(np.stack([np.asarray(t) for t in tiles])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x)).clamp(-1, 1)
    return list(((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=8, help="tiles per source on the sheet; PSNR over 4x as many")
    ap.add_argument("--split-cache", type=Path, default=Path("/work/runs/gen-v2/near-duplicates.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    vae = load_autoencoder("pixgen/weights/pixgen-default/vae").eval()
    args.out.mkdir(parents=True, exist_ok=True)
    by_label: dict[str, list[Image.Image]] = {}
    for label, img in _sources(DATA, args.split_cache, None, split="test"):
        if len(by_label.setdefault(label, [])) < 4 * args.n:
            by_label[label].append(img)
    for group, tiles in by_label.items():
        # every 4th tile on the sheet: consecutive tiles of one image look alike
        recon = reconstruct(vae, tiles)
        psnr = [peak_signal_noise_ratio(np.asarray(t), r) for t, r in zip(tiles, recon)]
        print(f"{group}: PSNR {np.mean(psnr):.2f} dB (min {np.min(psnr):.2f}) over {len(tiles)} tiles at 128 px")
        pick = list(itertools.islice(range(0, len(tiles), 4), args.n))
        top = np.concatenate([np.asarray(tiles[i]) for i in pick], axis=1)
        bottom = np.concatenate([recon[i] for i in pick], axis=1)
        sheet = Image.fromarray(np.concatenate([top, bottom], axis=0))
        sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(args.out / f"{group}.png")


if __name__ == "__main__":
    main()
