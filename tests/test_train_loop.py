"""The trainer on a tiny model and real LC25000 tiles: learning, objectives, final/, fine-tuning."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pixgen.embeddings import Embeddings
from pixgen.errors import InputError
from pixgen.pipeline import Generator
from training.losses import EpsilonDiffusion, FlowMatching
from training.presets import apply_overrides, get_preset
from training.testing import tiny_cache
from training.trainer import Trainer


@pytest.fixture(scope="module")
def cache(tmp_path_factory, shared_data):
    return tiny_cache(tmp_path_factory.mktemp("train"), shared_data / "lc25000-lung", per_class=16)


class Recorder(Trainer):
    """Keeps every step's logs."""

    def on_step_end(self, step, logs):
        self.__dict__.setdefault("history", []).append(logs)


def _cfg(**overrides):
    return apply_overrides(get_preset("tiny"), {"checkpoint_every": 1000, "log_every": 1000, **overrides})


def test_loss_falls_and_final_generates(cache, tmp_path):
    cfg = _cfg(max_steps=100, sample_every=50, num_samples=3, sample_steps=2)
    trainer = Recorder(cfg, cache, tmp_path / "run")
    final = trainer.fit()
    losses = np.array([h["loss"] for h in trainer.history])
    assert losses.shape == (100,) and np.isfinite(losses).all()
    assert losses[-20:].mean() < 0.9 * losses[:10].mean(), (losses[:10].mean(), losses[-20:].mean())
    with (tmp_path / "run" / "log.csv").open() as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [100]
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step-00000050.png", "step-00000100.png"]

    gen = Generator.from_pretrained(final)
    assert gen.embedding_bank.labels == ["lung_aca", "lung_n", "lung_scc"]
    assert gen.config["encoder"] == "tiny-ssl" and gen.config["mpp"] == 3.5
    out = gen.generate(label="lung_n", num_images=2, num_inference_steps=2, progress=False)
    assert [im.size for im in out.images] == [(32, 32), (32, 32)]
    ref = gen.generate(reference=[np.zeros((32, 32, 3), np.uint8)], num_inference_steps=2, progress=False)
    assert ref.images[0].size == (32, 32)  # the encoder was saved with the model
    # final/ holds the EMA weights, not the raw ones
    raw = load_file(tmp_path / "run" / "checkpoints" / "checkpoint-00000100" / "model.safetensors")
    ema = gen.transformer.state_dict()
    assert not torch.equal(raw["proj_out.weight"], ema["proj_out.weight"])


def test_epsilon_with_learned_variance_trains_in_bf16(cache, tmp_path):
    cfg = _cfg(max_steps=6, objective="epsilon", learned_sigma=True, mixed_precision="bf16")
    trainer = Recorder(cfg, cache, tmp_path / "eps")
    final = trainer.fit()
    assert all(np.isfinite([h["mse"], h["vb"]]).all() and h["vb"] > 0 for h in trainer.history)
    gen = Generator.from_pretrained(final)
    assert gen.transformer.learned_sigma and type(gen.scheduler).__name__ == "DPMSolverMultistepScheduler"


def test_lora_fine_tuning_merges_into_final(cache, tmp_path):
    base = Trainer(_cfg(max_steps=4, ema_decay=0.0), cache, tmp_path / "base").fit()
    cfg = _cfg(max_steps=4, init=str(base), lora_rank=4, lr=1e-2, ema_decay=0.0)
    final = Trainer(cfg, cache, tmp_path / "lora").fit()
    before = Generator.from_pretrained(base).transformer.state_dict()
    after = Generator.from_pretrained(final).transformer.state_dict()
    assert before.keys() == after.keys()  # merged: no adapter weights left
    assert not torch.equal(before["transformer_blocks.0.attn1.to_q.weight"], after["transformer_blocks.0.attn1.to_q.weight"])
    assert torch.equal(before["proj_out.weight"], after["proj_out.weight"])  # not adapted: frozen


def test_init_model_must_fit_the_cache(cache, tmp_path):
    from pixgen.testing import save_tiny_model

    other = save_tiny_model(tmp_path / "other", sample_size=4)  # 4x4 latents vs the cache's 8x8
    with pytest.raises(InputError, match="does not fit"):
        Trainer(_cfg(max_steps=1, init=str(other)), cache, tmp_path / "r").fit()


def test_objectives_targets():
    """Flow: the target is noise - x0 at x_t = (1-s) x0 + s noise; epsilon: the target is the noise."""

    class Probe(torch.nn.Module):
        def forward(self, x, t, cond, drop_condition=None):
            self.seen = (x, t)
            return type("Out", (), {"sample": torch.zeros_like(x.repeat(1, self.mult, 1, 1))})()

    x0 = torch.randn(4, 3, 4, 4)
    probe = Probe()
    probe.mult = 1
    g = torch.Generator().manual_seed(1)
    loss, _ = FlowMatching("uniform")(probe, x0, None, None, g)
    g = torch.Generator().manual_seed(1)
    noise, s = torch.randn(x0.shape, generator=g), torch.rand(4, generator=g)
    torch.testing.assert_close(probe.seen[0], (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(probe.seen[1], s * 1000)
    torch.testing.assert_close(loss, ((noise - x0) ** 2).mean())
    probe.mult = 2
    loss, logs = EpsilonDiffusion(learned_sigma=True)(probe, x0, None, None, torch.Generator().manual_seed(2))
    assert logs["vb"] > 0 and loss.item() == pytest.approx(logs["mse"] + logs["vb"], rel=1e-5)


def test_sample_grid_uses_fixed_conditions(cache):
    """One condition per label, round-robin, and the grid is the same at every call (fixed seed)."""
    from training.features import FeatureCache
    from training.tasks import GeneratorTask

    task = GeneratorTask(_cfg(num_samples=5, sample_steps=2), cache)
    task.cache = FeatureCache(cache)
    cond = task.sample_conditions()
    labels = task.cache.array("labels")
    rows = [int(np.flatnonzero(labels == k)[0]) for k in (0, 1, 2, 0, 1)]
    assert all(torch.equal(cond[i], task.cache[r]["condition"]) for i, r in enumerate(rows))
    assert not torch.equal(cond[0], cond[1]) and not torch.equal(cond[1], cond[2])
    Embeddings(cond, encoder="tiny-ssl")  # valid condition tokens
    task._model, task.vae = task.build_model().eval(), task.cache.load_vae()
    first, again = (np.asarray(task.sample(None, task._model)) for _ in range(2))
    assert np.array_equal(first, again) and first.std() > 0


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread
