"""Training your own virtual-staining models from paired folders (BCI / MIST layouts the tests
write): the translator, the IHC generator (LoRA) and the direct ControlNet baseline train a few
steps end to end, resume exactly, and what they export runs through ``pixgen stain``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pixgen.cli import main as cli
from pixgen.errors import InputError
from pixgen.pipeline import Generator
from pixgen.staining import direct_stain
from pixgen.testing import (
    save_tiny_model,
    synthetic_he_ihc_pair,
    write_bci_pairs,
    write_mist_pairs,
)
from training.tasks import lora, stain_controlnet, translator

TINY = ["--preset", "tiny", "--batch-size", "4"]
FLOW = ["--batch-size", "8", "--hidden", "16", "--num-blocks", "1", "--checkpoint-every", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("stain-train")
    return {"bci": write_bci_pairs(base / "BCI", n=3, size=64), "he": save_tiny_model(base / "he-model"),
            "mist": write_mist_pairs(base / "MIST", markers=("Ki67", "HER2"), n=2, size=64), "base": base}


def bci(data, out: Path) -> list[str]:
    return ["--layout", "bci", "--root", str(data["bci"]), "--mpp", "0.5", "--crop", "32", "--init", str(data["he"]),
            "--out", str(out)]


@pytest.fixture(scope="module")
def stain_model(data) -> Path:
    """A BCI HER2 stain model trained here: translator (4 steps) + LoRA IHC generator (2 steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = data["base"] / "bci-stain"
    translator.main(bci(data, data["base"] / "tr") + FLOW + ["--max-steps", "4", "--stain-model", str(model)])
    lora.main(bci(data, data["base"] / "lora") + TINY + ["--max-steps", "2", "--lora-rank", "4", "--set",
              "lora_targets=attn2.to_q,attn2.to_k,attn2.to_v,attn2.to_out.0", "--stain-model", str(model)])
    torch.set_num_threads(threads)
    return model


def test_bci_stain_model_trains_and_runs_from_the_cli(stain_model, data, tmp_path, one_thread):
    spec = json.loads((stain_model / "stain_model.json").read_text())
    assert spec["stains"]["her2"] == {"translator": "../tr/final", "generator": "../lora/final", "marker": "her2"}
    cache = json.loads((data["base"] / "tr" / "cache" / "index.json").read_text())
    assert cache["count"] == 12 and set(cache["fields"]) == {"he_latents", "he_embeddings"}  # 3 pairs x 4 crops
    out = tmp_path / "her2"
    test_he = data["bci"] / "HE" / "test"
    assert cli(["stain", str(test_he / "00000_test_0.png"), "--model", str(stain_model), "--to", "her2", "--out",
                str(out), "--steps", "2", "--mpp", "1.0"]) == 1  # the model works at 0.5 um/px
    assert cli(["stain", str(test_he), "--model", str(stain_model), "--to", "her2", "--out", str(out),
                "--steps", "2"]) == 0
    assert len(list(out.glob("0*.png"))) == 3


def test_lora_changes_only_cross_attention_and_tags_the_domain(stain_model, data):
    base = load_file(str(data["he"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    tuned = load_file(str(data["base"] / "lora" / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(base) == set(tuned)  # merged: no adapter keys left
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(".attn2." in k for k in changed)
    gen = Generator.from_pretrained(data["base"] / "lora" / "final")
    assert gen.config["domain"] == "ihc-her2" and gen.embedding_bank.domain == "ihc-her2"


def test_translator_resumes_exactly(data, tmp_path, one_thread):
    whole, split = tmp_path / "whole", tmp_path / "split"
    translator.main(bci(data, whole) + FLOW + ["--max-steps", "4"])
    translator.main(bci(data, split) + FLOW + ["--max-steps", "2"])
    translator.main(bci(data, split) + FLOW + ["--max-steps", "4", "--resume"])
    digest = [(run / "checksums" / "rank-0.txt").read_text() for run in (whole, split)]
    assert digest[0] == digest[1]
    config = json.loads((whole / "final" / "config.json").read_text())
    assert (config["source"], config["domain"], config["encoder"]) == ("he", "ihc-her2", "tiny-test")


def test_mist_lora_learns_its_marker(data, tmp_path, one_thread):
    args = ["--layout", "mist", "--root", str(data["mist"]), "--markers", "Ki67", "--mpp", "0.5", "--crop", "32",
            "--init", str(data["he"]), "--out", str(tmp_path / "ki67"), *TINY, "--max-steps", "1", "--lora-rank", "2",
            "--set", "lora_targets=attn2.to_q,attn2.to_v"]
    lora.main(args)
    assert Generator.from_pretrained(tmp_path / "ki67" / "final").config["domain"] == "ihc-ki67"
    with pytest.raises(InputError, match="which marker"):
        lora.main(args[:4] + args[6:])  # no --markers: both marker folders are used, and none is named


def test_direct_controlnet_baseline_trains_and_stains(stain_model, data, tmp_path, one_thread):
    out = tmp_path / "cn"
    stain_controlnet.main(bci(data, out)[:-4] + ["--init", str(data["base"] / "lora" / "final"), "--out", str(out),
                                                 *TINY, "--max-steps", "2", "--set", "controlnet_layers=1"])
    gen = Generator.from_pretrained(out / "final")
    assert gen.controlnet is not None and gen.config["stain_baseline"]["control"] == "he_latents"
    he = [synthetic_he_ihc_pair(32, s)[0] for s in (1, 2)]
    a, b = direct_stain(gen, he, seed=0, num_inference_steps=2), direct_stain(gen, he[1:], seed=1, num_inference_steps=2)
    assert a[0].size == (32, 32) and np.array_equal(np.asarray(a[1]), np.asarray(b[0]))
    with pytest.raises(InputError, match="32 x 32 px"):
        direct_stain(gen, [np.zeros((64, 64, 3), np.uint8)])
    with pytest.raises(Exception, match="not a direct staining baseline"):
        direct_stain(Generator.from_pretrained(data["he"]), he)
    # the same CLI and output as the embedding route, so both can be compared on the same tiles
    assert cli(["stain", str(data["bci"] / "HE" / "test"), "--model", str(out / "final"), "--to", "her2", "--out",
                str(tmp_path / "direct"), "--steps", "1"]) == 1  # 64 px tiles: the baseline takes 32 px
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i, im in enumerate(he):
        Image.fromarray(im).save(tiles / f"{i}.png")
    assert cli(["stain", str(tiles), "--model", str(out / "final"), "--to", "her2", "--out", str(tmp_path / "direct"),
                "--steps", "2", "--seed", "0"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "direct" / "0001.png")), np.asarray(a[1]))
    assert json.loads((tmp_path / "direct" / "stain.json").read_text())["direct"] is True


def test_pairs_at_another_resolution_are_refused(data, tmp_path):
    args = bci(data, tmp_path / "x")
    args[args.index("--crop") + 1] = "64"  # 64 px crops resized to 32 px tiles: 1.0 um/px, the model is 0.5
    with pytest.raises(InputError, match="reach the model at 1 um/px"):
        translator.main(args + FLOW + ["--max-steps", "1"])
