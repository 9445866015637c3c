"""Train pixgen's bundled SSL encoder ``pixgen-ssl``: a small timm ViT with DINO on H&E tiles.

DINO (Caron et al. 2021): a student ViT + projection head matches the sharpened, centred
output of an EMA teacher across views; multi-crop kept small (2 global 64 px views + 4 local
32 px views of one ~96 um region). H&E augmentations: stain jitter in HED space
(``skimage.color.rgb2hed``), flips, 90-degree rotations, Gaussian blur, random resized crops.
Regions are cut at a physical size (``fov_um`` / source mpp), so the encoder sees ~1 um/px.

Evaluation (teacher backbone, CLS token, as `pixgen.encoders.load_encoder("pixgen-ssl")` gives):
* linear probe: logistic regression on frozen embeddings, LC25000 3-class, grouped split
  (train -> test; the 128 px centre of each 224 px image = 64 um);
* CoNSeP retrieval: cosine k-NN from test tiles into train tiles; score = mean L1 distance
  between a tile's nucleus-type histogram (``types/*.png`` per instance of ``inst/*.png``) and
  its neighbours', against random pairs (ratio < 1: neighbours share the nucleus mix).

Example:
    $ nice -n 19 python -m training.ssl --data /work/shared/data --out /work/runs/ssl-vit6 \\
          --max-steps 3000 --threads 1
    $ python -m training.ssl --data /work/shared/data --out /work/runs/ssl-vit6 --resume
    $ python -m training.ssl --data /work/shared/data --out /work/runs/ssl-vit6 --eval-only --export RUN/export
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from pixgen.encoders.bundled import PIXGEN_SSL, SSL_MODEL_ARGS, BundledEncoder, build_vit
from pixgen.encoders.spec import EncoderSpec
from training.autoencoder import (
    SOURCES,
    CropSampler,
    augment_d4,
    lc25000_split,
    has_checkpoint,
    latest_weights,
    source_files,
    warmup_cosine,
)
from pixgen.errors import InputError
from pixgen.io import load_rgb, write_text_atomic
from training.dataclass_cli import add_dataclass_flags, add_run_flags, saved_config
from training.engine import CsvLog, Engine, EngineConfig, Task, list_checkpoints

__all__ = [
    "DINOHead",
    "SSLConfig",
    "ViewSampler",
    "consep_retrieval",
    "dino_loss",
    "evaluate_encoder",
    "hed_jitter",
    "he_view",
    "linear_probe",
    "main",
    "train_ssl",
]


# --- H&E augmentations (uint8 HWC in, uint8 HWC out) ---------------------------------------------
def hed_jitter(img: np.ndarray, rng: np.random.Generator, scale: float = 0.05, bias: float = 0.03) -> np.ndarray:
    """Stain jitter: scale and shift each HED channel (``skimage.color.rgb2hed``), back to RGB.

    Example:
        >>> out = hed_jitter(np.full((8, 8, 3), 200, np.uint8), np.random.default_rng(0))
        >>> out.dtype, out.shape
        (dtype('uint8'), (8, 8, 3))
    """
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(img)
    hed = hed * rng.uniform(1 - scale, 1 + scale, 3) + rng.uniform(-bias, bias, 3) * hed.std(axis=(0, 1))
    return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)


def gaussian_blur(img: np.ndarray, rng: np.random.Generator, radius: tuple[float, float] = (0.1, 1.2)) -> np.ndarray:
    """Gaussian blur with a random radius (pixels).

    Example:
        >>> gaussian_blur(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0)).shape
        (8, 8, 3)
    """
    r = float(rng.uniform(*radius))
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(r)))


def random_resized_crop(img: np.ndarray, size: int, scale: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Crop a random area fraction in ``scale`` (aspect 3/4..4/3) and resize it to ``size`` px.

    Example:
        >>> random_resized_crop(np.zeros((100, 90, 3), np.uint8), 32, (0.3, 1.0), np.random.default_rng(0)).shape
        (32, 32, 3)
    """
    h, w = img.shape[:2]
    area = h * w * rng.uniform(*scale)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    ch = int(min(h, max(1, round(math.sqrt(area / ratio)))))
    cw = int(min(w, max(1, round(math.sqrt(area * ratio)))))
    y, x = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    crop = Image.fromarray(np.ascontiguousarray(img[y : y + ch, x : x + cw]))
    return np.asarray(crop.resize((size, size), Image.BICUBIC, reducing_gap=2.0))


def he_view(region: np.ndarray, size: int, scale: tuple[float, float], rng: np.random.Generator,
            blur_p: float = 0.3, stain: bool = True) -> np.ndarray:
    """One augmented view of ``region``: resized crop, flip / 90-degree rotation, HED jitter, blur.

    Example:
        >>> he_view(np.full((96, 96, 3), 180, np.uint8), 64, (0.35, 1.0), np.random.default_rng(0)).shape
        (64, 64, 3)
    """
    view = augment_d4(random_resized_crop(region, size, scale, rng), rng)
    if stain:
        view = hed_jitter(view, rng)
    return gaussian_blur(view, rng) if rng.random() < blur_p else view


# --- configuration, views ------------------------------------------------------------------------
@dataclass
class SSLConfig:
    """SSL training run; CLI flags override these fields (see ``docs/compute-plan.md``).

    Example:
        >>> SSLConfig(max_steps=10).global_size
        64
    """

    data: str = "../shared/data"
    out: str = "runs/ssl"
    model_args: dict[str, Any] = field(default_factory=lambda: dict(SSL_MODEL_ARGS))
    fov_um: float = 96.0  # side of the region the views are cut from
    global_size: int = 64
    local_size: int = 32
    n_global: int = 2
    n_local: int = 4
    global_scale: tuple[float, float] = (0.35, 1.0)
    local_scale: tuple[float, float] = (0.08, 0.35)
    batch_size: int = 64
    max_steps: int = 3000
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    out_dim: int = 4096
    head_hidden: int = 1024
    bottleneck: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996
    freeze_last_steps: int = 50
    clip_grad: float = 3.0
    bf16: bool = True
    threads: int = 1
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 250  # steps
    eval_every: int = 250
    eval_limit: int = 600  # LC25000 images per split in periodic evaluations (0 = all)
    source_weights: dict[str, float] = field(default_factory=lambda: {"lc25000": 2.0, "consep": 1.0, "monuseg": 1.0})
    lc_split: str | None = None  # a split JSON; default <out>/lc25000_split.json


class ViewSampler:
    """Multi-crop views of random ~``fov_um`` regions from the training sources.

    Example:
        >>> vs = ViewSampler(files, SSLConfig())                    # doctest: +SKIP
        >>> g, l = vs.batch(8, np.random.default_rng(0))            # doctest: +SKIP
        >>> g.shape, l.shape                                        # doctest: +SKIP
        ((2, 8, 64, 64, 3), (4, 8, 32, 32, 3))
    """

    def __init__(self, files: dict[str, Sequence[Path]], cfg: SSLConfig):
        self.cfg = cfg
        self.images = CropSampler(files, crop=1, weights=cfg.source_weights)

    def region(self, rng: np.random.Generator) -> np.ndarray:
        """A random square region of ``fov_um`` microns (clipped to the image) at the source's mpp."""
        names, probs = self.images.names, self.images.probs
        source = names[int(rng.choice(len(names), p=probs))]
        img = self.images.image(source, rng)
        side = min(img.shape[0], img.shape[1], round(self.cfg.fov_um / SOURCES[source]))
        y, x = int(rng.integers(img.shape[0] - side + 1)), int(rng.integers(img.shape[1] - side + 1))
        return img[y : y + side, x : x + side]

    def views(self, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Global and local views of one region (blur strong on the first global view, as DINO)."""
        c, region = self.cfg, self.region(rng)
        glob = [he_view(region, c.global_size, c.global_scale, rng, blur_p=1.0 if i == 0 else 0.1) for i in range(c.n_global)]
        loc = [he_view(region, c.local_size, c.local_scale, rng, blur_p=0.5) for _ in range(c.n_local)]
        return glob, loc

    def batch(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """uint8 arrays (n_global, n, S, S, 3) and (n_local, n, s, s, 3)."""
        pairs = [self.views(rng) for _ in range(n)]
        glob = np.stack([np.stack([p[0][i] for p in pairs]) for i in range(self.cfg.n_global)])
        loc = np.stack([np.stack([p[1][i] for p in pairs]) for i in range(self.cfg.n_local)]) if self.cfg.n_local else None
        return glob, loc


def normalise(views: np.ndarray) -> torch.Tensor:
    """uint8 (..., S, S, 3) -> float (N, 3, S, S) normalised like `PIXGEN_SSL` (ImageNet mean / std)."""
    x = torch.from_numpy(views.reshape(-1, *views.shape[-3:])).permute(0, 3, 1, 2).float().div(255.0)
    mean, std = torch.tensor(PIXGEN_SSL.mean).view(1, 3, 1, 1), torch.tensor(PIXGEN_SSL.std).view(1, 3, 1, 1)
    return (x - mean) / std


# --- DINO -----------------------------------------------------------------------------------------
class DINOHead(nn.Module):
    """MLP projection + L2-normalised bottleneck + cosine prototypes (weight-normed last layer, g = 1).

    Example:
        >>> DINOHead(192, out_dim=16, hidden=32, bottleneck=8)(torch.zeros(2, 192)).shape
        torch.Size([2, 16])
    """

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden: int = 1024, bottleneck: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)  # (N, bottleneck)
        return z @ F.normalize(self.prototypes, dim=-1).T  # (N, out_dim), cosine logits


class DINO(nn.Module):
    """Backbone (timm ViT, CLS token) + `DINOHead`; ``forward`` takes a list of view batches."""

    def __init__(self, cfg: SSLConfig):
        super().__init__()
        self.backbone = build_vit(cfg.model_args)
        self.head = DINOHead(self.backbone.num_features, cfg.out_dim, cfg.head_hidden, cfg.bottleneck)

    def forward(self, batches: Sequence[torch.Tensor]) -> torch.Tensor:
        cls = torch.cat([self.backbone.forward_features(b)[:, 0] for b in batches])  # (sum N, D)
        return self.head(cls)


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_views: int, n_global: int,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Cross-entropy between teacher and student over all (global teacher view, other view) pairs.

    ``student`` is (n_views * B, K) with the global views first; ``teacher`` is (n_global * B, K).

    Example:
        >>> s, t = torch.randn(8, 16), torch.randn(4, 16)
        >>> float(dino_loss(s, t, torch.zeros(16), 4, 2, 0.1, 0.04)) > 0
        True
    """
    s = F.log_softmax(student.float() / student_temp, dim=-1).chunk(n_views)
    t = F.softmax((teacher.float() - center) / teacher_temp, dim=-1).detach().chunk(n_global)
    losses = [(-tq * s[v]).sum(-1).mean() for iq, tq in enumerate(t) for v in range(n_views) if v != iq]
    return torch.stack(losses).mean()


def teacher_entropy(teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> float:
    """Mean entropy (nats) of the teacher's centred, sharpened distributions; log(K) = collapse to uniform.

    Example:
        >>> round(teacher_entropy(torch.zeros(2, 8), torch.zeros(8), 0.04), 3) == round(math.log(8), 3)
        True
    """
    logp = F.log_softmax((teacher.float() - center) / teacher_temp, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


# --- evaluation -----------------------------------------------------------------------------------
def _even(items: list[Any], limit: int) -> list[Any]:
    return items if not limit or len(items) <= limit else [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def lc_fields(items: list[list[Any]]) -> tuple[np.ndarray, np.ndarray]:
    """LC25000 images as 64 um fields (the central 128 px at ~0.5 um/px) and their labels."""
    images = np.stack([load_rgb(p)[48:176, 48:176] for p, _ in items])
    return images, np.array([lab for _, lab in items])


def linear_probe(encoder: BundledEncoder, train: list[list[Any]], test: list[list[Any]]) -> dict[str, float]:
    """Logistic regression on frozen, standardised embeddings: accuracy and balanced accuracy.

    Example:
        >>> linear_probe(enc, split["train"], split["test"])  # doctest: +SKIP
        {'accuracy': 0.93, 'balanced_accuracy': 0.93, 'n_train': 600, 'n_test': 600}
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (xtr, ytr), (xte, yte) = lc_fields(train), lc_fields(test)
    ftr, fte = encoder.embed(xtr).numpy(), encoder.embed(xte).numpy()
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000)).fit(ftr, ytr)
    pred = clf.predict(fte)
    return {"accuracy": float((pred == yte).mean()), "balanced_accuracy": float(balanced_accuracy_score(yte, pred)),
            "n_train": len(ytr), "n_test": len(yte)}


def type_histogram(inst: np.ndarray, types: np.ndarray, n_types: int = 4) -> np.ndarray:
    """Fraction of nuclei of each type 1..n_types in a tile (type of an instance = its majority type).

    Example:
        >>> inst = np.array([[1, 1, 0], [2, 2, 2]]); types = np.array([[3, 3, 0], [1, 1, 2]])
        >>> type_histogram(inst, types).round(2).tolist()
        [0.5, 0.0, 0.5, 0.0]
    """
    k = n_types + 1
    counts = np.bincount(inst.ravel().astype(np.int64) * k + types.ravel(), minlength=(int(inst.max()) + 1) * k)
    per_instance = counts.reshape(-1, k)[1:, 1:]  # (instances, types 1..n)
    present = per_instance.sum(1) > 0
    hist = np.bincount(per_instance[present].argmax(1), minlength=n_types).astype(float)
    return hist / max(hist.sum(), 1.0)


def consep_tiles(data: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CoNSeP tiles of ``split`` that hold nuclei, and their nucleus-type histograms."""
    root = Path(data) / "consep" / split
    images, hists = [], []
    for path in sorted((root / "images").glob("*.jpg")):
        inst = np.asarray(Image.open(root / "inst" / f"{path.stem}.png"))
        hist = type_histogram(inst, np.asarray(Image.open(root / "types" / f"{path.stem}.png")))
        if hist.sum() > 0:
            images.append(load_rgb(path))
            hists.append(hist)
    return np.stack(images), np.stack(hists)


def consep_retrieval(encoder: BundledEncoder, data: str | Path, k: int = 5) -> dict[str, float]:
    """k-NN (cosine) from CoNSeP test tiles into train tiles, scored on nucleus-type mix.

    ``knn_l1``: mean L1 between a query's type histogram and its k neighbours'; ``random_l1``:
    the same over all train tiles; ``ratio`` = knn / random (1 = no better than chance).

    Example:
        >>> consep_retrieval(enc, "../shared/data")  # doctest: +SKIP
        {'knn_l1': 0.61, 'random_l1': 0.83, 'ratio': 0.73, 'k': 5, 'n_queries': 214}
    """
    (qi, qh), (di, dh) = consep_tiles(data, "test"), consep_tiles(data, "train")
    q = F.normalize(encoder.embed(qi), dim=-1)
    d = F.normalize(encoder.embed(di), dim=-1)
    k = min(k, len(d))
    nn_idx = (q @ d.T).topk(k, dim=1).indices.numpy()  # (Q, k)
    dist = np.abs(qh[:, None, :] - dh[None, :, :]).sum(-1)  # (Q, D) L1 between histograms
    knn = float(np.take_along_axis(dist, nn_idx, 1).mean())
    rand = float(dist.mean())
    return {"knn_l1": knn, "random_l1": rand, "ratio": knn / rand, "k": k, "n_queries": len(qh)}


def as_encoder(backbone: nn.Module, cfg: SSLConfig) -> BundledEncoder:
    """Wrap a (teacher) backbone as the `pixgen-ssl` encoder, in eval mode."""
    spec = EncoderSpec.from_dict({**PIXGEN_SSL.to_dict(), "dim": backbone.num_features, "model_kwargs": cfg.model_args,
                                  "input_size": cfg.global_size})
    return BundledEncoder(spec, backbone, cfg.model_args).eval()


def evaluate_encoder(encoder: BundledEncoder, data: str | Path, split: dict[str, Any], limit: int) -> dict[str, Any]:
    """Linear probe (LC25000 grouped split) and CoNSeP retrieval for one encoder."""
    train, test = _even(split["train"], limit), _even(split["test"], limit)
    return {"lc25000_probe": linear_probe(encoder, train, test), "consep_knn": consep_retrieval(encoder, data)}


# --- training -------------------------------------------------------------------------------------
class _Views(torch.utils.data.Dataset):
    """Multi-crop views as a dataset: item ``i`` is one region's views drawn with the seed
    ``(seed, i)`` (a pure function of the index; the engine shuffles the indices)."""

    LENGTH = 1 << 20

    def __init__(self, views: ViewSampler, seed: int):
        self.views, self.seed = views, seed

    def __len__(self) -> int:
        return self.LENGTH

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        glob, loc = self.views.views(np.random.default_rng([self.seed, index]))
        c = self.views.cfg
        local = normalise(np.stack(loc)) if loc else torch.zeros(0, 3, c.local_size, c.local_size)
        return {"global": normalise(np.stack(glob)), "local": local}  # (n_global, 3, S, S), (n_local, 3, s, s)


class _StudentTeacher(nn.Module):
    """DINO's student, its EMA teacher (no gradients) and the teacher-output centre, as one module
    (one checkpointed state); ``forward`` gives (student logits, teacher logits), global views first."""

    def __init__(self, cfg: SSLConfig):
        super().__init__()
        self.cfg = cfg
        self.student = DINO(cfg)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("center", torch.zeros(cfg.out_dim))

    def forward(self, glob: torch.Tensor, loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views = lambda x: x.transpose(0, 1).reshape(-1, *x.shape[2:])  # noqa: E731  (B, V, ...) -> (V*B, ...)
        batches = [views(glob)] + ([views(loc)] if loc.shape[1] else [])
        with torch.autocast(glob.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            with torch.no_grad():
                t_out = self.teacher(batches[:1]).float()
            s_out = self.student(batches).float()
        return s_out, t_out


class SSLTask(Task):
    """DINO on the training engine: cosine LR and weight decay, last-layer freeze, teacher momentum
    and centre updated after each optimizer step; ``sample_every`` = ``eval_every`` logs the
    teacher's linear probe and CoNSeP retrieval to eval.csv; RUN/final is the teacher encoder.

    Example:
        >>> Engine(SSLTask(SSLConfig(out="runs/ssl", max_steps=10)), "runs/ssl").fit()   # doctest: +SKIP
    """

    log_fields = ("kl", "teacher_entropy", "momentum")

    def __init__(self, cfg: SSLConfig):
        self.ssl = cfg
        self.cfg = EngineConfig(
            lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.clip_grad, batch_size=cfg.batch_size,
            max_steps=cfg.max_steps, mixed_precision="no",  # bf16: the module's own autocast
            ema_decay=0.0, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every, keep_checkpoints=2,
            sample_every=cfg.eval_every, log_every=cfg.log_every, tensorboard=False, warmup_steps=cfg.warmup)
        self.lr_lambda = lambda step: warmup_cosine(step, cfg.max_steps, cfg.warmup, 0.05)
        self.first_loss = self.last_loss = self.eval_log = None

    def configure(self, engine) -> None:
        self.split = lc25000_split(Path(self.ssl.data) / "lc25000-lung",
                                   cache=self.ssl.lc_split or Path(engine.out) / "lc25000_split.json")

    def setup(self, engine) -> None:
        self.engine = engine
        self.views = _Views(ViewSampler(source_files(self.ssl.data, "train", self.split), self.ssl), self.ssl.seed)
        self._model = _StudentTeacher(self.ssl)

    def model(self) -> nn.Module:
        return self._model

    def dataset(self) -> torch.utils.data.Dataset:
        return self.views

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for name, p in model.student.named_parameters():
            (no_decay if p.ndim == 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _progress(self, step: int) -> float:
        return min(1.0, step / max(1, self.ssl.max_steps))

    def momentum(self, step: int) -> float:
        """The teacher's EMA momentum at ``step`` (cosine from ``teacher_momentum`` to 1)."""
        return 1 - (1 - self.ssl.teacher_momentum) * 0.5 * (1 + math.cos(math.pi * self._progress(step)))

    def loss(self, model, batch: dict[str, torch.Tensor], generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, float]]:
        c, inner = self.ssl, self.engine.accelerator.unwrap_model(model)
        s_out, t_out = model(batch["global"], batch["local"])
        loss = dino_loss(s_out, t_out, inner.center, c.n_global + c.n_local, c.n_global, c.student_temp, c.teacher_temp)
        entropy = teacher_entropy(t_out, inner.center, c.teacher_temp)  # with the centre the loss used
        self._t_out = t_out
        value = float(loss.detach())
        self.first_loss = value if self.first_loss is None else self.first_loss
        self.last_loss = value
        # loss = mean teacher entropy + mean KL(teacher || student): the KL is what training lowers
        return loss, {"kl": value - entropy, "teacher_entropy": entropy, "momentum": self.momentum(self.engine.step)}

    def before_optimizer_step(self, model, optimizer, step: int) -> None:
        c = self.ssl
        cosine = 0.5 * (1 + math.cos(math.pi * self._progress(step)))
        optimizer.param_groups[0]["weight_decay"] = c.weight_decay_end + (c.weight_decay - c.weight_decay_end) * cosine
        if step < c.freeze_last_steps:
            self.engine.accelerator.unwrap_model(model).student.head.prototypes.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, model, step: int) -> None:
        inner, momentum = self.engine.accelerator.unwrap_model(model), self.momentum(step)
        for pt, ps in zip(inner.teacher.parameters(), inner.student.parameters()):
            pt.lerp_(ps.detach(), 1 - momentum)
        m = self.ssl.center_momentum
        inner.center.mul_(m).add_(self._t_out.mean(0) * (1 - m))

    def sample(self, engine, model):
        """The teacher's linear probe and CoNSeP retrieval -> eval.csv (no image grid)."""
        if self.eval_log is None and engine.accelerator.is_main_process:
            self.eval_log = CsvLog(engine.out / "eval.csv", ["step"], engine.start_step if engine.resume else None)
        res = evaluate_encoder(as_encoder(model.teacher.backbone, self.ssl), self.ssl.data, self.split, self.ssl.eval_limit)
        if self.eval_log is not None:
            _log_eval(self.eval_log, engine.step, res)
        return None

    def export(self, engine, state: dict[str, torch.Tensor], folder: Path) -> None:
        """RUN/final: the teacher backbone as the ``pixgen-ssl`` encoder (fp32)."""
        teacher = DINO(self.ssl)
        teacher.load_state_dict({k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")})
        as_encoder(teacher.backbone, self.ssl).save_pretrained(folder)

    def run_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.ssl)

    @property
    def resumable(self) -> frozenset[str]:
        return frozenset({"max_steps", "log_every", "checkpoint_every", "eval_every", "eval_limit", "threads",
                          "data", "lc_split"})


def train_ssl(cfg: SSLConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or continue) a DINO run in ``cfg.out`` on the training engine: ``log.csv``,
    ``eval.csv``, ``checkpoints/``, ``final/`` (the teacher encoder).

    Returns ``{"step", "first_loss", "last_loss", "final"}``.

    Example:
        >>> train_ssl(SSLConfig(data="../shared/data", out="runs/ssl", max_steps=3000))  # doctest: +SKIP
    """
    torch.set_num_threads(cfg.threads)
    if resume and not list_checkpoints(cfg.out) and has_checkpoint(cfg.out):
        raise InputError(f"{cfg.out} holds a checkpoint of the pre-engine trainer, which cannot be continued",
                         fix=f"export its encoder: python -m training.ssl --out {cfg.out} --eval-only --export DIR")
    task = SSLTask(cfg)
    final = Engine(task, cfg.out, resume=resume).fit()
    return {"step": cfg.max_steps, "first_loss": task.first_loss, "last_loss": task.last_loss, "final": final}


def _log_eval(log: CsvLog, step: int, res: dict[str, Any]) -> None:
    p, r = res["lc25000_probe"], res["consep_knn"]
    row = {"step": step, "probe_acc": round(p["accuracy"], 4), "probe_bal_acc": round(p["balanced_accuracy"], 4),
           "probe_n_test": p["n_test"], "knn_l1": round(r["knn_l1"], 4), "random_l1": round(r["random_l1"], 4),
           "knn_ratio": round(r["ratio"], 4)}
    log.append(row)
    print(json.dumps(row), file=sys.stderr)


def finalize(cfg: SSLConfig, export: str | None, eval_limit: int) -> dict[str, Any]:
    """Evaluate the teacher of ``cfg.out``'s checkpoint against a random-init ViT of the same
    shape; write ``final_metrics.json``; optionally export the encoder (fp16) for `load_encoder`.

    Example:
        >>> finalize(SSLConfig(out="runs/ssl"), export="runs/ssl/export", eval_limit=0)  # doctest: +SKIP
    """
    torch.set_num_threads(cfg.threads)
    step, weights, saved = latest_weights(cfg.out, "teacher", ema=False)
    cfg = _config_from_dict({**saved, "out": cfg.out, "data": cfg.data, "threads": cfg.threads})
    split = lc25000_split(Path(cfg.data) / "lc25000-lung", cache=cfg.lc_split or Path(cfg.out) / "lc25000_split.json")
    teacher = DINO(cfg)
    teacher.load_state_dict(weights)
    encoder = as_encoder(teacher.backbone, cfg)
    torch.manual_seed(cfg.seed)
    report = {"step": step, "split_method": split["method"],
              "trained": evaluate_encoder(encoder, cfg.data, split, eval_limit),
              "random_init": evaluate_encoder(as_encoder(DINO(cfg).backbone, cfg), cfg.data, split, eval_limit)}
    write_text_atomic(Path(cfg.out) / "final_metrics.json", json.dumps(report, indent=2) + "\n")
    if export:  # fp16 weights: half the bytes in the package; the loader casts back to float32
        copy.deepcopy(encoder).to(torch.float16).save_pretrained(export)
    return report


# --- CLI ------------------------------------------------------------------------------------------
def _config_from_dict(data: dict[str, Any]) -> SSLConfig:
    known = {f.name for f in dataclasses.fields(SSLConfig)}
    data = {k: v for k, v in data.items() if k in known}
    for key in ("global_scale", "local_scale"):
        if key in data:
            data[key] = tuple(data[key])
    return SSLConfig(**data)


def build_parser() -> argparse.ArgumentParser:
    """CLI: scalar `SSLConfig` fields as ``--flags``, ``--depth``/``--width``/``--patch-size``, and
    ``--resume``, ``--eval-only``, ``--export``."""
    p = argparse.ArgumentParser(prog="python -m training.ssl", description=__doc__.split("\n")[0])
    add_dataclass_flags(p, SSLConfig)
    for name in ("depth", "width", "patch_size", "heads"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"ViT {name}")
    add_run_flags(p, " against a random-init ViT", "encoder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m training.ssl``."""
    args = vars(build_parser().parse_args(argv))
    resume, eval_only, export = args.pop("resume"), args.pop("eval_only"), args.pop("export")
    arch = {"depth": args.pop("depth"), "embed_dim": args.pop("width"), "patch_size": args.pop("patch_size"),
            "num_heads": args.pop("heads")}
    base = saved_config(args["out"] or SSLConfig.out, resume or eval_only)
    cfg = _config_from_dict({**base, **{k: v for k, v in args.items() if v is not None}})
    cfg.model_args = {**cfg.model_args, **{k: v for k, v in arch.items() if v is not None}, "img_size": cfg.global_size}
    if eval_only:
        print(json.dumps(finalize(cfg, export, cfg.eval_limit), indent=2))
        return 0
    result = train_ssl(cfg, resume=resume)
    print(json.dumps({k: result[k] for k in ("step", "first_loss", "last_loss")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
