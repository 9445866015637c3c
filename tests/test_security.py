"""No code runs from a model, encoder, embeddings file or hub repository (#11 item 1), encoder files
that are corrupt fail in one line (#11 item 9), and ``pixgen eval`` picks detectors offline (#11 item 12).

Every hostile input here writes a marker file if any of its code runs: a ``*.py`` whose import
writes it (named by ``auto_map``, by ``trust_remote_code`` or by a dotted path on ``sys.path``) and
a pickle whose ``__reduce__`` writes it. The real entry points load them; the marker must never
appear, and the error must be one line.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixgen.cli import main
from pixgen.embeddings import load_embeddings
from pixgen.encoders import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, get_encoder_spec, load_encoder
from pixgen.errors import InputError, ModelLoadError, PixgenError
from pixgen.pipeline import Generator
from pixgen.testing import save_tiny_model, tiny_encoder

PIN = "0123456789abcdef0123456789abcdef01234567"


# --- hostile files ----------------------------------------------------------------------------
class _Payload:
    """Unpickling this writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pickle ran')",)


def _plant_py(directory: Path, marker: Path, name: str = "modeling_evil") -> None:
    (directory / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('module ran')\nclass Evil: pass\n")


def _plant_remote_code_config(directory: Path, marker: Path) -> None:
    """A transformers config that asks for its own code, and that code."""
    _plant_py(directory, marker, "modeling_evil")
    _plant_py(directory, marker, "configuration_evil")
    (directory / "config.json").write_text(json.dumps({
        "model_type": "evil", "hidden_size": 32,
        "auto_map": {"AutoConfig": "configuration_evil.Evil", "AutoModel": "modeling_evil.Evil"},
    }))


def _write_spec(directory: Path, **fields) -> None:
    spec = tiny_encoder().spec.to_dict()
    (directory / "pixgen_encoder.json").write_text(json.dumps({"format_version": 1, "spec": {**spec, **fields}}))


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and text, text
    return text


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), f"planted code ran: {path.read_text()}"


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return save_tiny_model(tmp_path / "model")


@pytest.fixture
def reference(tmp_path) -> Path:
    path = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def _encoder_remote_code(encoder_dir: Path, marker: Path) -> None:
    """pixgen_encoder.json asks for transformers with trust_remote_code; config.json has auto_map."""
    for f in encoder_dir.iterdir():
        f.unlink()
    _write_spec(encoder_dir, library="transformers", model_kwargs={"trust_remote_code": True},
                remote_code=True, revision=PIN)
    _plant_remote_code_config(encoder_dir, marker)
    (encoder_dir / "model.safetensors").write_bytes(b"")


def _encoder_auto_map_only(encoder_dir: Path, marker: Path) -> None:
    """A clean-looking spec (library transformers, no kwargs) over a config.json with auto_map."""
    for f in encoder_dir.iterdir():
        f.unlink()
    _write_spec(encoder_dir, library="transformers", model_kwargs={}, remote_code=True, revision=PIN)
    _plant_remote_code_config(encoder_dir, marker)


def _encoder_dotted_path(encoder_dir: Path, marker: Path, monkeypatch) -> None:
    """The spec names a class in a module that sits on sys.path (as the folder would, run from it)."""
    _plant_py(encoder_dir, marker, "evil_layers")
    monkeypatch.syspath_prepend(str(encoder_dir))
    _write_spec(encoder_dir, model_kwargs={"img_size": 32, "mlp_layer": "evil_layers.Evil"})


def _encoder_pickle_weights(encoder_dir: Path, marker: Path) -> None:
    """timm layout whose only weights file is a pickle (pytorch_model.bin)."""
    (encoder_dir / "model.safetensors").unlink()
    torch.save({"state": _Payload(marker)}, encoder_dir / "pytorch_model.bin")


def _encoder_timm_config_checkpoint(encoder_dir: Path, marker: Path) -> None:
    """timm config.json whose model_args name a pickle checkpoint for timm to load."""
    torch.save({"state": _Payload(marker)}, encoder_dir / "evil.pth")
    config = json.loads((encoder_dir / "config.json").read_text())
    config["model_args"]["checkpoint_path"] = str(encoder_dir / "evil.pth")
    (encoder_dir / "config.json").write_text(json.dumps(config))


def _encoder_hub_architecture(encoder_dir: Path, marker: Path) -> None:
    config = json.loads((encoder_dir / "config.json").read_text())
    config["architecture"] = "hf-hub:attacker/evil"
    (encoder_dir / "config.json").write_text(json.dumps(config))


HOSTILE_ENCODERS = {
    "spec enables trust_remote_code": (_encoder_remote_code, "trust_remote_code"),
    "config.json auto_map": (_encoder_auto_map_only, "auto_map"),
    "spec names a dotted path": (_encoder_dotted_path, "evil_layers.Evil"),
    "pickle weights": (_encoder_pickle_weights, "pytorch_model.bin"),
    "timm config names a checkpoint": (_encoder_timm_config_checkpoint, "checkpoint_path"),
    "timm config names a hub architecture": (_encoder_hub_architecture, "hf-hub:attacker/evil"),
}


def _plant(case: str, encoder_dir: Path, marker: Path, monkeypatch) -> str:
    plant, words = HOSTILE_ENCODERS[case]
    if plant is _encoder_dotted_path:
        plant(encoder_dir, marker, monkeypatch)
    else:
        plant(encoder_dir, marker)
    return words


# --- a model folder, an encoder folder: library and CLI -------------------------------------------
@pytest.mark.parametrize("case", sorted(HOSTILE_ENCODERS))
@pytest.mark.parametrize("trust", [False, True], ids=["no-flag", "trust-flag"])
def test_model_folder_encoder_never_runs_code(case, trust, model_dir, reference, marker, monkeypatch):
    words = _plant(case, model_dir / "encoder", marker, monkeypatch)
    gen = Generator.from_pretrained(model_dir, trust_remote_code=trust)
    with pytest.raises(PixgenError) as info:
        gen.embed_references([reference])
    assert words in _one_line(info.value)


@pytest.mark.parametrize("case", sorted(HOSTILE_ENCODERS))
def test_encoder_folder_by_path_never_runs_code(case, tmp_path, marker, monkeypatch):
    directory = tiny_encoder().save_pretrained(tmp_path / "enc")
    words = _plant(case, directory, marker, monkeypatch)
    with pytest.raises(ModelLoadError) as info:
        load_encoder(str(directory), trust_remote_code=True)
    assert words in _one_line(info.value)


def test_cli_generate_info_features_eval_with_a_hostile_encoder(model_dir, reference, marker, tmp_path, capsys,
                                                                 shared_data):
    _encoder_remote_code(model_dir / "encoder", marker)
    tiles = tmp_path / "tiles" / "a"
    tiles.mkdir(parents=True)
    for i in range(2):
        Image.open(reference).save(tiles / f"{i}.png")
    commands = [
        ["generate", "--model", str(model_dir), "--reference", str(reference), "--out", str(tmp_path / "g"),
         "--n", "1", "--steps", "1", "--trust-remote-code"],
        ["features", str(tmp_path / "tiles"), "--model", str(model_dir), "--out", str(tmp_path / "cache"),
         "--mpp", "0.5", "--trust-remote-code"],
        ["features", str(tmp_path / "tiles"), "--vae", str(model_dir / "vae"), "--encoder", str(model_dir / "encoder"),
         "--out", str(tmp_path / "cache2"), "--mpp", "0.5"],
        ["eval", "--real", str(tmp_path / "tiles"), "--synthetic", str(tmp_path / "tiles"), "--out", str(tmp_path / "e"),
         "--detectors", f"encoder:{model_dir / 'encoder'}", "--trust-remote-code", "--utility", "none"],
    ]
    for argv in commands:
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pixgen: error:" in err and "trust_remote_code" in err, (argv, err)


def test_train_init_with_a_hostile_encoder(model_dir, reference, marker, tmp_path, capsys):
    _encoder_remote_code(model_dir / "encoder", marker)
    (tmp_path / "tiles" / "a").mkdir(parents=True)
    for i in range(2):
        Image.open(reference).save(tmp_path / "tiles" / "a" / f"{i}.png")
    code = main(["train", "--data", str(tmp_path / "tiles"), "--out", str(tmp_path / "run"), "--init", str(model_dir),
                 "--max-steps", "1", "--mpp", "0.5", "--cpu", "--trust-remote-code", "--set", "image_size=32"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "trust_remote_code" in err, err


def test_pickled_transformer_weights_in_a_model_folder_do_not_run(model_dir, marker):
    weights = next((model_dir / "transformer").glob("*.safetensors"))
    weights.unlink()
    torch.save({"state": _Payload(marker)}, model_dir / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(Exception):  # diffusers refuses the pickle (weights_only=True)
        Generator.from_pretrained(model_dir)


# --- embeddings files ---------------------------------------------------------------------------
def _pt_pickle(path: Path, marker: Path) -> None:
    torch.save({"values": _Payload(marker)}, path)


def _npy_object(path: Path, marker: Path) -> None:
    np.save(path, np.array([_Payload(marker), 1], dtype=object), allow_pickle=True)


def _pt_pickle_as_npy(path: Path, marker: Path) -> None:  # a pickle under the .npy name
    path.write_bytes(pickle.dumps(_Payload(marker)))


@pytest.mark.parametrize("name, plant", [("e.pt", _pt_pickle), ("e.npy", _npy_object), ("p.npy", _pt_pickle_as_npy)])
def test_embeddings_files_never_unpickle(name, plant, tmp_path, marker, model_dir, capsys):
    path = tmp_path / name
    plant(path, marker)
    with pytest.raises(InputError) as info:
        load_embeddings(path)
    assert str(path) in _one_line(info.value)
    code = main(["generate", "--model", str(model_dir), "--embeddings", str(path), "--out", str(tmp_path / "g"),
                 "--n", "1", "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and str(path) in err, err


# --- hub ids: data files only -------------------------------------------------------------------
def test_hub_model_and_encoder_downloads_fetch_no_python(monkeypatch, tmp_path):
    import huggingface_hub

    from pixgen.encoders import backbones

    calls = []

    def fake_snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        raise ModelLoadError("stop here")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    with pytest.raises(ModelLoadError):
        Generator.from_pretrained("attacker/model")
    monkeypatch.setattr(backbones, "hub_is_offline", lambda: False)
    with pytest.raises(ModelLoadError):
        load_encoder("phikon-v2")
    assert [c[0] for c in calls] == ["attacker/model", "owkin/phikon-v2"]
    for _, kwargs in calls:
        assert sorted(kwargs["allow_patterns"]) == ["*.json", "*.safetensors"]


# --- the only path to trust_remote_code=True ----------------------------------------------------
class _FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"hidden_size": 32, "num_register_tokens": 0})()
        self.layer = torch.nn.Linear(1, 1)


@pytest.fixture
def transformers_spy(monkeypatch, tmp_path):
    """AutoConfig / AutoModel / the hub snapshot mocked: records what reaches them, no network."""
    import transformers

    from pixgen.encoders import backbones

    seen = {"model": [], "snapshot": []}
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 32,
                                                      "auto_map": {"AutoModel": "modeling_x.X"}}))

    def fake_snapshot(repo, **kwargs):
        seen["snapshot"].append(kwargs)
        return snapshot

    class FakeConfig:
        def update(self, values):
            self.values = values

    monkeypatch.setattr(backbones, "hub_snapshot", fake_snapshot)
    monkeypatch.setattr(backbones, "hub_is_offline", lambda: False)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: FakeConfig())
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained",
                        lambda *a, **k: seen["model"].append(k) or _FakeModel())
    return seen


def _remote_spec(monkeypatch, name: str, revision: str | None) -> EncoderSpec:
    spec = EncoderSpec(name=name, dim=32, input_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5,
                       source=f"hf-hub:org/{name}", library="transformers", remote_code=True, revision=revision)
    monkeypatch.setitem(ENCODERS, name, spec)
    return spec


def test_trust_remote_code_reaches_transformers_only_with_the_flag_and_a_pinned_entry(monkeypatch, transformers_spy):
    _remote_spec(monkeypatch, "pinned", PIN)
    _remote_spec(monkeypatch, "unpinned", None)
    with pytest.raises(ModelLoadError, match="--trust-remote-code") as info:
        load_encoder("pinned")
    _one_line(info.value)
    with pytest.raises(ModelLoadError, match="pins no reviewed commit"):
        load_encoder("unpinned", trust_remote_code=True)
    assert transformers_spy["model"] == []  # refused before anything was loaded
    load_encoder("pinned", trust_remote_code=True)
    assert transformers_spy["model"][-1]["trust_remote_code"] is True
    assert transformers_spy["model"][-1]["weights_only"] is True
    assert transformers_spy["snapshot"][-1]["revision"] == PIN and "*.py" in transformers_spy["snapshot"][-1]["allow_patterns"]
    # an ordinary entry with the flag: the flag changes nothing (and its config's auto_map is refused)
    monkeypatch.setitem(ENCODERS, "plain", EncoderSpec(name="plain", dim=32, input_size=32, mean=IMAGENET_MEAN,
                                                       std=IMAGENET_STD, mpp=0.5, source="hf-hub:org/plain",
                                                       library="transformers"))
    with pytest.raises(ModelLoadError, match="auto_map"):
        load_encoder("plain", trust_remote_code=True)
    assert len(transformers_spy["model"]) == 1
    assert "*.py" not in transformers_spy["snapshot"][-1]["allow_patterns"]


def test_a_folder_spec_cannot_claim_remote_code_or_a_revision(tmp_path):
    _write_spec(tmp_path, remote_code=True, revision=PIN)
    from pixgen.encoders import read_saved_spec

    spec = read_saved_spec(tmp_path)
    assert spec.remote_code is False and spec.revision is None


def test_hibou_refuses_until_pinned_and_says_how(monkeypatch, transformers_spy):
    for name in ("hibou-b", "hibou-l"):
        spec = get_encoder_spec(name)
        assert spec.remote_code and "trust_remote_code" not in spec.model_kwargs
        with pytest.raises(ModelLoadError) as info:
            load_encoder(name, trust_remote_code=True)
        message = _one_line(info.value)
        assert all(w in message for w in ("pins no reviewed commit", "revision=", "--trust-remote-code"))
    assert transformers_spy["model"] == []


def test_no_registry_entry_enables_remote_code_through_model_kwargs():
    for spec in ENCODERS.values():
        assert "trust_remote_code" not in spec.model_kwargs, spec.name
        assert not spec.remote_code or spec.revision is None or len(spec.revision) == 40


def test_cli_flag_is_the_only_way_the_generator_passes_trust_downward(model_dir, reference, tmp_path, monkeypatch):
    import pixgen.encoders

    seen = []

    def spy(*args, trust_remote_code=False, **kwargs):
        seen.append(trust_remote_code)
        return tiny_encoder()

    monkeypatch.setattr(pixgen.encoders, "load_encoder", spy)
    base = ["generate", "--model", str(model_dir), "--reference", str(reference), "--n", "1", "--steps", "1"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--trust-remote-code"]) == 0
    assert seen == [False, True]


# --- corrupt encoder files: one line naming the file (#11 item 9) --------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, filename", [
    (lambda d: (d / "pixgen_encoder.json").write_text('{"spec": {"name": '), "pixgen_encoder.json"),
    (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
    (lambda d: _truncate(d / "model.safetensors"), "model.safetensors"),
    (lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors"),
])
def test_corrupt_encoder_files_are_one_line_errors_naming_the_file(damage, filename, model_dir, reference, tmp_path,
                                                                   capsys):
    damage(model_dir / "encoder")
    with pytest.raises(ModelLoadError) as info:
        load_encoder(str(model_dir / "encoder"))
    assert filename in _one_line(info.value) and "fix:" in str(info.value)
    code = main(["generate", "--model", str(model_dir), "--reference", str(reference), "--out", str(tmp_path / "g"),
                 "--n", "1", "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and filename in err, err


def test_truncated_bundled_encoder_weights_are_one_line(tmp_path):
    from pixgen.encoders.bundled import BUNDLED_SSL_DIR

    shutil.copytree(BUNDLED_SSL_DIR, tmp_path / "ssl")
    _truncate(tmp_path / "ssl" / "model.safetensors")
    with pytest.raises(ModelLoadError) as info:
        load_encoder("pixgen-ssl", local_path=str(tmp_path / "ssl"))
    assert "model.safetensors" in _one_line(info.value)


# --- pixgen eval without --detectors, offline (#11 item 12) ---------------------------------------
@pytest.fixture
def eval_folders(shared_data, tmp_path) -> dict[str, Path]:
    out = {}
    for split, part in (("real", slice(0, 4)), ("synthetic", slice(4, 8))):
        for c in ("lung_aca", "lung_n"):
            (tmp_path / split / c).mkdir(parents=True)
            for f in sorted((shared_data / "lc25000-lung" / c).glob("*.jpeg"))[::400][part]:
                Image.open(f).resize((64, 64)).save(tmp_path / split / c / f"{f.stem}.png")
        out[split] = tmp_path / split
    return out


def _offline(monkeypatch, tmp_path) -> None:
    import socket

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def blocked(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", blocked)


def _tiny_cnn_detector(folder: Path) -> None:
    from safetensors.torch import save_file

    from metrics.utility import SmallCNN

    folder.mkdir(parents=True)
    save_file(SmallCNN(2, width=16).state_dict(), str(folder / "model.safetensors"))
    (folder / "classifier.json").write_text(json.dumps({"labels": ["a", "b"], "width": 16, "input_size": 64}))


@pytest.mark.parametrize("bundled_cnn", [False, True], ids=["no-bundled-cnn", "bundled-cnn"])
def test_pixgen_eval_without_detectors_works_offline_and_says_why(bundled_cnn, eval_folders, tmp_path, monkeypatch,
                                                                  capsys):
    import metrics.detectors

    _offline(monkeypatch, tmp_path)
    cnn = tmp_path / "weights" / "detector-cnn"
    if bundled_cnn:
        _tiny_cnn_detector(cnn)
    monkeypatch.setattr(metrics.detectors, "BUNDLED_CNN_DIR", cnn)
    out = tmp_path / "report"
    code = main(["eval", "--real", str(eval_folders["real"]), "--synthetic", str(eval_folders["synthetic"]),
                 "--out", str(out), "--n-boot", "0", "--utility", "none"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    expected = ["encoder:pixgen-ssl"] + ([f"classifier:{cnn}"] if bundled_cnn else [])
    assert rep["config"]["detectors"] == expected
    assert "FD_pixgen-ssl" in rep["fidelity"]["synthetic"]
    assert ("FD_classifier-detector-cnn" in rep["fidelity"]["synthetic"]) == bundled_cnn
    first = (out / "report.md").read_text().splitlines()[2]
    assert first.startswith("- detectors: `encoder:pixgen-ssl`") and "no Inception-v3 FID weights" in first
    assert ("independent of the generator" in first) == bundled_cnn
    assert "detectors: encoder:pixgen-ssl" in capsys.readouterr().err


def test_default_detectors_keep_inception_where_its_weights_are(tmp_path, monkeypatch):
    from metrics.detectors import INCEPTION_FILES, default_detectors

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert default_detectors()[0][0] == "encoder:pixgen-ssl"
    weights = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILES[0]
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    names, why = default_detectors()
    assert names == ["inception"] and str(weights) in why
    assert default_detectors(tmp_path / "own.pth")[0] == ["inception"]  # asked for; a missing file fails later, clearly
