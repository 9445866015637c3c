"""`pixgen generate --mask / --sample-masks`: a paired set in the CoNSeP layout plus the manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pixgen.cli import main
from pixgen.testing import save_tiny_mask_model, save_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory, shared_data):
    """A tiny 32 px generator and a mask model for it (random mask ControlNet + statistics of
    CoNSeP train tiles at 32 px)."""
    from training.data.masks import CoNSePDataset

    root = tmp_path_factory.mktemp("maskcli")
    base = save_tiny_model(root / "base")
    ds = CoNSePDataset(shared_data / "consep", "train")
    items = [{"inst": s["inst"], "types": s["types"], "tissue": "consep"} for s in (ds[i] for i in range(0, 432, 40))]
    save_tiny_mask_model(root / "mm", items, factor=8)
    return base, root / "mm"


def _masks(folder):
    (folder / "inst").mkdir(parents=True)
    (folder / "types").mkdir()
    for k in range(2):
        inst = np.zeros((32, 32), np.uint16)
        inst[4:12, 4 + k:12 + k], inst[4:12, 12 + k:20 + k] = 1, 2  # two touching nuclei
        Image.fromarray(inst).save(folder / "inst" / f"m{k}.png")
        Image.fromarray(np.where(inst > 0, 2 + k, 0).astype(np.uint8)).save(folder / "types" / f"m{k}.png")
    return folder


def test_mask_folder_gives_a_paired_consep_set(models, tmp_path):
    base, mm = models
    masks = _masks(tmp_path / "masks")
    out = tmp_path / "out"
    args = ["generate", "--model", str(base), "--mask-model", str(mm), "--mask", str(masks), "--out", str(out),
            "--steps", "2", "--label", "tumour", "--n", "1"]
    assert main(args) == 0
    for folder in ("images", "inst", "types"):
        assert sorted(p.name for p in (out / folder).iterdir()) == ["m0.png", "m1.png"]
    assert np.array_equal(np.asarray(Image.open(out / "inst" / "m1.png")), np.asarray(Image.open(masks / "inst" / "m1.png")))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and [f["control_image"] for f in manifest["files"]] == ["inst/m0.png", "inst/m1.png"]
    assert manifest["sampler"]["control_scale"] == 1.0
    off = tmp_path / "off"
    assert main(args[:-8] + ["--out", str(off), "--steps", "2", "--label", "tumour", "--n", "1", "--control-scale", "0"]) == 0
    assert not np.array_equal(np.asarray(Image.open(out / "images" / "m0.png")),
                              np.asarray(Image.open(off / "images" / "m0.png")))  # the mask steers


def test_the_mask_models_calibrated_scale_is_the_default(models, tmp_path):
    import shutil

    base, mm = models
    calibrated = tmp_path / "mm"
    shutil.copytree(mm, calibrated)
    info = json.loads((calibrated / "base.json").read_text()) if (calibrated / "base.json").is_file() else {}
    (calibrated / "base.json").write_text(json.dumps({**info, "control_scale": 1.5}))
    masks = _masks(tmp_path / "masks")
    common = ["generate", "--model", str(base), "--mask", str(masks), "--steps", "2", "--n", "1"]
    scales = {}
    for name, extra in {"calibrated": ["--mask-model", str(calibrated)], "given": ["--mask-model", str(calibrated),
                        "--control-scale", "1.5"], "plain": ["--mask-model", str(mm)]}.items():
        assert main([*common, *extra, "--out", str(tmp_path / name)]) == 0
        scales[name] = json.loads((tmp_path / name / "manifest.json").read_text())["sampler"]["control_scale"]
        scales[name + "_image"] = np.asarray(Image.open(tmp_path / name / "images" / "m0.png"))
    assert (scales["calibrated"], scales["given"], scales["plain"]) == (1.5, 1.5, 1.0)
    assert np.array_equal(scales["calibrated_image"], scales["given_image"])
    assert not np.array_equal(scales["calibrated_image"], scales["plain_image"])


def test_sampled_masks_are_seeded(models, tmp_path):
    base, mm = models
    common = ["generate", "--model", str(base), "--mask-model", str(mm), "--sample-masks", "3", "--tissue", "consep",
              "--steps", "2", "--seed", "4"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--out", str(tmp_path / "b")]) == 0
    names = sorted(p.name for p in (tmp_path / "a" / "inst").iterdir())
    assert names == ["consep_000004.png", "consep_000005.png", "consep_000006.png"]
    for n in names:
        for folder in ("images", "inst", "types"):
            assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / folder / n)),
                                  np.asarray(Image.open(tmp_path / "b" / folder / n)))
    assert np.asarray(Image.open(tmp_path / "a" / "inst" / names[0])).max() > 0


def test_refusals(models, tmp_path, capsys):
    base, mm = models
    assert main(["generate", "--model", str(base), "--mask-model", str(mm), "--sample-masks", "1",
                 "--tissue", "lung", "--out", str(tmp_path / "x")]) != 0
    assert "no mask statistics for tissue 'lung'" in capsys.readouterr().err
    assert main(["generate", "--model", str(base), "--mask-model", str(tmp_path), "--sample-masks", "1",
                 "--out", str(tmp_path / "y")]) != 0
    assert "no mask model" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
