"""The public sampler and condition values: golden numbers, guidance, ControlNet halves, img2img,
callbacks, any latent shape, per-image seeds, domains and bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixgen.conditioning import BankDraw, EmbeddingGrid, RawEmbeddings, Reference
from pixgen.embeddings import EmbeddingBank, Embeddings, load_embeddings, save_embeddings
from pixgen.errors import EncoderMismatchError, InputError
from pixgen.models.controlnet import PixgenControlNet
from pixgen.pipeline import default_scheduler
from pixgen.sampling import SamplingCancelled, guided_prediction, predicted_x0, sample, start_step_for_strength
from pixgen.testing import tiny_generator, tiny_transformer

STEPS = 3


@pytest.fixture(scope="module")
def gen():
    return tiny_generator()


def _inputs(n=2, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, h, w, generator=g), torch.randn(n, 1, 32, generator=g)


class CountingForward:
    """Wraps a model's forward and records the batch size and drop mask of every call."""

    def __init__(self, model):
        self.calls: list[tuple[int, bool]] = []
        self.original = model.forward
        model.forward = self

    def __call__(self, x, t, tokens, drop_condition=None, **kw):
        self.calls.append((x.shape[0], drop_condition is not None))
        return self.original(x, t, tokens, drop_condition=drop_condition, **kw)


# ------------------------------------------------------------------------------ golden numbers
# A tiny seeded model's outputs, computed once with this code (diffusers' pipeline-test style):
# they pin the scheduler wiring, guidance formula, timesteps and variance handling together.
GOLDEN = {
    ("flow", None): ([-0.6369, -1.5811, 0.1675, -1.0426, 1.2436, 0.0615], [0.6852, -1.9556, 1.695, -2.0507]),
    ("epsilon", None): ([-95.8341, -238.0141, 25.738, -155.4534, 195.8448, 18.724],
                        [97.8546, -305.0769, 254.5675, -318.4472]),
    ("epsilon", 8): ([-164.8835, -194.61, -31.4862, -63.8785, 87.8264, 88.1368],
                     [-48.9523, -340.2634, 143.5908, -304.1498]),
}


@pytest.mark.parametrize("prediction,out_channels", list(GOLDEN))
def test_golden_numbers_per_scheduler_and_prediction_type(prediction, out_channels):
    """flow + FlowMatchEuler, epsilon + DPM-Solver++, epsilon with learned variance + DPM-Solver++."""
    model = tiny_transformer(prediction_type=prediction, out_channels=out_channels)
    noise, cond = _inputs()
    out = sample(model, default_scheduler(prediction), noise, cond, num_inference_steps=4, guidance_scale=2.0)
    first, last = GOLDEN[(prediction, out_channels)]
    torch.testing.assert_close(out[0, 0, 0, :6], torch.tensor(first), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out[1, 3, -1, -4:], torch.tensor(last), rtol=1e-4, atol=1e-3)


def test_golden_pixels_of_the_generator(gen):
    emb = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    img = gen.generate(embeddings=emb, num_inference_steps=STEPS, output_type="np", progress=False).images[0]
    assert np.abs(img[0, :6, 0].astype(int) - [121, 128, 112, 118, 120, 109]).max() <= 1
    assert np.abs(img[-1, -4:, 2].astype(int) - [138, 144, 137, 140]).max() <= 1


# ------------------------------------------------------------------------------ guidance
def test_guidance_one_runs_only_the_conditional_rows():
    model = tiny_transformer()
    counter = CountingForward(model)
    noise, cond = _inputs()
    sample(model, default_scheduler("flow"), noise, cond, num_inference_steps=STEPS, guidance_scale=1.0)
    assert counter.calls == [(2, False)] * STEPS  # one forward per step, no null rows
    counter.calls.clear()
    sample(model, default_scheduler("flow"), noise, cond, num_inference_steps=STEPS, guidance_scale=2.0)
    assert counter.calls == [(4, True)] * STEPS  # conditional + null rows batched


def test_guided_prediction_is_the_cfg_formula_and_w_below_one_is_not_skipped():
    model = tiny_transformer()
    x, cond = _inputs()
    t = torch.tensor(500.0)
    c = model(x, t.expand(2), cond).sample
    u = model(x, t.expand(2), cond, drop_condition=torch.ones(2, dtype=torch.bool)).sample
    for w in (0.0, 0.5, 1.0, 3.0):
        torch.testing.assert_close(guided_prediction(model, x, t, cond, w), u + w * (c - u), atol=1e-5, rtol=1e-5)


def test_learned_variance_half_is_dropped_not_the_epsilon_half():
    model = tiny_transformer(prediction_type="epsilon", out_channels=8)
    x, cond = _inputs()
    t = torch.tensor(500.0)
    full = model(x, t.expand(2), cond).sample
    torch.testing.assert_close(guided_prediction(model, x, t, cond, 1.0), full[:, :4])
    assert not torch.allclose(full[:, :4], full[:, 4:], atol=1e-3)  # taking the other half would fail above


@pytest.mark.parametrize("w", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_guidance_is_refused(gen, w):
    with pytest.raises(InputError, match="guidance scale must be a finite number"):
        gen.generate(label="tumour", guidance_scale=w, progress=False)


@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_zero_or_bad_steps_are_refused(gen, steps):
    with pytest.raises(InputError, match="sampling steps must be a whole number >= 1"):
        gen.generate(label="tumour", num_inference_steps=steps, progress=False)


# ------------------------------------------------------------------------------ ControlNet halves
def test_controlnet_residuals_on_both_halves_or_the_conditional_half_only():
    model = tiny_transformer()
    cn = PixgenControlNet.from_transformer(model, num_layers=2)
    with torch.no_grad():
        for block in cn.controlnet_blocks:
            block.weight.normal_(std=0.1)
    x, cond = _inputs()
    control = torch.randn_like(x)
    t, tt, w = torch.tensor(300.0), torch.tensor([300.0, 300.0]), 2.5
    null = torch.ones(2, dtype=torch.bool)
    res = lambda drop=None: list(cn(x, tt, cond, control, drop_condition=drop).controlnet_block_samples)  # noqa: E731
    c = model(x, tt, cond, controlnet_block_samples=res()).sample
    u_both = model(x, tt, cond, drop_condition=null, controlnet_block_samples=res(null)).sample
    u_plain = model(x, tt, cond, drop_condition=null).sample
    both = guided_prediction(model, x, t, cond, w, controlnet=cn, control=control, controlnet_cfg="both")
    cond_only = guided_prediction(model, x, t, cond, w, controlnet=cn, control=control, controlnet_cfg="cond")
    torch.testing.assert_close(both, u_both + w * (c - u_both), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond_only, u_plain + w * (c - u_plain), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both, cond_only, atol=1e-4)
    with pytest.raises(InputError, match="controlnet_cfg"):
        guided_prediction(model, x, t, cond, w, controlnet=cn, control=control, controlnet_cfg="uncond")


def test_generator_controlnet_cfg_option_is_the_config_default_and_overridable():
    gen = tiny_generator()
    gen.controlnet = PixgenControlNet.from_transformer(gen.transformer, num_layers=1)
    with torch.no_grad():
        gen.controlnet.controlnet_blocks[0].weight.normal_()
    mask = np.zeros((32, 32), np.uint8)
    mask[:8] = 1
    kw = {"label": "tumour", "control_image": mask, "num_inference_steps": 2, "output_type": "latent", "progress": False}
    default = gen.generate(**kw)
    assert gen.config["controlnet_cfg"] == "both" and default.extra["controlnet_cfg"] == "both"
    torch.testing.assert_close(gen.generate(controlnet_cfg="both", **kw).images, default.images)
    assert not torch.allclose(gen.generate(controlnet_cfg="cond", **kw).images, default.images, atol=1e-5)


# ------------------------------------------------------------------------------ shapes, latents, img2img
def test_any_latent_shape():
    model = tiny_transformer()
    noise, cond = _inputs(h=8, w=12)
    assert sample(model, default_scheduler("flow"), noise, cond, num_inference_steps=2, guidance_scale=2.0).shape == (2, 4, 8, 12)


def test_generator_makes_other_image_sizes(gen):
    out = gen.generate(label="tumour", height=32, width=48, num_inference_steps=2, output_type="np", progress=False)
    assert out.images.shape == (1, 32, 48, 3)
    with pytest.raises(InputError, match="multiple of 8 px"):
        gen.generate(label="tumour", height=30, progress=False)


def test_latents_input_replaces_the_seeded_noise(gen):
    kw = {"label": "tumour", "num_images": 2, "num_inference_steps": 2, "output_type": "latent", "progress": False}
    seeded = gen.generate(seed=7, **kw).images
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (7, 8)])
    torch.testing.assert_close(gen.generate(seed=7, latents=noise, **kw).images, seeded)
    assert not torch.allclose(gen.generate(seed=7, latents=torch.zeros_like(noise), **kw).images, seeded)
    with pytest.raises(InputError, match="latents have shape"):
        gen.generate(seed=7, latents=noise[:1], **kw)


@pytest.mark.parametrize("prediction", ["flow", "epsilon"])
def test_img2img_noises_with_the_schedulers_own_method(prediction):
    model = tiny_transformer(prediction_type=prediction)
    scheduler = default_scheduler(prediction)
    noise, cond = _inputs()
    clean = torch.randn_like(noise)
    start = start_step_for_strength(4, 0.5)
    seen = []
    sample(model, scheduler, noise, cond, num_inference_steps=4, start_step=start, image_latents=clean,
           callback=lambda i, t, x, x0: seen.append((i, float(t))))
    scheduler.set_timesteps(4)
    assert [i for i, _ in seen] == [2, 3] and seen[0][1] == float(scheduler.timesteps[2])
    # the starting point is the scheduler's noising of the clean latents at that timestep
    first = {}

    def record_and_stop(x, t, y, **kw):
        first["x"] = x.clone()
        raise SamplingCancelled("seen the first input")

    model.forward = record_and_stop
    with pytest.raises(SamplingCancelled):
        sample(model, scheduler, noise, cond, num_inference_steps=4, start_step=start, image_latents=clean)
    t0 = scheduler.timesteps[start:start + 1]
    if prediction == "flow":
        sigma = float(t0) / 1000
        expected = (1 - sigma) * clean + sigma * noise
    else:
        a = scheduler.alphas_cumprod[int(t0)]
        expected = a.sqrt() * clean + (1 - a).sqrt() * noise
    torch.testing.assert_close(first["x"], expected, atol=1e-5, rtol=1e-5)


def test_lower_strength_stays_closer_to_the_image(gen):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    kw = {"label": "tumour", "num_inference_steps": 4, "output_type": "latent", "progress": False}
    clean = gen.vae.encode(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1)
    dist = [(gen.generate(image=image, strength=s, **kw).images - clean).abs().mean() for s in (0.25, 0.5, 1.0)]
    assert dist[0] < dist[1] < dist[2]
    with pytest.raises(InputError, match="strength must be in"):
        gen.generate(image=image, strength=0.0, **kw)
    with pytest.raises(InputError, match="leaves no step"):
        gen.generate(image=image, strength=0.1, **kw)


# ------------------------------------------------------------------------------ callback
def test_callback_sees_every_step_with_x0_and_the_last_x0_is_the_result():
    model = tiny_transformer()
    noise, cond = _inputs()
    seen = []
    out = sample(model, default_scheduler("flow"), noise, cond, num_inference_steps=STEPS, guidance_scale=2.0,
                 callback=lambda i, t, x, x0: seen.append((i, x.clone(), x0.clone())))
    assert [i for i, _, _ in seen] == list(range(STEPS))
    torch.testing.assert_close(seen[-1][1], out)
    torch.testing.assert_close(seen[-1][2], out, atol=1e-5, rtol=1e-5)  # Euler's last step lands on its x0
    assert not torch.allclose(seen[0][2], seen[0][1])


def test_epsilon_x0_inverts_the_forward_process():
    scheduler = default_scheduler("epsilon")
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor(600)
    a = scheduler.alphas_cumprod[600]
    torch.testing.assert_close(predicted_x0(scheduler, "epsilon", a.sqrt() * x0 + (1 - a).sqrt() * eps, eps, t), x0,
                               atol=1e-5, rtol=1e-5)


def test_callback_returning_false_cancels(gen):
    steps = []

    def stop_at_second(i, t, x, x0):
        steps.append(i)
        return i < 1

    with pytest.raises(SamplingCancelled, match="step 2 of 3"):
        gen.generate(label="tumour", num_inference_steps=STEPS, callback=stop_at_second, progress=False)
    assert steps == [0, 1]


def test_batches_arrive_one_by_one_and_cancel_keeps_finished_ones(gen):
    batches = gen.generate_batches(label="tumour", num_images=5, batch_size=2, num_inference_steps=2,
                                   output_type="np", progress=False)
    first = next(batches)
    assert first.images.shape[0] == 2 and first.seeds == [0, 1] and first.extra["batch_start"] == 0
    assert [b.seeds for b in batches] == [[2, 3], [4]]

    def cancel_in_second_batch(i, t, x, x0):
        calls.append(i)
        if len(calls) > 2:
            raise SamplingCancelled("stopped by the user")

    calls: list[int] = []
    done = []
    with pytest.raises(SamplingCancelled, match="stopped by the user"):
        for batch in gen.generate_batches(label="tumour", num_images=4, batch_size=2, num_inference_steps=2,
                                          callback=cancel_in_second_batch, progress=False):
            done.append(batch)
    assert len(done) == 1


# ------------------------------------------------------------------------------ per-image seeds
def test_image_i_of_a_run_equals_the_image_made_alone_with_its_seed(gen):
    """Issue 11: a bank draw per image from its own seed (not from the run's seed and --n)."""
    kw = {"label": "tumour", "num_inference_steps": 2, "output_type": "latent", "progress": False}
    run = gen.generate(num_images=8, seed=3, batch_size=1, **kw)
    for i in range(8):
        alone = gen.generate(num_images=1, seed=3 + i, **kw)
        assert alone.condition_ids == [run.condition_ids[i]] and alone.seeds == [run.seeds[i]]
        assert torch.equal(alone.images[0], run.images[i])  # same computation, bit for bit


def test_results_do_not_depend_on_batch_size(gen):
    """Exact per image at one batch size; across batch sizes float32 matrix products are blocked
    differently by the number of rows, so latents agree to ~4e-7 (measured), not bit for bit."""
    kw = {"label": "stroma", "num_images": 8, "num_inference_steps": 2, "progress": False}
    lat = {b: gen.generate(batch_size=b, output_type="latent", **kw).images for b in (1, 3, 8)}
    torch.testing.assert_close(lat[3], lat[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lat[8], lat[1], atol=1e-5, rtol=1e-5)
    px = [gen.generate(batch_size=b, output_type="np", **kw).images.astype(int) for b in (1, 8)]
    assert np.abs(px[0] - px[1]).max() <= 1


def test_a_torch_generator_drives_noise_and_draws(gen):
    kw = {"label": "tumour", "num_images": 3, "num_inference_steps": 1, "output_type": "latent", "progress": False}
    a = gen.generate(generator=torch.Generator().manual_seed(1), **kw)
    b = gen.generate(generator=torch.Generator().manual_seed(1), **kw)
    assert a.seeds == [None] * 3 and a.condition_ids == b.condition_ids and torch.equal(a.images, b.images)
    assert "batch_start" not in a.extra


def test_bank_draw_for_a_seed_does_not_depend_on_the_run():
    bank = EmbeddingBank({"a": torch.randn(5, 1, 4), "b": torch.randn(3, 1, 4)}, encoder="x")
    many = bank.draw("a", [10, 11, 12, 13])
    assert [bank.draw("a", [s]).ids[0] for s in (10, 11, 12, 13)] == many.ids
    pooled = bank.draw(None, list(range(40)))
    assert {i.split("[")[0] for i in pooled.ids} == {"a", "b"}


# ------------------------------------------------------------------------------ condition values
def test_condition_values_equal_the_keyword_conveniences(gen, tmp_path):
    kw = {"num_images": 2, "num_inference_steps": 2, "output_type": "latent", "progress": False}
    emb = Embeddings(torch.randn(2, 32), encoder="tiny-test")
    torch.testing.assert_close(gen.generate(RawEmbeddings(emb), **kw).images, gen.generate(embeddings=emb, **kw).images)
    torch.testing.assert_close(gen.generate(emb, **kw).images, gen.generate(embeddings=emb, **kw).images)
    torch.testing.assert_close(gen.generate(BankDraw("tumour"), **kw).images, gen.generate(label="tumour", **kw).images)
    ref = np.full((32, 32, 3), 90, np.uint8)
    torch.testing.assert_close(gen.generate(Reference([ref]), **kw).images, gen.generate(reference=[ref], **kw).images)
    with pytest.raises(InputError, match="only one of"):
        gen.generate(BankDraw("tumour"), label="tumour")
    with pytest.raises(InputError, match="cannot condition on a str"):
        gen.generate("tumour")


def test_embedding_grid_is_flattened_row_major():
    gen = tiny_generator(caption_num_tokens=4)
    grid = torch.randn(2, 2, 32)
    out = gen.generate(EmbeddingGrid(grid, encoder="tiny-test"), num_inference_steps=1, output_type="latent", progress=False)
    torch.testing.assert_close(out.conditions.values[0], torch.stack([grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1]]))
    with pytest.raises(InputError, match="grid of 4 condition tokens"):
        gen.generate(EmbeddingGrid(torch.randn(3, 3, 32)), progress=False)


# ------------------------------------------------------------------------------ domains
def test_model_refuses_embeddings_of_another_domain(gen):
    kw = {"num_inference_steps": 1, "output_type": "latent", "progress": False}
    ihc = Embeddings(torch.randn(1, 32), encoder="tiny-test", domain="ihc")
    with pytest.raises(EncoderMismatchError, match="describe 'ihc' tissue, the model generates 'he'.*stain translator"):
        gen.generate(embeddings=ihc, **kw)
    gen.generate(embeddings=torch.randn(1, 32), **kw)  # untagged arrays: domain unknown, accepted
    ihc_model = tiny_generator()
    ihc_model.config["domain"] = "ihc"
    with pytest.raises(EncoderMismatchError, match="describe 'he' tissue, the model generates 'ihc'"):
        ihc_model.generate(embeddings=Embeddings(torch.randn(1, 32), encoder="tiny-test"), **kw)
    assert ihc_model.generate(embeddings=ihc, **kw).conditions.domain == "ihc"


def test_domain_is_saved_with_embeddings_models_and_banks(gen, tmp_path):
    from pixgen.pipeline import Generator
    from safetensors.torch import save_file

    save_embeddings(tmp_path / "e.safetensors", Embeddings(torch.randn(2, 32), encoder="tiny-test", domain="ihc"))
    assert load_embeddings(tmp_path / "e.safetensors").domain == "ihc"
    save_file({"values": torch.randn(2, 1, 32)}, str(tmp_path / "old.safetensors"), metadata={"encoder": "tiny-test"})
    assert load_embeddings(tmp_path / "old.safetensors").domain == "he"  # files from before domains: H&E
    gen.save_pretrained(tmp_path / "m")
    loaded = Generator.from_pretrained(tmp_path / "m")
    assert loaded.config["domain"] == "he" and loaded.embedding_bank.domain == "he"
    assert loaded.describe()["domain"] == "he"
