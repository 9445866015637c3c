"""Compare generator runs at equal compute: held-out flow loss at fixed timesteps + a sample sheet.

Each run is a ``pixgen train`` run directory (its ``final/``, EMA weights) or any Generator
directory (the bundled model as a reference). Held-out data: a feature cache of test-split tiles
(``training.default_models.write_tiles(..., split="test")`` + ``pixgen features``).

* loss: rectified-flow MSE (velocity ``eps - x0``) on ``--n-val`` held-out tiles (the same number
  per label), the same noise for every run, at sigma 0.1, 0.3, 0.5, 0.7, 0.9, and their mean;
* sheet: row 1 the real held-out references (two per label), then one row per run: a tile
  generated from each reference's embedding (same seeds for every run), 2x zoom.

    python bench/calibrate_generator.py --val /work/runs/gen-v2/val-cache \\
        --run xs-p4=/work/runs/calib/xs-p4 --run xs-h=/work/runs/calib/xs-h --out /work/runs/calib/eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixgen.embeddings import Embeddings
from pixgen.io import contact_sheet
from pixgen.pipeline import Generator
from training.features import FeatureCache

SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def stratified_rows(cache: FeatureCache, per_label: int) -> list[int]:
    """The first ``per_label`` tiles of each label, spread evenly over that label's tiles."""
    labels = cache.array("labels")
    rows = []
    for k in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == k)
        rows += idx[np.linspace(0, len(idx) - 1, min(per_label, len(idx))).round().astype(int)].tolist()
    return rows


@torch.no_grad()
def flow_losses(model, x0: torch.Tensor, cond: torch.Tensor, batch: int = 32) -> dict[str, float]:
    """Velocity MSE at fixed sigmas, fixed noise (seed 0), fp32."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    out = {}
    for s in SIGMAS:
        err = 0.0
        for i in range(0, len(x0), batch):
            x, e, c = x0[i:i + batch], noise[i:i + batch], cond[i:i + batch]
            xt = (1 - s) * x + s * e
            pred = model(xt, torch.full((len(x),), s * 1000.0), c).sample[:, : x.shape[1]]
            err += float((pred - (e - x)).square().mean(dim=(1, 2, 3)).sum())
        out[f"{s:.1f}"] = err / len(x0)
    out["mean"] = float(np.mean([out[f"{s:.1f}"] for s in SIGMAS]))
    return out


def run_dir(path: Path) -> Path:
    return path / "final" if (path / "final" / "model_index.json").is_file() else path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--val", type=Path, required=True, help="feature cache of held-out tiles")
    ap.add_argument("--run", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-val", type=int, default=64, help="held-out tiles per label for the loss")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = FeatureCache(args.val)
    rows = stratified_rows(cache, args.n_val)
    x0 = torch.stack([cache[i]["latents"] for i in rows])
    cond = torch.stack([cache[i]["condition"] for i in rows])
    refs = stratified_rows(cache, 2)
    paths = cache.meta("paths")
    sheet = [Image.open(paths[i]).convert("RGB") for i in refs]
    ref_cond = Embeddings(torch.stack([cache[i]["condition"] for i in refs]), encoder=cache.encoder_name)
    results = {}
    for item in args.run:
        name, _, path = item.partition("=")
        gen = Generator.from_pretrained(run_dir(Path(path)))
        gen.to(dtype=torch.float32)
        model = gen.transformer.eval()
        results[name] = flow_losses(model, x0, cond)
        out = gen.generate(embeddings=ref_cond, seed=0, guidance_scale=args.guidance, num_inference_steps=args.steps,
                           progress=False, batch_size=len(refs))
        sheet += out.images
        print(name, json.dumps({k: round(v, 4) for k, v in results[name].items()}), flush=True)
    (args.out / "losses.json").write_text(json.dumps(results, indent=2))
    grid = contact_sheet(sheet, columns=len(refs))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(args.out / "sheet.png")
    print(f"rows: real, {', '.join(r.partition('=')[0] for r in args.run)} -> {args.out / 'sheet.png'}")


if __name__ == "__main__":
    main()
