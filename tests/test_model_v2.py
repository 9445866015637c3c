"""The hourglass generator (``conv_channels``): forward contract, init, conditioning, save/load,
learning, the trainer and ``Generator`` unchanged around it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixgen.errors import InputError
from pixgen.models.controlnet import PixgenControlNet
from pixgen.models.transformer import PRESETS, PixgenTransformer
from pixgen.pipeline import Generator
from pixgen.testing import TINY_ENCODER_DIM, tiny_autoencoder, tiny_encoder


def hourglass(seed: int = 0, perturb: bool = True, **overrides) -> PixgenTransformer:
    """``pixgen-tiny-H`` on 8x8 latents (conv stages at 8x8 and 4x4, 2x2 tokens of patch 2)."""
    torch.manual_seed(seed)
    config = dict(in_channels=4, sample_size=8, patch_size=2, caption_channels=TINY_ENCODER_DIM, encoder_name="tiny-test")
    model = PixgenTransformer.from_preset("pixgen-tiny-H", **{**config, **overrides})
    if perturb:  # leave the zero-init identities behind so outputs depend on every input
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _inputs(batch: int = 2, size: int = 8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([10.0, 700.0][:batch]),
            torch.randn(batch, 1, TINY_ENCODER_DIM, generator=g))


def test_forward_contract_shapes_tokens_and_tuple_output():
    model = hourglass()
    x, t, y = _inputs()
    out = model(x, t, y)
    assert out.sample.shape == (2, 4, 8, 8)
    assert model.pos_embed.height * model.pos_embed.width == 4  # 8x8 latents -> 4x4 map -> 2x2 tokens
    torch.testing.assert_close(model(x, t, y, return_dict=False)[0], out.sample)
    assert model(x, torch.tensor(10.0), y).sample.shape == (2, 4, 8, 8)  # scalar timestep
    assert model(*_inputs(size=16)).sample.shape == (2, 4, 16, 16)  # larger latents than sample_size
    learned = hourglass(out_channels=8, prediction_type="epsilon")
    assert learned.learned_sigma and learned(x, t, y).sample.shape == (2, 8, 8, 8)


def test_zero_init_output_is_zero_but_features_flow():
    model = PixgenTransformer.from_preset("pixgen-tiny-H", in_channels=4, sample_size=8, patch_size=2,
                                          caption_channels=TINY_ENCODER_DIM)
    x, t, y = _inputs()
    assert model(x, t, y).sample.abs().max() == 0  # the output conv starts at zero
    assert model.proj_out.weight.abs().max() > 0  # ... but the token path does not, so it learns from step 1
    model(x, t, y).sample.sum().backward()
    assert model.conv_stages.conv_out.weight.grad.abs().max() > 0


def test_condition_and_timestep_change_the_output():
    model = hourglass()
    x, t, y = _inputs()
    base = model(x, t, y).sample
    assert not torch.allclose(base, model(x, t, y + 1).sample)
    assert not torch.allclose(base, model(x, t + 100, y).sample)


def test_drop_condition_uses_null_embedding_and_changes_output():
    model = hourglass()
    x, t, y = _inputs()
    dropped = model(x, t, y, drop_condition=torch.tensor([True, False])).sample
    null = model.null_condition(2)
    torch.testing.assert_close(dropped[:1], model(x[:1], t[:1], null[:1]).sample)
    torch.testing.assert_close(dropped[1:], model(x[1:], t[1:], y[1:]).sample)
    assert not torch.allclose(dropped[:1], model(x[:1], t[:1], y[:1]).sample)


def test_batch_of_one_equals_batched():
    model = hourglass()
    x, t, y = _inputs()
    batched = model(x, t, y).sample
    for i in range(2):
        torch.testing.assert_close(model(x[i:i + 1], t[i:i + 1], y[i:i + 1]).sample, batched[i:i + 1],
                                   atol=1e-5, rtol=1e-5)


def test_controlnet_residuals_reach_the_token_blocks():
    model = hourglass()
    x, t, y = _inputs()
    zero = [torch.zeros(2, 4, model.inner_dim)]
    torch.testing.assert_close(model(x, t, y, controlnet_block_samples=zero).sample, model(x, t, y).sample)
    assert not torch.allclose(model(x, t, y, controlnet_block_samples=[torch.ones(2, 4, model.inner_dim)]).sample,
                              model(x, t, y).sample)


def test_hourglass_controlnet_starts_at_zero_then_steers_the_finest_skip(tmp_path):
    base = hourglass()
    x, t, y = _inputs()
    masks = torch.rand(2, 6, 32, 32)  # pixel-grid control channels, 4x the 8x8 latents
    cn = PixgenControlNet.from_transformer(base, num_layers=1, conditioning_channels=6, conditioning_downsample=4)
    assert not hasattr(cn.conv_stages, "up_resnets") and cn.cond_pos_embed is None  # down half only, no token entry
    torch.testing.assert_close(cn.conv_stages.conv_in.weight, base.conv_stages.conv_in.weight)  # copied from the base
    out = cn(x, t, y, masks)
    assert [r.shape for r in out.controlnet_skip_samples] == [(2, 16, 8, 8), (2, 32, 4, 4)]
    torch.testing.assert_close(base(x, t, y, **out.residuals()).sample, base(x, t, y).sample)  # zero-initialised

    with torch.no_grad():  # a trained entry conv + finest skip conv: the mask now changes the prediction
        torch.nn.init.normal_(cn.cond_conv_in.weight, std=0.1)
        torch.nn.init.normal_(cn.controlnet_skip_blocks[0].weight, std=0.1)
        steered = base(x, t, y, **cn(x, t, y, masks).residuals()).sample
        other = base(x, t, y, **cn(x, t, y, torch.zeros_like(masks)).residuals()).sample
    assert not torch.allclose(steered, other)
    cn.save_pretrained(tmp_path / "cn")
    loaded = PixgenControlNet.from_pretrained(tmp_path / "cn").eval()
    with torch.no_grad():
        torch.testing.assert_close(base(x, t, y, **loaded(x, t, y, masks).residuals()).sample, steered)


def test_save_load_round_trip(tmp_path):
    model = hourglass()
    model.save_pretrained(tmp_path / "m")
    loaded = PixgenTransformer.from_pretrained(tmp_path / "m").eval()
    assert tuple(loaded.config.conv_channels) == (16, 32) and loaded.conv_stages is not None
    x, t, y = _inputs()
    torch.testing.assert_close(loaded(x, t, y).sample, model(x, t, y).sample)


def test_invalid_hourglass_is_refused():
    with pytest.raises(InputError, match="multiple of 8"):  # 2 conv stages x patch 4
        PixgenTransformer.from_preset("pixgen-tiny-H", sample_size=4, patch_size=4, caption_channels=32)
    with pytest.raises(InputError, match="conv_groups"):
        PixgenTransformer.from_preset("pixgen-tiny-H", sample_size=8, patch_size=2, caption_channels=32, conv_groups=32)


def test_presets_registered_and_bundle_sized():
    assert PRESETS["pixgen-XS-H"]["conv_channels"] == (64, 128)
    with torch.device("meta"):
        model = PixgenTransformer.from_preset("pixgen-XS-H", sample_size=32, patch_size=2, caption_channels=192)
    params = sum(p.numel() for p in model.parameters())
    assert 2 * params / 1e6 < 18.2 + 26  # fp16 MB: within what the current generator frees + the free budget


def test_tiny_overfit_loss_decreases():
    """Rectified-flow training on 4 fixed latents: the loss falls well below its start."""
    model = PixgenTransformer.from_preset("pixgen-tiny-H", in_channels=4, sample_size=8, patch_size=2,
                                          caption_channels=TINY_ENCODER_DIM).train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g).sign()  # a structured target: +-1 per latent pixel
    cond = torch.randn(4, 1, TINY_ENCODER_DIM, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads, losses = torch.get_num_threads(), []
    torch.set_num_threads(1)  # tiny ops: a second thread only waits on the first on a shared CPU
    try:
        for _ in range(80):
            s = torch.rand(4, generator=g)[:, None, None, None]
            noise = torch.randn(x0.shape, generator=g)
            pred = model((1 - s) * x0 + s * noise, s.flatten() * 1000, cond).sample
            loss = (pred - (noise - x0)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:10]), (np.mean(losses[:10]), np.mean(losses[-20:]))


def test_generator_samples_with_the_hourglass_and_round_trips(tmp_path):
    gen = Generator(hourglass(), tiny_autoencoder(), encoder=tiny_encoder(),
                    config={"guidance_scale": 2.0, "num_inference_steps": 3, "mpp": 0.5, "encoder_path": "encoder"})
    cond = torch.randn(2, 1, TINY_ENCODER_DIM, generator=torch.Generator().manual_seed(3))
    a = gen.generate(embeddings=cond, seed=5, output_type="np", progress=False)
    assert a.images.shape == (2, 32, 32, 3) and a.images.std() > 0
    gen.save_pretrained(tmp_path / "gen")
    b = Generator.from_pretrained(tmp_path / "gen").generate(embeddings=cond, seed=5, output_type="np", progress=False)
    np.testing.assert_array_equal(a.images, b.images)


def test_trainer_trains_the_hourglass_preset(tmp_path):
    from training.presets import apply_overrides, get_preset
    from training.testing import TINY_DIM, synthetic_cache
    from training.trainer import Trainer

    cache = synthetic_cache(tmp_path / "cache", n=32, latent=(4, 8, 8), dim=TINY_DIM)
    cfg = apply_overrides(get_preset("tiny"), {"model": "pixgen-tiny-H", "patch_size": 2, "max_steps": 4,
                                               "checkpoint_every": 2, "log_every": 2})
    final = Trainer(cfg, cache, tmp_path / "run").fit()
    model = PixgenTransformer.from_pretrained(final / "transformer")
    assert model.conv_stages is not None and tuple(model.config.conv_channels) == (16, 32)


def test_v2_training_preset_uses_the_hourglass():
    from training.presets import get_preset

    cfg = get_preset("default-128-v2")
    assert cfg.model == "pixgen-XS-H" and cfg.patch_size == 2 and cfg.encoder == "pixgen-ssl"


def test_flops_closed_form_counts_the_conv_stages():
    from torch.utils.flop_counter import FlopCounterMode

    from training.flops import model_flops

    model = hourglass(conv_layers=2)
    x, t, y = _inputs(batch=1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t[:1], y)
    conv = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    width, cfg = model.inner_dim, model.config
    film = sum(2 * cfg.conv_layers * 2 * width * 2 * c for c in cfg.conv_channels)  # ResBlock timestep projections
    parts = model_flops(cfg)
    assert conv + film == parts["conv_stages"] + parts["patch_embed"]  # PatchEmbed is a conv too
    assert parts["total"] > parts["conv_stages"] > 0
