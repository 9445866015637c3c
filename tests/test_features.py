"""Feature cache: contents, the CLI, tile folders, and resuming after a kill (real LC25000 tiles)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pixgen.cli import main
from pixgen.errors import InputError
from training.features import FeatureCache, build_feature_cache, open_image_source, resolve_components
from training.testing import tiny_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data):
    return tiny_inputs(tmp_path_factory.mktemp("feat"), shared_data / "lc25000-lung", per_class=6)


@pytest.fixture(scope="module")
def parts(inputs):
    vae, enc, local = resolve_components(vae=str(inputs["vae"]), encoder=str(inputs["encoder"]))
    return open_image_source(inputs["images"], mpp=3.5), vae, enc, local


def _build(parts, out, **kwargs):
    dataset, vae, enc, local = parts
    opts = dict(grid=2, shard_size=5, batch_size=4, save_encoder=local, progress=False)
    return build_feature_cache(dataset, out, vae, enc, **{**opts, **kwargs})


def _store(root: Path) -> dict[str, bytes]:
    """Every file of a cache (index included), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cache_holds_latents_embeddings_labels_and_sources(parts, tmp_path):
    cache = _build(parts, tmp_path / "c")
    dataset, vae, enc, _ = parts
    assert len(cache) == 18 and cache.classes == ["lung_aca", "lung_n", "lung_scc"]
    assert cache.latent_shape == (4, 8, 8) and cache.dim == 32 and cache.grid == 2
    assert cache.encoder_name == "tiny-ssl" and cache.mpp == 3.5
    assert sorted(p.name for p in (tmp_path / "c").glob("shard-*")) == [f"shard-0000{k}" for k in range(4)]
    item = cache[7]
    assert item["latents"].dtype == torch.float32 and item["condition"].shape == (1, 32)
    assert FeatureCache(tmp_path / "c", tokens=4)[7]["condition"].shape == (4, 32)
    # the stored values are the VAE's and the encoder's on that tile (float16 storage)
    sample = dataset[7]
    image = torch.from_numpy(np.array(sample["image"])).permute(2, 0, 1)[None]
    torch.testing.assert_close(item["latents"], vae.encode(image.float() / 127.5 - 1)[0], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(item["condition"][0], enc.embed(image)[0], atol=2e-2, rtol=1e-2)
    assert item["label"] == sample["label"] and cache.meta("paths")[7] == sample["path"]
    assert cache.meta("groups")[7] == sample["group"]
    info = json.loads((tmp_path / "c" / "index.json").read_text())
    assert info["complete"] and info["arrays"]["latents"] == {"dtype": "float16", "shape": [4, 8, 8]}
    assert (tmp_path / "c" / "encoder" / "pixgen_encoder.json").is_file()  # local encoder travels along
    assert cache.load_vae().latent_channels == 4
    arr = np.load(tmp_path / "c" / "shard-00000" / "latents.npy", mmap_mode="r")
    assert isinstance(arr, np.memmap)


def test_killed_build_resumes_to_the_identical_store(parts, tmp_path):
    reference = _build(parts, tmp_path / "full").root

    class Killed(Exception):
        pass

    def kill_after_shard_1(k: int) -> None:
        if k == 1:
            raise Killed

    with pytest.raises(Killed):
        _build(parts, tmp_path / "resumed", on_shard=kill_after_shard_1)
    partial = tmp_path / "resumed"
    assert sorted(p.name for p in partial.glob("shard-*")) == ["shard-00000", "shard-00001"]
    with pytest.raises(InputError, match="incomplete"):
        FeatureCache(partial)
    assert len(FeatureCache(partial, allow_partial=True)) == 10
    # a shard half-written when the process died: a temporary folder, never a shard
    (partial / ".shard-00002.tmp-99999").mkdir()
    (partial / ".shard-00002.tmp-99999" / "latents.npy").write_bytes(b"\x93NUMPY truncated")
    seen = []
    _build(parts, partial, on_shard=seen.append)
    assert seen == [2, 3]  # resumed at the first missing shard
    assert _store(partial) == _store(reference)


def test_cache_refuses_a_different_build_in_the_same_folder(parts, tmp_path):
    _build(parts, tmp_path / "c")
    with pytest.raises(InputError, match="other data or settings"):
        _build(parts, tmp_path / "c", grid=1)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        _build(parts, tmp_path / "junk")


def test_features_cli(inputs, tmp_path, capsys):
    out = tmp_path / "cache"
    args = ["features", str(inputs["images"]), "--mpp", "3.5", "--vae", str(inputs["vae"]),
            "--encoder", str(inputs["encoder"]), "--out", str(out), "--shard-size", "8", "--dtype", "float32"]
    assert main(args) == 0
    assert "18 tiles" in capsys.readouterr().out
    assert FeatureCache(out).info["arrays"]["embeddings"]["dtype"] == "float32"
    assert main(args) == 0  # complete cache: nothing to do
    assert main(["features", str(inputs["images"]), "--vae", str(inputs["vae"]), "--encoder",
                 str(inputs["encoder"]), "--out", str(tmp_path / "x")]) == 1  # no --mpp for an image folder
    assert "--mpp" in capsys.readouterr().err


def test_tile_folder_source_reads_mpp_from_the_tiling(inputs, tmp_path):
    """A folder in `pixgen tile`'s layout (tiling.json + tiles.csv + tiles/) needs no --mpp."""
    tiles = tmp_path / "slide1"
    (tiles / "tiles").mkdir(parents=True)
    images = sorted((inputs["images"] / "lung_n").glob("*.png"))[:3]
    with (tiles / "tiles.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "x", "y", "size0", "level", "tissue", "mpp"])
        for i, img in enumerate(images):
            (tiles / "tiles" / f"s_x{i}_y0.png").write_bytes(img.read_bytes())
            writer.writerow([f"tiles/s_x{i}_y0.png", i * 64, 0, 64, 0, 0.9, 3.5])
    (tiles / "tiling.json").write_text(json.dumps({"slide_name": "slide1"}))
    ds = open_image_source(tmp_path)  # a folder of tiling outputs
    assert len(ds) == 3 and ds[0]["mpp"] == 3.5 and ds[0]["label"] == -1 and ds[0]["group"] == "slide1"
    assert ds[0]["image"].shape == (32, 32, 3)
    assert open_image_source(tiles, size=16, fit="crop")[1]["image"].shape == (16, 16, 3)


class _WithExtras(torch.utils.data.Dataset):
    """The tiles plus a per-tile mask (its row number in a corner) and a caption."""

    def __init__(self, base):
        self.base, self.classes, self.paths, self.labels = base, base.classes, base.paths, base.labels

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        mask = np.zeros((32, 32), np.uint8)
        mask[0, 0] = i
        return {**self.base[i], "mask": mask, "caption": f"tile {i}"}


def test_extra_fields_declared_by_name(parts, tmp_path):
    dataset, vae, enc, local = parts
    cache = build_feature_cache(_WithExtras(dataset), tmp_path / "c", vae, enc, shard_size=5, batch_size=4,
                                save_encoder=local, progress=False, fields=("mask", "caption"))
    assert cache.fields == {"mask": {"kind": "array", "dtype": "uint8", "shape": [32, 32]}, "caption": {"kind": "text"}}
    opened = FeatureCache(tmp_path / "c", fields=("mask", "caption"))
    assert [int(opened[i]["mask"][0, 0]) for i in (0, 7, 17)] == [0, 7, 17]  # across shards, in order
    assert opened[12]["caption"] == "tile 12" and "mask" not in FeatureCache(tmp_path / "c")[0]
    # a field added to a finished cache (e.g. paired embeddings), then read like the others
    paired = np.arange(18 * 3, dtype=np.float32).reshape(18, 3)
    from training.features import add_field

    add_field(tmp_path / "c", "he_embeddings", paired)
    both = FeatureCache(tmp_path / "c", fields=("he_embeddings", "mask"))
    assert torch.equal(both[11]["he_embeddings"], torch.from_numpy(paired[11])) and int(both[11]["mask"][0, 0]) == 11
    assert np.array_equal(both.array("he_embeddings"), paired)
    with pytest.raises(InputError, match="no field 'labels_v2'.*he_embeddings"):
        FeatureCache(tmp_path / "c", fields=("labels_v2",))
    with pytest.raises(InputError, match="one value per tile"):
        add_field(tmp_path / "c", "short", paired[:3])
    # a cache written without fields (the earlier format) opens as before, with none
    plain = _build(parts, tmp_path / "plain")
    assert plain.fields == {} and "fields" not in json.loads((tmp_path / "plain" / "index.json").read_text())
