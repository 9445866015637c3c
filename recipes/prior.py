"""Reproduce the bundled embedding prior (docs/prior.md): one resumable command on a CPU.

    nice -n 19 python -m recipes.prior --data ../shared/data --work /work/runs/prior \\
        --export pixgen/weights/pixgen-default/prior

Stages (each skipped when its output exists):

1. ``tiles``, ``cache``: the training tiles of ``recipes.default_models`` (train split only) and
   their feature cache made with the bundled autoencoder + ``pixgen-ssl`` (``--cache`` reuses one);
2. ``terms``: each tile's vocabulary terms: organ and diagnosis from its label; nuclear composition
   (CoNSeP type maps) and density (CoNSeP and MoNuSeg instance maps) from the masks of the same
   64 um field (thresholds: :data:`pixgen.prior.MASK_THRESHOLDS`);
3. ``flow``: ``training.tasks.flow``'s task on the standardised embeddings, conditioned on the
   multi-hot term vector; each tile appears once with all its terms and ``copies - 1`` times with a
   random subset, so a prompt that leaves terms unsaid samples their mixture;
4. ``export``: the EMA flow in fp16 with ``prior.json`` (:class:`pixgen.prior.EmbeddingPrior`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pixgen.prior import EmbeddingPrior, Term, Vocabulary, mask_terms

__all__ = ["VOCABULARY", "LABEL_TERMS", "tile_terms", "field_sources", "training_arrays", "train_prior",
           "grouped_holdout", "validation_sets", "score_validation", "choose_temperatures", "validate", "main"]

VOCABULARY = [
    Term("lung", "organ", "LC25000 lung tiles", ("pulmonary",)),
    Term("colon", "organ", "CoNSeP colorectal tiles", ("colorectal",)),
    Term("multi-organ", "organ", "MoNuSeg TCGA tiles (breast, kidney, liver, prostate, bladder, colon, stomach)",
         ("multi organ",)),
    Term("adenocarcinoma", "diagnosis", "LC25000 lung adenocarcinoma", ("aca",)),
    Term("benign", "diagnosis", "LC25000 benign lung", ("normal",)),
    Term("squamous-cell-carcinoma", "diagnosis", "LC25000 lung squamous cell carcinoma",
         ("squamous", "scc", "squamous cell carcinoma")),
    Term("inflammatory-rich", "composition", ">= 30% of >= 5 nuclei inflammatory (CoNSeP type maps)",
         ("inflammatory", "inflammatory rich", "immune")),
    Term("epithelial", "composition", ">= 50% of >= 5 nuclei epithelial (CoNSeP type maps)", ("epithelium",)),
    Term("spindle", "composition", ">= 50% of >= 5 nuclei spindle-shaped (CoNSeP type maps)", ("stroma", "stromal")),
    Term("sparse", "density", "< 15 nuclei per 64 um field (CoNSeP / MoNuSeg instance maps)", ("few nuclei",)),
    Term("dense", "density", ">= 60 nuclei per 64 um field (CoNSeP / MoNuSeg instance maps)", ("crowded", "cellular")),
]
LABEL_TERMS = {"lung_aca": ["lung", "adenocarcinoma"], "lung_n": ["lung", "benign"],
               "lung_scc": ["lung", "squamous-cell-carcinoma"], "consep": ["colon"], "monuseg": ["multi-organ"]}


def _fields(data: Path, split: str = "train"):
    """(label, source image, instance map, type map or None) of each CoNSeP / MoNuSeg field, in the order
    ``recipes.default_models`` writes their tiles (a CoNSeP tile ``{split}_{image}_{k}``, a MoNuSeg 256 px crop)."""
    from PIL import Image

    root = data / "consep" / split
    for path in sorted((root / "images").glob("*.jpg")):
        inst = np.array(Image.open(root / "inst" / f"{path.stem}.png"))
        yield "consep", path.stem.split("_")[1], inst, np.array(Image.open(root / "types" / f"{path.stem}.png"))
    root = data / "monuseg" / split
    for path in sorted((root / "images").glob("*.jpg")):
        inst = np.array(Image.open(root / "inst" / f"{path.stem}.png"))
        for y in range(0, inst.shape[0] - 255, 256):
            for x in range(0, inst.shape[1] - 255, 256):
                yield "monuseg", path.stem, inst[y:y + 256, x:x + 256], None


def _field_terms(data: Path, split: str = "train") -> dict[str, list[list[str]]]:
    """Mask terms of the CoNSeP and MoNuSeg fields, in tile order."""
    out: dict[str, list[list[str]]] = {"consep": [], "monuseg": []}
    for label, _, inst, types in _fields(data, split):
        out[label].append(mask_terms(inst, types))
    return out


def field_sources(data: Path, split: str = "train") -> dict[str, list[str]]:
    """The source image of each CoNSeP / MoNuSeg field, in tile order (the groups a grouped hold-out keeps whole)."""
    out: dict[str, list[str]] = {"consep": [], "monuseg": []}
    for label, source, _, _ in _fields(data, split):
        out[label].append(source)
    return out


def tile_terms(cache, data: Path, split: str = "train") -> list[list[str]]:
    """Each cache row's full term set (label terms + the field's mask terms); rows are matched to
    fields by their tile file number (``tiles/{label}/{k:05d}.png``)."""
    fields = _field_terms(data, split)
    labels = cache.array("labels")
    out = []
    for label_id, path in zip(labels, cache.meta("paths")):
        label = cache.classes[int(label_id)]
        extra = fields[label][int(Path(path).stem)] if label in fields else []
        out.append(LABEL_TERMS[label] + extra)
    return out


def training_arrays(embeddings: np.ndarray, terms: list[list[str]], vocab: Vocabulary, copies: int = 4,
                    keep: float = 0.5, seed: int = 0) -> dict[str, np.ndarray]:
    """Flow training rows: each tile once with all its terms and ``copies - 1`` times with each term
    kept with probability ``keep`` (term dropout: unsaid terms are marginalised)."""
    rng = np.random.default_rng(seed)
    full = np.stack([vocab.vector(t).numpy() for t in terms])
    conds = [full] + [full * (rng.random(full.shape) < keep) for _ in range(copies - 1)]
    return {"target": np.tile(embeddings, (copies, 1)).astype(np.float32),
            "condition": np.concatenate(conds).astype(np.float32)}


def train_prior(embeddings: np.ndarray, terms: list[list[str]], out: Path, steps: int = 4000, hidden: int = 128,
                num_blocks: int = 3, copies: int = 4, encoder: str | None = "pixgen-ssl", seed: int = 0,
                vocabulary: Sequence[Term] = VOCABULARY, labels: dict[str, list[str]] | None = None,
                batch_size: int = 256, whiten_rank: int = 0) -> EmbeddingPrior:
    """Train the prior on standardised ``embeddings`` (N, D) with their term sets (terms of
    ``vocabulary``; ``labels``: label -> terms, default :data:`LABEL_TERMS`); resumes in ``out``.
    ``whiten_rank`` > 0: the flow works in that many leading PCA-whitened directions (docs/prior.md).

    Example:
        >>> prior = train_prior(emb, [["lung", "benign"], ...], Path("runs/prior/flow"))   # doctest: +SKIP
    """
    from pixgen.models.flow import EmbeddingFlow
    from training.engine import Engine
    from training.tasks.flow import EmbeddingFlowTask, FlowConfig

    seen = sorted({tuple(sorted(t)) for t in terms})
    vocab = Vocabulary(list(vocabulary), labels=dict(LABEL_TERMS if labels is None else labels), seen=[list(s) for s in seen])
    mean, std = embeddings.mean(0), embeddings.std(0) + 1e-6
    arrays = training_arrays((embeddings - mean) / std, terms, vocab, copies=copies, seed=seed)
    cfg = FlowConfig(condition="vector", hidden=hidden, num_blocks=num_blocks, max_steps=steps, batch_size=batch_size,
                     lr=1e-3, warmup_steps=100, ema_decay=0.999, checkpoint_every=1000, sample_every=0, log_every=100,
                     tensorboard=False, seed=seed, whiten_rank=whiten_rank)
    task = EmbeddingFlowTask(cfg, arrays)
    final = Engine(task, out, resume=(out / "config.json").is_file()).fit()
    flow = EmbeddingFlow.from_pretrained(final)
    flow.register_to_config(encoder=encoder, _name_or_path="prior")  # not the run folder
    return EmbeddingPrior(flow, vocab, torch.from_numpy(mean), torch.from_numpy(std))


def grouped_holdout(cache, data: Path, fraction: float = 0.15, seed: int = 0) -> np.ndarray:
    """(N,) bool: the training-cache rows held back for validation: whole CoNSeP / MoNuSeg source images
    (``fraction`` of each label's tiles, as whole images allow; ``training.data.splits.group_split``).
    LC25000 rows all stay: its validation tiles are the project's grouped *val* split, a cache of its own."""
    from training.data.splits import group_split

    sources = field_sources(data)
    labels, paths = cache.array("labels"), cache.meta("paths")
    held = np.zeros(len(labels), bool)
    for k, label in enumerate(cache.classes):
        if label in sources:
            rows = np.flatnonzero(labels == k)
            groups = [sources[label][int(Path(paths[i]).stem)] for i in rows]
            held[rows[group_split(groups, (1 - fraction, fraction), seed, names=("train", "val"))["val"]]] = True
    return held


def validation_sets(train_cache, val_cache, data: Path, fraction: float = 0.15,
                    seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(rows of ``train_cache`` to train on, validation embeddings per label): the grouped hold-out of
    :func:`grouped_holdout` plus every label of ``val_cache`` (the LC25000 grouped val split)."""
    held = grouped_holdout(train_cache, data, fraction, seed)
    emb, labels = train_cache.array("embeddings").astype(np.float32), train_cache.array("labels")
    val = {name: emb[held & (labels == k)] for k, name in enumerate(train_cache.classes) if (held & (labels == k)).any()}
    v_emb, v_labels = val_cache.array("embeddings").astype(np.float32), val_cache.array("labels")
    val |= {name: v_emb[v_labels == k] for k, name in enumerate(val_cache.classes) if (v_labels == k).any()}
    return ~held, dict(sorted(val.items()))


def score_validation(prior: EmbeddingPrior, train: dict[str, np.ndarray], val: dict[str, np.ndarray],
                     temperatures: Sequence[float], n_boot: int = 20) -> dict[str, dict[str, dict]]:
    """Per temperature (one for every label) and label: FD of ``n`` prior samples (seeds ``0..n-1``) vs
    the ``n`` validation embeddings, the floor (``n`` random ``train`` embeddings vs the same), their
    ratio, and novelty: the share of prior samples nearer a ``train`` embedding than the validation
    tiles' 5th percentile of that distance (about 0.05 for a sampler like real held-out tiles)."""
    from metrics.fidelity import fd_estimate
    from metrics.memorisation import nn_distances

    pool, rng = np.concatenate(list(train.values())), np.random.default_rng(1)
    floors, p05 = {}, {}
    for label, real in val.items():
        base = train[label][rng.choice(len(train[label]), len(real), replace=False)]
        floors[label] = fd_estimate(base, real, n_boot=n_boot)["value"]
        p05[label] = float(np.percentile(nn_distances(real, pool)[0], 5))
    saved = prior.temperature, prior.label_temperatures
    out: dict[str, dict[str, dict]] = {}
    try:
        prior.label_temperatures = {}
        for t in temperatures:
            prior.temperature = float(t)
            out[str(float(t))] = rows = {}
            for label, real in val.items():
                z = prior.sample(prior.condition(label), list(range(len(real)))).numpy()
                fd = fd_estimate(z, real, n_boot=n_boot)["value"]
                rows[label] = {"n": len(real), "fd": fd, "floor": floors[label], "ratio": fd / floors[label],
                               "below_p05": float((nn_distances(z, pool)[0] < p05[label]).mean())}
    finally:
        prior.temperature, prior.label_temperatures = saved
    return out


def choose_temperatures(scores: dict[str, dict[str, dict]], novelty_max: float = 0.10) -> dict:
    """The validation rule (docs/prior.md): one temperature, the one with the smallest worst-label FD
    ratio; and per label, the temperature with the smallest ratio among those whose novelty share
    (``below_p05``) is <= ``novelty_max`` (all temperatures when none is), with its worst-label ratio."""
    worst = {t: max(r["ratio"] for r in rows.values()) for t, rows in scores.items()}
    best = min(worst, key=worst.get)
    per_label = {}
    for label in next(iter(scores.values())):
        novel = [t for t in scores if scores[t][label]["below_p05"] <= novelty_max] or list(scores)
        per_label[label] = min(novel, key=lambda t: scores[t][label]["ratio"])
    return {"temperature": float(best), "worst_ratio": worst[best],
            "label_temperatures": {k: float(t) for k, t in per_label.items()},
            "label_worst_ratio": max(scores[t][k]["ratio"] for k, t in per_label.items())}


def validate(train_cache, val_cache, data: Path, out: Path, temperatures: Sequence[float], fraction: float = 0.15,
             **train_kw) -> dict:
    """Train a prior on ``train_cache`` less the grouped hold-out and score ``temperatures`` on the
    validation sets (:func:`validation_sets`); writes ``out/validation.json``.

    Example:
        >>> validate(FeatureCache("cache"), FeatureCache("val-cache"), Path("../shared/data"), Path("runs/v"),
        ...          [0.9, 1.0, 1.1], whiten_rank=32)                                   # doctest: +SKIP
    """
    keep, val = validation_sets(train_cache, val_cache, data, fraction)
    emb, labels = train_cache.array("embeddings").astype(np.float32), train_cache.array("labels")
    terms = tile_terms(train_cache, data)
    prior = train_prior(emb[keep], [t for t, k in zip(terms, keep) if k], out / "flow", **train_kw)
    train = {name: emb[keep & (labels == k)] for k, name in enumerate(train_cache.classes)}
    scores = score_validation(prior, train, val, temperatures)
    report = {"train_rows": int(keep.sum()), "val_rows": {k: len(v) for k, v in val.items()}, "fraction": fraction,
              "flow": {k: v for k, v in train_kw.items() if isinstance(v, (int, float, str))},
              "scores": scores, "choice": choose_temperatures(scores)}
    (out / "validation.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recipes.prior", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="the shared data folder (../shared/data)")
    ap.add_argument("--work", required=True, type=Path, help="run folder (outside the repository)")
    ap.add_argument("--cache", type=Path, help="an existing training-tile feature cache (bundled AE + pixgen-ssl)")
    ap.add_argument("--model", type=Path, help="the model whose VAE / encoder build the cache (default: bundled)")
    ap.add_argument("--steps", type=int, default=4000, help="flow training steps")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--whiten-rank", type=int, default=0,
                    help="train the flow in this many leading PCA-whitened directions (0: the standardised space)")
    ap.add_argument("--temperature", type=float, default=0.5,
                    help="source-noise scale stored with the prior (bundled: 0.5, chosen by FD to training embeddings)")
    ap.add_argument("--label-temperatures", type=_label_floats, default={},
                    help="per-label temperatures stored with the prior, e.g. monuseg=0.9,consep=1.1")
    ap.add_argument("--export", type=Path, help="write the fp16 prior here (e.g. pixgen/weights/pixgen-default/prior)")
    ap.add_argument("--validate", action="store_true",
                    help="instead: train on the training cache less whole CoNSeP / MoNuSeg images, score --temperatures "
                         "on those images + the LC25000 grouped val split (--val-cache), write WORK/validation.json")
    ap.add_argument("--val-cache", type=Path, help="LC25000 grouped-val feature cache (default: built in WORK/val-cache)")
    ap.add_argument("--temperatures", default="0.8,0.9,1.0,1.1,1.2", help="temperatures scored by --validate")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.cache or _build_cache(args.data, args.work, args.model)
    from training.features import FeatureCache

    fc = FeatureCache(cache)
    flow_kw = {"steps": args.steps, "hidden": args.hidden, "num_blocks": args.blocks, "encoder": fc.encoder_name,
               "whiten_rank": args.whiten_rank}
    if args.validate:
        val = FeatureCache(args.val_cache or _build_cache(args.data, args.work, args.model, split="val"))
        report = validate(fc, val, args.data, args.work, [float(t) for t in args.temperatures.split(",")], **flow_kw)
        for t, rows in report["scores"].items():
            print(f"T={t}: " + "  ".join(f"{k} {r['ratio']:.2f} ({r['below_p05']:.2f})" for k, r in rows.items()))
        print(f"choice: {report['choice']}")
        return 0
    terms = tile_terms(fc, args.data)
    (args.work / "terms.json").write_text(json.dumps(terms))
    prior = train_prior(fc.array("embeddings").astype(np.float32), terms, args.work / "flow", **flow_kw)
    prior.temperature, prior.label_temperatures = args.temperature, args.label_temperatures
    if args.export:
        prior.flow.to(torch.float16)
        print(f"exported {prior.save(args.export)}")
    return 0


def _label_floats(text: str) -> dict[str, float]:
    """``a=0.9,b=1.1`` -> {"a": 0.9, "b": 1.1} (argparse type)."""
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(",") if item.strip())}
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected LABEL=T,LABEL=T, got {text!r}") from err


def _build_cache(data: Path, work: Path, model: Path | None, split: str = "train") -> Path:
    """One split's tiles (``recipes.default_models.write_tiles``: ``train``, or ``val``: the LC25000 grouped
    val split, the only dataset here with one) encoded by the model's VAE + encoder."""
    from pixgen.commands import DEFAULT_MODEL
    from recipes.default_models import TILE, write_tiles
    from training.features import build_feature_cache, open_image_source, resolve_components

    prefix = "" if split == "train" else f"{split}-"
    cache = work / f"{prefix}cache"
    index = cache / "index.json"
    if index.is_file() and json.loads(index.read_text()).get("complete"):
        return cache
    tiles = write_tiles(data, work / f"{prefix}tiles", work / "near-duplicates.json", split=split)
    vae, encoder, local = resolve_components(model=str(model or DEFAULT_MODEL))
    build_feature_cache(open_image_source(tiles, mpp=0.5, size=TILE), cache, vae, encoder, save_encoder=local)
    return cache


if __name__ == "__main__":
    raise SystemExit(main())
