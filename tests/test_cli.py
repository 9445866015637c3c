"""The `pixgen` command: help, generate with provenance, info, encoders, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from pixgen.cli import main
from pixgen.io import read_provenance
from pixgen.testing import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def test_help_lists_library_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("generate", "info", "encoders"):
        assert cmd in out


def test_generate_writes_pngs_contact_sheet_and_manifest(model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model_dir), "--n", "4", "--out", str(out), "--seed", "7", "--steps", "3"]) == 0
    pngs = sorted(out.glob("0*.png"))
    assert [p.name for p in pngs] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["seed"] for f in manifest["files"]] == [7, 8, 9, 10] and manifest["model"]["encoder"] == "tiny-test"
    assert manifest["sampler"]["steps"] == 3 and manifest["model"]["name"] == "tiny" and manifest["versions"]["pixgen"]
    png_prov = read_provenance(pngs[2])
    assert png_prov["seed"] == 9 and png_prov["sampler"]["guidance"] == 2.0 and png_prov["condition"]["id"]
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 64 and sheet.size[1] > 64


def test_generate_by_label_and_embeddings_file(model_dir, tmp_path):
    import torch

    from pixgen.embeddings import Embeddings, save_embeddings

    assert main(["generate", "--model", str(model_dir), "--n", "2", "--label", "stroma", "--out", str(tmp_path / "a")]) == 0
    assert read_provenance(tmp_path / "a" / "0001.png")["condition"]["label"] == "stroma"
    save_embeddings(tmp_path / "e.safetensors", Embeddings(torch.randn(1, 32), encoder="tiny-test"))
    args = ["generate", "--model", str(model_dir), "--n", "1", "--embeddings", str(tmp_path / "e.safetensors")]
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "0000.png").is_file()


def test_info_describes_model(model_dir, capsys):
    assert main(["info", str(model_dir), "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["encoder"] == "tiny-test" and desc["condition_dim"] == 32 and desc["prediction"] == "flow"
    assert desc["image_size"] == 32 and desc["bank"] == {"stroma": 6, "tumour": 6}


def test_errors_are_one_line_without_traceback(tmp_path):
    cmd = [sys.executable, "-m", "pixgen.cli", "generate", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("pixgen: error:")]
    assert len(lines) == 1 and "no model directory" in lines[0] and "fix:" in lines[0]


def test_bad_label_error_names_the_choices(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(model_dir), "--label", "bone", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "unknown label 'bone'" in err and "stroma, tumour" in err
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_generate_with_control_mask(tmp_path):
    import numpy as np
    import torch

    from pixgen.models.controlnet import PixgenControlNet
    from pixgen.testing import tiny_generator

    gen = tiny_generator()
    gen.controlnet = PixgenControlNet.from_transformer(gen.transformer, num_layers=1)
    with torch.no_grad():
        for p in gen.controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # leave the zero init so the mask matters
    gen.save_pretrained(tmp_path / "m")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    base = ["generate", "--model", str(tmp_path / "m"), "--n", "1", "--label", "tumour"]
    assert main([*base, "--out", str(tmp_path / "a"), "--control-image", str(tmp_path / "mask.png")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--control-image", str(tmp_path / "mask.png"), "--control-scale", "0"]) == 0
    assert main([*base, "--out", str(tmp_path / "c")]) == 0
    a, b, c = (np.array(Image.open(tmp_path / d / "0000.png")) for d in "abc")
    assert np.array_equal(b, c) and not np.array_equal(a, c)
    assert read_provenance(tmp_path / "a" / "0000.png")["control_image"] == str(tmp_path / "mask.png")
    with pytest.raises(SystemExit):
        main(["generate", "--help"])


def test_missing_bundled_model_says_so(monkeypatch, tmp_path, capsys):
    from pixgen import commands

    monkeypatch.setattr(commands, "DEFAULT_MODEL", tmp_path / "pixgen-default")
    assert main(["generate", "--model", str(tmp_path / "pixgen-default"), "--out", str(tmp_path / "o")]) == 1
    assert "bundled default model is missing from" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,words", [
    ("--guidance", "nan", "guidance scale must be a finite number"),
    ("--guidance", "inf", "guidance scale must be a finite number"),
    ("--steps", "0", "sampling steps must be a whole number >= 1"),
])
def test_nan_guidance_and_zero_steps_are_one_line_errors(model_dir, tmp_path, capsys, flag, value, words):
    assert main(["generate", "--model", str(model_dir), "--out", str(tmp_path / "o"), flag, value]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "fix:" in err
    assert not (tmp_path / "o").exists()  # nothing written, no NaN provenance


def test_label_image_regenerates_alone_from_its_seed(model_dir, tmp_path):
    """Issue 11: image i of `--n 8 --seed 5` equals `--n 1 --seed 5+i` (bank draw per image seed)."""
    import numpy as np

    base = ["generate", "--model", str(model_dir), "--label", "tumour", "--batch-size", "1", "--steps", "2"]
    assert main([*base, "--n", "8", "--seed", "5", "--out", str(tmp_path / "run")]) == 0
    assert main([*base, "--n", "1", "--seed", "11", "--out", str(tmp_path / "alone")]) == 0
    run, alone = np.array(Image.open(tmp_path / "run" / "0006.png")), np.array(Image.open(tmp_path / "alone" / "0000.png"))
    assert np.array_equal(run, alone)
    assert read_provenance(tmp_path / "run" / "0006.png")["condition"] == read_provenance(tmp_path / "alone" / "0000.png")["condition"]
