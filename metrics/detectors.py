"""Detectors: networks that turn images into feature vectors for the fidelity metrics.

One interface (edm2-style): ``detector(images) -> (N, D) float32 features`` where ``images``
is a uint8 NCHW tensor of RGB images in [0, 255]. Each detector owns a fixed, documented
preprocessing; no detector ever JPEG-encodes its input.

==================  =====  ===================================================================
name                D      preprocessing
==================  =====  ===================================================================
``inception``       2048   bilinear resize with antialias to 299x299 (torchmetrics'
                           ``NoTrainInceptionV3(antialias=True)``), then (x - 128) / 128;
                           pool3 features of the TF-2015 Inception-v3 (classic FID)
``encoder:NAME``    enc    the pixgen encoder's own preprocessing (``load_encoder(NAME)``);
                           ``encoder:NAME@PATH`` loads the weights from a local path;
                           ``encoder:DIR`` an encoder saved with ``save_pretrained``
``classifier:DIR``  128    bilinear resize with antialias to 64x64, x / 127.5 - 1; pooled
                           penultimate features of a small CNN tissue classifier trained
                           from scratch with labels (``metrics.classifier``), independent
                           of the generator's conditioning encoder
``random-conv``     256    bilinear resize with antialias to 128x128, x / 127.5 - 1, then a
                           4-layer conv net with fixed seeded random weights. A SANITY
                           detector for tests and offline smoke runs only: its numbers are
                           not comparable with any published FD
==================  =====  ===================================================================

Default choice (``pixgen eval`` without ``--detectors``, `default_detectors`): ``inception`` when
its weights are on disk (``--inception-weights`` or the torch hub cache); otherwise, offline, the
bundled encoder ``encoder:pixgen-ssl`` plus, when ``metrics/weights/detector-cnn`` exists, the
bundled CNN ``classifier:`` detector (trained with labels, independent of the generator's encoder).
The report's first lines say which were used and why.

Example:
    >>> det = get_detector("random-conv")
    >>> det(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape
    torch.Size([2, 256])
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pixgen.errors import InputError, ModelLoadError

# torch-fidelity's URL_INCEPTION_V3 (the TF-2015 FID weights converted to PyTorch); kept here so
# that resolving the file does not import torch-fidelity.
URL_INCEPTION_V3 = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILES = (Path(URL_INCEPTION_V3).name, "pt_inception-2015-12-05-6726825d.pth")
BUNDLED_ENCODER = "encoder:pixgen-ssl"
BUNDLED_CNN_DIR = Path(__file__).resolve().parent / "weights" / "detector-cnn"

__all__ = [
    "Detector",
    "RandomConvDetector",
    "InceptionDetector",
    "EncoderDetector",
    "get_detector",
    "list_detectors",
    "compute_features",
    "default_detectors",
    "inception_weights_on_disk",
]


def _check_uint8_nchw(images: torch.Tensor) -> None:
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        dtype = getattr(images, "dtype", "?")
        raise InputError(f"detectors take a uint8 (N, 3, H, W) tensor, got {shape} of {dtype}")


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images resized to ``size`` x ``size`` with bilinear interpolation and antialias."""
    x = images.float()
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class Detector:
    """Base class: ``name``, ``dim`` and ``__call__(uint8 NCHW) -> (N, dim) float32``."""

    name: str = "detector"
    dim: int = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_uint8_nchw(images)
        with torch.no_grad():
            return self.features(images).float().cpu()

    def features(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


class RandomConvDetector(Detector):
    """A weight-free, deterministic sanity detector: a conv net with seeded random weights.

    Four 3x3 stride-2 convolutions (3 -> 32 -> 64 -> 128 -> 256 channels, ReLU, He-scaled
    Gaussian weights from ``torch.Generator().manual_seed(seed)``), global average pooling.
    It is sensitive to colour, texture and noise, and knows nothing about tissue: use it for
    tests and offline smoke runs, never as evidence of image quality.

    Example:
        >>> RandomConvDetector(seed=0)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape
        torch.Size([1, 256])
    """

    name = "random-conv"
    input_size = 128
    widths = (3, 32, 64, 128, 256)

    def __init__(self, seed: int = 0, device: str | torch.device | None = None):
        self.device = torch.device(device or "cpu")
        gen = torch.Generator().manual_seed(seed)
        self.weights = []
        for c_in, c_out in zip(self.widths[:-1], self.widths[1:]):
            w = torch.randn(c_out, c_in, 3, 3, generator=gen) * math.sqrt(2.0 / (9 * c_in))
            self.weights.append(w.to(self.device))
        self.dim = self.widths[-1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = resize(images.to(self.device), self.input_size) / 127.5 - 1.0  # (N, 3, 128, 128)
        for w in self.weights:
            x = F.relu(F.conv2d(x, w, stride=2, padding=1))  # (N, C, H/2, W/2)
        return x.mean(dim=(2, 3))  # (N, 256)


class InceptionDetector(Detector):
    """Classic FID features: 2048-d pool3 of the TF-2015 Inception-v3 (via torchmetrics).

    ``weights_path``: the standard converted weights file, torch-fidelity's
    ``weights-inception-2015-12-05-6726825d.pth`` (pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth`` carries the same hash suffix; that the two are
    interchangeable was not verified offline -- a state dict that does not match fails the
    strict load with a :class:`ModelLoadError`). Without it the file is taken from the torch
    hub cache, or downloaded there once; offline that fails with a :class:`ModelLoadError`
    naming ``--inception-weights``.

    Example:
        >>> det = InceptionDetector("pt_inception-2015-12-05-6726825d.pth")   # doctest: +SKIP
    """

    name = "inception"
    dim = 2048
    input_size = 299

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device | None = None):
        if weights_path is not None and not Path(weights_path).is_file():
            raise ModelLoadError(
                f"Inception weights not found at {weights_path}",
                fix="pass --inception-weights PATH to the pt_inception-2015-12-05-6726825d.pth file",
            )
        path = Path(weights_path) if weights_path is not None else _cached_inception_weights()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as err:  # torch-fidelity missing
            raise ModelLoadError(
                f"the Inception detector needs torchmetrics and torch-fidelity ({err})",
                fix="pip install torch-fidelity",
            ) from err
        try:
            model = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path), antialias=True
            )
        except TypeError as err:  # an older torchmetrics: no antialias option
            import torchmetrics

            raise ModelLoadError(
                f"torchmetrics {torchmetrics.__version__} cannot resize with antialias for Inception ({err})",
                fix="pip install -U torchmetrics",
            ) from err
        except Exception as err:  # corrupt file, another network's state dict ...
            raise ModelLoadError(
                f"could not load Inception-v3 FID weights from {path}: {type(err).__name__}: {err}",
                fix="pass --inception-weights PATH to the pt_inception-2015-12-05-6726825d.pth file",
            ) from err
        self.device = torch.device(device or "cpu")
        self.model = model.to(self.device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images.to(self.device))  # resize to 299 with antialias inside
        return out[0] if isinstance(out, (tuple, list)) else out  # (N, 2048)


def inception_weights_on_disk(weights_path: str | Path | None = None) -> Path | None:
    """The Inception-v3 FID weights file: ``weights_path`` if it exists, else one in the torch hub
    cache, else None. Never downloads."""
    if weights_path is not None:
        return Path(weights_path) if Path(weights_path).is_file() else None
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return next((folder / name for name in INCEPTION_FILES if (folder / name).is_file()), None)


def default_detectors(inception_weights: str | Path | None = None) -> tuple[list[str], str]:
    """(detector names, why) for an evaluation that names none; works offline.

    Inception (classic FID) where its weights are on disk; otherwise the bundled encoder and,
    when shipped, the bundled CNN detector.

    Example:
        >>> names, why = default_detectors()
        >>> names[0] in ("inception", "encoder:pixgen-ssl")
        True
    """
    if inception_weights is not None:  # asked for: a missing file is an error, not a fallback
        return ["inception"], f"--inception-weights {inception_weights} given (classic FID, comparable with papers)"
    found = inception_weights_on_disk()
    if found is not None:
        return ["inception"], f"Inception-v3 FID weights found at {found} (classic FID, comparable with papers)"
    names = [BUNDLED_ENCODER]
    why = (f"no Inception-v3 FID weights on disk ({Path(torch.hub.get_dir()) / 'checkpoints'}), "
           f"so the bundled encoder pixgen-ssl is used (it also conditions the bundled generator, so it may favour it)")
    if BUNDLED_CNN_DIR.is_dir():
        names.append(f"classifier:{BUNDLED_CNN_DIR}")
        why += " with the bundled CNN detector (trained on labels, independent of the generator)"
    else:
        why += "; no bundled independent detector is installed"
    return names, why + "; numbers are not comparable with published FIDs (pass --inception-weights PATH for those)"


def _cached_inception_weights() -> Path:
    """The weights file in the torch hub cache, downloaded there first if missing (needs network)."""
    found = inception_weights_on_disk()
    if found is not None:
        return found
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    target = folder / Path(URL_INCEPTION_V3).name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(target), progress=False)
    except Exception as err:  # offline, proxy, read-only cache ...
        raise ModelLoadError(
            f"no Inception-v3 FID weights in {folder} and the download failed ({type(err).__name__}: {err})",
            fix="pass --inception-weights PATH to the pt_inception-2015-12-05-6726825d.pth file "
            "(or use --detectors random-conv / encoder:NAME offline)",
        ) from err
    return target


class EncoderDetector(Detector):
    """Features from any pixgen SSL encoder (``pixgen.encoders.load_encoder``).

    Preprocessing (resize, normalisation, mpp) is the encoder's own, as its spec states.

    Example:
        >>> det = EncoderDetector.load("uni2-h", local_path="/models/uni2-h")   # doctest: +SKIP
    """

    def __init__(self, encoder):
        self.encoder = encoder
        self.name = str(encoder.spec.name)
        self.dim = int(encoder.dim)

    @classmethod
    def load(cls, name: str, local_path: str | None = None, token: str | None = None, device=None,
             trust_remote_code: bool = False) -> "EncoderDetector":
        from pixgen.encoders import load_encoder

        return cls(load_encoder(name, local_path=local_path, token=token, device=device, trust_remote_code=trust_remote_code))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.encoder.embed(images)  # (N, dim)
        return out.float().cpu() if torch.is_tensor(out) else torch.as_tensor(np.asarray(out), dtype=torch.float32)


def list_detectors() -> list[str]:
    """Detector names that ``get_detector`` accepts (encoders as ``encoder:NAME``;
    ``classifier:DIR`` stands for any folder written by ``metrics.classifier``)."""
    names = ["inception", "random-conv", "classifier:DIR"]
    try:
        from pixgen.encoders import list_encoders

        names += [f"encoder:{getattr(spec, 'name', spec)}" for spec in list_encoders()]
    except ImportError:  # encoder registry not available
        pass
    return names


def get_detector(
    name: str,
    *,
    inception_weights: str | Path | None = None,
    token: str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> Detector:
    """A detector by name: ``inception``, ``random-conv``, ``encoder:NAME``, ``encoder:NAME@PATH``
    (registry encoder, weights from a local directory), ``encoder:DIR`` (a saved encoder) or
    ``classifier:DIR`` (a tissue classifier trained by ``metrics.classifier``). ``trust_remote_code``:
    see :func:`pixgen.encoders.load_encoder` (the caller's flag, never a folder's).

    Example:
        >>> get_detector("random-conv").name
        'random-conv'
        >>> get_detector("encoder:uni2-h@/models/uni2-h")       # doctest: +SKIP
        >>> get_detector("classifier:runs/detector-cnn").dim    # doctest: +SKIP
        128
    """
    if name == "inception":
        return InceptionDetector(inception_weights, device=device)
    if name == "random-conv":
        return RandomConvDetector(seed=seed, device=device)
    if name.startswith("encoder:"):
        enc_name, _, local_path = name[len("encoder:") :].partition("@")
        if not enc_name:
            raise InputError(f"detector {name!r} names no encoder", fix="use encoder:NAME or encoder:NAME@PATH")
        return EncoderDetector.load(enc_name, local_path=local_path or None, token=token, device=device,
                                    trust_remote_code=trust_remote_code)
    if name.startswith("classifier:"):
        from metrics.classifier import ClassifierDetector  # imports this module

        folder = name[len("classifier:") :]
        if not folder:
            raise InputError(f"detector {name!r} names no folder", fix="use classifier:DIR, DIR written by python -m metrics.classifier")
        return ClassifierDetector(folder, device=device)
    raise InputError(
        f"unknown detector {name!r}",
        fix="use inception, random-conv, encoder:NAME, encoder:NAME@LOCAL_PATH or classifier:DIR",
    )


def compute_features(detector: Detector, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """(N, D) float64 features of HWC uint8 images; consecutive same-size images share a batch.

    Example:
        >>> compute_features(get_detector("random-conv"), [np.zeros((32, 32, 3), np.uint8)]).shape
        (1, 256)
    """
    from metrics.images import to_nchw

    feats, batch = [], []

    def flush() -> None:
        if batch:
            feats.append(detector(to_nchw(batch)).numpy().astype(np.float64))
            batch.clear()

    for im in images:
        if batch and (im.shape != batch[0].shape or len(batch) == batch_size):
            flush()
        batch.append(im)
    flush()
    if not feats:
        return np.zeros((0, detector.dim))
    return np.concatenate(feats)
