"""Issue #11: bad inputs end in one line that names the file and the fix (no traceback, nothing
half-written, no code run), references far from the model's field of view get a one-line warning,
no spurious float32 warning, and `pixgen generate` writes each batch as it finishes.

The other #11 cases are tested where they were fixed: tests/test_security.py (planted code),
tests/test_generate_set.py (output folders, interrupted sets), tests/test_sampling.py (NaN
guidance, zero steps), tests/test_io.py (16-bit images), tests/test_train_*.py (run folders).
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixgen.cli import main
from pixgen.io import SetManifest
from pixgen.testing import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def model_copy(model_dir, tmp_path):
    import shutil

    return Path(shutil.copytree(model_dir, tmp_path / "m"))


@pytest.fixture
def no_model_load(monkeypatch):
    from pixgen.pipeline import Generator

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(Generator, "from_pretrained", refuse)


class _Payload:
    """A pickle whose loading would write a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pixgen: error:") and "fix:" in lines[0], err
    return lines[0]


def _png(path: Path, shape: tuple[int, ...], dtype=np.uint8, high: int = 255) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, high, shape).astype(dtype)).save(path)
    return path


# --- broken model folders (#11 item 9) -------------------------------------------------------
def _corrupt_transformer_config(m: Path) -> str:
    (m / "transformer" / "config.json").write_text('{"num_layers": ')
    return "transformer/config.json"


def _corrupt_scheduler_config(m: Path) -> str:
    (m / "scheduler" / "scheduler_config.json").write_text("{oops")
    return "scheduler/scheduler_config.json"


def _truncated_transformer_weights(m: Path) -> str:
    path = m / "transformer" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:300])
    return "diffusion_pytorch_model.safetensors"


def _truncated_vae_weights(m: Path) -> str:
    path = m / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return "vae/diffusion_pytorch_model.safetensors"


def _wrong_type_scheduler_value(m: Path) -> str:
    (m / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": "x"}')
    return "scheduler"


def _pickled_transformer_weights(m: Path) -> str:
    (m / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with open(m / "transformer" / "diffusion_pytorch_model.bin", "wb") as fh:
        pickle.dump({"w": _Payload(m.parent / "MARKER")}, fh)
    return "transformer/diffusion_pytorch_model.bin"


@pytest.mark.parametrize("command", ["generate", "info"])
@pytest.mark.parametrize("damage", [_corrupt_transformer_config, _corrupt_scheduler_config,
                                    _truncated_transformer_weights, _truncated_vae_weights,
                                    _wrong_type_scheduler_value, _pickled_transformer_weights])
def test_a_broken_model_folder_is_one_line_naming_the_file(damage, command, model_copy, tmp_path, capsys):
    named = damage(model_copy)
    out = tmp_path / "out"
    argv = ["generate", "--model", str(model_copy), "--n", "1", "--out", str(out)] if command == "generate" \
        else ["info", str(model_copy)]
    assert main(argv) == 1
    line = _one_error_line(capsys)
    assert named in line, line
    assert not out.exists() and not (tmp_path / "MARKER").exists()


# --- arguments are checked before anything loads (#11 items 5, 9) ------------------------------
@pytest.mark.parametrize("extra, expected", [
    (["--seed", str(2**70)], "--seed must be in 0..2**63-1"),
    (["--seed", "-1"], "--seed must be in"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--n", "0"], "--n must be >= 1"),
    (["--steps", "0"], "sampling steps must be a whole number >= 1"),
    (["--guidance", "nan"], "guidance scale must be a finite number"),
    (["--guidance", "inf"], "guidance scale must be a finite number"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cuda"], "no CUDA GPU is visible"),
])
def test_bad_arguments_are_refused_before_loading(extra, expected, no_model_load, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tmp_path), "--out", str(out), *extra]) == 1
    assert expected in _one_error_line(capsys)
    assert not out.exists()


def test_a_missing_gpu_index_is_refused(no_model_load, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["generate", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cuda:3"]) == 1
    assert "only 1 CUDA GPU(s)" in _one_error_line(capsys)


def test_an_existing_file_as_out_is_refused(no_model_load, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["generate", "--model", str(tmp_path), "--out", str(tmp_path / "f")]) == 1
    assert "is a file" in _one_error_line(capsys)


# --- references (#11 items 7, 9) ---------------------------------------------------------------
def _bomb_png(path: Path, side: int = 30000) -> Path:
    """A tiny file that declares a 30000 x 30000 greyscale image (900 M pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_reference_is_one_line(model_dir, tmp_path, capsys):
    bomb = _bomb_png(tmp_path / "bomb.png")
    assert main(["generate", "--model", str(model_dir), "--reference", str(bomb), "--out", str(tmp_path / "o")]) == 1
    line = _one_error_line(capsys)
    assert str(bomb) in line and "decompression bomb" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("shape, warned", [((300, 300, 3), True), ((1, 1, 3), True), ((32, 32, 3), False),
                                           ((64, 48, 3), False)])
def test_a_reference_far_from_the_field_of_view_warns_in_one_line(shape, warned, model_dir, tmp_path, capsys):
    ref = _png(tmp_path / "ref.png", shape)
    args = ["generate", "--model", str(model_dir), "--reference", str(ref), "--n", "1", "--steps", "1"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln.lower()]
    if warned:  # the tiny model: 32 px tiles at 0.5 um/px
        assert len(warnings) == 1 and warnings[0].startswith("pixgen: warning: reference"), warnings
        assert f"{shape[1]}x{shape[0]} px" in warnings[0] and "32 px at 0.5 um/px (16 um)" in warnings[0]
    else:
        assert warnings == []


def test_info_states_the_field_of_view(model_dir, capsys):
    import json

    assert main(["info", str(model_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["field_of_view_um"] == 16.0


def test_a_16_bit_reference_is_used_without_warnings(model_dir, tmp_path, capsys):
    ref = _png(tmp_path / "r16.png", (32, 32), np.uint16, 65535)
    assert Image.open(ref).mode == "I;16"
    assert main(["generate", "--model", str(model_dir), "--reference", str(ref), "--n", "1", "--steps", "1",
                 "--out", str(tmp_path / "o")]) == 0
    assert "warning" not in capsys.readouterr().err.lower()


# --- the float32 warning (#11 item 10) ----------------------------------------------------------
def test_no_float32_modules_warning_on_casts_or_runs(model_dir, tmp_path, capfd):
    from pixgen.testing import tiny_transformer

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        model = tiny_transformer().to("cpu", torch.bfloat16)
        assert model.dtype == torch.bfloat16
        assert model.to(device="cpu", dtype=torch.float32).dtype == torch.float32
        assert main(["generate", "--model", str(model_dir), "--n", "1", "--steps", "1", "--out", str(tmp_path / "o")]) == 0
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "float32" in r]
    assert "float32" not in capfd.readouterr().err


# --- pixgen eval with too few images (#11 item 9) -----------------------------------------------
def test_eval_with_one_synthetic_image_is_one_line(tmp_path, capsys):
    (tmp_path / "real").mkdir()
    (tmp_path / "syn").mkdir()
    for i in range(4):
        _png(tmp_path / "real" / f"r{i}.png", (32, 32, 3))
    _png(tmp_path / "syn" / "s0.png", (32, 32, 3))
    code = main(["eval", "--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "syn"),
                 "--out", str(tmp_path / "ev"), "--detectors", "random-conv", "--n-boot", "2"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("pixgen: error:")]
    assert code == 1 and len(err) == 1 and "at least 2 images per set" in err[0], err


# --- generate writes each batch as it finishes (#11 item 3) -------------------------------------
@pytest.mark.parametrize("stop, code", [("cancel", 1), ("interrupt", 130)])
def test_generate_keeps_finished_batches_when_stopped(stop, code, model_dir, tmp_path, monkeypatch, capsys):
    from pixgen import pipeline
    from pixgen.sampling import SamplingCancelled

    out = tmp_path / "out"
    calls = []
    real_sample = pipeline.sample

    def sample_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second batch: the first one must already be on disk
            assert sorted(p.name for p in out.glob("0*.png")) == ["0000.png", "0001.png"]
            raise SamplingCancelled("stopped") if stop == "cancel" else KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(pipeline, "sample", sample_then_stop)
    assert main(["generate", "--model", str(model_dir), "--label", "tumour", "--n", "6", "--batch-size", "2",
                 "--steps", "1", "--seed", "3", "--out", str(out)]) == code
    manifest = SetManifest.load(out)
    assert not manifest.complete and [(e.file, e.seed) for e in manifest.files] == [("0000.png", 3), ("0001.png", 4)]
    assert sorted(os.listdir(out)) == ["0000.png", "0001.png", "manifest.json"]


# --- the other commands: one line for the inputs in docs/reliability.md --------------------------
def _used_tile_folder(tmp: Path) -> Path:
    (tmp / "t").mkdir()
    (tmp / "t" / "tiles.csv").write_text("x")
    return tmp / "t"


def _image_folder(tmp: Path) -> Path:
    (tmp / "imgs" / "a").mkdir(parents=True)
    _png(tmp / "imgs" / "a" / "0.png", (32, 32, 3))
    return tmp / "imgs"


@pytest.mark.parametrize("argv, expected", [
    (lambda t, s, m: ["tile", str(s / "cmu-1-small-region.svs"), "--mpp", "0.5", "--out", str(_used_tile_folder(t))],
     "already holds tiles"),
    (lambda t, s, m: ["tile", str(s / "cmu-1-small-region.svs"), "--mpp", "0", "--out", str(t / "o")],
     "not a plausible resolution"),
    (lambda t, s, m: ["tile", str(_png(t / "x.png", (8, 8, 3))), "--mpp", "0.5", "--out", str(t / "o")],
     "cannot open slide x.png"),
    (lambda t, s, m: ["features", str(t / "missing"), "--out", str(t / "o")], "no data folder at"),
    (lambda t, s, m: ["features", str(_image_folder(t)), "--out", str(_used_tile_folder(t)), "--mpp", "0.5",
                      "--model", str(m)],
     "holds no feature cache"),
    (lambda t, s, m: ["train", "--data", str(t / "missing"), "--out", str(t / "o"), "--cpu"],
     "no data folder or feature cache"),
    (lambda t, s, m: ["eval", "--real", str(_image_folder(t)), "--synthetic", str(t / "missing"), "--out", str(t / "o"),
                   "--detectors", "random-conv"], "image folder not found"),
    (lambda t, s, m: ["eval", "--real", str(_image_folder(t)), "--synthetic", str(t / "imgs"), "--out", str(t / "o"),
                   "--detectors", "nope"], "unknown detector 'nope'"),
], ids=["tile-used-out", "tile-mpp-0", "tile-not-a-slide", "features-missing", "features-used-out",
        "train-missing", "eval-missing", "eval-unknown-detector"])
def test_other_commands_refuse_bad_inputs_in_one_line(argv, expected, model_dir, tmp_path, shared_data, capsys):
    assert main(argv(tmp_path, shared_data / "slides", model_dir)) == 1
    assert expected in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()
