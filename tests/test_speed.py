"""Sampling speed (issue #18): solvers, the guidance interval, quality presets and the CLI flag.

Solvers must reach Euler's limit and be deterministic; the guidance interval must actually skip
the unconditional rows outside its interval (counted model calls); presets must resolve to what
docs/benchmarks.md documents; ``pixgen generate --quality`` must apply them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pixgen.cli import main
from pixgen.errors import InputError
from pixgen.pipeline import Generator
from pixgen.sampling import (DEFAULT_QUALITY, QUALITY_PRESETS, SAMPLERS, QualityPreset, make_scheduler, quality_preset,
                             sample)
from pixgen.testing import save_tiny_model, tiny_generator, tiny_transformer

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def _inputs(n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 1, 32, generator=g)


class CountingForward:
    """Wraps a model's forward; records the batch size of every call."""

    def __init__(self, model):
        self.rows: list[int] = []
        self.original = model.forward
        model.forward = self

    def __call__(self, x, *args, **kw):
        self.rows.append(x.shape[0])
        return self.original(x, *args, **kw)


def test_every_solver_reaches_eulers_limit_and_converges(one_thread):
    """Many steps of any solver give what many Euler steps give; few steps are farther off."""
    model = tiny_transformer()
    noise, cond = _inputs()
    limit = sample(model, make_scheduler("euler"), noise, cond, num_inference_steps=200, guidance_scale=2.0)
    for sampler in SAMPLERS:
        steps = 50 if sampler == "heun" else 100  # Heun: two model calls per step
        fine = sample(model, make_scheduler(sampler), noise, cond, num_inference_steps=steps, guidance_scale=2.0)
        coarse = sample(model, make_scheduler(sampler), noise, cond, num_inference_steps=4, guidance_scale=2.0)
        fine_err, coarse_err = (fine - limit).abs().max(), (coarse - limit).abs().max()
        assert fine_err < 6e-3, (sampler, fine_err)
        assert fine_err < coarse_err / 4, (sampler, fine_err, coarse_err)


@pytest.mark.parametrize("quality", list(QUALITY_PRESETS))
def test_presets_are_deterministic_given_a_seed(quality, one_thread):
    gen = tiny_generator().set_quality(quality)
    a = gen.generate(label="tumour", num_images=2, seed=3, output_type="np", progress=False).images
    b = gen.generate(label="tumour", num_images=2, seed=3, output_type="np", progress=False).images
    c = gen.generate(label="tumour", num_images=2, seed=4, output_type="np", progress=False).images
    assert (a == b).all()
    assert (a != c).any()


def test_guidance_interval_skips_the_unconditional_rows_outside_it(one_thread):
    model = tiny_transformer()
    noise, cond = _inputs(n=2)
    scheduler = make_scheduler("euler")
    scheduler.set_timesteps(10)
    inside = sum(0.0 <= float(t) / 1000 <= 0.5 for t in scheduler.timesteps)
    assert 0 < inside < 10
    counter = CountingForward(model)
    sample(model, scheduler, noise, cond, num_inference_steps=10, guidance_scale=2.0, guidance_interval=(0.0, 0.5))
    assert counter.rows.count(4) == inside  # CFG: conditional + null rows in one batch
    assert counter.rows.count(2) == 10 - inside  # conditional rows alone
    counter.rows.clear()
    sample(model, scheduler, noise, cond, num_inference_steps=10, guidance_scale=2.0)
    assert counter.rows == [4] * 10


def test_full_guidance_interval_equals_plain_cfg_and_an_empty_one_equals_no_guidance(one_thread):
    model = tiny_transformer()
    noise, cond = _inputs()
    kw = {"num_inference_steps": 5}
    plain = sample(model, make_scheduler("dpm++2m"), noise, cond, guidance_scale=2.0, **kw)
    full = sample(model, make_scheduler("dpm++2m"), noise, cond, guidance_scale=2.0, guidance_interval=(0.0, 1.0), **kw)
    unguided = sample(model, make_scheduler("dpm++2m"), noise, cond, guidance_scale=1.0, **kw)
    none = sample(model, make_scheduler("dpm++2m"), noise, cond, guidance_scale=2.0, guidance_interval=(0.0, 0.0), **kw)
    assert torch.equal(plain, full)
    assert torch.equal(unguided, none)
    with pytest.raises(InputError, match="guidance_interval"):
        sample(model, make_scheduler("euler"), noise, cond, guidance_scale=2.0, guidance_interval=(0.8, 0.2), **kw)


def _documented_presets() -> dict[str, dict[str, str]]:
    """The preset table of docs/benchmarks.md: | `name` | sampler | steps | guidance interval | dtype | ..."""
    rows = re.findall(r"^\| `(\w+)` \| (\S+) \| (\d+) \| ([^|]+) \| (\w+) \|", DOCS.read_text(), re.M)
    return {name: {"sampler": s, "steps": n, "interval": gi.strip(), "dtype": dt} for name, s, n, gi, dt in rows}


def test_presets_resolve_to_the_documented_settings():
    documented = _documented_presets()
    assert set(documented) == set(QUALITY_PRESETS) and DEFAULT_QUALITY in documented
    for name, doc in documented.items():
        gen = tiny_generator().set_quality(name)
        preset = QUALITY_PRESETS[name]
        interval = "every step" if preset.guidance_interval is None else "t/T in [{:g}, {:g}]".format(*preset.guidance_interval)
        assert doc == {"sampler": preset.sampler, "steps": str(preset.num_inference_steps), "interval": interval,
                       "dtype": preset.dtype}, name
        assert type(gen.scheduler) is type(make_scheduler(preset.sampler))
        assert gen.config["num_inference_steps"] == preset.num_inference_steps
        assert gen.config["compute_dtype"] == preset.dtype
        assert gen.describe()["quality"] == name


def test_a_bfloat16_preset_keeps_the_float32_weights(one_thread):
    gen = tiny_generator()
    before = {k: v.clone() for k, v in gen.transformer.state_dict().items()}
    gen.set_quality(QualityPreset("euler", 2, dtype="bfloat16"))
    images = gen.generate(label="tumour", num_images=1, output_type="np", progress=False).images
    assert images.shape == (1, 32, 32, 3)
    assert gen.dtype == torch.float32
    assert all(torch.equal(v, gen.transformer.state_dict()[k]) for k, v in before.items())


def test_unknown_names_and_epsilon_models_are_refused():
    with pytest.raises(InputError, match="unknown quality"):
        quality_preset("ultra")
    with pytest.raises(InputError, match="unknown sampler"):
        make_scheduler("ddim")
    with pytest.raises(InputError, match="flow-matching"):
        make_scheduler("euler", "epsilon")
    with pytest.raises(InputError, match="flow-matching"):
        tiny_generator(prediction_type="epsilon").set_quality("fast")
    assert type(make_scheduler("unipc", "epsilon")).__name__ == "UniPCMultistepScheduler"


def test_a_preset_is_saved_and_loaded_with_the_model(tmp_path):
    tiny_generator().set_quality("fast").save_pretrained(tmp_path / "m")
    loaded = Generator.from_pretrained(tmp_path / "m")
    preset = QUALITY_PRESETS["fast"]
    assert type(loaded.scheduler) is type(make_scheduler(preset.sampler))
    assert loaded.config["num_inference_steps"] == preset.num_inference_steps
    assert loaded.config["guidance_interval"] == (list(preset.guidance_interval) if preset.guidance_interval else None)


@pytest.mark.parametrize("flags,sampler,steps", [
    ([], make_scheduler(QUALITY_PRESETS[DEFAULT_QUALITY].sampler), QUALITY_PRESETS[DEFAULT_QUALITY].num_inference_steps),
    (["--quality", "best"], make_scheduler(QUALITY_PRESETS["best"].sampler), QUALITY_PRESETS["best"].num_inference_steps),
    (["--quality", "fast", "--sampler", "heun", "--steps", "2"], make_scheduler("heun"), 2),
])
def test_generate_quality_flag_sets_the_sampler_recorded_in_the_manifest(flags, sampler, steps, tmp_path, one_thread):
    model = save_tiny_model(tmp_path / "m")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model), "--n", "1", "--out", str(out), *flags]) == 0
    recorded = json.loads((out / "manifest.json").read_text())["sampler"]
    assert (recorded["scheduler"], recorded["steps"]) == (type(sampler).__name__, steps)


def test_generate_refuses_an_unknown_quality_before_loading(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "none"), "--quality", "ultra", "--out", str(tmp_path / "o")]) == 1
    assert "unknown quality" in capsys.readouterr().err


def test_large_takes_a_quality_preset_and_refuses_unknown_names_before_loading(tmp_path, shared_data, capsys, one_thread):
    model = save_tiny_model(tmp_path / "m")
    slide = shared_data / "slides" / "cmu-1-small-region.svs"
    base = ["large", "--model", str(model), "--from-slide", str(slide), "--region", "0,0,64,64", "--tile", "16"]
    assert main([*base, "--quality", "fast", "--out", str(tmp_path / "a.ome.tiff")]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["steps"] == QUALITY_PRESETS["fast"].num_inference_steps  # the preset's, not the model's
    assert main([*base, "--sampler", "ddim", "--out", str(tmp_path / "b.ome.tiff")]) == 1
    assert "unknown sampler" in capsys.readouterr().err and not (tmp_path / "b.ome.tiff").exists()
