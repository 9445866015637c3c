"""Large images (#15): time per megapixel, peak RSS, seams and the overlap / steps trade-off, with
the bundled model on the CPU; and a slide region next to its synthetic twin. A benchmark, not a test.

Every measured run is a fresh child process (peak RSS = the child's ru_maxrss: Python, torch,
the model and the run), with ``torch.set_num_threads(--threads)``. Seams are scored on the
written level 0 with :func:`metrics.seams.seam_score` (period = the model's 16 px pixel grid).

    nice -n 19 python bench/bench_large.py --sizes 512 1024 2048 --steps 8 --out /tmp/bench_large
    nice -n 19 python bench/bench_large.py --tradeoff 512 --out /tmp/bench_large      # overlap x steps
    nice -n 19 python bench/bench_large.py --twin 500,1000,1024,1024 --out /tmp/bench_large
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SLIDE = "slides/cmu-1-small-region.svs"


def one(cfg: dict) -> dict:
    """One run in this process (the child): generate, then measure."""
    import numpy as np
    import torch

    torch.set_num_threads(cfg["threads"])
    from metrics.seams import naive_borders, seam_score, window_borders
    from pixgen.commands import DEFAULT_MODEL
    from pixgen.conditioning import BankDraw
    from pixgen.io.ome import RawCanvas
    from pixgen.large import generate_large, layout_from_condition, layout_from_slide
    from pixgen.pipeline import Generator

    gen = Generator.from_pretrained(DEFAULT_MODEL)
    out = Path(cfg["out"])
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # time a fresh run, not a resume
    real = None
    if cfg.get("twin"):
        x, y, w, h = cfg["twin"]
        layout, real = layout_from_slide(gen, Path(cfg["data"]) / SLIDE, (x, y, w, h))
        size = layout.size[0]
    else:
        size = cfg["size"]
        layout = layout_from_condition(gen, BankDraw(None), size, size, period=2, seed=cfg["seed"])
    t0 = time.perf_counter()
    summary = generate_large(gen, layout, out, num_inference_steps=cfg["steps"], seed=cfg["seed"],
                             overlap=cfg["overlap"], progress=False, keep_work=True)
    summary["seconds"] = time.perf_counter() - t0
    summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    canvas = RawCanvas(out.with_name(out.name + ".partial") / "level0.raw", size, size)
    img = canvas.read_rows(0, size)
    win_lat = gen.transformer.config.sample_size
    f = gen.vae.downsample_factor
    b = (naive_borders(size, win_lat * f) if cfg["overlap"] == 0
         else window_borders(size, win_lat * f, (win_lat - cfg["overlap"]) * f))
    summary["seams"] = seam_score(img, b, b, period=f * gen.transformer.config.patch_size)
    summary["megapixels"] = size * size / 1e6
    if real is not None:
        from PIL import Image

        from metrics.seams import tile_fidelity

        Image.fromarray(np.concatenate([real, np.full((size, 16, 3), 255, np.uint8), img], 1)).save(
            out.with_name("twin_side_by_side.png"))
        cell = layout.cell
        tiles = [img[r:r + cell, c:c + cell] for r in range(0, size, cell) for c in range(0, size, cell)]
        emb = gen.encoder.embed(tiles)
        summary["fidelity_model_encoder"] = tile_fidelity(emb, layout.grid.reshape(len(tiles), -1))
        # the fairer judge: the independent CNN (it did not condition the generator), each output
        # tile against the real tile it was conditioned on
        from metrics.detectors import BUNDLED_CNN_DIR, compute_features, get_detector

        cnn = get_detector(f"classifier:{BUNDLED_CNN_DIR}")
        real_tiles = [real[r:r + cell, c:c + cell] for r in range(0, size, cell) for c in range(0, size, cell)]
        summary["fidelity_independent_cnn"] = tile_fidelity(torch.from_numpy(compute_features(cnn, tiles)),
                                                            torch.from_numpy(compute_features(cnn, real_tiles)))
    return summary


def child(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row(cfg: dict, r: dict) -> str:
    s = r["seams"]
    return (f"| {r['width']} | {cfg['steps']} | {cfg['overlap']} | {r['seconds']:.1f} | "
            f"{r['seconds'] / r['megapixels']:.1f} | {r['peak_rss_mb']:.0f} | {s['line_ratio']:.2f} | {s['crop_ratio']:.2f} |")


HEADER = ("| px | steps | overlap (latents) | seconds | s / MP | peak RSS MB | seam line ratio | seam crop ratio |\n"
          "|---|---|---|---|---|---|---|---|")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--overlap", type=int, default=8, help="latents (the bundled window is 32)")
    p.add_argument("--tradeoff", type=int, help="a size for the overlap x steps table")
    p.add_argument("--twin", help="x,y,w,h of a region of CMU-1-small-region (level-0 px)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="/work/shared/data")
    p.add_argument("--out", default="/tmp/bench_large")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(json.loads(args.child)), default=float))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = {"threads": args.threads, "seed": args.seed, "data": args.data}
    runs = [{**base, "size": s, "steps": args.steps, "overlap": args.overlap} for s in args.sizes]
    if args.tradeoff:
        runs += [{**base, "size": args.tradeoff, "steps": st, "overlap": ov} for st in (4, 8) for ov in (0, 8, 16)]
    if args.twin:
        runs.append({**base, "twin": [int(v) for v in args.twin.split(",")], "steps": args.steps, "overlap": args.overlap})
    print(HEADER, flush=True)
    for cfg in runs:
        name = f"twin_{args.steps}" if cfg.get("twin") else f"{cfg['size']}_s{cfg['steps']}_o{cfg['overlap']}"
        cfg["out"] = str(out / f"{name}.ome.tiff")
        r = child(cfg)
        (out / f"{name}.json").write_text(json.dumps(r, indent=1, default=float))
        print(row(cfg, r), flush=True)
        if "fidelity_model_encoder" in r:
            print("twin fidelity (model encoder):", json.dumps(r["fidelity_model_encoder"]), flush=True)
            print("twin fidelity (independent CNN, output tile vs its real tile):",
                  json.dumps(r["fidelity_independent_cnn"]), flush=True)


if __name__ == "__main__":
    main()
