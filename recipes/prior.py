"""Reproduce the bundled embedding prior (docs/prior.md): one resumable command on a CPU.

    nice -n 19 python -m recipes.prior --data ../shared/data --work /work/runs/prior \\
        --export pixgen/weights/pixgen-default/prior

Stages (each skipped when its output exists):

1. ``tiles``, ``cache``: the training tiles of ``recipes.default_models`` (train split only) and
   their feature cache made with the bundled autoencoder + ``pixgen-ssl`` (``--cache`` reuses one);
2. ``terms``: each tile's vocabulary terms: organ and diagnosis from its label; nuclear composition
   (CoNSeP type maps) and density (CoNSeP and MoNuSeg instance maps) from the masks of the same
   64 um field (thresholds: :data:`THRESHOLDS`);
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

from pixgen.prior import EmbeddingPrior, Term, Vocabulary

__all__ = ["VOCABULARY", "LABEL_TERMS", "THRESHOLDS", "tile_terms", "training_arrays", "train_prior", "main"]

# Nuclei per 64 um field and type fractions; chosen from the CoNSeP train distribution (docs/prior.md).
THRESHOLDS = {"sparse_below": 15, "dense_from": 60, "min_nuclei": 5, "inflammatory_from": 0.3,
              "epithelial_from": 0.5, "spindle_from": 0.5}

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


def _mask_stats(inst: np.ndarray, types: np.ndarray | None) -> list[str]:
    """Composition / density terms of one 64 um field from its instance (and type) map."""
    ids = np.unique(inst)
    ids = ids[ids > 0]
    t = THRESHOLDS
    terms = ["sparse"] if len(ids) < t["sparse_below"] else ["dense"] if len(ids) >= t["dense_from"] else []
    if types is None or len(ids) < t["min_nuclei"]:
        return terms
    kinds = np.array([np.bincount(types[inst == i], minlength=5)[1:5].argmax() + 1 for i in ids])
    frac = {k: float((kinds == v).mean()) for k, v in (("inflammatory", 2), ("epithelial", 3), ("spindle", 4))}
    terms += ["inflammatory-rich"] if frac["inflammatory"] >= t["inflammatory_from"] else []
    terms += [k for k in ("epithelial", "spindle") if frac[k] >= t[f"{k}_from"]]
    return terms


def _field_terms(data: Path, split: str = "train") -> dict[str, list[list[str]]]:
    """Mask terms of the CoNSeP and MoNuSeg fields, in the order ``recipes.default_models`` writes them."""
    from PIL import Image

    out: dict[str, list[list[str]]] = {"consep": [], "monuseg": []}
    root = data / "consep" / split
    for path in sorted((root / "images").glob("*.jpg")):
        inst = np.array(Image.open(root / "inst" / f"{path.stem}.png"))
        out["consep"].append(_mask_stats(inst, np.array(Image.open(root / "types" / f"{path.stem}.png"))))
    root = data / "monuseg" / split
    for path in sorted((root / "images").glob("*.jpg")):
        inst = np.array(Image.open(root / "inst" / f"{path.stem}.png"))
        for y in range(0, inst.shape[0] - 255, 256):
            for x in range(0, inst.shape[1] - 255, 256):
                out["monuseg"].append(_mask_stats(inst[y:y + 256, x:x + 256], None))
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
    ap.add_argument("--export", type=Path, help="write the fp16 prior here (e.g. pixgen/weights/pixgen-default/prior)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.cache or _build_cache(args.data, args.work, args.model)
    from training.features import FeatureCache

    fc = FeatureCache(cache)
    terms = tile_terms(fc, args.data)
    (args.work / "terms.json").write_text(json.dumps(terms))
    prior = train_prior(fc.array("embeddings").astype(np.float32), terms, args.work / "flow", steps=args.steps,
                        hidden=args.hidden, num_blocks=args.blocks, encoder=fc.encoder_name,
                        whiten_rank=args.whiten_rank)
    prior.temperature = args.temperature
    if args.export:
        prior.flow.to(torch.float16)
        print(f"exported {prior.save(args.export)}")
    return 0


def _build_cache(data: Path, work: Path, model: Path | None) -> Path:
    """The training tiles (``recipes.default_models.write_tiles``) encoded by the model's VAE + encoder."""
    from pixgen.commands import DEFAULT_MODEL
    from recipes.default_models import TILE, write_tiles
    from training.features import build_feature_cache, open_image_source, resolve_components

    cache = work / "cache"
    index = cache / "index.json"
    if index.is_file() and json.loads(index.read_text()).get("complete"):
        return cache
    tiles = write_tiles(data, work / "tiles", work / "near-duplicates.json")
    vae, encoder, local = resolve_components(model=str(model or DEFAULT_MODEL))
    build_feature_cache(open_image_source(tiles, mpp=0.5, size=TILE), cache, vae, encoder, save_encoder=local)
    return cache


if __name__ == "__main__":
    raise SystemExit(main())
