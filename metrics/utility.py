"""Downstream utility: are synthetic images useful training data?

Classification (labelled image sets, scored on the real test split):

- TSTR: train on synthetic, test on real; beside TRTR (train on real train, test on real).
- Augmentation: real-only vs real+synthetic at several real fractions (1 %, 10 %, 100 %),
  the real subset stratified and seeded; the gain is a paired bootstrap on one test set.

with two learners: a linear probe (scikit-learn logistic regression on frozen detector
features) and a small CNN trained from scratch on 64 px inputs (a fixed number of steps, so
every training-set size gets the same budget). Scores: accuracy, balanced accuracy,
macro-F1, each with a bootstrap interval over the test images.

Segmentation (image/mask sets): a tiny U-Net trained on real vs real+synthetic pairs, Dice
and AJI on the real test split (``metrics.segmentation``).

Example:
    >>> res = classification_utility(train, test, synthetic, features=feats)   # doctest: +SKIP
    >>> res["tstr"]["linear-probe"]["train_on_synthetic"]["accuracy"]["value"]  # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn

from metrics.images import ImageSet, stratified_subsample
from metrics.segmentation import MaskSet, aji, dice, instances_from_probability, predict_probability, train_segmenter
from metrics.stats import Estimate, estimate, mean_estimate, warn_if_small

__all__ = [
    "classification_scores",
    "linear_probe",
    "SmallCNN",
    "train_small_cnn",
    "predict_small_cnn",
    "classification_utility",
    "segmentation_utility",
]

LEARNERS = ("linear-probe", "small-cnn")


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (restored after).

    The models trained here are tiny (a 60 k-parameter CNN on 64 px, a 0.1 M-parameter U-Net):
    extra threads gain little, and on a loaded machine their synchronisation costs a lot
    (measured: a CNN step 0.08 s on 1 thread vs 0.72 s on 2 threads of a busy 2-core box).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """(n, n) confusion matrix, rows = true class."""
    return np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n)


def _balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present in y_true (as scikit-learn's balanced_accuracy_score)."""
    support = cm.sum(axis=1)
    return float((np.diag(cm)[support > 0] / support[support > 0]).mean())


def _macro_f1(cm: np.ndarray, labels: np.ndarray) -> float:
    """Mean F1 = 2TP / (2TP + FP + FN) over ``labels``, 0 where undefined (as scikit-learn's
    ``f1_score(average="macro", labels=labels, zero_division=0)``)."""
    tp = np.diag(cm)[labels].astype(float)
    denom = 2 * tp + (cm.sum(axis=0)[labels] - tp) + (cm.sum(axis=1)[labels] - tp)
    return float(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0).mean())


def classification_scores(y_true: np.ndarray, y_pred: np.ndarray, n_boot: int = 200, seed: int = 0) -> dict[str, Estimate]:
    """Accuracy, balanced accuracy and macro-F1 (over the classes in ``y_true``) with bootstrap
    intervals over test samples. Labels are class indices 0..C-1.

    Example:
        >>> s = classification_scores(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), n_boot=0)
        >>> s["accuracy"]["value"], round(s["macro_f1"]["value"], 3)
        (0.75, 0.733)
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    labels = np.unique(y_true)
    n_cls = int(max(y_true.max(), y_pred.max())) + 1

    def bacc(i: np.ndarray) -> float:
        return _balanced_accuracy(_confusion(y_true[i], y_pred[i], n_cls))

    def f1(i: np.ndarray) -> float:
        return _macro_f1(_confusion(y_true[i], y_pred[i], n_cls), labels)

    every = np.arange(len(y_true))
    return {
        "accuracy": mean_estimate(y_true == y_pred, n_boot, seed),
        "balanced_accuracy": estimate(bacc(every), bacc, [len(y_true)], n_boot, seed),
        "macro_f1": estimate(f1(every), f1, [len(y_true)], n_boot, seed),
    }


def linear_probe(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray, seed: int = 0) -> np.ndarray:
    """Predicted test labels of a standardised logistic regression fit on frozen features.

    Example:
        >>> x = np.array([[0.0], [0.1], [1.0], [1.1]]); y = np.array([0, 0, 1, 1])
        >>> linear_probe(x, y, np.array([[0.05], [1.05]])).tolist()
        [0, 1]
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_labels)) < 2:  # a 1 % subset may hold a single class
        return np.full(len(test_feats), train_labels[0])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, random_state=seed))
    with threadpool_limits(limits=1, user_api="blas"):  # see metrics.fidelity.c2st
        return model.fit(train_feats, train_labels).predict(test_feats)


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU-maxpool blocks (16-32-64-``width`` channels; with the default 64, ~14 M
    multiply-adds per 64 px image, ~60 k parameters) and a linear head: small enough to train
    on a CPU in seconds. :meth:`embed` gives the pooled ``width``-d penultimate features.

    Example:
        >>> SmallCNN(3)(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 3])
        >>> SmallCNN(3, width=128).embed(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 128])
    """

    def __init__(self, n_classes: int, width: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in [(3, 16), (16, 32), (32, 64), (64, width)]:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)  # (B, width, 4, 4) for 64 px
        self.head = nn.Linear(width, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled last-block features, (B, width)."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))  # (B, n_classes)


def _small_inputs(images: Sequence[np.ndarray], size: int = 64) -> torch.Tensor:
    """(N, 3, size, size) float in [-1, 1]: bilinear antialiased resize of each image."""
    out = [
        F.interpolate(torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float(), size=(size, size), mode="bilinear", antialias=True)
        for im in images
    ]
    return torch.cat(out) / 127.5 - 1.0


def train_small_cnn(x: torch.Tensor, labels: np.ndarray, n_classes: int, steps: int = 150, batch_size: int = 32, seed: int = 0) -> SmallCNN:
    """Train :class:`SmallCNN` on (N, 3, 64, 64) inputs for ``steps`` Adam steps with random flips
    and 90-degree rotations (tissue has no orientation)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SmallCNN(n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    y = torch.as_tensor(labels, dtype=torch.long)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)
        xb = torch.rot90(x[idx], int(torch.randint(0, 4, (1,), generator=gen)), dims=(2, 3))
        if torch.rand(1, generator=gen) < 0.5:
            xb = xb.flip(3)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def predict_small_cnn(model: SmallCNN, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Predicted labels for (N, 3, 64, 64) inputs."""
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).numpy()


@dataclass
class _Split:
    """One labelled set, prepared for both learners."""

    feats: np.ndarray | None
    small: torch.Tensor | None
    labels: np.ndarray

    def take(self, index: np.ndarray) -> "_Split":
        return _Split(
            None if self.feats is None else self.feats[index],
            None if self.small is None else self.small[torch.as_tensor(index)],
            self.labels[index],
        )

    def join(self, other: "_Split") -> "_Split":
        return _Split(
            None if self.feats is None else np.concatenate([self.feats, other.feats]),
            None if self.small is None else torch.cat([self.small, other.small]),
            np.concatenate([self.labels, other.labels]),
        )


def _fit_predict(learner: str, train: _Split, test: _Split, n_classes: int, seed: int, cnn_steps: int) -> np.ndarray:
    if learner == "linear-probe":
        return linear_probe(train.feats, train.labels, test.feats, seed)
    with single_threaded():
        model = train_small_cnn(train.small, train.labels, n_classes, steps=cnn_steps, seed=seed)
        return predict_small_cnn(model, test.small)


def classification_utility(
    real_train: ImageSet | None,
    real_test: ImageSet,
    synthetic: ImageSet,
    features: dict[str, np.ndarray] | None = None,
    learners: Sequence[str] = LEARNERS,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    cnn_steps: int = 150,
    seed: int = 0,
    n_boot: int = 200,
) -> dict[str, Any]:
    """TSTR (and TRTR) and the real vs real+synthetic comparison for each learner.

    ``features`` maps ``"train"``, ``"test"``, ``"synthetic"`` to detector features of those
    sets (needed by the linear probe). All sets must carry labels over the same ``classes``.
    Without ``real_train`` only TSTR is computed.
    """
    for s in (real_test, synthetic, real_train):
        if s is not None and (s.labels is None or s.classes != real_test.classes):
            raise ValueError("utility needs labelled sets over the same classes (class subfolders)")
    if "linear-probe" in learners and features is None:
        raise ValueError("the linear probe needs detector features for train/test/synthetic")
    n_classes = len(real_test.classes)
    warn_if_small("utility", len(real_test), 30 * n_classes, "test-set scores have wide intervals")
    use_cnn = "small-cnn" in learners

    def split(name: str, s: ImageSet) -> _Split:
        feats = None if features is None else features.get(name)
        return _Split(feats, _small_inputs(s.images) if use_cnn else None, np.asarray(s.labels))

    test, syn = split("test", real_test), split("synthetic", synthetic)
    train = split("train", real_train) if real_train is not None else None
    out: dict[str, Any] = {"learners": list(learners), "n_test": len(real_test), "tstr": {}, "augmentation": {}}
    for learner in learners:
        tstr = {"train_on_synthetic": classification_scores(test.labels, _fit_predict(learner, syn, test, n_classes, seed, cnn_steps), n_boot, seed)}
        out["tstr"][learner] = tstr
        if train is None:
            continue
        pred_all_real = _fit_predict(learner, train, test, n_classes, seed, cnn_steps)
        tstr["train_on_real"] = classification_scores(test.labels, pred_all_real, n_boot, seed)
        rows = []
        for frac in fractions:
            sub = train.take(stratified_subsample(train.labels, float(frac), seed))
            pred_real = pred_all_real if frac >= 1.0 else _fit_predict(learner, sub, test, n_classes, seed, cnn_steps)
            pred_aug = _fit_predict(learner, sub.join(syn), test, n_classes, seed, cnn_steps)
            gain = (pred_aug == test.labels).astype(float) - (pred_real == test.labels)
            rows.append({
                "fraction": float(frac),
                "n_real": len(sub.labels),
                "n_synthetic": len(syn.labels),
                "real": classification_scores(test.labels, pred_real, n_boot, seed),
                "real+synthetic": classification_scores(test.labels, pred_aug, n_boot, seed),
                "accuracy_gain": mean_estimate(gain, n_boot, seed),
            })
        out["augmentation"][learner] = rows
    return out


def _segmentation_scores(model, test: MaskSet, n_boot: int, seed: int) -> dict[str, Estimate]:
    dices, ajis = [], []
    for im, gt in zip(test.images, test.instances):
        prob = predict_probability(model, im)
        dices.append(dice(prob > 0.5, gt > 0))
        ajis.append(aji(gt, instances_from_probability(prob)))
    ajis_arr = np.asarray(ajis)
    ajis_arr = ajis_arr[~np.isnan(ajis_arr)]  # images with no nucleus and no prediction
    return {"dice": mean_estimate(np.asarray(dices), n_boot, seed), "aji": mean_estimate(ajis_arr, n_boot, seed)}


def segmentation_utility(
    real_train: MaskSet, real_test: MaskSet, synthetic: MaskSet | None, steps: int = 300, seed: int = 0, n_boot: int = 200
) -> dict[str, Any]:
    """Dice and AJI (mean per test image, with intervals) of a tiny U-Net trained on real pairs
    and on real+synthetic pairs, on the real test split.

    Example:
        >>> segmentation_utility(load_mask_folder("consep/train"), load_mask_folder("consep/test"), syn)  # doctest: +SKIP
    """
    warn_if_small("segmentation utility", len(real_test), 20, "per-image Dice/AJI means have wide intervals")
    out: dict[str, Any] = {"n_train": len(real_train), "n_test": len(real_test), "steps": steps}
    with single_threaded():
        out["real"] = _segmentation_scores(train_segmenter(real_train, steps=steps, seed=seed), real_test, n_boot, seed)
        if synthetic is not None:
            out["n_synthetic"] = len(synthetic)
            model = train_segmenter(real_train.concat(synthetic), steps=steps, seed=seed)
            out["real+synthetic"] = _segmentation_scores(model, real_test, n_boot, seed)
    return out
