"""Splits that keep related images together, and near-duplicate grouping for LC25000.

Tiles of one slide, tiles of one CoNSeP image, or augmented copies of one LC25000 photo must all
land in the same split, or test scores measure memory instead of generalisation. `group_split`
splits *groups*, never items, and checks that no group straddles two splits.

LC25000 made its 5000 images per class from 250 originals by rotations (any angle, the corners
filled by reflection, with a zoom) and flips, so exact hashing misses most copies.
`near_duplicate_groups` finds them in three steps:

1. fingerprint: each image is decoded once at 56x56 (JPEG draft mode); from the central square
   (70% of the side, inside the disc that every rotation keeps) 54 variants are sampled:
   18 rotations (0..85 deg, step 5) x 3 zooms (1, 1.15, 1.33). Each variant's 8x8 DCT gives a
   63-bit sign pHash, canonical under the 8 dihedral transforms (minimum over flips/transposes,
   computed by bit masks). The mean/std colour of the central disc is kept too.
2. candidates: pairs (i, j) where image i's plain hash is within ``radius`` bits of any variant
   hash of image j, searched within blocks (e.g. classes): exact-match buckets for radius 0,
   multi-index (pigeonhole) banding for radius <= 7, chunked XOR-popcount otherwise.
3. verify + union-find: a candidate is a duplicate when the cosine between the two 8x8 DCT
   blocks (best dihedral alignment, DC removed) is >= ``min_cos`` and the mean colours differ
   by <= ``max_color_diff`` (0..255) in every channel; connected components are the groups.

Example:
    >>> split = lc25000_grouped_split("../shared/data/lc25000-lung", seed=0)  # doctest: +SKIP
    >>> {k: len(v) for k, v in split.splits.items()}                          # doctest: +SKIP
    {'train': 9957, 'val': 2133, 'test': 2133}
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pixgen.errors import InputError
from pixgen.io import READ_ERRORS, to_rgb, write_text_atomic

__all__ = [
    "group_split", "check_no_straddle", "NearDuplicateConfig", "Fingerprints", "fingerprint_images",
    "hamming_pairs", "near_duplicate_groups", "GroupedSplit", "lc25000_grouped_split",
]

SPLIT_NAMES = ("train", "val", "test")


# ----------------------------------------------------------------------------- group splits
def group_split(
    groups: Sequence[Hashable],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    names: Sequence[str] | None = None,
    stratify: Sequence[Hashable] | None = None,
) -> dict[str, list[int]]:
    """Split item indices so that every group lies in exactly one split.

    ``names`` defaults to `split_names` (train/val/test for three fractions).
    Groups are shuffled (``seed``) and dealt to the splits so that the number of *items* per
    split follows ``fractions`` as closely as whole groups allow. With ``stratify`` (a label per
    item), each group is assigned by its most common label and every label is split on its own,
    so the class balance is the same in every split.

    Example:
        >>> s = group_split(["a", "a", "b", "c", "c", "d"], (0.5, 0.5), seed=0, names=("train", "test"))
        >>> sorted(len(v) for v in s.values())
        [3, 3]
    """
    fr = np.asarray(fractions, dtype=float)
    names = list(names) if names is not None else split_names(len(fr))
    if len(fr) != len(names) or (fr < 0).any() or not np.isclose(fr.sum(), 1.0, atol=1e-6):
        raise InputError(f"fractions {tuple(fractions)} must be >= 0, sum to 1, one per split {tuple(names)}")
    if stratify is not None and len(stratify) != len(groups):
        raise InputError(f"stratify has {len(stratify)} labels for {len(groups)} items")
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    strata: dict[Hashable, list[Hashable]] = {}
    for g, idx in members.items():
        key = Counter(stratify[i] for i in idx).most_common(1)[0][0] if stratify is not None else 0
        strata.setdefault(key, []).append(g)
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {n: [] for n in names}
    for key in sorted(strata, key=str):
        gs = sorted(strata[key], key=str)
        gs = [gs[k] for k in rng.permutation(len(gs))]
        for name, chosen in zip(names, _deal(gs, [len(members[g]) for g in gs], fr)):
            out[name] += [i for g in chosen for i in members[g]]
    out = {n: sorted(v) for n, v in out.items()}
    check_no_straddle(groups, out)
    return out


def split_names(k: int) -> list[str]:
    """Default names: 2 -> train/test, 3 -> train/val/test, else split0, split1, ...

    Example:
        >>> split_names(2)
        ['train', 'test']
    """
    return {2: ["train", "test"], 3: list(SPLIT_NAMES)}.get(k, [f"split{i}" for i in range(k)])


def _deal(gs: list[Hashable], sizes: list[int], fr: np.ndarray) -> list[list[Hashable]]:
    """Give each (shuffled) group to the split furthest below its target item count."""
    target = fr * sum(sizes)
    have = np.zeros(len(fr))
    parts: list[list[Hashable]] = [[] for _ in fr]
    for g, s in zip(gs, sizes):
        k = int(np.argmax(target - have))
        parts[k].append(g)
        have[k] += s
    # a split that asked for items but got no group takes one from the largest split
    for k in np.nonzero(fr > 0)[0]:
        if not parts[k]:
            donor = max(range(len(parts)), key=lambda d: len(parts[d]))
            if len(parts[donor]) > 1:
                parts[k].append(parts[donor].pop())
    return parts


def check_no_straddle(groups: Sequence[Hashable], splits: Mapping[str, Sequence[int]]) -> None:
    """Raise `InputError` if an item is in two splits or a group appears in more than one split.

    Example:
        >>> check_no_straddle(["a", "a", "b"], {"train": [0], "test": [1, 2]})
        Traceback (most recent call last):
        ...
        pixgen.errors.InputError: group 'a' straddles splits test, train (items 1, 0)
    """
    owner: dict[Hashable, tuple[str, int]] = {}
    seen: dict[int, str] = {}
    for name, idx in splits.items():
        for i in idx:
            if i in seen:
                raise InputError(f"item {i} is in both {seen[i]} and {name}")
            seen[i] = name
            g = groups[i]
            if g in owner and owner[g][0] != name:
                a, b = sorted([owner[g][0], name])
                raise InputError(f"group {g!r} straddles splits {a}, {b} (items {i}, {owner[g][1]})")
            owner.setdefault(g, (name, i))


# ----------------------------------------------------------------------------- fingerprints
@dataclass(frozen=True)
class NearDuplicateConfig:
    """Settings of `near_duplicate_groups` (see the module docstring for the method).

    The defaults were tuned on LC25000 (see docs/data.md for the measured group counts).
    ``angle_step=90, zooms=(1.0,)`` gives the plain dihedral pHash.
    """

    size: int = 56                       # decode side (px); JPEG draft mode decodes at 1/4
    side: float = 0.70                   # central square sampled, fraction of the image side
    sample: int = 32                     # variant side (px) before the 8x8 DCT
    angle_step: float = 5.0              # rotations 0, step, ..., < 90 degrees
    zooms: tuple[float, ...] = (1.0, 1.15, 1.33)
    radius: int = 16                     # Hamming radius (bits of 63) for candidates
    min_cos: float = 0.75                # DCT cosine to accept a candidate
    max_color_diff: float = 10.0         # max |mean colour difference| per channel (0..255)
    version: int = 1                     # bump when the fingerprint changes (invalidates caches)

    @property
    def angles(self) -> np.ndarray:
        return np.arange(0.0, 90.0 - 1e-9, self.angle_step)


@dataclass
class Fingerprints:
    """Per image: ``hashes`` (N, V) uint64 canonical sign-pHash of each rotation/zoom variant
    (variant 0 = the image itself), ``dct`` (N, V, 8, 8) float16, ``color`` (N, 6) mean/std RGB."""

    hashes: np.ndarray
    dct: np.ndarray
    color: np.ndarray


def _decode(path: Path, size: int, disc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(grey float32 (size, size), colour stats (6,)) of one image, decoded small."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # DCT-scaled JPEG decoding: this reader only needs a thumbnail
            img = to_rgb(img, str(path))
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BOX)
            rgb = np.asarray(img, dtype=np.float32)
    except READ_ERRORS as err:
        raise InputError(f"cannot read image {path}: {err}") from None
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    inner = rgb[disc]
    return grey, np.concatenate([inner.mean(0), inner.std(0)])


def _variant_grid(cfg: NearDuplicateConfig) -> Any:
    """torch grid (V, S, S, 2) in [-1, 1] sampling the rotated/zoomed central squares."""
    import torch

    t = (np.arange(cfg.sample) + 0.5) / cfg.sample * 2.0 - 1.0
    yy, xx = np.meshgrid(t, t, indexing="ij")
    grids = []
    for z in cfg.zooms:
        for a in np.deg2rad(cfg.angles):
            s = cfg.side / z
            grids.append(np.stack([s * (xx * np.cos(a) - yy * np.sin(a)),
                                   s * (xx * np.sin(a) + yy * np.cos(a))], axis=-1))
    return torch.tensor(np.stack(grids), dtype=torch.float32)


def _dct_matrix(n: int, k: int = 8) -> np.ndarray:
    """The first ``k`` rows of the orthonormal DCT-II matrix of size ``n``."""
    i = np.arange(n)
    c = np.cos(np.pi * (2 * i[None, :] + 1) * np.arange(k)[:, None] / (2 * n)) * np.sqrt(2.0 / n)
    c[0] /= np.sqrt(2.0)
    return c.astype(np.float32)


def _bit_mask(pred: Any) -> np.uint64:
    """uint64 with bit (63 - k) set where pred(u, v) holds for coefficient k = 8u + v."""
    m = 0
    for k in range(64):
        if pred(*divmod(k, 8)):
            m |= 1 << (63 - k)
    return np.uint64(m)


_FLIP_X = _bit_mask(lambda u, v: v % 2 == 1)     # mirror left-right negates odd horizontal freqs
_FLIP_Y = _bit_mask(lambda u, v: u % 2 == 1)
_NO_DC = ~_bit_mask(lambda u, v: u == 0 and v == 0)
_TRANSPOSE = np.array([(k % 8) * 8 + k // 8 for k in range(64)])


def dihedral_hash(dct: np.ndarray) -> np.ndarray:
    """Canonical 63-bit sign pHash of 8x8 DCT blocks (..., 8, 8): the minimum over the 8
    dihedral transforms (flips negate odd-frequency coefficients, a transpose swaps u and v).

    Example:
        >>> x = np.random.default_rng(0).normal(size=(8, 8))
        >>> mirror = x * (-1.0) ** np.arange(8)        # DCT of the left-right mirrored image
        >>> bool(dihedral_hash(x) == dihedral_hash(mirror) == dihedral_hash(x.T))
        True
    """
    flat = dct.reshape(*dct.shape[:-2], 64)

    def pack(bits: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.packbits(bits, axis=-1)).view(">u8")[..., 0].astype(np.uint64) & _NO_DC

    plain, trans = pack(flat > 0), pack(flat[..., _TRANSPOSE] > 0)
    variants = [h ^ m for h in (plain, trans) for m in (np.uint64(0), _FLIP_X, _FLIP_Y, _FLIP_X ^ _FLIP_Y)]
    return np.minimum.reduce(variants)


def fingerprint_images(paths: Sequence[str | Path], config: NearDuplicateConfig | None = None,
                       workers: int = 2, progress: bool = False, batch: int = 256) -> Fingerprints:
    """Fingerprints of images (decoded in ``workers`` threads, variants sampled with torch).

    Example:
        >>> fp = fingerprint_images(paths[:10])   # doctest: +SKIP
        >>> fp.hashes.shape                        # doctest: +SKIP
        (10, 54)
    """
    import torch
    from tqdm.auto import tqdm

    cfg = config or NearDuplicateConfig()
    c = (cfg.size - 1) / 2.0
    yy, xx = np.mgrid[:cfg.size, :cfg.size]
    disc = (yy - c) ** 2 + (xx - c) ** 2 <= (cfg.side / 2 * cfg.size) ** 2
    grid, dct = _variant_grid(cfg), torch.from_numpy(_dct_matrix(cfg.sample))
    v, s = grid.shape[0], cfg.sample
    hashes, dcts, colors = [], [], []
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(paths), desc="fingerprints", unit="img", disable=not progress) as bar:
        for b in range(0, len(paths), batch):
            decoded = list(pool.map(lambda p: _decode(Path(p), cfg.size, disc), paths[b:b + batch]))
            grey = torch.from_numpy(np.stack([g for g, _ in decoded]))[:, None]       # (B, 1, n, n)
            g = grid.reshape(1, v * s, s, 2).expand(len(grey), -1, -1, -1)
            var = torch.nn.functional.grid_sample(grey, g, mode="bilinear", align_corners=False)
            block = (dct @ var.reshape(len(grey), v, s, s) @ dct.T).numpy()           # (B, V, 8, 8)
            hashes.append(dihedral_hash(block))
            dcts.append(block.astype(np.float16))
            colors.append(np.stack([col for _, col in decoded]))
            bar.update(len(decoded))
    if not hashes:
        return Fingerprints(np.zeros((0, v), np.uint64), np.zeros((0, v, 8, 8), np.float16), np.zeros((0, 6)))
    return Fingerprints(np.concatenate(hashes), np.concatenate(dcts), np.concatenate(colors))


# ----------------------------------------------------------------------------- candidate search
def hamming_pairs(query: np.ndarray, index: np.ndarray, radius: int, chunk: int = 32, workers: int = 2
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (i, j, v) with popcount(query[i] ^ index[j, v]) <= radius, the best v per (i, j), i != j.

    ``query`` is (N,) uint64, ``index`` (N, V) uint64 (the same N items). Method: exact-match
    buckets when radius is 0; multi-index banding (split the 64 bits into radius + 1 bands: a pair
    within the radius agrees exactly on at least one band) when bands keep >= 8 bits; else a
    chunked XOR-popcount over all pairs (faster than banding with short bands).

    Example:
        >>> q = np.array([0b1011, 0b1111, 0], dtype=np.uint64)
        >>> [a.tolist() for a in hamming_pairs(q, q[:, None], 1)]
        [[0, 1], [1, 0], [0, 0]]
    """
    n = len(query)
    if n == 0:
        e = np.zeros(0, np.int64)
        return e, e, e
    if 64 // (radius + 1) >= 8:
        return _banded_pairs(query, index, radius)

    def block(b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = np.bitwise_count(query[b:b + chunk, None, None] ^ index[None, :, :])    # (c, N, V)
        best, arg = d.min(axis=2), d.argmin(axis=2)
        i, j = np.nonzero(best <= radius)
        keep = i + b != j
        return i[keep] + b, j[keep], arg[i[keep], j[keep]]

    with ThreadPoolExecutor(max(1, workers)) as pool:     # numpy releases the GIL here
        found = list(pool.map(block, range(0, n, chunk)))
    return tuple(np.concatenate([f[k] for f in found]).astype(np.int64) for k in range(3))  # type: ignore[return-value]


def _banded_pairs(query: np.ndarray, index: np.ndarray, radius: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-index hashing: candidates share one of radius + 1 bands exactly; then verify."""
    n, v = index.shape
    edges = np.linspace(0, 64, radius + 2).astype(int)
    flat = index.ravel()
    found = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = np.uint64(((1 << (hi - lo)) - 1) << (64 - hi))
        keys_i = flat & mask
        order = np.argsort(keys_i, kind="stable")
        left = np.searchsorted(keys_i[order], query & mask, "left")
        count = np.searchsorted(keys_i[order], query & mask, "right") - left
        start = np.repeat(left - (np.cumsum(count) - count), count)        # vectorised bucket join
        found.append(np.repeat(np.arange(n), count) * flat.size + order[start + np.arange(count.sum())])
    pairs = np.unique(np.concatenate(found))
    if not len(pairs):
        e = np.zeros(0, np.int64)
        return e, e, e
    arr = np.stack([pairs // flat.size, pairs % flat.size], axis=1).astype(np.int64)
    i, f = arr[:, 0], arr[:, 1]
    j, var = f // v, f % v
    d = np.bitwise_count(query[i] ^ flat[f])
    keep = (d <= radius) & (i != j)
    i, j, var, d = i[keep], j[keep], var[keep], d[keep]
    # best variant per (i, j)
    order = np.lexsort((d, j, i))
    i, j, var = i[order], j[order], var[order]
    first = np.ones(len(i), bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    return i[first], j[first], var[first]


def _verify(fp: Fingerprints, i: np.ndarray, j: np.ndarray, v: np.ndarray, cfg: NearDuplicateConfig
            ) -> np.ndarray:
    """Candidate pairs that pass the DCT-cosine (best dihedral) and colour checks."""
    if len(i) == 0:
        return np.zeros(0, bool)
    color_ok = np.abs(fp.color[i, :3] - fp.color[j, :3]).max(axis=1) <= cfg.max_color_diff
    cos = np.full(len(i), -1.0, np.float32)
    u = np.arange(8)
    sx = np.broadcast_to((-1.0) ** u[None, :], (8, 8))
    sy = sx.T
    signs = np.stack([np.ones((8, 8)), sx, sy, sx * sy]).astype(np.float32)                 # (4, 8, 8)
    for b in range(0, len(i), 65536):
        sl = slice(b, b + 65536)
        a = _unit(fp.dct[i[sl], 0])
        c = _unit(fp.dct[j[sl], v[sl]])
        plain = np.einsum("nuv,suv,nuv->ns", a, signs, c)
        trans = np.einsum("nuv,suv,nvu->ns", a, signs, c)
        cos[sl] = np.maximum(plain.max(1), trans.max(1))
    return color_ok & (cos >= cfg.min_cos)


def _unit(block: np.ndarray) -> np.ndarray:
    """DC removed, unit norm (float32)."""
    x = block.astype(np.float32).copy()
    x[:, 0, 0] = 0.0
    return x / np.maximum(np.linalg.norm(x.reshape(len(x), -1), axis=1), 1e-8)[:, None, None]


# ----------------------------------------------------------------------------- grouping
def near_duplicate_groups(
    paths: Sequence[str | Path],
    blocks: Sequence[Hashable] | None = None,
    config: NearDuplicateConfig | None = None,
    cache: str | Path | None = None,
    workers: int = 2,
    progress: bool = False,
) -> np.ndarray:
    """Group near-duplicate images; returns a group id per path (0..G-1, by first member).

    ``blocks`` (e.g. class labels) restricts the search to pairs within a block. ``cache`` is a
    JSON file: when every file's path, size and mtime and the settings match, the stored
    groups are returned without reading any image; otherwise they are recomputed and saved.

    Example:
        >>> g = near_duplicate_groups(paths, blocks=labels, cache="lc25000-groups.json")  # doctest: +SKIP
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    cfg = config or NearDuplicateConfig()
    paths = [Path(p) for p in paths]
    blocks = list(blocks) if blocks is not None else [0] * len(paths)
    if len(blocks) != len(paths):
        raise InputError(f"{len(blocks)} blocks for {len(paths)} paths")
    keys = _file_keys(paths)
    cached = _read_cache(cache, keys, cfg, blocks)
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    fp = fingerprint_images(paths, cfg, workers, progress)
    t1 = time.perf_counter()
    rows, cols = [], []
    for block in sorted(set(blocks), key=str):
        idx = np.array([k for k, b in enumerate(blocks) if b == block])
        i, j, v = hamming_pairs(fp.hashes[idx, 0], fp.hashes[idx], cfg.radius, workers=workers)
        ok = _verify(Fingerprints(fp.hashes[idx], fp.dct[idx], fp.color[idx]), i, j, v, cfg)
        rows.append(idx[i[ok]])
        cols.append(idx[j[ok]])
    r, c = np.concatenate(rows), np.concatenate(cols)
    n = len(paths)
    _, labels = connected_components(coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n)), directed=False)
    groups = _renumber(labels)
    timing = {"fingerprint_s": round(t1 - t0, 2), "match_s": round(time.perf_counter() - t1, 2)}
    if cache is not None:
        _write_cache(cache, keys, cfg, blocks, groups, timing)
    return groups


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Group ids 0..G-1 in order of each group's first member."""
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(np.argsort(first))
    return order[np.searchsorted(np.unique(labels), labels)].astype(np.int64)


def _file_keys(paths: Sequence[Path]) -> list[list[Any]]:
    keys = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as err:
            raise InputError(f"cannot read {p}: {err}") from None
        keys.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return keys


def _cache_tag(cfg: NearDuplicateConfig, blocks: Sequence[Hashable]) -> str:
    text = json.dumps([asdict(cfg), [str(b) for b in blocks]], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()


def _read_cache(cache: str | Path | None, keys: list[list[Any]], cfg: NearDuplicateConfig,
                blocks: Sequence[Hashable]) -> np.ndarray | None:
    if cache is None or not Path(cache).is_file():
        return None
    try:
        data = json.loads(Path(cache).read_text())
    except (OSError, ValueError):
        return None
    if data.get("settings") != _cache_tag(cfg, blocks) or data.get("files") != [k[:3] for k in keys]:
        return None
    return np.asarray(data["groups"], dtype=np.int64)


def _write_cache(cache: str | Path, keys: list[list[Any]], cfg: NearDuplicateConfig, blocks: Sequence[Hashable],
                 groups: np.ndarray, timing: dict[str, float]) -> None:
    path = Path(cache)
    data = {"format": "pixgen-near-duplicate-groups/1", "settings": _cache_tag(cfg, blocks),
            "config": asdict(cfg), "timing": timing, "n_groups": int(groups.max() + 1) if len(groups) else 0,
            "files": [k[:3] for k in keys], "groups": groups.tolist()}
    write_text_atomic(path, json.dumps(data))


def default_cache_dir() -> Path:
    """$PIXGEN_CACHE, else $XDG_CACHE_HOME/pixgen, else ~/.cache/pixgen."""
    if os.environ.get("PIXGEN_CACHE"):
        return Path(os.environ["PIXGEN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pixgen"


# ----------------------------------------------------------------------------- LC25000
@dataclass
class GroupedSplit:
    """A split of an image folder by groups: ``splits[name]`` are indices into ``paths``."""

    paths: list[Path]
    labels: list[int]
    class_names: list[str]
    groups: np.ndarray
    splits: dict[str, list[int]]
    info: dict[str, Any] = field(default_factory=dict)

    def files(self, name: str) -> list[Path]:
        """The paths of one split (e.g. for ``ImageFolderDataset(root, mpp, files=...)``)."""
        return [self.paths[i] for i in self.splits[name]]

    def groups_per_class(self) -> dict[str, int]:
        """Number of distinct groups in each class."""
        out: dict[str, set[int]] = {c: set() for c in self.class_names}
        for lab, g in zip(self.labels, self.groups):
            out[self.class_names[lab]].add(int(g))
        return {c: len(s) for c, s in out.items()}


def lc25000_grouped_split(
    root: str | Path,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    cache: str | Path | None | bool = True,
    config: NearDuplicateConfig | None = None,
    workers: int = 2,
    progress: bool = False,
) -> GroupedSplit:
    """Split LC25000 (``root/{class}/*.jpeg``) into train/val/test by near-duplicate groups.

    Groups are searched within each class, and the split is stratified by class.
    ``cache=True`` stores the grouping in ``default_cache_dir()/near-duplicates-<hash of root>.json``;
    a path stores it there; ``None``/``False`` disables caching.

    Example:
        >>> s = lc25000_grouped_split("../shared/data/lc25000-lung")  # doctest: +SKIP
        >>> s.groups_per_class()                                      # doctest: +SKIP
        {'lung_aca': 328, 'lung_n': 320, 'lung_scc': 403}
    """
    from training.data.folders import scan_image_folder

    paths, labels, names = scan_image_folder(root)
    if not names:
        raise InputError(f"{root} has no class folders", fix="pass the LC25000 folder holding lung_aca/, lung_n/, ...")
    if cache is True:
        digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]
        cache = default_cache_dir() / f"near-duplicates-{digest}.json"
    t0 = time.perf_counter()
    groups = near_duplicate_groups(paths, labels, config, cache or None, workers, progress)
    splits = group_split(groups.tolist(), fractions, seed, stratify=labels)
    info = {"seconds": round(time.perf_counter() - t0, 2), "cache": str(cache) if cache else None,
            "n_groups": int(groups.max() + 1)}
    return GroupedSplit(paths, labels, names, groups, splits, info)
