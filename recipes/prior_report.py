"""Measure an embedding prior against held-out real embeddings and with an independent classifier.

    nice -n 19 python -m recipes.prior_report --train-cache /work/runs/gen-v2/cache \\
        --test-cache /work/runs/gen-v2/test-cache --classifier runs/detector-cnn --out runs/prior/report.json

Per label (docs/prior.md):

* ``fd``: Fréchet distance in the encoder's space between ``n`` prior samples (seeds ``0..n-1``)
  and the ``n`` held-out embeddings, with 95 % bootstrap intervals; ``floor``: the same between
  ``n`` random training embeddings and the held-out ones (what a perfect sampler of the training
  distribution scores); ``ratio`` = fd / floor (target <= 1.5);
* ``novelty``: each embedding's distance to its nearest training embedding, for the prior's
  samples and for the held-out real tiles (medians, and the share of prior samples closer than
  the held-out 5th percentile; target: prior not closer than held-out real);
* ``adherence`` (with ``--data``): for each composition / density term, a linear probe trained on
  the real training embeddings of the tiles with masks (has the term or not; its held-out AUC is
  reported) scores prior samples of ``colon`` and of ``colon, TERM`` drawn from the same seeds;
  the paired difference of probe probabilities, with a 95 % bootstrap interval, should be > 0.
  This is adherence in embedding space;
* ``image_adherence`` (with ``--segmenter``): the same on generated *images*: ``n`` images of
  ``colon`` and ``n`` of ``colon, TERM`` from the same seeds (the model's default quality preset),
  each segmented by the type-aware nuclei segmenter (``metrics.nuclei``, :data:`TERM_PROPERTIES`
  names the property each term should move: a type's share of the nuclei, or the nuclei count);
  the paired shift with a 95 % bootstrap interval, and whether it goes the expected way; with
  ``--test-tiles`` and ``--data``, the same properties of the real held-out CoNSeP tiles with vs
  without each term (terms from their true masks): the difference the images should approach;
* ``label_fidelity`` (with ``--classifier``): images generated from prior samples, classified by
  the independent classifier (``metrics.classifier``), accuracy vs its accuracy on real held-out tiles;
* ``utility`` (with ``--train-tiles``, ``--test-tiles``, ``--sets``): two synthetic sets of the same
  size and image seeds built by ``pixgen synth`` (:func:`pixgen.synth.build_set`), one from prior
  samples and one from bank draws, each scored by ``metrics.utility.classification_utility`` with
  its small CNN trained from scratch: TSTR (synthetic only -> real held-out tiles) and the
  augmentation gain (real 10 % + synthetic vs real 10 %, paired bootstrap), over several training seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pixgen.prior import EmbeddingPrior

__all__ = ["embedding_report", "adherence_report", "nuclear_properties", "image_adherence", "real_term_differences",
           "label_fidelity",
           "with_prior", "utility_report", "main"]

MASK_TERMS = ("inflammatory-rich", "epithelial", "spindle", "sparse", "dense")
# What each mask term should move on an image, and which way (+1 up, -1 down); type ids as metrics.nuclei.TYPE_NAMES.
TERM_PROPERTIES = {"inflammatory-rich": ("inflammatory_fraction", 1), "epithelial": ("epithelial_fraction", 1),
                   "spindle": ("spindle_fraction", 1), "sparse": ("nuclei", -1), "dense": ("nuclei", 1)}
TYPE_IDS = {"inflammatory_fraction": 2, "epithelial_fraction": 3, "spindle_fraction": 4}


def _by_label(cache) -> dict[str, np.ndarray]:
    emb, labels = cache.array("embeddings").astype(np.float32), cache.array("labels")
    return {name: emb[labels == k] for k, name in enumerate(cache.classes)}


def embedding_report(prior: EmbeddingPrior, train: dict[str, np.ndarray], test: dict[str, np.ndarray],
                     n_boot: int = 100) -> dict[str, dict]:
    """FD with its floor and novelty per label (module docstring)."""
    from metrics.fidelity import fd_estimate
    from metrics.memorisation import nn_distances

    pool = np.concatenate(list(train.values()))
    rng = np.random.default_rng(0)
    out = {}
    for label, real in test.items():
        n = len(real)
        z = prior.sample(prior.condition(label), list(range(n))).numpy()
        base = train[label][rng.choice(len(train[label]), n, replace=False)]
        fd, floor = fd_estimate(z, real, n_boot=n_boot), fd_estimate(base, real, n_boot=n_boot)
        d_prior, d_real = nn_distances(z, pool)[0], nn_distances(real, pool)[0]
        out[label] = {"n": n, "fd": fd, "floor": floor, "ratio": fd["value"] / floor["value"],
                      "novelty": {"prior_median": float(np.median(d_prior)), "heldout_median": float(np.median(d_real)),
                                  "prior_p05": float(np.percentile(d_prior, 5)),
                                  "heldout_p05": float(np.percentile(d_real, 5)),
                                  "prior_below_heldout_p05": float((d_prior < np.percentile(d_real, 5)).mean())}}
    return out


def adherence_report(prior: EmbeddingPrior, train_cache, test_cache, data: Path, base: str = "colon",
                     n: int = 400) -> dict[str, dict]:
    """Per mask term: probe AUC on held-out real tiles and the paired shift of prior samples (module docstring)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from metrics.stats import mean_estimate
    from recipes.prior import tile_terms

    def masked(cache, split):
        terms = tile_terms(cache, data, split)
        keep = np.array([any(t in ("colon", "multi-organ") for t in ts) for ts in terms])
        return cache.array("embeddings").astype(np.float32)[keep], [t for t, k in zip(terms, keep) if k]

    (x_tr, t_tr), (x_te, t_te) = masked(train_cache, "train"), masked(test_cache, "test")
    seeds = list(range(n))
    out = {}
    for term in MASK_TERMS:
        y_tr, y_te = np.array([term in t for t in t_tr]), np.array([term in t for t in t_te])
        probe = LogisticRegression(C=0.1, max_iter=5000, class_weight="balanced").fit(x_tr, y_tr)
        without = probe.predict_proba(prior.sample(prior.condition(prompt=base), seeds).numpy())[:, 1]
        with_term = probe.predict_proba(prior.sample(prior.condition(prompt=f"{base}, {term}"), seeds).numpy())[:, 1]
        out[term] = {"probe_heldout_auc": float(roc_auc_score(y_te, probe.predict_proba(x_te)[:, 1]))
                     if 0 < y_te.sum() < len(y_te) else None,
                     "heldout_positives": int(y_te.sum()), "n": n,
                     "p_without": float(without.mean()), "p_with": float(with_term.mean()),
                     "shift": mean_estimate(with_term - without)}
    return out


def nuclear_properties(classified: Sequence[tuple[np.ndarray, np.ndarray]], min_nuclei: int = 5) -> dict[str, np.ndarray]:
    """Per image, from ``NucleiSegmenter.classify`` pairs (instance map, class map): ``nuclei`` (count)
    and each type's share of the nuclei (NaN below ``min_nuclei`` nuclei, as the training terms'
    ``pixgen.prior.MASK_THRESHOLDS``; a share of two or three nuclei says nothing).

    Example:
        >>> inst = np.zeros((8, 8), int); inst[0, :2], inst[4, :2] = 1, 2
        >>> cls = np.where(inst == 1, 2, np.where(inst == 2, 3, 0))
        >>> nuclear_properties([(inst, cls)], min_nuclei=1)["inflammatory_fraction"].tolist()
        [0.5]
    """
    out: dict[str, list[float]] = {"nuclei": [], **{k: [] for k in TYPE_IDS}}
    for inst, cls in classified:
        kind = np.zeros(int(inst.max()) + 1, int)
        kind[inst.ravel()] = cls.ravel()  # one class per instance (classify's majority vote)
        types = kind[np.unique(inst[inst > 0])]
        out["nuclei"].append(float(len(types)))
        for name, k in TYPE_IDS.items():
            out[name].append(float((types == k).mean()) if len(types) >= min_nuclei else float("nan"))
    return {k: np.array(v) for k, v in out.items()}


def image_adherence(gen, segmenter, base: str = "colon", terms: Sequence[str] = MASK_TERMS, n: int = 32, seed: int = 0,
                    batch_size: int = 8, n_boot: int = 1000) -> dict[str, dict]:
    """Per term: the :data:`TERM_PROPERTIES` property of ``n`` images of ``base`` and of ``base, TERM``
    (prior samples and images from the same seeds ``seed..seed+n-1``), measured by ``segmenter``
    (a typed ``metrics.nuclei.NucleiSegmenter``); the paired shift over the images where both are
    defined, its 95 % bootstrap interval, and ``right_way``: the interval lies on the expected side of 0.

    Example:
        >>> image_adherence(Generator.from_pretrained(m), NucleiSegmenter.load(TYPED), n=32)   # doctest: +SKIP
    """
    from metrics.stats import mean_estimate
    from pixgen.conditioning import PriorSample

    def measure(prompt: str) -> dict[str, np.ndarray]:
        images = gen.generate(PriorSample(prompt=prompt), num_images=n, seed=seed, output_type="np",
                              batch_size=batch_size, progress=False).images
        return nuclear_properties(segmenter.classify(list(images)))

    without = measure(base)
    out: dict[str, dict] = {"_base": {"prompt": base, "n": n, "seed": seed,
                                      **{k: float(np.nanmean(v)) for k, v in without.items()}}}
    for term in terms:
        prop, sign = TERM_PROPERTIES[term]
        a, b = measure(f"{base}, {term}")[prop], without[prop]
        ok = np.isfinite(a) & np.isfinite(b)
        shift = mean_estimate(a[ok] - b[ok], n_boot=n_boot)
        out[term] = {"property": prop, "expected": "+" if sign > 0 else "-", "n_pairs": int(ok.sum()),
                     "without": float(b[ok].mean()) if ok.any() else None, "with": float(a[ok].mean()) if ok.any() else None,
                     "shift": shift, "right_way": bool(ok.any() and min(sign * c for c in shift["ci"]) > 0)}
    return out


def real_term_differences(segmenter, images: Sequence[np.ndarray], terms: Sequence[Sequence[str]],
                          mask_terms: Sequence[str] = MASK_TERMS, n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per term: the :data:`TERM_PROPERTIES` property of real ``images`` (HWC uint8) measured by
    ``segmenter``, mean over the images whose ``terms`` (from their true masks) hold the term minus
    the mean over the others, with a 95 % bootstrap interval (each group resampled on its own).

    Example:
        >>> real_term_differences(NucleiSegmenter.load(TYPED), tiles, tile_terms)   # doctest: +SKIP
    """
    props = nuclear_properties(segmenter.classify(list(images)))
    rng = np.random.default_rng(seed)
    out = {}
    for term in mask_terms:
        prop, _ = TERM_PROPERTIES[term]
        has, ok = np.array([term in t for t in terms]), np.isfinite(props[prop])
        a, b = props[prop][ok & has], props[prop][ok & ~has]
        if not (len(a) and len(b)):
            out[term] = {"property": prop, "n_with": len(a), "n_without": len(b), "difference": None}
            continue
        boots = [rng.choice(a, len(a)).mean() - rng.choice(b, len(b)).mean() for _ in range(n_boot)]
        out[term] = {"property": prop, "n_with": len(a), "n_without": len(b), "with": float(a.mean()),
                     "without": float(b.mean()), "difference": {"value": float(a.mean() - b.mean()),
                                                                "ci": [float(np.percentile(boots, 2.5)),
                                                                       float(np.percentile(boots, 97.5))],
                                                                "n_boot": n_boot}}
    return out


def _real_consep(test_tiles: Path, data: Path) -> tuple[list[np.ndarray], list[list[str]]]:
    """The held-out CoNSeP tiles (``test_tiles/consep/*.png``, ``recipes.default_models`` order) and their mask terms."""
    from PIL import Image

    from recipes.prior import _field_terms

    files = sorted((Path(test_tiles) / "consep").glob("*.png"))
    terms = _field_terms(Path(data), "test")["consep"]
    if len(files) != len(terms):
        raise ValueError(f"{len(files)} CoNSeP test tiles but {len(terms)} CoNSeP test fields in {data}")
    return [np.array(Image.open(f).convert("RGB")) for f in files], terms


def label_fidelity(model: str | Path, classifier: str | Path, test_tiles: str | Path, n: int,
                   steps: int | None, batch_size: int = 8, from_bank: bool = False, quality: str | None = None) -> dict:
    """Classifier accuracy on ``n`` images per label generated from prior samples (or bank draws)
    vs on the real held-out tiles; sampled as the commands do (``quality``: a preset, default
    ``pixgen.sampling.DEFAULT_QUALITY``; ``steps`` replaces its step count)."""
    from metrics.classifier import ClassifierDetector, preprocess, score_classifier
    from pixgen.conditioning import BankDraw, PriorSample
    from pixgen.pipeline import Generator

    gen = Generator.from_pretrained(model).use_sampling(quality)
    det = ClassifierDetector(classifier)
    real = score_classifier(classifier, test_tiles)
    per_class = {}
    for k, label in enumerate(det.labels):
        cond = BankDraw(label) if from_bank else PriorSample(label)
        images = gen.generate(cond, num_images=n, seed=1000, num_inference_steps=steps, output_type="np",
                              batch_size=batch_size, progress=False).images
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        with torch.no_grad():
            pred = det.model(preprocess(x, det.input_size)).argmax(1).numpy()
        per_class[label] = float((pred == k).mean())
    acc = float(np.mean(list(per_class.values())))
    return {"source": "bank" if from_bank else "prior", "n_per_label": n, "steps": steps or gen.config["num_inference_steps"],
            "quality": gen.config.get("quality"),
            "accuracy": acc, "per_class": per_class, "real_accuracy": real["balanced_accuracy"],
            "real_per_class": real["per_class"], "ratio": acc / real["balanced_accuracy"]}


def _set_spec(model: Path, labels: Sequence[str], n: int, steps: int | None, from_bank: bool, batch_size: int = 8):
    """A ``pixgen synth`` spec: ``n`` images per label, seed 0, prior samples or bank draws."""
    from pixgen.synth import parse_spec

    sampler = f"steps = {steps}\nbatch_size = {batch_size}" if steps else f"batch_size = {batch_size}"
    classes = "".join(f'[classes.{label}]\ncount = {n}\nlabel = "{label}"\nfrom_bank = {str(from_bank).lower()}\n\n'
                      for label in labels)
    text = f'seed = 0\nmodel = "{Path(model).resolve()}"\n\n[sampler]\n{sampler}\n\n{classes}'
    return parse_spec(text, "prior_report utility", ".")


def with_prior(model: Path, prior: Path, folder: Path) -> Path:
    """``folder``: ``model``'s components (symlinks) with ``prior`` as its ``prior/`` (a candidate prior
    measured without copying or changing the model)."""
    from pixgen.prior import PRIOR_DIR

    folder.mkdir(parents=True, exist_ok=True)
    links = {e.name: e for e in Path(model).iterdir() if e.name != PRIOR_DIR} | {PRIOR_DIR: Path(prior)}
    for name, target in links.items():
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to(target.resolve(), target_is_directory=target.is_dir())
    return folder


def utility_report(model: str | Path, train_tiles: str | Path, test_tiles: str | Path, sets: str | Path, n: int,
                   steps: int | None, seeds: Sequence[int] = (0, 1, 2), cnn_steps: int = 150,
                   prior_model: str | Path | None = None, classifier: str | Path | None = None) -> dict[str, dict]:
    """TSTR and augmentation gain of a prior-sampled and a bank-drawn set (module docstring), per CNN seed;
    the bank set comes from ``model``, the prior set from ``prior_model`` (default: ``model``). With
    ``classifier`` (``metrics.classifier``) each set's label fidelity is scored too.

    Example:
        >>> utility_report("model/", "tiles/", "test-tiles/", "runs/sets", n=40, steps=14)   # doctest: +SKIP
    """
    from metrics.classifier import score_classifier
    from metrics.images import load_image_folder
    from metrics.utility import classification_utility
    from pixgen.synth import build_set

    test = load_image_folder(test_tiles)
    train = load_image_folder(train_tiles, classes=test.classes)
    out: dict[str, dict] = {}
    for source in ("prior", "bank"):
        folder = Path(sets) / source
        t0 = time.perf_counter()
        source_model = Path(model if source == "bank" or prior_model is None else prior_model)
        build_set(_set_spec(source_model, test.classes, n, steps, from_bank=source == "bank"), folder, progress=False)
        syn = load_image_folder(folder, classes=test.classes)
        out[source] = {"n_per_label": n, "steps": steps, "folder": str(folder),
                       "generate_seconds": round(time.perf_counter() - t0, 1),
                       "runs": {str(seed): classification_utility(train, test, syn, learners=("small-cnn",), fractions=(0.1,),
                                                                  cnn_steps=cnn_steps, seed=seed)
                                for seed in seeds}}
        if classifier is not None:
            out[source]["label_fidelity"] = score_classifier(classifier, folder)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from pixgen.commands import DEFAULT_MODEL
    from pixgen.prior import PRIOR_DIR
    from training.features import FeatureCache

    ap = argparse.ArgumentParser(prog="python -m recipes.prior_report", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder with a prior/ (default: bundled)")
    ap.add_argument("--prior", type=Path, help="a prior folder to measure instead of the model's")
    ap.add_argument("--train-cache", required=True, type=Path, help="feature cache of the prior's training tiles")
    ap.add_argument("--test-cache", required=True, type=Path, help="feature cache of held-out tiles (same encoder)")
    ap.add_argument("--data", type=Path, help="the shared data folder: prompt adherence of the mask terms")
    ap.add_argument("--classifier", type=Path, help="metrics.classifier folder (label fidelity; needs --test-tiles)")
    ap.add_argument("--test-tiles", type=Path, help="held-out tile folder, one subfolder per label")
    ap.add_argument("--images", type=int, default=16, help="generated images per label for label fidelity")
    ap.add_argument("--segmenter", type=Path, help="typed metrics.nuclei segmenter (image_adherence), e.g. metrics/weights/nuclei-types")
    ap.add_argument("--adherence-images", type=int, default=32, help="images per prompt for image_adherence")
    ap.add_argument("--adherence-terms", default=",".join(MASK_TERMS), help="comma-separated terms for image_adherence")
    ap.add_argument("--steps", type=int, help="generator sampling steps (default: the quality preset's)")
    ap.add_argument("--quality", help="quality preset for image_adherence and fidelity (default: the commands' default)")
    ap.add_argument("--bank", action="store_true", help="also measure label fidelity of bank draws")
    ap.add_argument("--train-tiles", type=Path, help="the real training tiles, one subfolder per label (utility)")
    ap.add_argument("--sets", type=Path, help="folder for the utility section's synthetic sets (prior/, bank/)")
    ap.add_argument("--set-images", type=int, default=40, help="images per label in each utility set")
    ap.add_argument("--sections", default="embeddings,adherence,fidelity",
                    help="comma-separated: embeddings, adherence (needs --data), image_adherence (needs --segmenter), "
                         "fidelity (needs --classifier), "
                         "utility (needs --train-tiles, --test-tiles, --sets)")
    ap.add_argument("--out", required=True, type=Path, help="JSON report (sections run now replace those in it)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    prior = EmbeddingPrior.load(args.prior or args.model / PRIOR_DIR)
    prior_model = with_prior(args.model, args.prior, args.out.parent / f"{args.out.stem}-model") if args.prior else args.model
    train, test = FeatureCache(args.train_cache), FeatureCache(args.test_cache)
    sections = set(args.sections.split(","))
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), prior=str(args.prior or args.model),
                  temperature=prior.temperature, steps=prior.steps)
    if "embeddings" in sections:
        report["embeddings"] = embedding_report(prior, _by_label(train), _by_label(test))
        args.out.write_text(json.dumps(report, indent=1))
    if args.data and "adherence" in sections:
        report["adherence"] = adherence_report(prior, train, test, args.data)
        args.out.write_text(json.dumps(report, indent=1))
    if args.segmenter and "image_adherence" in sections:
        from metrics.nuclei import NucleiSegmenter
        from pixgen.pipeline import Generator

        t1 = time.perf_counter()
        gen = Generator.from_pretrained(prior_model).use_sampling(args.quality)
        report["image_adherence"] = image_adherence(gen, NucleiSegmenter.load(args.segmenter), n=args.adherence_images,
                                                    terms=args.adherence_terms.split(","))
        report["image_adherence"]["_base"].update(quality=gen.config.get("quality"), steps=gen.config["num_inference_steps"])
        if args.test_tiles and args.data:
            seg = NucleiSegmenter.load(args.segmenter)
            report["image_adherence"]["_real"] = real_term_differences(seg, *_real_consep(args.test_tiles, args.data))
        report["image_adherence"]["_base"]["seconds"] = round(time.perf_counter() - t1, 1)
        args.out.write_text(json.dumps(report, indent=1))
    if args.classifier and "fidelity" in sections:
        report["label_fidelity"] = [label_fidelity(prior_model, args.classifier, args.test_tiles, args.images, args.steps,
                                                   quality=args.quality)]
        if args.bank:
            report["label_fidelity"].append(label_fidelity(args.model, args.classifier, args.test_tiles, args.images,
                                                           args.steps, from_bank=True, quality=args.quality))
    if "utility" in sections:
        if not (args.train_tiles and args.test_tiles and args.sets):
            ap.error("the utility section needs --train-tiles, --test-tiles and --sets")
        report["utility"] = utility_report(args.model, args.train_tiles, args.test_tiles, args.sets, args.set_images,
                                           args.steps, prior_model=prior_model, classifier=args.classifier)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(report, indent=1))
    for label, r in report.get("embeddings", {}).items():
        nov = r["novelty"]
        print(f"{label:<10} n={r['n']:<4} FD {r['fd']['value']:.3f} floor {r['floor']['value']:.3f} "
              f"ratio {r['ratio']:.2f}  NN-dist prior {nov['prior_median']:.3f} held-out {nov['heldout_median']:.3f}")
    for term, r in report.get("adherence", {}).items():
        sh = r["shift"]
        print(f"adherence {term:<18} probe AUC {r['probe_heldout_auc']} p {r['p_without']:.3f} -> {r['p_with']:.3f} "
              f"shift {sh['value']:+.3f} [{sh['ci'][0]:+.3f}, {sh['ci'][1]:+.3f}]")
    for term, r in report.get("image_adherence", {}).items():
        if not term.startswith("_"):
            sh = r["shift"]
            print(f"image adherence {term:<18} {r['property']} {r['without']} -> {r['with']} (n {r['n_pairs']}) "
                  f"shift {sh['value']:+.3f} [{sh['ci'][0]:+.3f}, {sh['ci'][1]:+.3f}] expected {r['expected']}: {r['right_way']}")
    for term, r in report.get("image_adherence", {}).get("_real", {}).items():
        if r["difference"]:
            d = r["difference"]
            print(f"real CoNSeP test tiles {term:<18} {r['property']} {r['without']:.3f} -> {r['with']:.3f} "
                  f"({d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}])")
    for lf in report.get("label_fidelity", []):
        print(f"label fidelity ({lf['source']}): {lf['accuracy']:.3f} vs real {lf['real_accuracy']:.3f} "
              f"(ratio {lf['ratio']:.2f}) {lf['per_class']}")
    for source, u in report.get("utility", {}).items():
        for seed, run in u["runs"].items():
            tstr = run["tstr"]["small-cnn"]["train_on_synthetic"]["accuracy"]
            aug = run["augmentation"]["small-cnn"][0]
            print(f"utility ({source}, seed {seed}): TSTR {tstr['value']:.3f} [{tstr['ci'][0]:.3f}, {tstr['ci'][1]:.3f}]  "
                  f"real 10 % {aug['real']['accuracy']['value']:.3f} -> +synthetic "
                  f"{aug['real+synthetic']['accuracy']['value']:.3f}, gain {aug['accuracy_gain']['value']:+.3f} "
                  f"[{aug['accuracy_gain']['ci'][0]:+.3f}, {aug['accuracy_gain']['ci'][1]:+.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
