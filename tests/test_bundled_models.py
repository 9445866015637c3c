"""The bundled default models (pixgen/weights): what a fresh, offline install can do with them."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from pixgen.cli import main
from pixgen.commands import DEFAULT_MODEL
from pixgen.encoders import load_encoder
from pixgen.encoders.bundled import BUNDLED_SSL_DIR
from pixgen.io import read_provenance
from pixgen.pipeline import Generator

LABELS = ["consep", "lung_aca", "lung_n", "lung_scc", "monuseg"]


def test_bundled_weights_fit_the_budget():
    files = [p for p in DEFAULT_MODEL.parent.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 60e6
    assert any(p.name.endswith(".safetensors") for p in files) and not any(p.suffix in (".pt", ".bin") for p in files)


def test_default_model_is_the_documented_one():
    gen = Generator.from_pretrained(DEFAULT_MODEL)
    assert gen.config["encoder"] == "pixgen-ssl" and gen.config["encoder_path"] is None
    assert gen.config["image_size"] == 128 and gen.config["mpp"] == 0.5
    assert gen.embedding_bank.labels == LABELS and gen.embedding_bank.encoder == "pixgen-ssl"
    assert all(torch.isfinite(p).all() for p in gen.transformer.parameters())


def test_readme_main_command_runs_on_the_bundled_model(tmp_path):
    assert main(["generate", "--n", "2", "--steps", "4", "--out", str(tmp_path)]) == 0
    img = np.array(Image.open(tmp_path / "0001.png"))
    assert img.shape == (128, 128, 3) and img.std() > 5  # tissue-like contrast, not a flat tile
    assert (tmp_path / "contact_sheet.png").is_file()
    assert json.loads((tmp_path / "manifest.json").read_text())["model"]["encoder"] == "pixgen-ssl"


def test_label_generation_uses_the_bank(tmp_path, capsys):
    assert main(["generate", "--label", "lung_scc", "--n", "2", "--steps", "4", "--out", str(tmp_path / "scc")]) == 0
    assert read_provenance(tmp_path / "scc" / "0000.png")["condition"]["label"] == "lung_scc"
    assert main(["generate", "--label", "lung_xyz", "--n", "1", "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "unknown label 'lung_xyz'" in err and "lung_scc" in err


def test_bundled_encoder_embeds_real_tiles_and_drives_reference_generation(shared_data, tmp_path):
    tile = sorted((shared_data / "consep" / "test" / "images").glob("*.jpg"))[0]
    enc = load_encoder("pixgen-ssl")
    emb = enc.embed(torch.from_numpy(np.array(Image.open(tile).convert("RGB"))).permute(2, 0, 1)[None])
    assert emb.shape == (1, 192) and torch.isfinite(emb).all()
    assert (BUNDLED_SSL_DIR / "model.safetensors").is_file()
    assert main(["generate", "--reference", str(tile), "--n", "1", "--steps", "4", "--out", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "0000.png").size == (128, 128)

