"""Reference retrieval: do variations of a reference look like that reference?

Given K reference images and variations generated from them (each synthetic image names its
reference), embed everything with a detector and rank, for every variation, the K references by
cosine similarity (features centred on the references' mean, so the tissue all references
share does not dominate). Top-1 / top-3 = share of variations whose own reference ranks first /
in the first three; chance is 1/K and 3/K. Use a detector that did not condition the generator
(the independent CNN, ``classifier:metrics/weights/detector-cnn``) for a fair judge.

    python -m metrics.retrieval --references refs/ --synthetic variations/ --map map.json \\
        --detector classifier:metrics/weights/detector-cnn

``map.json`` maps each synthetic image's file name to its reference's file name:
``{"ref03_v1.png": "ref03.png", ...}``.

Example:
    >>> refs = np.eye(4); var = refs[[0, 0, 1, 2, 3]] + 0.01
    >>> reference_retrieval(refs, var, np.array([0, 0, 1, 2, 3]), n_boot=0)["top1"]["value"]
    1.0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from metrics.stats import mean_estimate
from pixgen.errors import InputError, PixgenError

__all__ = ["reference_retrieval", "read_reference_map", "retrieval_from_folders", "main"]

BUNDLED_DETECTOR = Path(__file__).parent / "weights" / "detector-cnn"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def reference_retrieval(
    ref_feats: np.ndarray, syn_feats: np.ndarray, syn_ref: np.ndarray, ks: Sequence[int] = (1, 3), n_boot: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Top-k retrieval of each variation's own reference among all references.

    ``ref_feats`` (K, D), ``syn_feats`` (M, D), ``syn_ref`` (M,) the reference row of each
    variation. Returns ``top{k}`` estimates (share of variations, with intervals over
    variations), ``chance`` per k, the mean rank (1 = best) and the counts.

    Example (shuffled references retrieve at about chance):
        >>> rng = np.random.default_rng(0); refs = rng.normal(size=(10, 8))
        >>> out = reference_retrieval(refs, refs[np.arange(40) % 10], rng.permutation(np.arange(40) % 10), n_boot=0)
        >>> out["chance"]["top1"]
        0.1
    """
    ref_feats, syn_feats, syn_ref = np.asarray(ref_feats, float), np.asarray(syn_feats, float), np.asarray(syn_ref, int)
    k_refs = len(ref_feats)
    if k_refs < 2 or len(syn_feats) == 0 or len(syn_ref) != len(syn_feats):
        raise InputError(f"retrieval needs at least 2 references and one variation per mapping entry ({k_refs} references, "
                         f"{len(syn_feats)} variations, {len(syn_ref)} mapped)", fix="map every synthetic image to one of 2+ references")
    centre = ref_feats.mean(axis=0)
    sim = _unit(syn_feats - centre) @ _unit(ref_feats - centre).T  # (M, K)
    own = sim[np.arange(len(sim)), syn_ref]
    rank = 1 + (sim > own[:, None]).sum(axis=1)  # ties count in the variation's favour
    out: dict[str, Any] = {"n_references": k_refs, "n_variations": len(sim), "mean_rank": float(rank.mean()), "chance": {}}
    for k in ks:
        out[f"top{k}"] = mean_estimate((rank <= k).astype(float), n_boot, seed)
        out["chance"][f"top{k}"] = min(k, k_refs) / k_refs
    return out


def read_reference_map(path: str | Path) -> dict[str, str]:
    """``{synthetic file name: reference file name}`` from a JSON object file."""
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the reference map {path}: {err}", fix='write a JSON object {"synthetic.png": "reference.png", ...}') from err
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise InputError(f"{path} is not a JSON object of file names", fix='write {"synthetic.png": "reference.png", ...}')
    return mapping


def retrieval_from_folders(
    references: str | Path, synthetic: str | Path | Any, mapping: Mapping[str, str] | str | Path, detector: Any = None,
    n_boot: int = 200, seed: int = 0,
) -> dict[str, Any]:
    """Embed a reference folder and a synthetic folder (or a loaded ``ImageSet`` with paths) with
    ``detector`` (a name for :func:`metrics.detectors.get_detector`, a detector, or by default
    the bundled independent CNN) and score :func:`reference_retrieval`; synthetic images not in
    ``mapping`` are ignored.

    Example:
        >>> retrieval_from_folders("refs/", "variations/", "map.json")["top1"]    # doctest: +SKIP
    """
    from metrics.detectors import Detector, compute_features, get_detector
    from metrics.images import ImageSet, load_image_folder

    mapping = dict(mapping) if isinstance(mapping, Mapping) else read_reference_map(mapping)
    refs = load_image_folder(references)
    syn = synthetic if isinstance(synthetic, ImageSet) else load_image_folder(synthetic)
    ref_row = {Path(p).name: i for i, p in enumerate(refs.paths)}
    pairs = [(i, ref_row.get(mapping[Path(p).name])) for i, p in enumerate(syn.paths) if Path(p).name in mapping]
    missing = sorted({mapping[Path(syn.paths[i]).name] for i, r in pairs if r is None})
    if missing:
        raise InputError(f"reference(s) named in the map are not in {references}: {missing[:5]}", fix="map to file names in the reference folder")
    if not pairs:
        raise InputError("no synthetic image is named in the reference map", fix="key the map by synthetic file names")
    det = detector if isinstance(detector, Detector) else get_detector(detector or f"classifier:{BUNDLED_DETECTOR}", seed=seed)
    f_ref = compute_features(det, refs.images)
    f_syn = compute_features(det, [syn.images[i] for i, _ in pairs])
    return {"detector": det.name, **reference_retrieval(f_ref, f_syn, np.array([r for _, r in pairs]), n_boot=n_boot, seed=seed)}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the retrieval scores as JSON."""
    ap = argparse.ArgumentParser(prog="python -m metrics.retrieval", description=__doc__.splitlines()[0])
    ap.add_argument("--references", required=True, help="folder of the reference images")
    ap.add_argument("--synthetic", required=True, help="folder of the variations")
    ap.add_argument("--map", required=True, help="JSON object: synthetic file name -> reference file name")
    ap.add_argument("--detector", help="detector name (default: the bundled independent CNN, classifier:metrics/weights/detector-cnn)")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        out = retrieval_from_folders(args.references, args.synthetic, args.map, args.detector, args.n_boot, args.seed)
    except PixgenError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
