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
5. ``retrieval``  5 CoNSeP + 5 MoNuSeg held-out references, 4 variations each, reference
                  retrieval in the independent CNN's space (:mod:`metrics.retrieval`)
                                                                      -> WORK/report/retrieval/
6. ``targets``    issue 12's targets against the measured numbers, and with ``--before
                  OLD_WORK`` (an earlier run of this command, e.g. on the previous bundled model)
                  a before / after table of the same figures            -> DOCS/targets.md

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
REFERENCES_PER_SOURCE, VARIATIONS = 5, 4  # issue 12: 10 held-out references x 4 variations
# issue 12's targets: C2ST per set, FD / floor, nuclear statistics / floor, retrieval top-1, seconds
C2ST_MAX = {"lc25000": 0.62, "consep": 0.75, "monuseg": 0.75}
FD_RATIO_MAX = NUCLEI_RATIO_MAX = 2.0
RETRIEVAL_MIN, GENERATE_MAX_S = 0.6, 60.0


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


def _ensure_retrieval(model: str, real: Path, out: Path, detector: str, seed: int) -> dict[str, Any]:
    """Reference retrieval of ``VARIATIONS`` variations of ``REFERENCES_PER_SOURCE`` seeded
    held-out tiles per source, judged by the independent CNN; cached in ``out/retrieval.json``."""
    from metrics.retrieval import retrieval_from_folders
    from pixgen.io import load_image, write_json_atomic
    from pixgen.pipeline import Generator

    result = out / "retrieval.json"
    if result.is_file():
        return json.loads(result.read_text())
    gen, rng, mapping = Generator.from_pretrained(model), np.random.default_rng(seed), {}
    for folder in (out / "references", out / "variations"):
        folder.mkdir(parents=True, exist_ok=True)
    for src in SOURCES:
        files = sorted((real / src).glob("*.png"))
        for i in sorted(rng.choice(len(files), REFERENCES_PER_SOURCE, replace=False)):
            ref, ref_name = load_image(files[i]), f"{src}_{files[i].name}"  # sources number their tiles alike
            ref.save(out / "references" / ref_name)
            res = gen.generate(reference=[ref], num_images=VARIATIONS, seed=seed, progress=False)
            for j, image in enumerate(res.images):
                name = f"{src}_{files[i].stem}_v{j}.png"
                image.save(out / "variations" / name)
                mapping[name] = ref_name
    scores = retrieval_from_folders(out / "references", out / "variations", mapping, detector, seed=seed)
    write_json_atomic(result, scores)
    return scores


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


def _nuclei_ratio(rep: dict[str, Any]) -> tuple[float, float] | None:
    """(synthetic, floor) aggregate nuclear-statistics distances of a report, if it has them."""
    rows = rep.get("nuclei", {}).get("rows", {})
    floor = next((r for name, r in rows.items() if name.startswith("floor")), None)
    if "synthetic" not in rows or floor is None:
        return None
    return rows["synthetic"]["distance"]["aggregate"]["value"], floor["distance"]["aggregate"]["value"]


def key_figures(reports: dict[str, dict[str, Any]], retrieval: dict[str, Any] | None,
                generate_seconds: float | None) -> dict[str, tuple[str, float, str]]:
    """Issue 12's figures: name -> (wanted, value, shown), in report order. FD and nuclear
    statistics are ratios to their real-vs-real floor."""
    from metrics.report import FLOOR, SYNTHETIC

    out: dict[str, tuple[str, float, str]] = {}
    if generate_seconds is not None:
        out["`pixgen generate --n 16`, fresh process"] = (f"<= {GENERATE_MAX_S:g} s", generate_seconds,
                                                          f"{generate_seconds:.1f} s")
    for name, rep in reports.items():
        syn, floor = rep["fidelity"][SYNTHETIC], rep["fidelity"].get(FLOOR, {})
        for key in (k for k in syn if k.startswith("C2ST_")):
            v = syn[key]["value"]
            out[f"{name}: C2ST `{key[5:]}`"] = (f"<= {C2ST_MAX.get(name, 0.75):g}", v, f"{v:.3f}")
        for key in (k for k in syn if k.startswith("FD_") and k in floor):
            a, b = syn[key]["value"], floor[key]["value"]
            out[f"{name}: FD `{key[3:]}` / floor"] = (f"<= {FD_RATIO_MAX:g}", a / b, f"{a:.4g} / {b:.4g} = {a / b:.2f}")
        nuclei = _nuclei_ratio(rep)
        if nuclei:
            a, b = nuclei
            out[f"{name}: nuclear statistics / floor"] = (f"<= {NUCLEI_RATIO_MAX:g}", a / b, f"{a:.3f} / {b:.3f} = {a / b:.2f}")
    if retrieval:
        top1 = retrieval["top1"]
        out[f"reference retrieval top-1, `{retrieval['detector']}`"] = (
            f">= {RETRIEVAL_MIN:g} (chance {retrieval['chance']['top1']:.2g})", top1["value"],
            f"{top1['value']:.3f} [{top1['ci'][0]:.3f}, {top1['ci'][1]:.3f}]")
    return out


def _met(name: str, value: float) -> bool:
    if name.startswith("`pixgen generate"):
        return value <= GENERATE_MAX_S
    if "C2ST" in name:
        return value <= C2ST_MAX.get(name.split(":")[0], 0.75)
    if "retrieval" in name:
        return value >= RETRIEVAL_MIN
    return value <= (FD_RATIO_MAX if "FD" in name else NUCLEI_RATIO_MAX)


def targets_markdown(reports: dict[str, dict[str, Any]], generate_seconds: float | None,
                     retrieval: dict[str, Any] | None = None) -> str:
    """The issue's targets, each with the measured figure and whether it is met; then the report's
    other checks (memorisation, conditional fidelity, utility)."""
    rows = [(k, wanted, shown, _verdict(_met(k, v)))
            for k, (wanted, v, shown) in key_figures(reports, retrieval, generate_seconds).items()]
    for name, rep in reports.items():
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


def before_after_markdown(before: dict[str, tuple[str, float, str]], after: dict[str, tuple[str, float, str]]) -> str:
    """One row per figure both runs measured: wanted, before, after."""
    rows = [f"| {k} | {w} | {before[k][2]} | {shown} |" for k, (w, _, shown) in after.items() if k in before]
    return "\n".join(["| figure | wanted | before | after |", "|---|---|---|---|", *rows]) + "\n"


def load_figures(work: Path) -> dict[str, tuple[str, float, str]]:
    """:func:`key_figures` of an earlier run of this command (its ``WORK/report``)."""
    report = work / "report"
    reports = {p.name[len("eval-"):]: json.loads((p / "report.json").read_text())
               for p in sorted(report.glob("eval-*")) if (p / "report.json").is_file()}
    retrieval = report / "retrieval" / "retrieval.json"
    seconds = report / "generate-16.seconds"
    return key_figures(reports, json.loads(retrieval.read_text()) if retrieval.is_file() else None,
                       float(seconds.read_text()) if seconds.is_file() else None)


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
    ap.add_argument("--before", type=Path, help="WORK of an earlier run (e.g. the previous model): a before/after table")
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
    retrieval = _ensure_retrieval(args.model, real, report / "retrieval", f"classifier:{args.detector}", args.seed)
    seconds = _time_generate(args.model, report / "generate-16")
    write_text_atomic(report / "generate-16.seconds", f"{seconds:.2f}\n")
    header = f"Measured {date.today()} by `python -m recipes.default_report` ({args.n} images per label).\n\n"
    table = targets_markdown(reports, seconds, retrieval)
    if args.before:
        table += ("\nBefore (`" + str(args.before) + "`) / after:\n\n"
                  + before_after_markdown(load_figures(args.before), key_figures(reports, retrieval, seconds)))
    write_text_atomic(args.docs / "targets.md", header + table + "\nCommands:\n\n```bash\n" + "\n".join(run) + "\n```\n")
    print((args.docs / "targets.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
