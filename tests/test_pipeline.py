"""Generator: determinism, batching, guidance, save/load, conditioning and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pixgen.embeddings import EmbeddingBank, Embeddings, load_embeddings, save_embeddings
from pixgen.errors import EncoderMismatchError, InputError, ModelLoadError
from pixgen.pipeline import Generator
from pixgen.testing import tiny_generator

STEPS = 3


@pytest.fixture(scope="module")
def gen():
    return tiny_generator()


def _emb(n=2, dim=32, encoder="tiny-test", seed=0):
    return Embeddings(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), encoder=encoder)


def _run(gen, **kw):
    kw = {"embeddings": _emb(), "num_inference_steps": STEPS, "output_type": "np", "progress": False, **kw}
    return gen.generate(**kw)


def test_outputs_and_types(gen):
    out = _run(gen, num_images=2)
    assert out.images.shape == (4, 32, 32, 3) and out.images.dtype == np.uint8
    assert out.seeds == [0, 1, 2, 3]
    assert out.condition_ids == ["condition[0]", "condition[0]", "condition[1]", "condition[1]"]
    pil = _run(gen, output_type="pil").images
    assert pil[0].size == (32, 32) and pil[0].mode == "RGB"
    pt = _run(gen, output_type="pt").images
    assert pt.shape == (2, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    assert _run(gen, output_type="latent").images.shape == (2, 4, 8, 8)


def test_same_seed_same_images_other_seed_differs(gen):
    a, b, c = _run(gen, seed=5).images, _run(gen, seed=5).images, _run(gen, seed=6).images
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_batch_of_one_equals_batched(gen):
    batched = _run(gen, batch_size=8, output_type="latent").images
    singly = _run(gen, batch_size=1, output_type="latent").images
    torch.testing.assert_close(singly, batched, atol=1e-5, rtol=1e-5)
    alone = _run(gen, embeddings=Embeddings(_emb().values[1:], encoder="tiny-test"), seed=1, output_type="latent").images
    torch.testing.assert_close(alone[0], batched[1], atol=1e-5, rtol=1e-5)  # image i = seed + i


def test_guidance_one_equals_conditional_prediction(gen):
    """w = 1 must give exactly the conditional model (pred = uncond + 1 * (cond - uncond))."""
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0])
    cond = _emb().values
    model = gen.transformer
    c = model(x, t, cond).sample
    u = model(x, t, cond, drop_condition=torch.ones(2, dtype=torch.bool)).sample
    torch.testing.assert_close(u + 1.0 * (c - u), c)
    guided = _run(gen, guidance_scale=1.0, output_type="latent").images
    # the sampler with w=1 skips the unconditional rows; compare with an explicit CFG loop at w=1
    gen2 = tiny_generator()
    gen2.transformer.forward = _force_cfg(gen2.transformer)
    torch.testing.assert_close(_run(gen2, guidance_scale=1.0, output_type="latent").images, guided, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_run(gen, guidance_scale=3.0, output_type="latent").images, guided)


def _force_cfg(model):
    """Wrap forward to also run null rows and combine them with w=1 (the batched CFG path)."""
    original = model.forward

    def forward(x, t, cond, drop_condition=None, **kw):
        n = x.shape[0]
        both = original(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]),
                        drop_condition=torch.arange(2 * n) >= n, **kw).sample
        c, u = both.chunk(2)
        return type("Out", (), {"sample": u + (c - u)})()

    return forward


def test_save_load_generates_bit_identical(gen, tmp_path):
    gen.save_pretrained(tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "Generator" and index["encoder"] == "tiny-test"
    loaded = Generator.from_pretrained(tmp_path / "m")
    assert np.array_equal(_run(gen).images, _run(loaded).images)
    assert loaded.embedding_bank.labels == ["stroma", "tumour"]
    assert loaded.describe()["bank"] == {"stroma": 6, "tumour": 6}


def test_reference_images_are_embedded_by_the_model_encoder(gen, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"ref{i}.png")
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(paths[-1])
    out = gen.generate(reference=paths, num_images=2, num_inference_steps=STEPS, output_type="np", progress=False)
    assert out.images.shape == (4, 32, 32, 3)
    assert out.condition_ids == [str(paths[0])] * 2 + [str(paths[1])] * 2
    assert out.conditions.encoder == "tiny-test"
    torch.testing.assert_close(out.conditions.values[0, 0], gen.encoder.embed([Image.open(paths[0])])[0])


def test_encoder_is_saved_with_the_model_and_reloaded(gen, tmp_path):
    gen.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "encoder" / "pixgen_encoder.json").is_file()
    loaded = Generator.from_pretrained(tmp_path / "m")
    img = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    torch.testing.assert_close(loaded.encoder.embed([img]), gen.encoder.embed([img]))


def test_label_generation_from_bank(gen):
    out = gen.generate(label="tumour", num_images=3, num_inference_steps=STEPS, output_type="np", progress=False)
    assert out.images.shape[0] == 3 and all(i.startswith("tumour[") for i in out.condition_ids)
    with pytest.raises(InputError, match="unknown label 'nope'.*stroma, tumour"):
        gen.generate(label="nope")


def test_epsilon_model_with_learned_variance_and_dpm_solver():
    """The epsilon half is used, the variance half never read: NaN there changes nothing, while
    swapping the halves (taking the wrong one) changes the result."""
    from pixgen.models.transformer import TransformerOutput

    gen = tiny_generator(prediction_type="epsilon", out_channels=8)
    assert type(gen.scheduler).__name__ == "DPMSolverMultistepScheduler"
    reference = _run(gen, output_type="latent").images
    original = gen.transformer.forward

    def nan_variance(*args, **kwargs):
        out = original(*args, **kwargs).sample
        return TransformerOutput(sample=torch.cat([out[:, :4], torch.full_like(out[:, 4:], float("nan"))], 1))

    def swapped_halves(*args, **kwargs):
        out = original(*args, **kwargs).sample
        return TransformerOutput(sample=torch.cat([out[:, 4:], out[:, :4]], 1))

    gen.transformer.forward = nan_variance
    assert torch.equal(_run(gen, output_type="latent").images, reference)
    gen.transformer.forward = swapped_halves
    assert not torch.allclose(_run(gen, output_type="latent").images, reference, atol=1e-3)


def test_embeddings_file_round_trip(tmp_path):
    emb = _emb()
    emb.ids = ["a", "b"]
    save_embeddings(tmp_path / "e.safetensors", emb)
    back = load_embeddings(tmp_path / "e.safetensors")
    assert back.encoder == "tiny-test" and back.ids == ["a", "b"] and torch.equal(back.values, emb.values)
    np.save(tmp_path / "e.npy", emb.values.numpy())
    assert load_embeddings(tmp_path / "e.npy").encoder is None


# ---------------------------------------------------------------- bad input, by message
def test_wrong_dim_refused(gen):
    with pytest.raises(EncoderMismatchError, match="dim 16 but the model expects 32"):
        _run(gen, embeddings=_emb(dim=16))


def test_other_encoder_refused(gen):
    with pytest.raises(EncoderMismatchError, match="from encoder 'uni2-h'.*trained on 'tiny-test'"):
        _run(gen, embeddings=_emb(encoder="uni2-h"))


def test_nan_embeddings_refused(gen):
    values = torch.randn(3, 32)
    values[1, 4] = float("nan")
    with pytest.raises(InputError, match=r"NaN or Inf \(rows \[1\]\)"):
        _run(gen, embeddings=values)


def test_corrupt_and_unsupported_reference_images(gen, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match="cannot read image .*bad.png"):
        gen.generate(reference=[bad])
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    with pytest.raises(InputError, match="cannot read image .*notes.txt"):
        gen.generate(reference=[txt])
    with pytest.raises(InputError, match="image not found"):
        gen.generate(reference=[tmp_path / "missing.png"])


def test_missing_and_broken_model_dirs(tmp_path):
    with pytest.raises(ModelLoadError, match="no model directory at"):
        Generator.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a model directory"):
        Generator.from_pretrained(tmp_path / "empty")


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="could not fetch 'someone/some-model'"):
        Generator.from_pretrained("someone/some-model")


def test_conflicting_or_missing_conditions(gen):
    with pytest.raises(InputError, match="only one of"):
        gen.generate(embeddings=_emb(), label="tumour")
    unconditioned = gen.generate(num_images=3, num_inference_steps=STEPS, progress=False)  # pooled bank draws
    assert {i.split("[")[0] for i in unconditioned.condition_ids} <= {"stroma", "tumour"}
    with pytest.raises(InputError, match="nothing to condition on"):
        tiny_generator(bank=False).generate()
    with pytest.raises(InputError, match="num_images must be >= 1"):
        gen.generate(label="tumour", num_images=0)


def test_bank_refuses_empty_and_nan():
    with pytest.raises(InputError):
        EmbeddingBank({}, encoder=None)
    with pytest.raises(InputError, match="NaN"):
        EmbeddingBank({"a": torch.full((2, 1, 4), float("nan"))}, encoder=None)


def test_labels_are_the_priors_or_else_the_banks():
    from pixgen.commands import DEFAULT_MODEL

    gen = tiny_generator(bank=True)
    assert gen.labels == gen.embedding_bank.labels and gen.labels
    assert tiny_generator(bank=False).labels == []
    bundled = Generator.from_pretrained(DEFAULT_MODEL)
    assert bundled.labels == sorted(bundled.prior.labels) == ["consep", "lung_aca", "lung_n", "lung_scc", "monuseg"]
