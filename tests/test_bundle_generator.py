"""recipes.bundle_generator: only the transformer is rewritten (int8), the rest stays byte-identical,
and a model trained on another VAE is refused."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from pixgen.errors import ModelLoadError
from pixgen.io.int8 import INT8_WEIGHTS
from pixgen.pipeline import Generator
from pixgen.testing import tiny_autoencoder, tiny_generator
from recipes.bundle_generator import main


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bundling_replaces_only_the_transformer_and_sets_guidance(tmp_path):
    dest = tiny_generator(seed=0).save_pretrained(tmp_path / "bundled")
    trained = tiny_generator(seed=0)
    with torch.no_grad():  # "more training": same VAE and encoder, another transformer
        for p in trained.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = trained.save_pretrained(tmp_path / "final")
    before = _digests(dest)
    main(["--model", str(model), "--dest", str(dest), "--guidance", "1.5", "--steps", "20"])
    after = _digests(dest)
    kept = {k: v for k, v in before.items() if not k.startswith("transformer/") and k != "model_index.json"}
    assert kept and all(after[k] == v for k, v in kept.items())  # VAE, encoder, bank, scheduler: byte-identical
    assert sorted(k for k in after if k.startswith("transformer/")) == ["transformer/config.json",
                                                                        f"transformer/{INT8_WEIGHTS}"]
    index = json.loads((dest / "model_index.json").read_text())
    assert index["guidance_scale"] == 1.5 and index["num_inference_steps"] == 20
    loaded = Generator.from_pretrained(dest)
    for (name, a), b in zip(trained.transformer.state_dict().items(), loaded.transformer.state_dict().values()):
        assert torch.allclose(a, b, atol=0.01 * a.abs().max().item() + 1e-4), name


def test_a_model_with_another_vae_is_refused_and_nothing_changes(tmp_path):
    dest = tiny_generator(seed=0).save_pretrained(tmp_path / "bundled")
    other = tiny_generator(seed=0)
    other.vae = tiny_autoencoder(seed=5)
    model = other.save_pretrained(tmp_path / "final")
    before = _digests(dest)
    with pytest.raises(ModelLoadError, match="another VAE"):
        main(["--model", str(model), "--dest", str(dest), "--guidance", "2"])
    assert _digests(dest) == before
