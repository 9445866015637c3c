"""The quality report of the bundled default model (``docs/default-quality.md``): one resumable command.

    python -m recipes.default_report --data ../shared/data --work /work/runs/default \\
        --detector /work/runs/detector-cnn --docs docs/default-quality

Stages, each skipped when its output exists (``WORK`` is the run folder of
``recipes.default_models``; its ``tiles/`` are the training tiles):

1. ``real``       held-out tiles, the same 64 um fields at 0.5 um/px as training: LC25000
                  grouped test (3 classes), CoNSeP test, MoNuSeg test   -> WORK/report/real/{label}/
2. ``synthetic``  ``--n`` images per bank label, each conditioned on a bank embedding (a
                  training tile's); a synthetic set per label, its
                  ``manifest.json`` declaring files and conditions    -> WORK/report/synthetic/{label}/
3. ``sheets``     real held-out | generated, 16 + 16 tiles per label   -> DOCS/sheet_{label}.jpg
4. ``eval``       ``metrics.report.evaluate`` (the equivalent ``pixgen eval`` commands are printed
                  and recorded): LC25000 3-class with
                  utility, then CoNSeP and MoNuSeg (fidelity, memorisation) -> WORK/report/eval-*/,
                  each report.md and its plots copied to DOCS/{lc25000,consep,monuseg}/
5. ``targets``    the issue's targets against the measured numbers      -> DOCS/targets.md

Detectors: ``encoder:pixgen-ssl`` (the bundled encoder: the generator was conditioned on it) and
``classifier:DIR`` (a supervised tissue CNN trained independently, ``python -m metrics.classifier``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
from datetime import date
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pixgen.io import write_text_atomic

__all__ = ["main", "targets_markdown", "side_by_side"]

LC_CLASSES = ("lung_aca", "lung_n", "lung_scc")
SOURCES = ("consep", "monuseg")


def _ensure_real(data: Path, work: Path) -> Path:
    from recipes.default_models import write_tiles

    return write_tiles(data, work / "report" / "real", work / "near-duplicates.json", split="test")


def _ensure_synthetic(model: str, out: Path, n: int, steps: int | None, seed: int) -> Path:
    """``n`` images per bank label, one synthetic set (images + ``manifest.json`` with the
    conditions) per label, named ``{label}_{i:04d}.png``; a label whose set is complete is kept,
    so an interruption loses at most one label."""
    from pixgen.errors import InputError
    from pixgen.io import Condition, ImageEntry, SamplerSettings, SetManifest, SetWriter
    from pixgen.io.manifest import model_id
    from pixgen.pipeline import Generator

    gen = Generator.from_pretrained(model)
    if gen.embedding_bank is None:
        raise InputError(f"{model} has no embedding bank, so the report cannot draw conditions per label",
                         fix="evaluate a model trained by `pixgen train` (it stores a bank), e.g. the bundled default")
    steps = int(steps or gen.config["num_inference_steps"])
    for k, label in enumerate(gen.embedding_bank.labels):
        folder, label_seed = out / label, seed + 100_000 * k
        if SetManifest.exists(folder) and SetManifest.load(folder).complete:
            continue
        cond = gen.embedding_bank.sample(label, n, seed=label_seed)
        manifest = SetManifest(model_id(model, gen.source, gen.config.get("encoder")),
                               SamplerSettings(steps, float(gen.config["guidance_scale"]), type(gen.scheduler).__name__,
                                               batch_size=64, n=1, seed=label_seed))
        with SetWriter.create(folder, manifest, overwrite=True) as writer:
            res = gen.generate(embeddings=cond, num_images=1, num_inference_steps=steps, seed=label_seed, batch_size=64)
            for i, (img, s, cid) in enumerate(zip(res.images, res.seeds, cond.ids)):
                writer.add(img, ImageEntry(f"{label}_{i:04d}.png", s, Condition("label", cid, label)))
            writer.finish(conditions=cond.values, encoder=cond.encoder, contact_sheet=False)
        print(f"generated {n} x {label}", flush=True)
    return out


def side_by_side(real: list[Image.Image], generated: list[Image.Image], title: str) -> Image.Image:
    """One image: the real grid on the left, the generated grid on the right, captioned."""
    from pixgen.io import contact_sheet

    left, right = contact_sheet(real, columns=4), contact_sheet(generated, columns=4)
    top, gap = 18, 12
    sheet = Image.new("RGB", (left.width + gap + right.width, top + max(left.height, right.height)), "white")
    sheet.paste(left, (0, top))
    sheet.paste(right, (left.width + gap, top))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), f"{title}: real held-out", fill="black")
    draw.text((left.width + gap + 4, 3), f"{title}: generated", fill="black")
    return sheet


def _sheets(real: Path, synthetic: Path, docs: Path, seed: int) -> None:
    from pixgen.io import SetManifest, atomic_write, load_image

    rng = np.random.default_rng(seed)
    for folder in sorted(p for p in synthetic.iterdir() if p.is_dir()):
        real_files = sorted((real / folder.name).glob("*.png"))
        pick = rng.choice(len(real_files), size=min(16, len(real_files)), replace=False)
        generated = SetManifest.load(folder).image_paths(folder)[:16]
        sheet = side_by_side([load_image(real_files[i]) for i in sorted(pick)], [load_image(p) for p in generated],
                             folder.name)
        with atomic_write(docs / f"sheet_{folder.name}.jpg") as fh:
            sheet.save(fh, format="JPEG", quality=88)


def _views(report: Path, tiles: Path) -> dict[str, dict[str, Path]]:
    """Folders ``pixgen eval`` reads: the LC25000 classes together, each other source alone."""
    lc = report / "views"
    for kind, root in (("real", report / "real"), ("synthetic", report / "synthetic"), ("train", tiles)):
        for cls in LC_CLASSES:
            link = lc / kind / cls
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to((root / cls).resolve(), target_is_directory=True)
    sets = {"lc25000": {k: lc / k for k in ("real", "synthetic", "train")}}
    for src in SOURCES:
        sets[src] = {"real": report / "real" / src, "synthetic": report / "synthetic" / src, "train": tiles / src}
    return sets


def _evaluations(sets: dict[str, dict[str, Path]], report: Path, detectors: str, n_boot: int) -> dict[str, dict[str, Any]]:
    """``metrics.report.evaluate`` arguments per evaluation (the conditions come from each
    synthetic set's manifest)."""
    return {
        name: {"real": s["real"], "synthetic": s["synthetic"], "train": s["train"], "out": report / f"eval-{name}",
               "detectors": detectors.split(","), "seed": 0, "n_boot": n_boot,
               **({} if name == "lc25000" else {"utility": ()})}
        for name, s in sets.items()
    }


def _as_command(kw: dict[str, Any]) -> str:
    """The ``pixgen eval`` command line that runs the same evaluation."""
    cmd = ["pixgen", "eval", "--real", str(kw["real"]), "--synthetic", str(kw["synthetic"]), "--train", str(kw["train"]),
           "--out", str(kw["out"]), "--detectors", ",".join(kw["detectors"]), "--seed", str(kw["seed"]),
           "--n-boot", str(kw["n_boot"])]
    return shlex.join(cmd + (["--utility", "none"] if "utility" in kw else []))


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def targets_markdown(reports: dict[str, dict[str, Any]], generate_seconds: float | None) -> str:
    """The issue's targets, each with the measured figure and whether it is met."""
    from metrics.report import FLOOR, SYNTHETIC

    rows = []
    if generate_seconds is not None:
        rows.append(("`pixgen generate --n 16` (first call included)", "<= 120 s", f"{generate_seconds:.1f} s",
                     _verdict(generate_seconds <= 120)))
    for name, rep in reports.items():
        syn, floor = rep["fidelity"][SYNTHETIC], rep["fidelity"].get(FLOOR, {})
        for key in (k for k in syn if k.startswith("FD_") and k in floor):
            ratio = syn[key]["value"] / floor[key]["value"]
            rows.append((f"{name}: FD `{key[3:]}` / floor", "<= 3", f"{syn[key]['value']:.4g} / {floor[key]['value']:.4g} = {ratio:.2f}",
                         _verdict(ratio <= 3)))
        for key in (k for k in syn if k.startswith("C2ST_")):
            rows.append((f"{name}: C2ST `{key[5:]}`", "<= 0.80", f"{syn[key]['value']:.3f}", _verdict(syn[key]["value"] <= 0.8)))
        for det, m in rep.get("memorisation", {}).items():
            rows.append((f"{name}: memorised copies `{det}`", "0", str(m["n_suspects"]), _verdict(m["n_suspects"] == 0)))
        c = rep.get("conditional", {})
        if "cos_real_same_class" in c:
            g, same = c["cos_generated_condition"], c["cos_real_same_class"]
            rows.append((f"{name}: conditional fidelity (cosine, `{c['detector']}`)", "clearly above random same-class pairs",
                         f"{g['value']:.3f} [{g['ci'][0]:.3f}, {g['ci'][1]:.3f}] vs {same['value']:.3f}",
                         _verdict(g["ci"][0] > same["ci"][1])))
        for learner, t in rep.get("utility", {}).get("tstr", {}).items():
            tstr, trtr = t["train_on_synthetic"]["accuracy"]["value"], t["train_on_real"]["accuracy"]["value"]
            rows.append((f"{name}: TSTR accuracy, {learner}", "within 10 points of TRTR", f"{tstr:.3f} vs {trtr:.3f}",
                         _verdict(trtr - tstr <= 0.10)))
        for learner, aug in rep.get("utility", {}).get("augmentation", {}).items():
            for r in (r for r in aug if r["fraction"] == 0.01):
                gain = r["accuracy_gain"]
                rows.append((f"{name}: real+synthetic vs real at 1 % real, {learner}", "not worse (gain CI reaches 0 or above)",
                             f"{r['real+synthetic']['accuracy']['value']:.3f} vs {r['real']['accuracy']['value']:.3f} "
                             f"(gain {gain['value']:+.3f} [{gain['ci'][0]:+.3f}, {gain['ci'][1]:+.3f}])",
                             _verdict(gain["ci"][1] >= 0)))
    lines = ["| target | wanted | measured | verdict |", "|---|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]) + "\n"


def _time_generate(model: str, out: Path) -> float:
    """Wall seconds of the README's command in a fresh process (model load and first call included)."""
    import subprocess
    import sys
    import time

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pixgen.cli", "generate", "--model", model, "--n", "16", "--out", str(out),
                    "--overwrite"], check=True)
    return time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    from pixgen.commands import DEFAULT_MODEL

    ap = argparse.ArgumentParser(prog="python -m recipes.default_report", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="the shared data folder (../shared/data)")
    ap.add_argument("--work", required=True, type=Path, help="the training run folder (recipes.default_models --work)")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="the generator to evaluate (default: the bundled one)")
    ap.add_argument("--detector", required=True, type=Path, help="the independent detector (python -m metrics.classifier)")
    ap.add_argument("--docs", required=True, type=Path, help="where sheets, reports and targets.md go")
    ap.add_argument("--n", type=int, default=200, help="synthetic images per label")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from metrics.report import evaluate

    report = args.work / "report"
    real = _ensure_real(args.data, args.work)
    synthetic = _ensure_synthetic(args.model, report / "synthetic", args.n, args.steps, args.seed)
    args.docs.mkdir(parents=True, exist_ok=True)
    _sheets(real, synthetic, args.docs, args.seed)
    detectors = f"encoder:pixgen-ssl,classifier:{args.detector}"
    reports, run = {}, []
    for name, kw in _evaluations(_views(report, args.work / "tiles"), report, detectors, args.n_boot).items():
        out, command = kw["out"], _as_command(kw)
        if not (out / "report.json").is_file():
            print("$ " + command, flush=True)
            evaluate(**kw)
        run.append(command)
        shutil.copytree(out, args.docs / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.json", "*.npz"))
        reports[name] = json.loads((out / "report.json").read_text())
    seconds = _time_generate(args.model, report / "generate-16")
    header = f"Measured {date.today()} by `python -m recipes.default_report` ({args.n} images per label).\n\n"
    write_text_atomic(args.docs / "targets.md", header + targets_markdown(reports, seconds) + "\nCommands:\n\n```bash\n"
                      + "\n".join(run) + "\n```\n")
    print((args.docs / "targets.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
