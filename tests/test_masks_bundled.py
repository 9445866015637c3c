"""The bundled mask model (pixgen/weights/pixgen-masks): it attaches to the bundled generator only,
and `pixgen generate --sample-masks` runs offline on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pixgen.cli import main
from pixgen.errors import ModelLoadError
from pixgen.masks import BUNDLED_MASK_MODEL, attach_mask_model
from pixgen.pipeline import Generator
from pixgen.testing import save_tiny_model


def test_bundled_mask_model_is_small_and_tied_to_the_bundled_generator(tmp_path):
    size = sum(p.stat().st_size for p in BUNDLED_MASK_MODEL.rglob("*") if p.is_file())
    assert size <= 8e6
    gen = attach_mask_model(Generator.from_pretrained(BUNDLED_MASK_MODEL.parent / "pixgen-default"))
    cfg = gen.controlnet.config
    assert cfg.conditioning_channels == 6 and cfg.conditioning_downsample == 4 and cfg.num_layers == 2
    stats = json.loads((BUNDLED_MASK_MODEL / "mask_stats.json").read_text())
    assert {"consep", "monuseg"} <= set(stats) and stats["size"] == 128
    other = Generator.from_pretrained(save_tiny_model(tmp_path / "tiny"))
    with pytest.raises(ModelLoadError, match="trained for another generator"):
        attach_mask_model(other)


def test_sample_masks_on_the_bundled_models(tmp_path):
    out = tmp_path / "pairs"
    assert main(["generate", "--sample-masks", "2", "--tissue", "monuseg", "--steps", "2", "--out", str(out)]) == 0
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == sorted(p.name for p in (out / "inst").iterdir()) and len(names) == 2
    assert not (out / "types").exists()  # MoNuSeg layouts have no classes
    assert np.asarray(Image.open(out / "images" / names[0])).shape == (128, 128, 3)
    assert np.asarray(Image.open(out / "inst" / names[0])).max() > 3


def test_mask_composition_joins_the_prior_condition(tmp_path):
    """An epithelial, dense CoNSeP layout conditions the bundled prior on ``colon, dense, epithelial``
    (its own terms), unless --no-mask-terms; MoNuSeg tiles had no type maps, so ``epithelial`` is dropped there."""
    masks = tmp_path / "masks"
    (masks / "inst").mkdir(parents=True)
    (masks / "types").mkdir()
    inst = np.zeros((128, 128), np.uint16)
    for i in range(64):
        y, x = divmod(i, 8)
        inst[y * 16 + 4:y * 16 + 10, x * 16 + 4:x * 16 + 10] = i + 1
    Image.fromarray(inst).save(masks / "inst" / "m.png")
    Image.fromarray(np.where(inst > 0, 3, 0).astype(np.uint8)).save(masks / "types" / "m.png")

    def condition(label, *extra):
        out = tmp_path / f"{label}{''.join(extra)}"
        assert main(["generate", "--mask", str(masks), "--label", label, "--n", "1", "--steps", "1", "--out", str(out),
                     *extra]) == 0
        return json.loads((out / "manifest.json").read_text())["files"][0]["condition"]

    assert condition("consep") == {"kind": "prior", "id": "consep, dense, epithelial[prior seed 0]",
                                   "label": "consep", "reference_sha256": None}
    assert condition("consep", "--no-mask-terms")["id"] == "consep[prior seed 0]"
    assert condition("monuseg")["id"] == "monuseg, dense[prior seed 0]"
    assert condition("consep", "--from-bank")["kind"] == "label"
