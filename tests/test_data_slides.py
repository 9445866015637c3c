"""Whole-slide tiling on the real .svs files: tissue, levels, index files, the CLI, bad slides."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pixgen.cli import main
from pixgen.errors import InputError
from training.data import SlideTileDataset, TilingConfig, open_slide, tile_slide, tissue_mask
from training.data.slides import Slide, _low_res_image, choose_level


@pytest.fixture(scope="module")
def slides(shared_data):
    return shared_data / "slides"


@pytest.fixture(scope="module")
def cmu_tiles(slides, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmu")
    result = tile_slide(slides / "cmu-1-small-region.svs", out, TilingConfig(mpp=0.5, size=256), progress=False)
    return out, result


def _rows(out):
    with (out / "tiles.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_cmu_tiles_index_and_settings(cmu_tiles):
    out, result = cmu_tiles
    info = json.loads((out / "tiling.json").read_text())
    rows = _rows(out)
    assert result.n_tiles == len(rows) == info["tiles"] > 10 and info["grid_tiles"] >= len(rows)
    assert info["slide_mpp"] == pytest.approx(0.499) and info["slide_mpp_source"].startswith("metadata")
    assert info["config"]["mpp"] == 0.5 and info["level"] == 0 and info["complete"]
    w, h = info["slide_dimensions"]
    for r in rows:
        x, y, s0 = int(r["x"]), int(r["y"]), int(r["size0"])
        assert 0 <= x and x + s0 <= w and 0 <= y and y + s0 <= h
        assert float(r["tissue"]) >= 0.5 and float(r["mpp"]) == 0.5 and s0 == 257   # 256 * 0.5 / 0.499
        assert (out / r["file"]).is_file()
    img = np.asarray(Image.open(out / rows[0]["file"]))
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8
    assert (out / "tissue.png").is_file()


def test_tile_dataset_reads_the_output(cmu_tiles):
    out, result = cmu_tiles
    ds = SlideTileDataset(out)
    s = ds[0]
    assert len(ds) == result.n_tiles and s["image"].shape == (256, 256, 3)
    assert s["group"] == "cmu-1-small-region" and s["mpp"] == 0.5 and s["size0"] == 257


def test_tcga_via_cli_needs_slide_mpp_and_uses_level_1(slides, tmp_path, capsys):
    slide = slides / "tcga-cr-7395-01a-01-ts1.svs"
    out = tmp_path / "tcga"
    assert main(["tile", str(slide), "--mpp", "1.0", "--size", "128", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--slide-mpp" in err and "does not record its resolution" in err
    assert not out.exists()
    code = main(["tile", str(slide), "--mpp", "1.0", "--size", "128", "--out", str(out), "--slide-mpp", "0.5",
                 "--max-tiles", "12", "--min-tissue", "0.6", "--quiet"])
    assert code == 0 and "wrote 12 of" in capsys.readouterr().out
    info = json.loads((out / "tiling.json").read_text())
    assert info["level"] == 1 and info["slide_mpp"] == 0.5 and info["slide_mpp_source"] == "given (--slide-mpp)"
    assert info["tiles"] == 12 and info["config"]["max_tiles"] == 12
    rows = _rows(out)
    w, h = info["slide_dimensions"]
    assert len(rows) == 12 and all(int(r["size0"]) == 256 and int(r["level"]) == 1 for r in rows)
    assert all(int(r["x"]) + 256 <= w and int(r["y"]) + 256 <= h and float(r["tissue"]) >= 0.6 for r in rows)
    assert np.asarray(Image.open(out / rows[0]["file"])).shape == (128, 128, 3)
    # a second run into the same folder is refused unless --overwrite
    again = ["tile", str(slide), "--mpp", "1.0", "--size", "128", "--out", str(out), "--slide-mpp", "0.5", "--quiet"]
    assert main(again) == 1 and "--overwrite" in capsys.readouterr().err
    assert main([*again, "--max-tiles", "3", "--overwrite"]) == 0
    assert len(list((out / "tiles").glob("*.png"))) == 3


def test_broken_slide_gives_one_clear_line(slides, tmp_path, capsys):
    with pytest.raises(InputError, match="cannot open slide broken.svs"):
        open_slide(slides / "broken.svs")
    assert main(["tile", str(slides / "broken.svs"), "--mpp", "0.5", "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pixgen: error: cannot open slide broken.svs") and err.count("\n") == 1
    assert "Traceback" not in err
    assert main(["tile", str(tmp_path / "missing.svs"), "--mpp", "0.5", "--out", str(tmp_path / "m")]) == 1
    assert "slide not found" in capsys.readouterr().err


def test_upsampling_is_refused(slides):
    with open_slide(slides / "cmu-1-small-region.svs") as s:
        with pytest.raises(InputError, match="finer than the slide"):
            choose_level(s, s.mpp(), 0.25)


def test_level_choice_is_closest_finer_or_equal():
    handle = SimpleNamespace(level_dimensions=[(40000, 30000), (10000, 7500), (2500, 1875)],
                             level_downsamples=[1.0, 4.0002, 16.001], properties={"openslide.mpp-x": "0.25",
                                                                                  "openslide.mpp-y": "0.25"},
                             close=lambda: None)
    s = Slide(handle, __import__("pathlib").Path("fake.svs"), "fake")
    assert s.mpp() == 0.25
    assert [choose_level(s, 0.25, m) for m in (0.25, 0.5, 0.95, 1.0, 2.0, 4.0, 8.0)] == [0, 0, 0, 1, 1, 2, 2]
    assert choose_level(s, 0.25, 0.999) == 1                               # 1.00005 counts as equal (<1%)
    assert choose_level(s, 0.2527, 0.25) == 0                              # 1% finer: allowed
    with pytest.raises(InputError, match="does not record"):
        Slide(SimpleNamespace(level_dimensions=[(10, 10)], level_downsamples=[1.0], properties={}),
              __import__("pathlib").Path("x.tif"), "fake").mpp()


def test_tissue_mask_and_tiffslide_backend(slides):
    with open_slide(slides / "cmu-1-small-region.svs", backend="tiffslide") as t, \
            open_slide(slides / "cmu-1-small-region.svs", backend="openslide") as o:
        assert t.backend == "tiffslide" and t.mpp() == o.mpp() == pytest.approx(0.499)
        a, b = t.read(1000, 1000, 0, 64, 64), o.read(1000, 1000, 0, 64, 64)
        assert a.shape == b.shape == (64, 64, 3) and np.abs(a.astype(int) - b.astype(int)).mean() < 3
        tm = tissue_mask(o, o.mpp())
        whole = _low_res_image(o, o.mpp(), 4.0)[1]
        pieces = _low_res_image(o, o.mpp(), 4.0, block=700)[1]      # bounded memory, same picture
        assert np.array_equal(whole, pieces)
    assert 0.2 < tm.mask.mean() < 0.7                       # a strip of tissue on white glass
    assert not tm.mask[:20, :20].any()                       # top-left corner is glass
