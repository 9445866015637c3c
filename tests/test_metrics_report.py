"""`pixgen eval` end to end on small folders of real LC25000 tiles, and the Python API."""

from __future__ import annotations

import json
import shutil
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metrics.report import BLUR, FLOOR, FLOOR_HALF, NOISE, SYNTHETIC, evaluate
from metrics.stats import SmallSampleWarning
from pixgen.cli import main

CLASSES = ("lung_aca", "lung_n", "lung_scc")


@pytest.fixture(scope="module")
def folders(shared_data, tmp_path_factory) -> dict[str, Path]:
    """42 LC25000 tiles in class subfolders: train 5/class, test 5/class, synthetic 4/class, where
    the "synthetic" set holds two exact copies of training tiles."""
    root = tmp_path_factory.mktemp("eval")
    out = {}
    for c in CLASSES:
        files = sorted((shared_data / "lc25000-lung" / c).glob("*.jpeg"))[::300][:14]
        for split, chosen in (("train", files[:5]), ("test", files[5:10]), ("synthetic", files[10:14])):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                shutil.copy(f, root / split / c / f.name)
            out[split] = root / split
    for f in sorted((root / "train" / "lung_n").iterdir())[:2]:  # planted copies, as PNG
        Image.open(f).save(root / "synthetic" / "lung_n" / f"copy_{f.stem}.png")
    return out


def test_pixgen_eval_writes_the_report_with_calibration_rows(folders, tmp_path, capsys):
    out = tmp_path / "report"
    code = main([
        "eval", "--real", str(folders["test"]), "--synthetic", str(folders["synthetic"]), "--train", str(folders["train"]),
        "--out", str(out), "--detectors", "random-conv", "--n-boot", "20", "--utility", "linear-probe",
    ])
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["fidelity"]) == [SYNTHETIC, FLOOR, NOISE, BLUR]
    for row in rep["fidelity"].values():
        for key in ("FD_random-conv", "KID_random-conv", "precision_random-conv", "coverage_random-conv", "C2ST_random-conv"):
            assert len(row[key]["ci"]) == 2
    # the trivial baselines are told apart from real far better than the floor
    c2st = {name: row["C2ST_random-conv"]["value"] for name, row in rep["fidelity"].items()}
    assert c2st[NOISE] > 0.7 and c2st[NOISE] > c2st[FLOOR]
    assert rep["rows"][FLOOR]["n_candidate"] == rep["sets"]["synthetic"]["n"] == 14
    assert {s["synthetic"].rsplit("/", 1)[-1] for s in rep["memorisation"]["random-conv"]["suspects"]} == {
        p.name for p in (folders["synthetic"] / "lung_n").glob("copy_*.png")
    }
    assert set(rep["c2st_per_class"][SYNTHETIC]["random-conv"]) == set(CLASSES)
    assert set(rep["utility"]["tstr"]) == {"linear-probe"}  # the small CNN: test_metrics_utility
    assert any("FD: only" in w for w in rep["warnings"])  # 14 images: the report says so
    md = (out / "report.md").read_text()
    for text in (FLOOR, NOISE, BLUR, "Memorisation audit", "suspects_random-conv.png", "TSTR"):
        assert text in md
    for png in ("pca_random-conv.png", "nn_distances_random-conv.png", "suspects_random-conv.png"):
        assert (out / png).stat().st_size > 1000
    assert "report.md" in capsys.readouterr().out


def test_pixgen_eval_offline_without_inception_weights_is_one_clear_line(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def blocked(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", blocked)
    code = main(["eval", "--real", str(folders["test"]), "--synthetic", str(folders["synthetic"]), "--out", str(tmp_path / "o"),
                 "--detectors", "inception"])  # asked for explicitly (the default falls back offline: test_security)
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "--inception-weights" in err


def test_evaluate_api_without_train_with_crops_and_conditioning(folders, tmp_path):
    from metrics.detectors import RandomConvDetector, compute_features
    from metrics.images import load_image_folder

    # conditions = the random-conv embeddings of the synthetic images themselves -> cosine 1
    syn = load_image_folder(folders["synthetic"])
    cond = tmp_path / "conditioning.npz"
    np.savez(cond, files=np.array([p.rsplit("/", 1)[-1] for p in syn.paths]),
             embeddings=compute_features(RandomConvDetector(seed=0), syn.images), encoder=np.array("random-conv"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        rep = evaluate(folders["test"], folders["synthetic"], detectors=["random-conv"], n_boot=0, utility=(),
                       crop_size=112, conditioning=cond)
    assert list(rep["fidelity"]) == [SYNTHETIC, FLOOR_HALF, NOISE, BLUR]
    assert rep["memorisation"] == {} and "utility" not in rep
    assert np.isnan(rep["fidelity"][SYNTHETIC]["KID_random-conv"]["ci"][0])  # n_boot=0: no interval
    assert rep["fidelity"][SYNTHETIC]["cropFD_random-conv"]["value"] > 0
    assert rep["conditional"]["n"] == 14
    assert rep["conditional"]["cos_generated_condition"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert "cos_real_same_class" in rep["conditional"]


def test_pixgen_eval_on_mask_folders_runs_the_segmentation_study(shared_data, tmp_path):
    """images/ + inst/ folders (64 px corners of CoNSeP tiles): fidelity rows plus Dice/AJI."""
    from metrics.segmentation import load_mask_folder

    for split, source, n in (("train", "train", 6), ("test", "test", 4), ("synthetic", "train", 4)):
        data = load_mask_folder(shared_data / "consep" / source, max_images=n, seed=1 if split == "synthetic" else 0)
        for sub in ("images", "inst"):
            (tmp_path / split / sub).mkdir(parents=True)
        for im, inst, path in zip(data.images, data.instances, data.paths):
            stem = Path(path).stem
            Image.fromarray(im[:64, :64]).save(tmp_path / split / "images" / f"{stem}.png")
            Image.fromarray(inst[:64, :64].astype(np.uint16)).save(tmp_path / split / "inst" / f"{stem}.png")
    code = main([
        "eval", "--real", str(tmp_path / "test"), "--synthetic", str(tmp_path / "synthetic"), "--train", str(tmp_path / "train"),
        "--out", str(tmp_path / "report"), "--detectors", "random-conv", "--n-boot", "5", "--seg-steps", "2",
    ])
    assert code == 0
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    assert rep["segmentation"]["n_test"] == 4 and "utility" not in rep  # no class labels
    assert 0.0 <= rep["segmentation"]["real+synthetic"]["dice"]["value"] <= 1.0
    assert "Segmentation utility" in (tmp_path / "report" / "report.md").read_text()
