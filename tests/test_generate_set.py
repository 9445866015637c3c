"""`pixgen generate` writes a declared set: manifest.json, a used folder refused, an unwritable
--out found before the model loads, an interrupted set marked incomplete, `pixgen eval` reading it."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixgen.cli import main
from pixgen.io import SetManifest, read_provenance, sha256_file, weights_sha256
from pixgen.testing import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def no_model_load(monkeypatch):
    from pixgen.pipeline import Generator

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(Generator, "from_pretrained", refuse)


def test_manifest_names_model_by_content_sampler_and_references(model_dir, tmp_path):
    ref = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(ref)
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model_dir), "--reference", str(ref), "--n", "3", "--seed", "7",
                 "--batch-size", "2", "--steps", "3", "--out", str(out)]) == 0
    m = SetManifest.load(out)
    assert m.complete and [e.file for e in m.files] == ["0000.png", "0001.png", "0002.png"]
    assert [e.seed for e in m.files] == [7, 8, 9]
    assert m.model.name == "tiny" and (m.model.weights_sha256, m.model.weights_files) == weights_sha256(model_dir)
    assert str(model_dir) not in m.to_dict().__repr__()  # the model is named by content, not by its path
    assert (m.sampler.steps, m.sampler.guidance, m.sampler.batch_size, m.sampler.n) == (3, 2.0, 2, 3)
    assert m.references == {str(ref): sha256_file(ref)}
    cond = m.files[1].condition
    assert (cond.kind, cond.id, cond.reference_sha256) == ("reference", str(ref), sha256_file(ref))
    assert {"pixgen", "torch", "diffusers"} <= set(m.versions)
    assert read_provenance(out / "0001.png")["model"]["weights_sha256"] == m.model.weights_sha256
    from safetensors.torch import load_file

    assert load_file(str(out / m.conditions["file"]))["embeddings"].shape == (3, 1, 32)
    assert not list(out.glob("*.part"))


def test_generate_refuses_a_used_folder_unless_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["generate", "--model", str(model_dir), "--label", "tumour", "--out", str(out)]
    assert main([*base, "--n", "3"]) == 0
    (out / "mine.txt").write_text("keep me")
    assert main([*base, "--n", "1"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert len(SetManifest.load(out).files) == 3  # untouched
    assert main([*base, "--n", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "conditions.safetensors", "contact_sheet.png",
                                                     "manifest.json", "mine.txt"]
    assert len(SetManifest.load(out).files) == 1


def test_unusable_out_fails_before_the_model_loads(tmp_path, no_model_load, capsys):
    (tmp_path / "file.txt").write_text("x")
    assert main(["generate", "--out", str(tmp_path / "file.txt")]) == 1
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "0000.png").write_bytes(b"old")
    assert main(["generate", "--out", str(tmp_path / "used")]) == 1
    assert "not empty" in capsys.readouterr().err


def test_unwritable_out_fails_before_the_model_loads(tmp_path, no_model_load, capsys):
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o555)
    try:
        if os.access(target, os.W_OK):  # root ignores permissions: a read-only file system instead
            target = Path("/proc/pixgen-out")
        assert main(["generate", "--out", str(target / "set")]) == 1
        assert "cannot write to" in capsys.readouterr().err
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_an_interrupted_set_is_marked_incomplete_and_eval_refuses_it(model_dir, tmp_path, monkeypatch):
    from pixgen.io import images

    real_save, calls = images.save_png, []

    def save_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(images, "save_png", save_then_interrupt)
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model_dir), "--n", "3", "--out", str(out)]) == 130
    m = SetManifest.load(out)
    assert m.complete is False and [e.file for e in m.files] == ["0000.png"]
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "manifest.json"]  # no .part, no sheet
    from metrics.images import load_image_folder
    from pixgen.errors import InputError

    with pytest.raises(InputError, match="incomplete"):
        load_image_folder(out)


def test_a_refused_request_leaves_nothing(model_dir, tmp_path):
    assert main(["generate", "--model", str(model_dir), "--label", "bone", "--out", str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()


def test_eval_reads_the_set_and_its_conditions_from_the_manifest(model_dir, tmp_path):
    from metrics.detectors import Detector
    from metrics.report import evaluate
    from metrics.stats import SmallSampleWarning

    class Projection(Detector):  # 32-d features, the dimension of the tiny model's conditions
        name, dim = "projection-32", 32

        def features(self, images):
            w = torch.Generator().manual_seed(0)
            return images.float().mean((2, 3)) @ torch.randn(3, 32, generator=w)

    syn = tmp_path / "syn"
    assert main(["generate", "--model", str(model_dir), "--n", "8", "--out", str(syn)]) == 0
    rng = np.random.default_rng(1)
    (tmp_path / "real").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "real" / f"{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        rep = evaluate(tmp_path / "real", syn, detectors=[Projection()], n_boot=0, utility=())
    assert rep["sets"]["synthetic"]["n"] == 8  # the declared files: the contact sheet is not a sample
    assert rep["conditional"]["detector"] == "projection-32" and rep["conditional"]["n"] == 8
