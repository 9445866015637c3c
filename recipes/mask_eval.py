"""Measure a mask model's adherence on held-out masks: one resumable command.

    nice -n 19 python -m recipes.mask_eval --data ../shared/data --mask-model runs/masks/export \\
        --work runs/masks/eval [--model pixgen/weights/pixgen-default] [--tiles 32]

Stages (each skipped when its output exists):

1. ``real``      every k-th CoNSeP *test* tile at 128 px / 0.5 um/px (image LANCZOS, masks
                 nearest-neighbour) as ``images/ inst/ types/``                  -> WORK/real
2. ``gen`` / ``floor``  paired sets from the real masks with the ControlNet on (``--control-scale``,
                 default 1; another scale writes gen-scaleS, scores-scaleS.json, sheet-scaleS.png; with
                 the masks' composition terms in the prior condition unless ``--no-mask-terms``: suffix
                 -noterms) / off and without the terms (same seeds, ``consep`` condition)
                                                                                  -> WORK/gen, WORK/floor
3. ``scores``    Dice / AJI of the bundled nuclei segmenter (``metrics.nuclei``, trained on the
                 CoNSeP + MoNuSeg train tiles at 0.5 um/px), and detection / per-class type F1 of
                 the typed segmenter (``metrics/weights/nuclei-types``, CoNSeP train tiles), on real
                 (ceiling), gen and floor, and gen minus floor per class (paired) -> WORK/scores.json
4. ``sheet``     mask | generated | no mask | real for 6 tiles                   -> WORK/sheet.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from pixgen.io import save_png, write_json_atomic

__all__ = ["main"]


def _write_real(data: Path, out: Path, tiles: int) -> Path:
    from pixgen.masks import downsample_layout
    from training.data.masks import CoNSePDataset

    if (out / "images").is_dir():
        return out
    ds = CoNSePDataset(data / "consep", "test")
    tmp = out.with_name(out.name + ".partial")
    for sub in ("images", "inst", "types"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    for i in np.linspace(0, len(ds) - 1, tiles).round().astype(int):
        s = ds[int(i)]
        inst, types = downsample_layout(s["inst"], s["types"], 2)
        save_png(Image.fromarray(s["image"]).resize((128, 128), Image.LANCZOS), tmp / "images" / f"{s['image_id']}.png")
        save_png(inst.astype(np.uint16), tmp / "inst" / f"{s['image_id']}.png")
        save_png(types.astype(np.uint8), tmp / "types" / f"{s['image_id']}.png")
    tmp.rename(out)
    return out


def _generate(model: Path, mask_model: Path, real: Path, out: Path, scale: float, steps: int | None,
              mask_terms: bool = True) -> Path:
    from pixgen.cli import main as cli

    if not (out / "manifest.json").is_file() or not json.loads((out / "manifest.json").read_text()).get("complete"):
        args = ["generate", "--model", str(model), "--mask-model", str(mask_model), "--mask", str(real),
                "--label", "consep", "--n", "1", "--control-scale", str(scale), "--out", str(out), "--overwrite"]
        args += ([] if mask_terms else ["--no-mask-terms"]) + (["--steps", str(steps)] if steps else [])
        if cli(args) != 0:
            raise SystemExit(f"generation into {out} failed")
    return out


def _sheet(real: Path, gen: Path, floor: Path, out: Path, rows: int = 6) -> Path:
    from pixgen.io import contact_sheet
    from pixgen.masks import encode_masks

    names = sorted(p.name for p in (real / "inst").iterdir())[:: max(1, len(list((real / "inst").iterdir())) // rows)][:rows]
    tiles = []
    for n in names:
        inst = np.asarray(Image.open(real / "inst" / n))
        types = np.asarray(Image.open(real / "types" / n))
        ch = encode_masks(inst, types)
        from pixgen.masks import PALETTE

        rgb = np.zeros((*inst.shape, 3), np.uint8)
        for k in range(1, 5):
            rgb[ch[k] > 0] = PALETTE[k]
        rgb[ch[5] > 0] = (rgb[ch[5] > 0] * 0.5).astype(np.uint8)  # boundaries darker: instances visible
        tiles += [Image.fromarray(rgb), Image.open(gen / "images" / n), Image.open(floor / "images" / n),
                  Image.open(real / "images" / n)]
    contact_sheet([t.convert("RGB") for t in tiles], columns=4).save(out)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m recipes.mask_eval", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--mask-model", type=Path, required=True)
    p.add_argument("--model", type=Path, default=Path(__file__).parents[1] / "pixgen" / "weights" / "pixgen-default")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--tiles", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--control-scale", type=float, default=1.0, help="ControlNet scale of the generated set")
    p.add_argument("--no-mask-terms", action="store_true", help="the generated set without the masks' composition terms")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--typed-segmenter", type=Path, help="typed nuclei segmenter (default: the bundled nuclei-types)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from metrics.adherence import bundled_segmenter, relative, score_folder, type_counts_folder, typed_segmenter
    from metrics.nuclei import typed_difference, typed_scores

    a.work.mkdir(parents=True, exist_ok=True)
    real = _write_real(a.data, a.work / "real", a.tiles)
    segment = bundled_segmenter()  # the tiles are at its 0.5 um/px
    gen_name = ("gen" if a.control_scale == 1.0 else f"gen-scale{a.control_scale:g}") + ("-noterms" if a.no_mask_terms else "")
    gen = _generate(a.model, a.mask_model, real, a.work / gen_name, a.control_scale, a.steps, not a.no_mask_terms)
    floor = _generate(a.model, a.mask_model, real, a.work / "floor", 0.0, a.steps, mask_terms=False)
    typed = typed_segmenter(a.typed_segmenter)
    sets = (("ceiling_real", real), ("generated", gen), ("floor_no_mask", floor))
    counts = {name: type_counts_folder(typed, folder) for name, folder in sets}  # same masks, same order
    scores = {name: {**score_folder(segment, folder), "type_f1": typed_scores(counts[name])} for name, folder in sets}
    scores["type_f1_generated_minus_floor"] = typed_difference(counts["generated"], counts["floor_no_mask"])
    ceiling_f1, gen_f1 = (scores[k]["type_f1"]["f1"] for k in ("ceiling_real", "generated"))
    scores["type_f1_vs_ceiling"] = {k: round(gen_f1[k]["value"] / ceiling_f1[k]["value"], 4)
                                    if gen_f1[k] and ceiling_f1[k] and ceiling_f1[k]["value"] else None for k in gen_f1}
    for metric in ("dice", "aji"):
        scores[f"{metric}_relative"] = relative(scores["generated"][metric]["value"],
                                                scores["floor_no_mask"][metric]["value"],
                                                scores["ceiling_real"][metric]["value"])
        scores[f"{metric}_vs_ceiling"] = round(scores["generated"][metric]["value"]
                                               / scores["ceiling_real"][metric]["value"], 4)
    scores.update(control_scale=a.control_scale, mask_terms=not a.no_mask_terms)
    suffix = "" if gen_name == "gen" else gen_name[3:]
    write_json_atomic(a.work / f"scores{suffix}.json", scores)
    _sheet(real, gen, floor, a.work / f"sheet{suffix}.png")
    print(json.dumps(scores, indent=1))
    return scores


if __name__ == "__main__":
    main()
