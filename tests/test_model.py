"""The diffusion transformer: shapes, init identities, conditioning, presets, checkpointing."""

from __future__ import annotations

import pytest
import torch

from pixgen.errors import EncoderMismatchError, InputError
from pixgen.models.transformer import PRESETS, PixgenTransformer, grid_pos_embed
from pixgen.testing import tiny_transformer


def _inputs(batch=2, tokens=1, dim=32, size=8):
    return torch.randn(batch, 4, size, size), torch.tensor([10.0, 700.0][:batch]), torch.randn(batch, tokens, dim)


def test_output_shapes_velocity_and_learned_sigma():
    x, t, y = _inputs()
    assert tiny_transformer()(x, t, y).sample.shape == (2, 4, 8, 8)
    model = tiny_transformer(out_channels=8, prediction_type="epsilon")
    assert model.learned_sigma
    assert model(x, t, y).sample.shape == (2, 8, 8, 8)


def test_larger_latent_than_sample_size_is_accepted():
    x, t, y = _inputs(size=16)
    assert tiny_transformer()(x, t, y).sample.shape == (2, 4, 16, 16)


def test_zero_init_output_is_zero_and_condition_free():
    model = PixgenTransformer.from_preset("pixgen-tiny", caption_channels=32, sample_size=8)
    x, t, y = _inputs()
    assert model(x, t, y).sample.abs().max() == 0  # final projection starts at zero
    with torch.no_grad():
        torch.nn.init.normal_(model.proj_out.weight, std=0.1)
    a = model(x, t, y).sample
    b = model(x, t, torch.randn_like(y)).sample
    assert a.abs().max() > 0
    torch.testing.assert_close(a, b)  # zero cross-attention outputs: condition has no effect yet


def test_condition_changes_output_after_training_init():
    model = tiny_transformer()
    x, t, y = _inputs()
    assert not torch.allclose(model(x, t, y).sample, model(x, t, y + 1).sample)


def test_batch_of_one_equals_batched():
    model = tiny_transformer()
    x, t, y = _inputs()
    batched = model(x, t, y).sample
    for i in range(2):
        torch.testing.assert_close(model(x[i : i + 1], t[i : i + 1], y[i : i + 1]).sample, batched[i : i + 1], atol=1e-5, rtol=1e-5)


def test_drop_condition_uses_null_embedding():
    model = tiny_transformer()
    x, t, y = _inputs()
    dropped = model(x, t, y, drop_condition=torch.tensor([True, False])).sample
    null = model.null_condition(2)
    torch.testing.assert_close(dropped[:1], model(x[:1], t[:1], null[:1]).sample)
    torch.testing.assert_close(dropped[1:], model(x[1:], t[1:], y[1:]).sample)


def test_any_number_of_tokens_without_grid():
    model = tiny_transformer()
    x, t, _ = _inputs()
    assert model(x, t, torch.randn(2, 5, 32)).sample.shape == (2, 4, 8, 8)


def test_grid_tokens_get_position_embedding():
    """The fixed grid table is added to the tokens before projection: zeroing it changes the
    output, and adding it by hand to the tokens of the zeroed model restores it."""
    model = tiny_transformer(caption_num_tokens=16)
    assert model.y_pos_embed is not None and model.y_pos_embed.y_pos_embed.shape == (1, 16, 32)
    pe = grid_pos_embed(32, 16, base_size=4)
    assert pe.shape == (16, 32) and len({tuple(r.tolist()) for r in pe}) == 16
    torch.testing.assert_close(model.y_pos_embed.y_pos_embed[0], pe)
    x, t, _ = _inputs()
    y = torch.randn(2, 1, 32).expand(2, 16, 32)  # same embedding in every cell: only position differs
    with_pe = model(x, t, y).sample
    table = model.y_pos_embed.y_pos_embed.clone()
    model.y_pos_embed.y_pos_embed.zero_()
    assert not torch.allclose(model(x, t, y).sample, with_pe, atol=1e-4)
    torch.testing.assert_close(model(x, t, y + table).sample, with_pe, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="grid of 16 condition tokens"):
        model(x, t, torch.randn(2, 4, 32))


def test_wrong_condition_dim_is_refused_with_encoder_name():
    model = tiny_transformer()
    x, t, _ = _inputs()
    with pytest.raises(EncoderMismatchError, match="dim 16, this model expects 32.*tiny-test"):
        model(x, t, torch.randn(2, 1, 16))


def test_controlnet_residuals_are_added_per_block():
    model = tiny_transformer()
    x, t, y = _inputs()
    base = model(x, t, y).sample
    zeros = [torch.zeros(2, 16, model.inner_dim)] * 2
    torch.testing.assert_close(model(x, t, y, controlnet_block_samples=zeros).sample, base)
    ones = [torch.ones(2, 16, model.inner_dim)] * 2
    assert not torch.allclose(model(x, t, y, controlnet_block_samples=ones).sample, base)


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny_transformer().train()
    x, t, y = _inputs()
    model(x, t, y).sample.square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(ref) > 20
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(x, t, y).sample.square().mean().backward()
    for n, p in model.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n])


def test_presets_and_unknown_preset():
    assert set(PRESETS) >= {"pixgen-tiny", "pixgen-S/2", "pixgen-B/2", "pixgen-XL/2"}
    xl = PRESETS["pixgen-XL/2"]
    assert xl["num_layers"] == 28 and xl["num_attention_heads"] * xl["attention_head_dim"] == 1152
    with pytest.raises(InputError, match="unknown preset"):
        PixgenTransformer.from_preset("pixgen-huge")


def test_save_load_bit_identical(tmp_path):
    model = tiny_transformer(caption_num_tokens=4, out_channels=8, prediction_type="epsilon")
    model.save_pretrained(tmp_path)
    loaded = PixgenTransformer.from_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x, t, _ = _inputs()
    y = torch.randn(2, 4, 32)
    assert torch.equal(model(x, t, y).sample, loaded(x, t, y).sample)
