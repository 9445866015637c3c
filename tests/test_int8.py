"""Weight-only int8 storage (pixgen.io.int8): exact round-trip bounds, strict loading, clear errors."""

import numpy as np
import pytest
import torch

from pixgen.errors import ModelLoadError
from pixgen.io.int8 import INT8_WEIGHTS, SCALE_SUFFIX, dequantize, load_model, quantize, save_int8
from pixgen.models.transformer import PixgenTransformer
from pixgen.pipeline import Generator
from pixgen.testing import save_tiny_model, tiny_transformer


def test_quantize_error_is_at_most_half_a_step_per_row():
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different magnitude
    stored = quantize({"w": w, "b": torch.randn(64)})
    assert stored["w"].dtype == torch.int8 and stored["b"].dtype == torch.float16
    back = dequantize(stored)
    step = w.abs().amax(1) / 127
    assert ((back["w"] - w).abs().amax(1) <= step / 2 + 1e-7).all()
    assert set(back) == {"w", "b"}


def test_saved_int8_model_loads_strictly_and_predicts_like_the_original(tmp_path):
    model = tiny_transformer(seed=1).eval()
    save_int8(model, tmp_path / "t")
    loaded = load_model(PixgenTransformer, tmp_path / "t")
    fp16_bytes = sum(v.numel() * 2 for v in model.state_dict().values())
    assert (tmp_path / "t" / INT8_WEIGHTS).stat().st_size < 0.7 * fp16_bytes  # tiny model: headers and fp16 biases weigh more than in a real one
    x = torch.randn(2, model.config.in_channels, 8, 8)
    t = torch.tensor([500.0, 20.0])
    cond = torch.randn(2, model.config.caption_num_tokens, model.config.caption_channels)
    with torch.no_grad():
        a = model(x, t, cond).sample
        b = loaded(x, t, cond).sample
    assert torch.allclose(a, b, atol=0.05 * a.abs().max().item())
    assert not torch.equal(a, b)  # it really is the quantized copy


def test_generator_folder_with_int8_transformer_generates(tmp_path):
    root = save_tiny_model(tmp_path / "m")
    ref = Generator.from_pretrained(root)
    (root / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    save_int8(ref.transformer, root / "transformer")
    gen = Generator.from_pretrained(root)
    kw = dict(label=None, num_images=2, seed=0, num_inference_steps=4, output_type="np", progress=False)
    a = np.asarray(ref.generate(**kw).images, dtype=float)
    b = np.asarray(gen.generate(**kw).images, dtype=float)
    assert np.abs(a - b).mean() < 3.0  # of 255


def test_missing_scale_and_wrong_config_are_clear_errors(tmp_path):
    stored = quantize({"w": torch.randn(64, 32)})
    del stored["w" + SCALE_SUFFIX]
    with pytest.raises(ModelLoadError, match="no scale"):
        dequantize(stored)
    save_int8(tiny_transformer(seed=0), tmp_path / "t")
    big = tiny_transformer(seed=0, num_layers=3)
    big.save_config(tmp_path / "t")
    with pytest.raises(ModelLoadError, match="does not match"):
        load_model(PixgenTransformer, tmp_path / "t")
    (tmp_path / "t" / INT8_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="could not read"):
        load_model(PixgenTransformer, tmp_path / "t")
