"""pixgen.io: the one image reader, the atomic writer, the set manifest, slide regions."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pixgen.errors import InputError
from pixgen.io import (
    Condition,
    ImageEntry,
    ModelId,
    SamplerSettings,
    SetManifest,
    SetWriter,
    atomic_dir,
    atomic_write,
    load_rgb,
    read_provenance,
    weights_sha256,
    write_json_atomic,
)


def _png_rgb16(path, arr: np.ndarray) -> None:
    """A 48-bit RGB PNG (Pillow cannot write one): signature, IHDR (depth 16, colour 2), IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ------------------------------------------------------------------ reader
def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 40], [257 * 128, 65535]], np.uint16)  # 8-bit 0, 40, 128, 255
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_rgb(tmp_path / "g16.png")
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3) and out.flags.writeable
    np.testing.assert_array_equal(out[..., 0], [[0, 40], [128, 255]])
    assert (out[..., 0] == out[..., 2]).all()


def test_16bit_colour_png_keeps_its_colours(tmp_path):
    arr = np.zeros((3, 4, 3), np.uint16)
    arr[..., 0], arr[..., 1], arr[..., 2] = 200 * 257, 100 * 257, 30 * 257
    _png_rgb16(tmp_path / "rgb16.png", arr)
    out = load_rgb(tmp_path / "rgb16.png")
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out[0, 0], [200, 100, 30])


def test_greyscale_palette_and_alpha(tmp_path):
    Image.fromarray(np.full((4, 4), 77, np.uint8)).save(tmp_path / "l.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "l.png")[0, 0], [77, 77, 77])
    Image.new("RGB", (4, 4), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "p.png")[0, 0], [10, 200, 30])
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 0, 0, 255)   # opaque red stays red
    rgba[0, 1] = (200, 0, 0, 0)     # transparent: white (no data), not red or black
    rgba[1, :] = (0, 0, 0, 128)     # half transparent black: mid grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    assert abs(int(out[1, 0, 0]) - 127) <= 1


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_corrupt_file_is_an_input_error_naming_it(tmp_path, content):
    (tmp_path / "bad.png").write_bytes(content)
    with pytest.raises(InputError, match="bad.png") as err:
        load_rgb(tmp_path / "bad.png")
    assert err.value.fix


def test_truncated_file_is_an_input_error(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.png.*truncated|cut.png") as err:
        load_rgb(tmp_path / "cut.png")
    assert "truncated" in err.value.fix


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "bomb.png")  # 4096 px: a bomb under a 1000 px limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match="bomb.png") as err:
        load_rgb(tmp_path / "bomb.png")
    assert "pixgen tile" in err.value.fix


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_rgb(tmp_path / "nope.png")


# ------------------------------------------------------------------ atomic writer
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        with atomic_write(tmp_path / "b.bin") as fh:
            fh.write(b"1")
    finally:
        os.umask(old)
    for name in ("a.json", "b.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_error_leaves_the_old_file_and_no_part(tmp_path):
    target = tmp_path / "x.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as fh:
            fh.write('{"v": 2')
            raise RuntimeError("disk full")
    assert target.read_text().strip().endswith("}") and '"v": 1' in target.read_text()
    with pytest.raises(ValueError):  # NaN is not JSON: refused before anything is written
        write_json_atomic(tmp_path / "nan.json", {"g": float("nan")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    with atomic_dir(tmp_path / "final") as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "final") as tmp:
            (tmp / "b").write_text("2")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["a"]


# ------------------------------------------------------------------ manifest
def _manifest() -> SetManifest:
    return SetManifest(
        model=ModelId("tiny", weights_sha256="ab" * 32, weights_files=2, encoder="tiny-test"),
        sampler=SamplerSettings(steps=3, guidance=2.0, scheduler="Euler", batch_size=8, n=2, seed=5),
        references={"r.png": "cd" * 32},
    )


def test_manifest_round_trip_and_set_writer(tmp_path):
    import torch

    out = tmp_path / "set"
    w = SetWriter.create(out, _manifest())
    assert SetManifest.load(out).complete is False
    for i in range(2):
        cond = Condition("reference", "r.png", reference_sha256="cd" * 32)
        w.add(np.full((8, 8, 3), 40 * i, np.uint8), ImageEntry(f"{i:04d}.png", 5 + i, cond))
    w.finish(conditions=torch.randn(2, 1, 4), encoder="tiny-test")
    m = SetManifest.load(out)
    assert m == SetManifest.from_dict(m.to_dict())
    assert m.complete and [e.file for e in m.files] == ["0000.png", "0001.png"] and m.files[1].seed == 6
    assert m.files[0].condition == Condition("reference", "r.png", None, "cd" * 32)
    assert m.conditions["encoder"] == "tiny-test" and m.contact_sheet == "contact_sheet.png"
    assert {"pixgen", "torch", "diffusers"} <= set(m.versions)
    assert [p.name for p in m.image_paths(out)] == ["0000.png", "0001.png"]
    prov = read_provenance(out / "0001.png")
    assert prov["seed"] == 6 and prov["model"]["weights_sha256"] == "ab" * 32
    assert not list(out.glob("*.part"))


def test_manifest_refuses_newer_versions_and_incomplete_sets(tmp_path):
    data = _manifest().to_dict()
    with pytest.raises(InputError, match="version 2"):
        SetManifest.from_dict({**data, "version": 2})
    with pytest.raises(InputError, match="not a pixgen"):
        SetManifest.from_dict({"files": []})
    with pytest.raises(InputError, match="incomplete"):
        _manifest().image_paths(tmp_path)


def test_writer_refuses_a_used_folder_and_overwrites_only_its_own_files(tmp_path):
    (tmp_path / "0000.png").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty") as err:
        SetWriter.create(tmp_path, _manifest())
    assert "--overwrite" in err.value.fix
    SetWriter.create(tmp_path, _manifest(), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "notes.txt"]


def test_weights_hash_is_by_content_not_path(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d / "transformer").mkdir(parents=True)
        (tmp_path / d / "transformer" / "w.safetensors").write_bytes(b"weights")
        (tmp_path / d / "config.json").write_text(d)  # not a weight file
    assert weights_sha256(tmp_path / "a") == weights_sha256(tmp_path / "b")
    (tmp_path / "b" / "transformer" / "w.safetensors").write_bytes(b"weightz")
    assert weights_sha256(tmp_path / "a")[0] != weights_sha256(tmp_path / "b")[0]


# ------------------------------------------------------------------ slides
def test_region_at_mpp_reads_the_finer_level_and_resizes(shared_data):
    from pixgen.io.slides import choose_level, open_slide, region_at_mpp

    with open_slide(shared_data / "slides" / "cmu-1-small-region.svs") as slide:
        base = slide.mpp()
        assert choose_level(slide, base, 2 * base) == 0  # a single-level slide: always level 0
        region = region_at_mpp(slide, 400, 600, size=64, mpp=2 * base)
        full = slide.read(400, 600, 0, 128, 128)
    assert region.shape == (64, 64, 3) and region.dtype == np.uint8
    # the 2x region is the level-0 region shrunk: same colours on average
    assert abs(float(region.mean()) - float(full.mean())) < 2.0
    with pytest.raises(InputError, match="finer"):
        with open_slide(shared_data / "slides" / "cmu-1-small-region.svs") as slide:
            region_at_mpp(slide, 0, 0, size=64, mpp=base / 4)
