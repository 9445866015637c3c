"""An independently trained detector: a supervised tissue classifier whose pooled penultimate
features are the feature space of the fidelity metrics.

The generator is conditioned on pixgen-ssl (a self-supervised DINO ViT), so FD in that
encoder's own space partly measures what the generator was told to match. This detector
shares nothing with it: a :class:`metrics.utility.SmallCNN` with a 128-wide last block,
trained from scratch with labels (one subfolder per label), offline, on a CPU.

Preprocessing (fixed, the same in training and as a detector): uint8 RGB resized to 64 x 64
with bilinear interpolation and antialias (``metrics.detectors.resize``), then x / 127.5 - 1.

A trained detector is a folder with ``model.safetensors`` and ``classifier.json`` (labels,
width, input size, preprocessing, steps, held-out accuracy, training folder, date).

    python -m metrics.classifier --train runs/default/tiles --out runs/detector-cnn --steps 2000 --threads 1

Example:
    >>> summary = train_classifier("tiles/", "detector-cnn/", steps=2000)   # doctest: +SKIP
    >>> det = ClassifierDetector("detector-cnn/")                          # doctest: +SKIP
    >>> det(torch.zeros(2, 3, 128, 128, dtype=torch.uint8)).shape          # doctest: +SKIP
    torch.Size([2, 128])
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from metrics.detectors import Detector, resize
from metrics.images import load_image_folder, stratified_subsample
from metrics.utility import SmallCNN, classification_scores
from pixgen.errors import InputError, ModelLoadError, PixgenError
from pixgen.io import write_bytes_atomic, write_text_atomic

__all__ = ["INPUT_SIZE", "WIDTH", "preprocess", "train_classifier", "score_classifier", "ClassifierDetector", "main"]

INPUT_SIZE = 64
WIDTH = 128  # last-block channels = feature dimension
PREPROCESSING = "bilinear resize with antialias of uint8 RGB to 64x64, then x / 127.5 - 1"
WEIGHTS, CONFIG = "model.safetensors", "classifier.json"
_TRAIN_CMD = "python -m metrics.classifier --train TILES_DIR --out DIR"


def preprocess(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3, size, size) in [-1, 1].

    Example:
        >>> preprocess(torch.full((1, 3, 128, 128), 255, dtype=torch.uint8)).shape
        torch.Size([1, 3, 64, 64])
    """
    return resize(images, size) / 127.5 - 1.0


def _load_inputs(folder: Path) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Preprocessed inputs, integer labels and label names of a folder of label subfolders."""
    s = load_image_folder(folder)  # files at the root (e.g. tiles.json) are ignored
    if s.labels is None or len(s.classes) < 2:
        raise InputError(
            f"{folder} needs at least two label subfolders of images, found {s.classes or 'none'}",
            fix="put the images in one subfolder per label (e.g. tiles/lung_aca, tiles/lung_n)",
        )
    counts = np.bincount(s.labels, minlength=len(s.classes))
    if counts.min() < 2:
        raise InputError(f"label {s.classes[int(counts.argmin())]!r} in {folder} has fewer than 2 images", fix="add images or drop the folder")
    x = torch.cat([preprocess(torch.tensor(im).permute(2, 0, 1)[None]) for im in s.images])
    return x, s.labels, s.classes


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per image: one of the 8 flips/90-degree rotations and a mild colour jitter (brightness
    +-0.1, contrast and saturation x0.8-1.25, per-channel shift +-0.05, in [-1, 1] units)."""
    n = len(x)

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    k = torch.randint(0, 4, (n,), generator=gen)
    x = x.clone()
    for r in range(1, 4):
        x[k == r] = torch.rot90(x[k == r], r, dims=(2, 3))
    x = torch.where(torch.rand(n, 1, 1, 1, generator=gen) < 0.5, x.flip(3), x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.8, 1.25, 1, 1, 1) + mean  # contrast
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * u(0.8, 1.25, 1, 1, 1) + grey  # saturation
    x = x + u(-0.1, 0.1, 1, 1, 1) + u(-0.05, 0.05, 3, 1, 1)  # brightness, hue-ish channel shift
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def _predict(model: SmallCNN, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).numpy()


def train_classifier(
    folder: str | Path,
    out: str | Path,
    steps: int = 2000,
    batch_size: int = 64,
    seed: int = 0,
    threads: int = 1,
    lr: float = 2e-3,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the tissue classifier on ``folder`` (one image subfolder per label) and save it to ``out``.

    A seeded, stratified 10 % of the images is held out. Training: ``steps`` Adam steps
    (cosine-decayed ``lr``, weight decay 1e-4) on batches drawn label-balanced (a label
    uniformly, then one of its images), with :func:`_augment`. ``log`` receives a progress
    line every 100 steps. Returns the summary also written to ``out/classifier.json``.

    Example:
        >>> s = train_classifier("runs/default/tiles", "runs/detector-cnn", steps=3000)  # doctest: +SKIP
        >>> round(s["heldout_accuracy"], 3)                                              # doctest: +SKIP
        0.967
    """
    folder, out = Path(folder), Path(out)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        x, labels, classes = _load_inputs(folder)
        load_s = time.perf_counter() - t0
        held = stratified_subsample(labels, 0.1, seed)
        train = np.setdiff1d(np.arange(len(labels)), held)
        order = torch.as_tensor(train[np.argsort(labels[train], kind="stable")])  # training images, grouped by label
        count = torch.as_tensor(np.bincount(labels[train], minlength=len(classes)))
        start = torch.cumsum(count, 0) - count
        y = torch.as_tensor(labels, dtype=torch.long)

        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = SmallCNN(len(classes), width=WIDTH)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
        model.train()
        t0, losses = time.perf_counter(), []
        for step in range(1, steps + 1):
            pick = torch.randint(0, len(classes), (batch_size,), generator=gen)
            idx = order[start[pick] + (torch.rand(batch_size, generator=gen) * count[pick]).long()]
            loss = F.cross_entropy(model(_augment(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if log and (step % 100 == 0 or step == steps):
                log(f"step {step}/{steps} loss {np.mean(losses[-100:]):.4f} ({time.perf_counter() - t0:.0f} s)")
        train_s = time.perf_counter() - t0
        model.eval()
        scores = classification_scores(labels[held], _predict(model, x[torch.as_tensor(held)]), n_boot=0)
    finally:
        torch.set_num_threads(threads_before)

    summary = {
        "labels": classes,
        "width": WIDTH,
        "input_size": INPUT_SIZE,
        "preprocessing": PREPROCESSING,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "counts": {c: int(n) for c, n in zip(classes, np.bincount(labels, minlength=len(classes)))},
        "n_heldout": int(len(held)),
        "heldout_accuracy": scores["accuracy"]["value"],
        "heldout_balanced_accuracy": scores["balanced_accuracy"]["value"],
        "final_loss": float(np.mean(losses[-100:])) if losses else None,
        "load_seconds": round(load_s, 1),
        "train_seconds": round(train_s, 1),
        "training_folder": str(folder.resolve()),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_bytes_atomic(out / WEIGHTS, save(state))
    write_text_atomic(out / CONFIG, json.dumps(summary, indent=2) + "\n")
    return summary


class ClassifierDetector(Detector):
    """Pooled penultimate (``width``-d) features of a classifier saved by :func:`train_classifier`.

    Named ``classifier-<folder name>`` (so FD is reported as ``FD_classifier-<folder name>``).

    Example:
        >>> det = ClassifierDetector("runs/detector-cnn")                          # doctest: +SKIP
        >>> det(torch.zeros(2, 3, 128, 128, dtype=torch.uint8)).shape             # doctest: +SKIP
        torch.Size([2, 128])
    """

    def __init__(self, folder: str | Path, device: str | torch.device | None = None):
        from safetensors.torch import load_file

        folder = Path(folder)
        missing = [f for f in (CONFIG, WEIGHTS) if not (folder / f).is_file()]
        if missing:
            raise ModelLoadError(f"no classifier detector in {folder} (missing {', '.join(missing)})", fix=f"train one with: {_TRAIN_CMD}")
        try:
            config = json.loads((folder / CONFIG).read_text())
            labels, width, self.input_size = list(config["labels"]), int(config["width"]), int(config["input_size"])
        except (ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(f"unreadable {folder / CONFIG}: {type(err).__name__}: {err}", fix=f"retrain it: {_TRAIN_CMD}") from err
        model = SmallCNN(len(labels), width=width)
        try:
            model.load_state_dict(load_file(str(folder / WEIGHTS)))
        except Exception as err:  # corrupt file (SafetensorError, OSError), other shapes or keys (RuntimeError)
            raise ModelLoadError(
                f"the weights in {folder / WEIGHTS} do not fit a classifier of width {width} with {len(labels)} labels "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]})",
                fix=f"retrain it into a fresh folder: {_TRAIN_CMD}",
            ) from err
        self.device = torch.device(device or "cpu")
        self.model = model.eval().to(self.device)
        self.labels = labels
        self.name = f"classifier-{folder.resolve().name}"
        self.dim = width

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(preprocess(images.to(self.device), self.input_size))  # (N, width)


def score_classifier(folder: str | Path, test: str | Path) -> dict[str, Any]:
    """Accuracy of a saved classifier on a held-out folder with the same label subfolders.

    Example:
        >>> score_classifier("runs/detector-cnn", "runs/real-test")["accuracy"]   # doctest: +SKIP
        0.93
    """
    det = ClassifierDetector(folder)
    x, y, labels = _load_inputs(Path(test))
    if labels != det.labels:
        raise InputError(f"{test} has labels {labels}, the classifier {det.labels}", fix="use a folder with the classifier's label subfolders")
    pred = _predict(det.model, x)
    scores = classification_scores(y, pred, n_boot=0)
    return {"test": str(test), "n": len(y), "accuracy": scores["accuracy"]["value"],
            "balanced_accuracy": scores["balanced_accuracy"]["value"],
            "per_class": {c: float((pred[y == k] == k).mean()) for k, c in enumerate(labels)}}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: train a classifier detector (``--train``), score it on held-out data (``--test``);
    print the summaries as JSON."""
    ap = argparse.ArgumentParser(prog="python -m metrics.classifier", description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, help="image folder with one subfolder per label (omit to only --test)")
    ap.add_argument("--test", type=Path, help="held-out folder with the same label subfolders: accuracy of the saved model")
    ap.add_argument("--out", required=True, type=Path, help="output folder (model.safetensors, classifier.json)")
    ap.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.train is None and args.test is None:
        ap.error("give --train, --test or both")
    try:
        summary = {}
        if args.train is not None:
            summary = train_classifier(
                args.train, args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed, threads=args.threads,
                log=lambda line: print(line, file=sys.stderr, flush=True),
            )
        if args.test is not None:
            torch.set_num_threads(args.threads)
            summary["held_out"] = score_classifier(args.out, args.test)
    except PixgenError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
