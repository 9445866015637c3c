"""Encoder interface, registry and loaders, on tiny backbones built here (no downloads)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pixgen.encoders import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderSpec,
    get_encoder_spec,
    list_encoders,
    load_encoder,
    loading,
    register_encoder,
    register_loader,
    to_uint8_batch,
)
from pixgen.errors import EncoderMismatchError, InputError, ModelLoadError

TINY = 32  # pixels; tiny ViTs use 16 px (timm) / 8 px (transformers) patches


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory):
    """A random tiny timm ViT saved by timm itself in the Hub layout (config.json + safetensors)."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=TINY, depth=2, num_classes=0)
    path = tmp_path_factory.mktemp("tiny_timm")
    save_for_hf(model, str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny transformers DINOv2 with 2 register tokens, saved with save_pretrained."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        patch_size=8, image_size=TINY, num_register_tokens=2,
    )
    path = tmp_path_factory.mktemp("tiny_hf")
    Dinov2WithRegistersModel(config).save_pretrained(path)
    return path


def _register(monkeypatch, **fields) -> EncoderSpec:
    base = {
        "name": "tiny-timm", "dim": 192, "input_size": TINY, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "mpp": 0.5, "source": "hf-hub:pixgen-tests/tiny-timm", "library": "timm",
        "model_kwargs": {"img_size": TINY, "depth": 2},
    }
    spec = EncoderSpec(**{**base, **fields})
    monkeypatch.setitem(ENCODERS, spec.name, spec)
    return spec


@pytest.fixture
def tiny_timm(monkeypatch, timm_dir) -> Encoder:
    _register(monkeypatch)
    return load_encoder("tiny-timm", local_path=str(timm_dir))


def _images(n: int = 3, size: int = TINY) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)


# --- to_uint8_batch ---------------------------------------------------------------------------
def test_to_uint8_batch_accepts_every_input_kind():
    hwc = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    expected = torch.from_numpy(hwc).permute(2, 0, 1)[None]
    inputs = [
        Image.fromarray(hwc),
        hwc,
        hwc[None],
        expected[0],
        expected,
        [Image.fromarray(hwc), hwc, expected[0]],
    ]
    for item in inputs:
        out = to_uint8_batch(item)
        assert out.dtype == torch.uint8 and out.shape[1:] == (3, 20, 24)
        assert torch.equal(out[:1], expected)
    assert to_uint8_batch(inputs[-1]).shape[0] == 3
    assert to_uint8_batch(Image.fromarray(hwc[..., 0])).shape == (1, 3, 20, 24)  # grayscale PIL -> RGB


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (np.zeros((8, 8, 3), np.float32), ["uint8", "float32"]),
        (torch.rand(1, 3, 8, 8), ["uint8", "float32"]),
        (np.full((8, 8, 3), np.nan, np.float32), ["NaN"]),
        (torch.full((1, 3, 8, 8), float("nan")), ["NaN"]),
        (np.zeros((8, 8, 4), np.uint8), ["shape", "(H, W, 3)"]),
        (np.zeros((8, 8), np.uint8), ["shape"]),
        (torch.zeros(1, 8, 8, 3, dtype=torch.uint8), ["shape", "permute"]),
        ([], ["empty"]),
        (np.zeros((0, 8, 8, 3), np.uint8), ["empty"]),
        ("tile.png", ["str"]),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], ["differ in size"]),
    ],
)
def test_to_uint8_batch_rejects_bad_input_with_a_fix(bad, words):
    with pytest.raises(InputError) as info:
        to_uint8_batch(bad)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert info.value.fix


# --- registry ---------------------------------------------------------------------------------
EXPECTED = {
    "uni": (1024, "cls", "timm", True),
    "uni2-h": (1536, "cls", "timm", True),
    "virchow": (2560, "cls+mean", "timm", True),
    "virchow2": (2560, "cls+mean", "timm", True),
    "h-optimus-0": (1536, "cls", "timm", False),
    "h-optimus-1": (1536, "cls", "timm", True),
    "hibou-b": (768, "cls", "transformers", False),
    "hibou-l": (1024, "cls", "transformers", True),
    "phikon-v2": (1024, "cls", "transformers", False),
    "dinov2-vits14": (384, "cls", "timm", False),
    "dinov2-vitb14": (768, "cls", "timm", False),
    "dinov2-vitl14": (1024, "cls", "timm", False),
    "dinov2-vitg14": (1536, "cls", "timm", False),
}


def test_registry_has_every_foundation_model_with_its_facts():
    specs = list_encoders()
    assert set(EXPECTED) <= {s.name for s in specs} and [str(s) for s in specs] == sorted(ENCODERS)
    for name, (dim, output, library, gated) in EXPECTED.items():
        spec = get_encoder_spec(name)
        assert (spec.dim, spec.output, spec.library, spec.gated) == (dim, output, library, gated), name
        assert spec.input_size == 224 and spec.mpp == 0.5 and spec.licence and spec.description
        assert spec.source.startswith("hf-hub:")
    assert get_encoder_spec("H-optimus-0").mean == (0.707223, 0.578729, 0.703617)
    uni2 = get_encoder_spec("UNI2-h").model_kwargs
    assert uni2["reg_tokens"] == 8 and uni2["mlp_layer"] == "timm.layers.SwiGLUPacked"
    assert get_encoder_spec("virchow2").model_kwargs["reg_tokens"] == 4


def test_unknown_name_lists_known_encoders():
    with pytest.raises(InputError, match="uni2-h") as info:
        load_encoder("uni3-xl")
    assert "unknown encoder 'uni3-xl'" in str(info.value)


def test_register_encoder_refuses_silent_replacement(monkeypatch):
    spec = _register(monkeypatch)
    with pytest.raises(InputError, match="already registered"):
        register_encoder(dataclasses.replace(spec, dim=384))
    assert register_encoder(dataclasses.replace(spec, dim=384), overwrite=True).dim == 384


def test_spec_validation_and_json_round_trip():
    spec = get_encoder_spec("virchow2")
    assert EncoderSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(InputError, match="output"):
        dataclasses.replace(spec, output="mean")
    with pytest.raises(InputError, match="3 values"):
        dataclasses.replace(spec, mean=(0.5, 0.5))


def test_import_is_light():
    code = "import sys, pixgen.encoders; print(any(m in sys.modules for m in ('timm', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- timm encoders ----------------------------------------------------------------------------
def test_timm_encoder_from_local_hub_layout(tiny_timm):
    emb = tiny_timm.embed(_images(5), batch_size=2)
    assert emb.shape == (5, 192) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert (tiny_timm.name, tiny_timm.dim, tiny_timm.input_size, tiny_timm.mpp) == ("tiny-timm", 192, TINY, 0.5)
    assert not tiny_timm.training


def test_cls_plus_mean_doubles_dim_and_starts_with_cls(monkeypatch, timm_dir, tiny_timm):
    _register(monkeypatch, name="tiny-timm-cm", dim=384, output="cls+mean")
    both = load_encoder("tiny-timm-cm", local_path=str(timm_dir))
    images = _images(2)
    emb = both.embed(images)
    assert emb.shape == (2, 384)
    torch.testing.assert_close(emb[:, :192], tiny_timm.embed(images))
    tokens = tiny_timm.backbone.forward_features(tiny_timm.preprocess(images))  # (N, 1 + 4, 192)
    torch.testing.assert_close(emb[:, 192:], tokens[:, 1:].mean(1))


def test_preprocess_resizes_and_normalises(tiny_timm):
    white = np.full((64, 48, 3), 255, np.uint8)
    x = tiny_timm.preprocess(white)
    assert x.shape == (1, 3, TINY, TINY) and x.dtype == torch.float32
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 5, 5], expected)


def test_embed_grid_is_row_major_and_matches_direct_crops(tiny_timm):
    images = _images(2, size=2 * TINY)
    grid = tiny_timm.embed_grid(images, grid=2)
    assert grid.shape == (2, 4, 192)
    crop_01 = images[:, :, :TINY, TINY:]  # row 0, column 1
    torch.testing.assert_close(grid[:, 1], tiny_timm.embed(crop_01), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="3x3 grid"):
        tiny_timm.embed_grid(images, grid=3)


def test_forward_rejects_bad_pixel_values(tiny_timm):
    with pytest.raises(InputError, match=r"\(N, 3, 32, 32\)"):
        tiny_timm(torch.zeros(1, 3, 16, 16))
    with pytest.raises(InputError, match="float tensor"):
        tiny_timm(torch.zeros(1, 3, TINY, TINY, dtype=torch.uint8))
    with pytest.raises(InputError, match="NaN"):
        tiny_timm(torch.full((1, 3, TINY, TINY), float("nan")))
    with pytest.raises(InputError, match="empty"):
        tiny_timm.embed([])
    with pytest.raises(InputError, match="batch_size"):
        tiny_timm.embed(_images(1), batch_size=0)


def test_save_pretrained_round_trip_is_exact(tiny_timm, tmp_path):
    images = _images(3)
    saved = tiny_timm.save_pretrained(tmp_path / "enc")
    assert {"pixgen_encoder.json", "config.json", "model.safetensors"} <= {p.name for p in saved.iterdir()}
    again = load_encoder(str(saved))
    assert again.spec == tiny_timm.spec
    assert torch.equal(again.embed(images), tiny_timm.embed(images))
    # the saved directory is also a plain Hub-layout local_path for the registry name
    assert torch.equal(load_encoder("tiny-timm", local_path=str(saved)).embed(images), tiny_timm.embed(images))


def test_swiglu_layer_kwargs_survive_save(monkeypatch, tmp_path):
    """Layer classes (UNI2-h / Virchow style) live in the spec as dotted paths, not in config.json."""
    import timm
    from timm.models import save_for_hf

    kwargs = {"img_size": TINY, "depth": 1, "reg_tokens": 2, "no_embed_class": True,
              "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=TINY, depth=1,
                              reg_tokens=2, no_embed_class=True, mlp_layer=timm.layers.SwiGLUPacked,
                              act_layer=torch.nn.SiLU)
    save_for_hf(model, str(tmp_path / "hub"), safe_serialization=True,
                model_args={"mlp_layer": None, "act_layer": None})
    _register(monkeypatch, name="tiny-swiglu", dim=384, output="cls+mean", model_kwargs=kwargs)
    enc = load_encoder("tiny-swiglu", local_path=str(tmp_path / "hub"))
    assert enc.backbone.num_prefix_tokens == 3
    images = _images(2)
    again = load_encoder(str(enc.save_pretrained(tmp_path / "saved")))
    assert torch.equal(again.embed(images), enc.embed(images))


# --- transformers encoders --------------------------------------------------------------------
def test_transformers_encoder_loads_and_skips_registers(monkeypatch, hf_dir, tmp_path):
    _register(monkeypatch, name="tiny-hf", dim=64, output="cls+mean", library="transformers", model_kwargs={})
    enc = load_encoder("tiny-hf", local_path=str(hf_dir))
    images = _images(2)
    emb = enc.embed(images)
    assert emb.shape == (2, 64)
    hidden = enc.backbone(pixel_values=enc.preprocess(images)).last_hidden_state  # (N, 1 + 2 + 16, 32)
    torch.testing.assert_close(emb, torch.cat([hidden[:, 0], hidden[:, 3:].mean(1)], -1))
    again = load_encoder(str(enc.save_pretrained(tmp_path / "saved")))
    assert torch.equal(again.embed(images), emb)


# --- the Hub path, offline ----------------------------------------------------------------------
@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """Offline mode with a private, initially empty Hugging Face cache."""
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


def _cache_repo(cache, repo_id: str, files_from) -> None:
    """Lay out a repository in the Hugging Face cache as a download would."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_offline_hub_load_uses_the_cache(monkeypatch, hub_cache, timm_dir, hf_dir):
    _cache_repo(hub_cache, "pixgen-tests/tiny-timm", timm_dir)
    _cache_repo(hub_cache, "pixgen-tests/tiny-hf", hf_dir)
    _register(monkeypatch)
    _register(monkeypatch, name="tiny-hf", dim=32, library="transformers", source="hf-hub:pixgen-tests/tiny-hf",
              model_kwargs={})
    assert load_encoder("tiny-timm").embed(_images(1)).shape == (1, 192)
    assert load_encoder("tiny-hf").embed(_images(1)).shape == (1, 32)


# --- failures that must explain themselves ----------------------------------------------------
def test_gated_model_offline_without_token_explains_access_token_and_local_path(hub_cache):
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_encoder("uni2-h")
    message = str(info.value)
    assert time.monotonic() - start < 10
    assert "https://huggingface.co/MahmoodLab/UNI2-h" in message
    assert all(word in message for word in ("request access", "token", "HF_TOKEN", "local_path", "--encoder-path"))
    assert "offline" in message


def test_transformers_offline_failure_is_a_model_load_error(hub_cache):
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="local_path") as info:
        load_encoder("phikon-v2")
    assert time.monotonic() - start < 10
    assert "request access" not in str(info.value)  # not gated


def test_local_path_problems_are_model_load_errors(monkeypatch, tmp_path, tiny_timm):
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_encoder("tiny-timm", local_path=str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_encoder("tiny-timm", local_path=str(tmp_path))
    with pytest.raises(ModelLoadError, match="pixgen_encoder.json"):
        load_encoder(str(tmp_path))
    other = tiny_timm.save_pretrained(tmp_path / "tiny")
    with pytest.raises(EncoderMismatchError, match="holds encoder 'tiny-timm'"):
        load_encoder("uni2-h", local_path=str(other))


def test_wrong_width_weights_are_refused(monkeypatch, timm_dir):
    _register(monkeypatch, name="tiny-wrong", dim=1024)
    with pytest.raises(ModelLoadError, match="token width 192"):
        load_encoder("tiny-wrong", local_path=str(timm_dir))


# --- loader hooks -----------------------------------------------------------------------------
class _ToyEncoder(Encoder):
    def forward_tokens(self, pixel_values):
        tokens = self.backbone(pixel_values).flatten(2).transpose(1, 2)  # (N, P, 4)
        return tokens.mean(1), tokens


def test_register_loader_plugs_in_a_new_library(monkeypatch):
    spec = _register(monkeypatch, name="toy", dim=4, library="toy-lib", source="bundled", model_kwargs={})
    monkeypatch.setitem(loading._LOADERS, "toy-lib", None)  # restored after the test
    seen = {}

    def load_toy(spec, local_path, token):
        seen.update(local_path=local_path, token=token)
        return _ToyEncoder(spec, torch.nn.Conv2d(3, 4, 8, stride=8))

    register_loader("toy-lib", load_toy)
    enc = load_encoder("toy", token="t", dtype="float64")
    assert seen == {"local_path": None, "token": "t"} and enc.dtype == torch.float64
    assert enc.embed(_images(2)).shape == (2, 4)
    monkeypatch.setitem(ENCODERS, "toy2", dataclasses.replace(spec, name="toy2", library="nope"))
    with pytest.raises(ModelLoadError, match="register_loader"):
        load_encoder("toy2")
