"""The one-command reproduction of the bundled models, as a smoke run (slow: run with -m slow)."""

from __future__ import annotations

import pytest

from pixgen.encoders import load_encoder
from pixgen.pipeline import Generator
from recipes.default_models import main


@pytest.mark.slow
def test_smoke_run_exports_a_generator_with_the_bundled_encoder(shared_data, tmp_path):
    work, weights = tmp_path / "work", tmp_path / "weights"
    args = ["--data", str(shared_data), "--work", str(work), "--export", str(weights), "--ae-steps", "2",
            "--ssl-steps", "2", "--gen-steps", "3", "--limit", "30", "--eval-limit", "4", "--guidance", "1.5"]
    assert main(args) == 0
    counts = (work / "tiles" / "tiles.json").read_text()
    assert '"monuseg": 270' in counts and '"consep": 30' in counts
    assert main(args) == 0  # every stage done: nothing is redone
    gen = Generator.from_pretrained(weights / "pixgen-default", encoder_path=weights / "pixgen-ssl")
    assert gen.config["encoder"] == "pixgen-ssl" and gen.config["encoder_path"] is None
    assert gen.config["guidance_scale"] == 1.5
    assert gen.transformer.config.patch_size == 4 and gen.config["image_size"] == 128
    assert load_encoder(str(weights / "pixgen-ssl")).dim == 192
    out = gen.generate(label="consep", num_images=1, num_inference_steps=2, output_type="np", progress=False)
    assert out.images.shape == (1, 128, 128, 3)
