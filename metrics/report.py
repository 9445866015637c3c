"""The evaluation report: ``evaluate(...)`` (Python) and ``pixgen eval`` (command line).

Every number is computed for the synthetic set AND for calibration rows computed the same
way, against the same real (held-out) reference, at the same N:

- ``floor: real-train vs real-test``: real images the generator trained on (needs
  ``--train``); the best a generator can do. Without ``--train`` the floor is one half of the
  real set against the other half (``floor: real half vs real half``), a smaller-N stand-in.
- ``baseline: colour-matched noise`` and ``baseline: blurred real``: trivial generators
  (per-channel mean/std Gaussian noise; a strong Gaussian blur of real images), made from the
  training images (else the real ones). Anything scoring near them is bad.

Example:
    >>> rep = evaluate("real_test/", "synthetic/", train="real_train/", detectors=["random-conv"],
    ...                out="report/")                                         # doctest: +SKIP
    >>> rep["fidelity"]["synthetic"]["FD_random-conv"]["value"]               # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from metrics.detectors import Detector, compute_features, default_detectors, get_detector
from metrics.fidelity import c2st, conditional_fidelity, fd_estimate, kid_estimate, prdc
from metrics.images import (
    ImageSet,
    blurred,
    colour_matched_noise,
    image_crops,
    load_image_folder,
    stratified_subsample,
)
from metrics.memorisation import memorisation_audit
from metrics.nuclei import MPP, nuclear_statistics
from metrics.retrieval import retrieval_from_folders
from metrics.segmentation import is_mask_folder, load_mask_folder
from metrics.stats import SmallSampleWarning
from metrics.utility import LEARNERS, classification_utility, segmentation_utility
from pixgen.errors import InputError
from pixgen.io import write_text_atomic

__all__ = ["evaluate", "add_parser", "run"]

SYNTHETIC = "synthetic"
FLOOR = "floor: real-train vs real-test"
FLOOR_HALF = "floor: real half vs real half (no --train)"
NOISE = "baseline: colour-matched noise"
BLUR = "baseline: blurred real"

# metric key prefix -> (what the best value is, a one-line reading)
METRIC_HELP = {
    "FD": ("lower", "Frechet distance of Gaussian fits; 0 = same mean and covariance"),
    "KID": ("lower", "kernel MMD^2 (cubic kernel), unbiased: ~0 for one distribution"),
    "precision": ("higher", "share of synthetic inside the real k-NN manifold (realism)"),
    "recall": ("higher", "share of real inside the synthetic k-NN manifold (variety)"),
    "density": ("~1", "real k-NN balls per synthetic sample / k"),
    "coverage": ("higher", "share of real whose k-NN ball holds a synthetic sample"),
    "C2ST": ("0.5", "held-out accuracy telling synthetic from real; 0.5 = indistinguishable"),
}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _class_names(root: Path) -> list[str]:
    from metrics.images import image_files

    return sorted(p.name for p in root.iterdir() if p.is_dir() and image_files(p)) if root.is_dir() else []


def _load(root: str | Path | ImageSet | None, classes: list[str], max_images: int | None, seed: int) -> ImageSet | None:
    if root is None or isinstance(root, ImageSet):
        return root
    if is_mask_folder(root):
        ms = load_mask_folder(root, max_images, seed)
        return ImageSet(ms.images, None, [], ms.paths)
    return load_image_folder(root, max_images, seed, classes=classes or None)


def _paths(*roots: Any) -> list[Path]:
    return [Path(r) for r in roots if isinstance(r, (str, Path))]


# ---------------------------------------------------------------------------------------------
# The rows being compared with the real reference
# ---------------------------------------------------------------------------------------------


def _calibration_rows(real: ImageSet, synthetic: ImageSet, train: ImageSet | None, seed: int) -> dict[str, tuple[ImageSet, ImageSet]]:
    """``row name -> (candidate, reference)``; calibration candidates have the synthetic N."""
    n = len(synthetic)
    rows = {SYNTHETIC: (synthetic, real)}
    if train is not None:
        rows[FLOOR] = (_take(train, n, seed), real)
    else:
        perm = np.random.default_rng(seed).permutation(len(real))
        half = len(real) // 2
        rows[FLOOR_HALF] = (real.subset(perm[half:]), real.subset(perm[:half]))
    source = _take(train if train is not None else real, n, seed + 1)
    rows[NOISE] = (ImageSet(colour_matched_noise(source.images, seed), source.labels, source.classes), real)
    rows[BLUR] = (ImageSet(blurred(source.images), source.labels, source.classes), real)
    return rows


def _take(s: ImageSet, n: int, seed: int) -> ImageSet:
    if len(s) <= n:
        return s
    labels = s.labels if s.labels is not None else np.zeros(len(s), int)
    return s.subset(stratified_subsample(labels, n, seed))


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


def _fidelity_row(cand: np.ndarray, ref: np.ndarray, det: str, k: int, n_boot: int, seed: int) -> dict[str, Any]:
    row = {f"FD_{det}": fd_estimate(ref, cand, n_boot, seed), f"KID_{det}": kid_estimate(ref, cand, n_boot, seed)}
    for name, est in prdc(ref, cand, k=k, n_boot=n_boot, seed=seed).items():
        row[f"{name}_{det}"] = est
    row[f"C2ST_{det}"] = c2st(cand, ref, seed=seed, n_boot=n_boot)
    return row


def _per_class_c2st(cand: ImageSet, ref: ImageSet, fc: np.ndarray, fr: np.ndarray, seed: int, n_boot: int) -> dict[str, Any]:
    if cand.labels is None or ref.labels is None:
        return {}
    out = {}
    for c, name in enumerate(ref.classes):
        a, b = fc[cand.labels == c], fr[ref.labels == c]
        if min(len(a), len(b)) >= 4:
            out[name] = c2st(a, b, seed=seed, n_boot=n_boot)
    return out


def _load_conditioning(path: Path, synthetic: ImageSet) -> tuple[np.ndarray, np.ndarray, str | None]:
    """``(row indices into synthetic, embeddings, encoder name)`` from a conditioning .npz with
    ``files`` (names or paths of synthetic images), ``embeddings`` (N, D), optional ``encoder``
    (``--conditioning``, for sets not written by ``pixgen generate``)."""
    data = np.load(path, allow_pickle=False)
    if "files" not in data or "embeddings" not in data:
        raise InputError(f"{path} lacks 'files' and 'embeddings' arrays", fix="save them with np.savez")
    where = {Path(p).name: i for i, p in enumerate(synthetic.paths)}
    pairs = [(where[Path(str(f)).name], e) for f, e in zip(data["files"], data["embeddings"]) if Path(str(f)).name in where]
    if not pairs:
        raise InputError(f"no file named in {path} is in the synthetic set")
    encoder = str(data["encoder"]) if "encoder" in data else None
    return np.array([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), encoder


def _manifest_conditioning(root: Path, synthetic: ImageSet) -> tuple[np.ndarray, np.ndarray, str | None] | None:
    """The same triple from the ``manifest.json`` of a synthetic set folder (or of each class
    subfolder): the conditions tensor it declares, row i for its file i. None when no manifest
    declares conditions."""
    from safetensors.numpy import load_file

    from pixgen.io import SetManifest

    where = {Path(p).resolve(): i for i, p in enumerate(synthetic.paths)}
    rows, embeddings, encoders = [], [], set()
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if not SetManifest.exists(folder) or not (m := SetManifest.load(folder)).conditions:
            continue
        values = load_file(str(folder / m.conditions["file"]))[m.conditions["key"]]
        encoders.add(m.conditions.get("encoder"))
        for entry, value in zip(m.files, values.reshape(len(values), -1)):
            if (folder / entry.file).resolve() in where:
                rows.append(where[(folder / entry.file).resolve()])
                embeddings.append(value)
    if not rows:
        return None
    if len(encoders) > 1:
        raise InputError(f"the synthetic sets under {root} were conditioned on different encoders {sorted(map(str, encoders))}",
                         fix="evaluate sets of one encoder together")
    return np.array(rows), np.stack(embeddings), encoders.pop()


def evaluate(
    real: str | Path | ImageSet,
    synthetic: str | Path | ImageSet,
    train: str | Path | ImageSet | None = None,
    detectors: Sequence[str | Detector] | None = None,
    *,
    inception_weights: str | Path | None = None,
    trust_remote_code: bool = False,
    max_images: int | None = None,
    seed: int = 0,
    n_boot: int = 200,
    k: int = 3,
    crop_size: int | None = None,
    conditioning: str | Path | None = None,
    utility: Sequence[str] = LEARNERS,
    cnn_steps: int = 150,
    seg_steps: int = 300,
    nuclei: bool = True,
    nuclei_mpp: float = MPP,
    references: str | Path | None = None,
    reference_map: str | Path | dict[str, str] | None = None,
    batch_size: int = 32,
    device: str | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a synthetic image set against real held-out images (and the training images).

    ``real`` is the held-out real set the metrics compare with; ``train`` the images the
    generator was trained on (enables the floor row, the memorisation audit and the
    augmentation study). Folders may hold class subfolders (labels = names) or, for masks,
    ``images/`` + ``inst/``. ``detectors`` are names for :func:`metrics.detectors.get_detector`
    or detector objects; None picks :func:`metrics.detectors.default_detectors` (Inception where its
    weights are on disk, else the bundled ones; the report says which and why). ``nuclei`` adds the
    nuclear statistics (:mod:`metrics.nuclei`) of every row, for images at ``nuclei_mpp`` um/px.
    With ``references`` (a folder) and ``reference_map`` (synthetic file name -> reference file
    name), every detector also scores reference retrieval (:mod:`metrics.retrieval`). With ``out``
    the report is written there (``report.json``, ``report.md``, plots). Returns the report as a dict.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if detectors is None:
        detectors, detectors_why = default_detectors(inception_weights)
    else:
        detectors_why = "chosen by the caller (--detectors)"
    classes = sorted(set().union(*(_class_names(p) for p in _paths(real, synthetic, train))))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SmallSampleWarning)
        real_s, syn_s, train_s = (_load(x, classes, max_images, seed) for x in (real, synthetic, train))
        timings["load"] = time.perf_counter() - t_start
        rows = _calibration_rows(real_s, syn_s, train_s, seed)
        config = {
            "real": _describe(real), "synthetic": _describe(synthetic), "train": _describe(train),
            "detectors": [d if isinstance(d, str) else d.name for d in detectors], "detectors_why": detectors_why,
            "max_images": max_images,
            "seed": seed, "n_boot": n_boot, "k": k, "crop_size": crop_size, "utility": list(utility), "cnn_steps": cnn_steps,
        }
        report = _empty_report(config, real_s, syn_s, train_s, rows)
        feats, audits = {}, {}
        for spec in detectors:
            t0 = time.perf_counter()
            det = spec if isinstance(spec, Detector) else get_detector(spec, inception_weights=inception_weights, device=device,
                                                                      seed=seed, trust_remote_code=trust_remote_code)
            feats[det.name] = f = _features(det, real_s, train_s, rows, batch_size)
            timings[f"features_{det.name}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            _fidelity_section(report, det, f, real_s, rows, k=k, n_boot=n_boot, seed=seed, crop_size=crop_size, batch_size=batch_size)
            if train_s is not None:
                audits[det.name] = memorisation_audit(f[SYNTHETIC], f["train"], f["real"], n_boot=n_boot, seed=seed)
                report["memorisation"][det.name] = _audit_summary(audits[det.name], syn_s, train_s)
            timings[f"fidelity_{det.name}"] = time.perf_counter() - t0
            if references is not None:
                report.setdefault("retrieval", {})[det.name] = retrieval_from_folders(references, syn_s, reference_map or {}, det, n_boot, seed)
        if nuclei:
            t0 = time.perf_counter()
            pairs = {name: (cand.images, ref.images) for name, (cand, ref) in rows.items()}
            report["nuclei"] = nuclear_statistics(real_s.images, pairs, mpp=nuclei_mpp, n_boot=n_boot, seed=seed)
            timings["nuclei"] = time.perf_counter() - t0
        if conditioning is not None and not Path(conditioning).is_file():
            raise InputError(f"conditioning file not found: {conditioning}", fix="pass an .npz with 'files' and 'embeddings'")
        if conditioning is not None:
            cond = _load_conditioning(Path(conditioning), syn_s)
        else:
            cond = _manifest_conditioning(Path(synthetic), syn_s) if isinstance(synthetic, (str, Path)) else None
        if cond is not None:
            report["conditional"] = _conditional(cond, syn_s, real_s, feats, seed, n_boot)
        if utility and all(s is None or s.labels is not None for s in (real_s, syn_s, train_s)):
            t0 = time.perf_counter()
            first = next(iter(feats))
            util_feats = {name: feats[first][key] for name, key in (("test", "real"), ("synthetic", SYNTHETIC), ("train", "train")) if key in feats[first]}
            report["utility"] = classification_utility(train_s, real_s, syn_s, util_feats, learners=utility, cnn_steps=cnn_steps, seed=seed, n_boot=n_boot)
            report["utility"]["probe_features"] = first
            timings["utility"] = time.perf_counter() - t0
        if train is not None and all(isinstance(p, (str, Path)) and is_mask_folder(p) for p in (real, synthetic, train)):
            t0 = time.perf_counter()
            masks = [load_mask_folder(p, max_images, seed) for p in (train, real, synthetic)]
            report["segmentation"] = segmentation_utility(*masks, steps=seg_steps, seed=seed, n_boot=n_boot)
            timings["segmentation"] = time.perf_counter() - t0
    report["warnings"] = sorted({str(w.message) for w in caught if issubclass(w.category, SmallSampleWarning)})
    for w in caught:  # pass them on to the caller
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    timings["total"] = time.perf_counter() - t_start
    report["timings_s"] = {name: round(v, 2) for name, v in timings.items()}
    if out is not None:
        _write_report(report, Path(out), {"features": feats, "memorisation": audits}, rows, syn_s, train_s)
    return report


def _describe(source: Any) -> str | None:
    return None if source is None else "<ImageSet>" if isinstance(source, ImageSet) else str(source)


def _empty_report(config: dict, real: ImageSet, syn: ImageSet, train: ImageSet | None, rows: dict) -> dict[str, Any]:
    sets = {name: s for name, s in (("real", real), ("synthetic", syn), ("train", train)) if s is not None}
    return {
        "config": config,
        "sets": {
            name: {"n": len(s), "classes": s.classes, "sizes": sorted({f"{im.shape[1]}x{im.shape[0]}" for im in s.images})}
            for name, s in sets.items()
        },
        "rows": {name: {"n_candidate": len(c), "n_reference": len(r)} for name, (c, r) in rows.items()},
        "fidelity": {name: {} for name in rows},
        "c2st_per_class": {},
        "memorisation": {},
    }


def _features(det: Detector, real: ImageSet, train: ImageSet | None, rows: dict, batch_size: int) -> dict[str, np.ndarray]:
    """Features of the reference, of every row's candidate set, and of the training set."""
    f = {"real": compute_features(det, real.images, batch_size)}
    for name, (cand, _) in rows.items():
        f[name] = compute_features(det, cand.images, batch_size)
    if train is not None:
        f["train"] = compute_features(det, train.images, batch_size)
    return f


def _fidelity_section(
    report: dict, det: Detector, f: dict, real: ImageSet, rows: dict, *, k: int, n_boot: int, seed: int, crop_size: int | None, batch_size: int
) -> None:
    """Fill ``report["fidelity"]`` (and C2ST per class) for one detector, every row."""
    for name, (cand, ref) in rows.items():
        f_ref = f["real"] if ref is real else f["real"][_subset_index(real, ref)]
        report["fidelity"][name].update(_fidelity_row(f[name], f_ref, det.name, k, n_boot, seed))
        if crop_size:
            report["fidelity"][name][f"cropFD_{det.name}"] = fd_estimate(
                compute_features(det, image_crops(ref.images, crop_size, seed=seed), batch_size),
                compute_features(det, image_crops(cand.images, crop_size, seed=seed), batch_size),
                n_boot, seed,
            )
        if name in (SYNTHETIC, FLOOR):
            per_class = _per_class_c2st(cand, ref, f[name], f_ref, seed, n_boot)
            if per_class:
                report["c2st_per_class"].setdefault(name, {})[det.name] = per_class


def _subset_index(full: ImageSet, part: ImageSet) -> np.ndarray:
    """Rows of ``full`` that ``part`` was taken from (by identity of the image arrays)."""
    where = {id(im): i for i, im in enumerate(full.images)}
    return np.array([where[id(im)] for im in part.images])


def _audit_summary(audit: dict[str, Any], syn: ImageSet, train: ImageSet) -> dict[str, Any]:
    suspects = [
        {
            "synthetic": syn.paths[i] if syn.paths else i,
            "nearest_train": train.paths[int(audit["nn_train_index"][i])] if train.paths else int(audit["nn_train_index"][i]),
            "distance": float(audit["nn_distance"][i]),
            "ratio_to_baseline_median": float(audit["ratio_to_baseline_median"][i]),
        }
        for i in audit["suspects"]
    ]
    return {
        "n_suspects": len(suspects),
        "suspects": suspects,
        "threshold": audit["threshold"],
        "quantile": audit["quantile"],
        "max_ratio": audit["max_ratio"],
        "baseline_median": audit["baseline_median"],
        "synthetic_median": float(np.median(audit["nn_distance"])),
        "frac_below_quantile": audit["frac_below_quantile"],
    }


def _conditional(conditioning: tuple[np.ndarray, np.ndarray, str | None], syn: ImageSet, real: ImageSet, feats: dict,
                 seed: int, n_boot: int) -> dict[str, Any]:
    rows, cond, encoder = conditioning
    det = encoder if encoder in feats else next((d for d, f in feats.items() if f["real"].shape[1] == cond.shape[1]), None)
    if det is None:
        warnings.warn(f"conditional fidelity skipped: no detector matches the conditioning embeddings ({encoder}, D={cond.shape[1]})")
        return {"skipped": f"add --detectors encoder:{encoder or 'NAME'} (the encoder the conditions came from)"}
    f = feats[det]
    res = conditional_fidelity(f[SYNTHETIC][rows], cond, f["real"], real.labels, seed=seed, n_boot=n_boot)
    return {"detector": det, "n": len(rows), **res}


# ---------------------------------------------------------------------------------------------
# Writing: report.json, report.md and plots
# ---------------------------------------------------------------------------------------------


def _fmt(est: Any, scale: float = 1.0, digits: int = 3) -> str:
    if not isinstance(est, dict) or "value" not in est:
        return "-"
    lo, hi = est["ci"]
    ci = "" if np.isnan(lo) else f" [{lo * scale:.{digits}g}, {hi * scale:.{digits}g}]"
    return f"{est['value'] * scale:.{digits}g}{ci}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _write_report(
    report: dict[str, Any], out: Path, plots_data: dict, rows: dict, syn: ImageSet, train: ImageSet | None
) -> None:
    """Write ``report.json``, ``report.md`` and the plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    figures = _plots(out, plots_data, rows, syn, train)
    write_text_atomic(out / "report.json", json.dumps(report, indent=1, default=_json_default))
    write_text_atomic(out / "report.md", _markdown(report, figures))


def _plots(out: Path, data: dict, rows: dict, syn: ImageSet, train: ImageSet | None) -> dict[str, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    figures: dict[str, list[str]] = {}
    for det, f in data["features"].items():
        pca = PCA(n_components=2, random_state=0).fit(np.concatenate([f["real"], *(f[name] for name in rows)]))
        fig, ax = plt.subplots(figsize=(6, 5))
        ax.scatter(*pca.transform(f["real"]).T, s=6, alpha=0.5, label="real (reference)", c="k")
        for name, colour in zip(rows, ["tab:red", "tab:blue", "tab:gray", "tab:orange"]):
            ax.scatter(*pca.transform(f[name]).T, s=6, alpha=0.5, label=name, c=colour)
        ax.set(title=f"PCA of {det} features (fit on all sets)", xlabel="PC1", ylabel="PC2")
        ax.legend(fontsize=7, markerscale=2)
        fig.tight_layout()
        name = f"pca_{_safe(det)}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        figures.setdefault(det, []).append(name)
    for det, audit in data["memorisation"].items():
        fig, ax = plt.subplots(figsize=(6, 4))
        bins = np.linspace(0, max(audit["baseline_distance"].max(), audit["nn_distance"].max()) * 1.02, 50)
        ax.hist(audit["baseline_distance"], bins=bins, alpha=0.6, density=True, label="real test -> train (baseline)")
        ax.hist(audit["nn_distance"], bins=bins, alpha=0.6, density=True, label="synthetic -> train")
        ax.axvline(audit["threshold"], c="r", ls="--", label=f"{audit['quantile']:.0%} quantile of baseline")
        ax.set(title=f"nearest-neighbour distance to training set ({det})", xlabel="distance", ylabel="density")
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"nn_distances_{_safe(det)}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        figures.setdefault(det, []).append(name)
        if audit["suspects"] and train is not None:
            show = audit["suspects"][:8]
            fig, axes = plt.subplots(2, len(show), figsize=(1.8 * len(show), 4), squeeze=False)
            for col, i in enumerate(show):
                axes[0, col].imshow(syn.images[i])
                axes[0, col].set_title(f"syn #{i}\nd={audit['nn_distance'][i]:.3g}", fontsize=7)
                axes[1, col].imshow(train.images[int(audit["nn_train_index"][i])])
                axes[1, col].set_title("nearest train", fontsize=7)
            for a in axes.ravel():
                a.axis("off")
            fig.tight_layout()
            name = f"suspects_{_safe(det)}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            figures[det].append(name)
    return figures


def _markdown(rep: dict[str, Any], figures: dict[str, list[str]]) -> str:
    cfg = rep["config"]
    lines = ["# pixgen evaluation report", "", f"- detectors: {', '.join(f'`{d}`' for d in cfg['detectors'])}: "
             f"{cfg.get('detectors_why', '')}"]
    lines += [f"- real (reference): `{cfg['real']}`", f"- synthetic: `{cfg['synthetic']}`", f"- train: `{cfg['train']}`"]
    lines += [f"- {name}: {s['n']} images, sizes {', '.join(s['sizes'])}" + (f", classes {s['classes']}" if s["classes"] else "") for name, s in rep["sets"].items()]
    lines += [f"- seed {cfg['seed']}, bootstrap n={cfg['n_boot']} (95 % percentile intervals in brackets), k={cfg['k']}", ""]
    if rep["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in rep["warnings"]] + [""]
    lines += [
        "## Fidelity, read between the calibration rows", "",
        "The floor is as good as it gets; the baselines are trivial generators. KID is shown x1000.", "",
    ]
    for det in dict.fromkeys(k.split("_", 1)[1] for row in rep["fidelity"].values() for k in row):
        metrics = [m for m in ("FD", "cropFD", "KID", "precision", "recall", "density", "coverage", "C2ST") if any(f"{m}_{det}" in r for r in rep["fidelity"].values())]
        lines += [f"### detector `{det}`", "", "| row | N | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
        for name, row in rep["fidelity"].items():
            cells = [_fmt(row.get(f"{m}_{det}"), 1000.0 if m == "KID" else 1.0) for m in metrics]
            lines.append(f"| {name} | {rep['rows'][name]['n_candidate']} | " + " | ".join(cells) + " |")
        lines += [""] + [f"![{f}]({f})" for f in figures.get(det, []) if f.startswith("pca")] + [""]
    lines += ["Reading: " + "; ".join(f"**{m}** ({best} is best): {text}" for m, (best, text) in METRIC_HELP.items()), ""]
    if rep["c2st_per_class"]:
        lines += ["## C2ST per class", "", "| row | detector | " + " | ".join(rep["sets"]["real"]["classes"]) + " |", "|---" * (2 + len(rep["sets"]["real"]["classes"])) + "|"]
        for name, by_det in rep["c2st_per_class"].items():
            for det, per in by_det.items():
                lines.append(f"| {name} | {det} | " + " | ".join(_fmt(per.get(c)) for c in rep["sets"]["real"]["classes"]) + " |")
        lines.append("")
    if rep["memorisation"]:
        lines += ["## Memorisation audit", "", "Nearest-neighbour distance of each synthetic image to the training set, against real test images' distances to it.", ""]
        for det, m in rep["memorisation"].items():
            lines += [
                f"### `{det}`: {m['n_suspects']} suspect(s)", "",
                f"- threshold: below the {m['quantile']:.0%} quantile of the real baseline ({m['threshold']:.4g}) and below {m['max_ratio']:.2g} x its median ({m['baseline_median']:.4g})",
                f"- median NN distance: synthetic {m['synthetic_median']:.4g}, real baseline {m['baseline_median']:.4g}",
                f"- share of synthetic below the quantile: {_fmt(m['frac_below_quantile'])} (expected ~{m['quantile']:.2g} without memorisation)", "",
            ]
            lines += [f"- `{s['synthetic']}` ~ `{s['nearest_train']}` (d={s['distance']:.4g}, ratio {s['ratio_to_baseline_median']:.3g})" for s in m["suspects"][:20]]
            lines += [""] + [f"![{f}]({f})" for f in figures.get(det, []) if not f.startswith("pca")] + [""]
    if "nuclei" in rep:
        lines += _nuclei_markdown(rep["nuclei"])
    if "retrieval" in rep:
        lines += ["## Reference retrieval", "", "Share of variations whose own reference is the nearest (top-1) or among the 3 nearest references.", "",
                  "| detector | references | variations | top-1 | top-3 | chance top-1 / top-3 | mean rank |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {d} | {r['n_references']} | {r['n_variations']} | {_fmt(r['top1'])} | {_fmt(r['top3'])} | "
                  f"{r['chance']['top1']:.3g} / {r['chance']['top3']:.3g} | {r['mean_rank']:.3g} |" for d, r in rep["retrieval"].items()] + [""]
    if "conditional" in rep:
        c = rep["conditional"]
        lines += ["## Conditional fidelity", ""] + [f"- {k}: {_fmt(v) if isinstance(v, dict) else v}" for k, v in c.items()] + [""]
    if "utility" in rep:
        lines += _utility_markdown(rep["utility"])
    if "segmentation" in rep:
        s = rep["segmentation"]
        lines += ["## Segmentation utility (tiny U-Net, real test split)", "", "| training data | Dice | AJI |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(s[k]['dice'])} | {_fmt(s[k]['aji'])} |" for k in ("real", "real+synthetic") if k in s] + [""]
    lines += ["## Timings (s)", "", ", ".join(f"{k}: {v}" for k, v in rep["timings_s"].items()), ""]
    return "\n".join(lines)


def _nuclei_markdown(n: dict[str, Any]) -> list[str]:
    feats = n["features"]["per_tile"] + n["features"]["per_nucleus"]
    floor = next((r["distance"]["aggregate"]["value"] for name, r in n["rows"].items() if name.startswith("floor")), float("nan"))
    lines = [
        "## Nuclear statistics", "",
        (f"Nuclei segmented by `{n['segmenter']}` (at {n['segmenter_mpp']} um/px; images taken as {n['mpp']} um/px). "
         f"Distance per feature: {n['distance']}. 0 = the real distribution; read against the floor."), "",
        "| row | N | " + " | ".join(feats) + " | aggregate | / floor |", "|---" * (len(feats) + 4) + "|",
    ]
    for name, r in n["rows"].items():
        d = r["distance"]
        lines.append(f"| {name} | {r['n_tiles']} | " + " | ".join(_fmt(d[f]) for f in feats)
                     + f" | {_fmt(d['aggregate'])} | {d['aggregate']['value'] / floor if floor else float('nan'):.3g} |")
    lines += ["", "Medians (nuclei per 64 um field, area in um^2, hematoxylin optical density):", "",
              "| set | nuclei | " + " | ".join(feats) + " |", "|---" * (len(feats) + 2) + "|"]
    for name, summ in [("real (reference)", n["real"])] + [(k, r["summary"]) for k, r in n["rows"].items()]:
        lines.append(f"| {name} | {summ['n_nuclei']} | " + " | ".join(f"{summ[f]:.3g}" for f in feats) + " |")
    return lines + [""]


def _utility_markdown(u: dict[str, Any]) -> list[str]:
    lines = ["## Downstream utility (real test split)", "", f"Linear probe on `{u.get('probe_features')}` features; small CNN from scratch on 64 px.", ""]
    lines += ["| learner | trained on | accuracy | balanced accuracy | macro-F1 |", "|---|---|---|---|---|"]
    for learner, t in u["tstr"].items():
        for key, label in (("train_on_synthetic", "synthetic (TSTR)"), ("train_on_real", "real train (TRTR)")):
            if key in t:
                s = t[key]
                lines.append(f"| {learner} | {label} | {_fmt(s['accuracy'])} | {_fmt(s['balanced_accuracy'])} | {_fmt(s['macro_f1'])} |")
    if u["augmentation"]:
        lines += ["", "| learner | real fraction | N real | accuracy real | accuracy real+synthetic | gain |", "|---|---|---|---|---|---|"]
        for learner, rows in u["augmentation"].items():
            lines += [
                f"| {learner} | {r['fraction']:g} | {r['n_real']} | {_fmt(r['real']['accuracy'])} | {_fmt(r['real+synthetic']['accuracy'])} | {_fmt(r['accuracy_gain'])} |"
                for r in rows
            ]
    return lines + [""]


# ---------------------------------------------------------------------------------------------
# CLI: pixgen eval
# ---------------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pixgen eval`` to the pixgen command line."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate synthetic images against real ones (fidelity, memorisation, utility)",
        description="Evaluate a folder of synthetic images against real held-out images; writes report.json and report.md.",
    )
    p.add_argument("--real", required=True, help="real held-out images (class subfolders give labels; images/+inst/ for masks)")
    p.add_argument("--synthetic", required=True, help="synthetic images, same layout")
    p.add_argument("--train", help="the real images the generator was trained on (floor row, memorisation, augmentation)")
    p.add_argument("--out", required=True, help="output folder for report.json, report.md and plots")
    p.add_argument("--detectors", help="comma list: inception, random-conv, encoder:NAME[@PATH], classifier:DIR "
                   "(default: inception where its weights are on disk, else the bundled encoder pixgen-ssl [+ bundled CNN])")
    p.add_argument("--inception-weights", metavar="PATH", help="local pt_inception-2015-12-05-6726825d.pth (offline use)")
    p.add_argument("--max-images", type=int, help="at most this many images per folder (seeded, class-stratified)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples per interval (0 = none)")
    p.add_argument("--k", type=int, default=3, help="neighbours for precision/recall/density/coverage")
    p.add_argument("--crop-size", type=int, help="also compute crop-FD on regular crops of this size (large images)")
    p.add_argument("--conditioning", help=".npz with 'files' and 'embeddings' (and 'encoder') of the synthetic images' conditions "
                   "(default: those declared by the set's manifest.json, written by pixgen generate)")
    p.add_argument("--utility", default=",".join(LEARNERS), help="learners for utility: linear-probe,small-cnn, or 'none'")
    p.add_argument("--cnn-steps", type=int, default=150, help="training steps of the small CNN")
    p.add_argument("--seg-steps", type=int, default=300, help="training steps of the nuclei U-Net (mask folders)")
    p.add_argument("--no-nuclei", dest="nuclei", action="store_false", help="skip the nuclear statistics (metrics.nuclei)")
    p.add_argument("--nuclei-mpp", type=float, default=MPP, help=f"um/px of the images, for the nuclear statistics (default {MPP})")
    p.add_argument("--references", help="folder of the references the synthetic images are variations of (reference retrieval)")
    p.add_argument("--reference-map", help="JSON object: synthetic file name -> reference file name (with --references)")
    p.add_argument("--device", help="torch device for detectors (default cpu)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="for encoder:NAME detectors, run a pinned registry encoder's own hub code (never a folder's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``pixgen eval``; prints a short summary and where the report is."""
    utility = [] if args.utility in ("", "none") else [u.strip() for u in args.utility.split(",")]
    unknown = set(utility) - set(LEARNERS)
    if unknown:
        raise InputError(f"unknown utility learner(s) {sorted(unknown)}", fix=f"use {','.join(LEARNERS)} or none")
    if args.detectors is None:
        names, why = default_detectors(args.inception_weights)
        print(f"detectors: {', '.join(names)} ({why})", file=sys.stderr)
    with warnings.catch_warnings():  # listed once below, and in the report
        warnings.simplefilter("ignore", SmallSampleWarning)
        rep = _evaluate_from_args(args, utility)
    for w in rep["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    for name, row in rep["fidelity"].items():
        fds = ", ".join(f"{k}={v['value']:.4g}" for k, v in row.items() if k.startswith(("FD_", "C2ST_")))
        print(f"{name:45s} {fds}")
    for name, row in rep.get("nuclei", {}).get("rows", {}).items():
        print(f"{name:45s} nuclear statistics distance={row['distance']['aggregate']['value']:.3g}")
    print(f"report: {Path(args.out) / 'report.md'} ({rep['timings_s']['total']:.0f} s)")
    return 0


def _evaluate_from_args(args: argparse.Namespace, utility: list[str]) -> dict[str, Any]:
    return evaluate(
        args.real, args.synthetic, args.train,
        detectors=None if args.detectors is None else [d.strip() for d in args.detectors.split(",") if d.strip()],
        inception_weights=args.inception_weights, trust_remote_code=args.trust_remote_code, max_images=args.max_images, seed=args.seed,
        n_boot=args.n_boot, k=args.k, crop_size=args.crop_size, conditioning=args.conditioning,
        utility=utility, cnn_steps=args.cnn_steps, seg_steps=args.seg_steps, nuclei=args.nuclei, nuclei_mpp=args.nuclei_mpp,
        references=args.references, reference_map=args.reference_map, device=args.device, out=args.out,
    )
