"""Autoencoder wrapper: scaling/shift round trip, factors, save/load of every kind, bad folders."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderTiny

from pixgen.errors import ModelLoadError
from pixgen.models.autoencoders import Autoencoder, PixelSpace, load_autoencoder
from pixgen.testing import tiny_autoencoder


def test_kl_latents_use_scale_and_shift():
    ae = tiny_autoencoder()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    raw = ae.model.encode(x).latent_dist.mode()
    torch.testing.assert_close(ae.encode(x), (raw - 0.1) * 1.5)
    assert ae.downsample_factor == 4 and ae.latent_channels == 4
    torch.testing.assert_close(ae.decode(ae.encode(x)), ae.model.decode(raw).sample)


@pytest.mark.parametrize("make", [
    lambda: tiny_autoencoder().model,
    lambda: PixelSpace(),
    lambda: AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                            num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4),
])
def test_every_kind_round_trips(tmp_path, make):
    ae = Autoencoder(make().eval())
    ae.save_pretrained(tmp_path / "vae")
    back = load_autoencoder(tmp_path / "vae")
    assert back.kind == ae.kind and back.downsample_factor == ae.downsample_factor
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(back.encode(x), ae.encode(x))


def test_bad_folders_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="no autoencoder config"):
        load_autoencoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(ModelLoadError, match="unsupported autoencoder class 'VQModel'"):
        load_autoencoder(tmp_path)
    with pytest.raises(ModelLoadError, match="no autoencoder folder"):
        load_autoencoder(tmp_path / "missing")
