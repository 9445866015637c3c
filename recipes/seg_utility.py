"""Segmentation utility of a mask model's synthetic pairs (issue #13): one resumable command.

    nice -n 19 python -m recipes.seg_utility --data ../shared/data --work runs/masks2/utility \\
        [--n-synthetic 200] [--gen-steps 20] [--steps 500] [--threads 1]

Does a nuclei segmenter trained on synthetic (image, mask) pairs segment real tissue? The
untyped nuclei segmenter of :mod:`metrics.nuclei` (TinyUNet, foreground + boundary, watershed
instances) is trained identically (same steps, crops, batch, seed) on each arm:

=====================  =====================================================================
``real``               CoNSeP train tiles (432 at 128 px, 0.5 um/px, as the bundled segmenter)
``real10``             a seeded 10 % of them (43 tiles)
``synthetic``          the synthetic pairs only
``real10+synthetic``   both
``real+synthetic``     both
=====================  =====================================================================

A mixed arm either pools both sets (``--mix pooled``, the default: tiles drawn uniformly, so the
larger set dominates the batches) or balances them (``--mix balanced``: the smaller set is repeated
to the larger one's size, so a batch is half real, half synthetic on average; docs/masks.md
measures both),
and scored on the real CoNSeP test split (224 tiles) and the MoNuSeg test images with expert
polygons (at 0.5 um/px): mean per-image foreground Dice and AJI with 95 % bootstrap intervals,
and paired differences (same test images) for the issue's comparisons.

Stages (each skipped when its output exists, so an interrupted run resumes):

1. ``synthetic``  ``pixgen generate --sample-masks PART --tissue consep`` (the mask sampler and
                  the mask model) in parts of ``--part`` pairs, seeds ``--seed-synthetic + PART k``
                  -> WORK/synthetic/part-KK (CoNSeP layout); ``--synthetic DIR`` uses a ready set
2. ``models``     one segmenter per arm                                -> WORK/models/ARM
3. ``scores``     per-image scores, means, intervals, differences      -> WORK/scores.json, WORK/scores.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from metrics.segmentation import MaskSet

__all__ = ["ARMS", "COMPARISONS", "main", "synthetic_pairs", "train_arms", "score_arms"]

ARMS = ("real", "real10", "synthetic", "real10+synthetic", "real+synthetic")
# (name, arm, reference arm): the targets read these paired differences
COMPARISONS = (("synthetic - real", "synthetic", "real"), ("real10+synthetic - real10", "real10+synthetic", "real10"),
               ("real+synthetic - real", "real+synthetic", "real"))
REAL_FRACTION = 0.1


def synthetic_pairs(work: Path, n: int, part: int, steps: int | None, seed: int, model: Path | None,
                    mask_model: Path | None) -> list[Path]:
    """Generate ``n`` sampled-layout pairs in parts of ``part`` (complete parts are kept)."""
    from pixgen.cli import main as cli

    parts = []
    for k in range(int(np.ceil(n / part))):
        out = work / "synthetic" / f"part-{k:02d}"
        manifest = out / "manifest.json"
        if not (manifest.is_file() and json.loads(manifest.read_text()).get("complete")):
            args = ["generate", "--sample-masks", str(min(part, n - k * part)), "--tissue", "consep",
                    "--seed", str(seed + k * part), "--out", str(out), "--overwrite"]
            args += ["--steps", str(steps)] if steps else []
            args += ["--model", str(model)] if model else []
            args += ["--mask-model", str(mask_model)] if mask_model else []
            if cli(args) != 0:
                raise SystemExit(f"generation into {out} failed")
        parts.append(out)
    return parts


def _load_synthetic(folders: Sequence[Path]) -> MaskSet:
    from metrics.segmentation import load_mask_folder

    sets = [load_mask_folder(f) for f in folders]
    out = sets[0]
    for s in sets[1:]:
        out = out.concat(s)
    return out


def _repeat(s: MaskSet, times: int) -> MaskSet:
    """``s`` concatenated ``times`` times."""
    return s.subset([i for _ in range(times) for i in range(len(s))])


def _arm_data(arm: str, real: MaskSet, synthetic: MaskSet | None, seed: int, mix: str = "pooled") -> MaskSet:
    real10 = real.subset(np.sort(np.random.default_rng(seed).choice(len(real), round(REAL_FRACTION * len(real)), replace=False)))
    parts = {"real": real, "real10": real10, "synthetic": synthetic}
    sets = [parts[p] for p in arm.split("+")]
    if any(s is None for s in sets):
        raise SystemExit(f"arm {arm} needs the synthetic pairs")
    if len(sets) == 1:
        return sets[0]
    a, b = sets
    if mix == "balanced":  # oversample the smaller set to the larger one's size
        a, b = (_repeat(a, round(len(b) / len(a))), b) if len(a) < len(b) else (a, _repeat(b, round(len(a) / len(b))))
    return a.concat(b)


def train_arms(arms: Sequence[str], work: Path, real: MaskSet, synthetic: MaskSet | None, steps: int, crop: int,
               batch_size: int, seed: int, mix: str = "pooled") -> dict[str, Path]:
    """Train (or find) one untyped nuclei segmenter per arm, all with the same settings and seed."""
    from metrics.nuclei import NucleiSegmenter, foreground_boundary_target
    from metrics.segmentation import train_segmenter

    out = {}
    for arm in arms:
        folder = work / "models" / arm
        if not (folder / "config.json").is_file():
            data = _arm_data(arm, real, synthetic, seed, mix)
            t0 = time.perf_counter()
            log = lambda s, arm=arm: print(f"[{arm}] {s}", file=sys.stderr, flush=True)
            model = train_segmenter(data, steps=steps, crop=crop, batch_size=batch_size, seed=seed,
                                    targets=foreground_boundary_target, log=log)
            NucleiSegmenter(model).save(folder, name=f"seg-utility:{arm}", arm=arm, n_train=len(data), mix=mix, steps=steps, crop=crop,
                                        batch_size=batch_size, seed=seed, train_seconds=round(time.perf_counter() - t0, 1))
        out[arm] = folder
    return out


def _per_image(folder: Path, test: MaskSet) -> dict[str, np.ndarray]:
    from metrics.nuclei import NucleiSegmenter
    from metrics.segmentation import aji, dice

    pred = NucleiSegmenter.load(folder).instances(test.images)
    return {"dice": np.array([dice(p > 0, g > 0) for p, g in zip(pred, test.instances)]),
            "aji": np.array([aji(g, p) for p, g in zip(pred, test.instances)])}


def score_arms(models: dict[str, Path], tests: dict[str, MaskSet], n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Mean per-image Dice / AJI per arm and test set with 95 % bootstrap intervals (over test
    images; AJI skips images where it is undefined), and the paired differences of
    :data:`COMPARISONS` (resampling the same test images for both arms)."""
    from metrics.stats import estimate

    def mean(x: np.ndarray) -> dict:
        return estimate(np.nanmean(x), lambda i: np.nanmean(x[i]), [len(x)], n_boot, seed)

    out: dict[str, Any] = {}
    for name, test in tests.items():
        per = {arm: _per_image(folder, test) for arm, folder in models.items()}
        out[name] = {"n_images": len(test), "arms": {arm: {m: mean(v) for m, v in s.items()} for arm, s in per.items()},
                     "differences": {}}
        for label, arm, ref in COMPARISONS:
            if arm in per and ref in per:
                out[name]["differences"][label] = {m: mean(per[arm][m] - per[ref][m]) for m in ("dice", "aji")}
    return out


def _fmt(e: dict) -> str:
    return f"{e['value']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]"


def _markdown(scores: dict[str, Any], sizes: dict[str, int]) -> str:
    lines = []
    for name, s in scores.items():
        lines += [f"{name} test ({s['n_images']} images)", "", "| trained on | pairs | Dice | AJI |", "|---|---|---|---|"]
        lines += [f"| {arm} | {sizes.get(arm, '')} | {_fmt(e['dice'])} | {_fmt(e['aji'])} |" for arm, e in s["arms"].items()]
        lines += ["", "| paired difference | Dice | AJI |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(e['dice'])} | {_fmt(e['aji'])} |" for k, e in s["differences"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m recipes.seg_utility", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the shared data folder (consep/, monuseg/)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--synthetic", type=Path, nargs="+", help="ready paired folders (images/ + inst/) instead of generating")
    p.add_argument("--n-synthetic", type=int, default=200, help="sampled-layout pairs to generate")
    p.add_argument("--part", type=int, default=50, help="pairs per generation part (the unit of resumption)")
    p.add_argument("--gen-steps", type=int, default=20, help="sampling steps of the generator")
    p.add_argument("--seed-synthetic", type=int, default=10000, help="seed of the first sampled layout")
    p.add_argument("--model", type=Path, help="generator (default: the bundled pixgen-default)")
    p.add_argument("--mask-model", type=Path, help="mask model (default: the bundled pixgen-masks)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma list of arms to train and score")
    p.add_argument("--steps", type=int, default=500, help="training steps of every segmenter")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--mix", choices=["pooled", "balanced"], default="pooled",
                   help="mixed arms: repeat the smaller set to the larger's size, or pool them as they are")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of training and of the 10 %% subset")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from metrics.nuclei import load_training_tiles
    from pixgen.io import write_json_atomic

    arms = [x for x in a.arms.split(",") if x]
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    a.work.mkdir(parents=True, exist_ok=True)
    synthetic = None
    if any("synthetic" in arm for arm in arms):
        folders = a.synthetic or synthetic_pairs(a.work, a.n_synthetic, a.part, a.gen_steps, a.seed_synthetic, a.model, a.mask_model)
        synthetic = _load_synthetic(folders)
    real = load_training_tiles(a.data, "train", sources=("consep",))["consep"]
    models = train_arms(arms, a.work, real, synthetic, a.steps, a.crop, a.batch_size, a.seed, a.mix)
    tests = load_training_tiles(a.data, "test", tile=False)  # CoNSeP tiles, MoNuSeg expert images, at 0.5 um/px
    sizes = {arm: len(_arm_data(arm, real, synthetic, a.seed, "pooled")) for arm in arms}  # distinct pairs
    scores = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, "n_train": sizes,
              "test": score_arms(models, tests, a.n_boot, a.seed)}
    write_json_atomic(a.work / "scores.json", scores)
    (a.work / "scores.md").write_text(_markdown(scores["test"], sizes))
    print(_markdown(scores["test"], sizes))
    return scores


if __name__ == "__main__":
    main()
