"""The independently trained classifier detector: training, save/load, registry, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from metrics.classifier import ClassifierDetector, main, score_classifier, train_classifier
from metrics.detectors import get_detector, list_detectors
from pixgen.errors import InputError, ModelLoadError

COLOURS = {"red": (200, 60, 60), "green": (60, 200, 60), "blue": (60, 60, 200)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A classifier trained for 40 steps on 3 labels x 24 coloured-noise images (32 px)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for label, colour in COLOURS.items():
        (root / label).mkdir()
        for i in range(24):
            im = np.clip(np.array(colour) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(im).save(root / label / f"{i:02d}.png")
    (root / "tiles.json").write_text("{}")  # a file at the root is ignored
    out = tmp_path_factory.mktemp("model")
    summary = train_classifier(root, out, steps=40, batch_size=16, seed=0)
    return root, out, summary


def _images(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_training_beats_chance_and_records_its_settings(trained):
    _, out, summary = trained
    assert summary["labels"] == ["blue", "green", "red"]
    assert summary["n_heldout"] == 7 and summary["heldout_accuracy"] >= 0.85  # chance: 1/3
    saved = json.loads((out / "classifier.json").read_text())
    assert saved == summary
    assert {"width", "input_size", "preprocessing", "steps", "training_folder", "date"} <= set(saved)
    assert sorted(p.name for p in out.iterdir()) == ["classifier.json", "model.safetensors"]  # no .tmp left


def test_save_load_round_trip_and_registry(trained):
    _, out, _ = trained
    a = ClassifierDetector(out)(_images())
    b = get_detector(f"classifier:{out}")(_images())
    assert a.shape == (4, 128) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert get_detector(f"classifier:{out}").name == f"classifier-{out.name}"
    assert "classifier:DIR" in list_detectors()


def test_missing_folder_and_bad_names(tmp_path):
    with pytest.raises(ModelLoadError, match="no classifier detector.*missing classifier.json, model.safetensors.*metrics.classifier --train"):
        get_detector(f"classifier:{tmp_path / 'nowhere'}")
    with pytest.raises(InputError, match="names no folder"):
        get_detector("classifier:")


def test_corrupt_or_mismatched_weights(trained, tmp_path):
    _, out, summary = trained
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "classifier.json").write_text(json.dumps(summary))
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="do not fit a classifier of width 128 with 3 labels"):
        ClassifierDetector(bad)
    (bad / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    (bad / "classifier.json").write_text(json.dumps({**summary, "width": 64}))
    with pytest.raises(ModelLoadError, match="do not fit a classifier of width 64"):
        ClassifierDetector(bad)
    (bad / "classifier.json").write_text("{")
    with pytest.raises(ModelLoadError, match="unreadable"):
        ClassifierDetector(bad)


def test_training_folder_needs_label_subfolders(tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="label subfolders"):
        train_classifier(tmp_path, tmp_path / "out", steps=1)
    assert main(["--train", str(tmp_path), "--out", str(tmp_path / "out"), "--steps", "1"]) == 2
    assert "label subfolders" in capsys.readouterr().err


def test_scoring_on_a_held_out_folder(trained, tmp_path, capsys):
    root, out, _ = trained
    assert main(["--out", str(out), "--test", str(root)]) == 0
    held = json.loads(capsys.readouterr().out)["held_out"]
    assert held["n"] == 72 and held["accuracy"] >= 0.85 and set(held["per_class"]) == set(COLOURS)
    (tmp_path / "red").mkdir()
    (tmp_path / "blue").mkdir()
    for d in ("red", "blue"):
        for i in range(2):
            Image.new("RGB", (16, 16), d).save(tmp_path / d / f"{i}.png")
    with pytest.raises(InputError, match="the classifier"):
        score_classifier(out, tmp_path)
