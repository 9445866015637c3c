"""Detectors: the random-conv sanity detector, Inception (local weights / offline error), encoders."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from metrics.detectors import (
    URL_INCEPTION_V3,
    EncoderDetector,
    InceptionDetector,
    RandomConvDetector,
    compute_features,
    get_detector,
    list_detectors,
)
from pixgen.errors import InputError, ModelLoadError


def _images(n: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_random_conv_is_deterministic_and_resizes():
    a = RandomConvDetector(seed=0)(_images())
    b = get_detector("random-conv", seed=0)(_images())
    assert a.shape == (3, 256) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, RandomConvDetector(seed=1)(_images()))
    # resize policy: any input size goes to 128 px with antialias
    assert RandomConvDetector()(_images(size=300)).shape == (3, 256)


def test_detectors_refuse_non_uint8_input():
    with pytest.raises(InputError, match="uint8"):
        RandomConvDetector()(torch.zeros(1, 3, 8, 8))


def test_compute_features_batches_mixed_sizes():
    ims = [np.zeros((32, 32, 3), np.uint8), np.zeros((48, 40, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)]
    feats = compute_features(RandomConvDetector(), ims, batch_size=2)
    assert feats.shape == (3, 256)
    assert np.allclose(feats[0], compute_features(RandomConvDetector(), ims[:1])[0], atol=1e-6)


def test_list_detectors_names_registry_encoders():
    names = list_detectors()
    assert {"inception", "random-conv"} <= set(names)
    assert all(isinstance(n, str) for n in names) and any(n.startswith("encoder:") for n in names)


def test_unknown_detector_names_the_choices():
    with pytest.raises(InputError, match="random-conv"):
        get_detector("fid")


def test_inception_offline_without_weights_says_which_option_to_use(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache

    def blocked(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(socket, "create_connection", blocked)
    with pytest.raises(ModelLoadError, match="--inception-weights"):
        get_detector("inception")
    with pytest.raises(ModelLoadError, match="not found"):
        get_detector("inception", inception_weights=str(tmp_path / "missing.pth"))


def test_inception_from_a_local_weights_file(monkeypatch, tmp_path):
    """A random-weight state dict in the layout of the standard file loads through the local path."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with monkeypatch.context() as m, torch.device("meta"):  # shapes only, no init cost
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        shapes = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    gen = torch.Generator().manual_seed(0)
    state = {
        k: torch.ones(v.shape) if k.endswith("running_var")
        else torch.zeros(v.shape, dtype=v.dtype) if k.endswith(("running_mean", "num_batches_tracked"))
        else torch.randn(v.shape, generator=gen) * 0.05
        for k, v in shapes.items()
    }
    assert tfi.URL_INCEPTION_V3 == URL_INCEPTION_V3  # the copy used to find/download the file
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    det = get_detector("inception", inception_weights=str(path))
    assert isinstance(det, InceptionDetector) and det.dim == 2048
    feats = det(_images(2, size=224))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


def test_encoder_detector_over_a_pixgen_encoder(monkeypatch, tmp_path):
    timm = pytest.importorskip("timm")
    from timm.models import save_for_hf

    from pixgen.encoders import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=0)
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    spec = EncoderSpec(
        name="tiny-timm-metrics", dim=192, input_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5,
        source="hf-hub:pixgen-tests/tiny-timm", library="timm", model_kwargs={"img_size": 32, "depth": 1},
    )
    monkeypatch.setitem(ENCODERS, spec.name, spec)
    det = get_detector(f"encoder:tiny-timm-metrics@{tmp_path}")
    assert isinstance(det, EncoderDetector) and det.name == "tiny-timm-metrics" and det.dim == 192
    assert det(_images(2)).shape == (2, 192)
