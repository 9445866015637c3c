"""The training engine: safe checkpoints, legacy resume, failed-start cleanup, bundled defaults,
and the ControlNet and embedding-flow tasks (behaviour on tiny seeded problems)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pixgen.cli import main
from pixgen.errors import InputError
from training.engine import Engine, list_checkpoints
from training.presets import apply_overrides, get_preset
from training.tasks import EmbeddingFlowTask, FlowConfig
from training.testing import tiny_cache, tiny_image_folder
from training.trainer import Trainer

LEGACY = Path(__file__).parent / "data" / "legacy-run-tiny"
# The legacy run's settings (see tests/data/legacy-run-tiny/README.md).
LEGACY_CFG = {"max_steps": 9, "batch_size": 4, "grad_accum": 2, "checkpoint_every": 3, "keep_checkpoints": 1,
              "log_every": 1, "sample_every": 0, "ema_decay": 0.9, "warmup_steps": 4}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, shared_data):
    return tiny_cache(tmp_path_factory.mktemp("engine"), shared_data / "lc25000-lung", per_class=6)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


class Killed(Exception):
    pass


class _Marker:
    """Pickles to a call that writes ``path``: loading it would leave the marker file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "code ran"))


def _plant(folder: Path, marker: Path, names: list[str]) -> None:
    for name in names:
        if name.endswith((".pt", ".bin")):
            torch.save(_Marker(marker), folder / name)  # torch's zip format
        else:
            (folder / name).write_bytes(pickle.dumps(_Marker(marker)))  # a raw pickle


# ----------------------------------------------------------------------------- safe resume
def test_resume_never_unpickles_planted_files(cache, tmp_path):
    marker = tmp_path / "MARKER"
    _plant(tmp_path, tmp_path / "probe", ["probe.pkl"])
    pickle.loads((tmp_path / "probe.pkl").read_bytes())  # the planting works: an unsafe load runs it
    assert (tmp_path / "probe").read_text() == "code ran"

    cfg = apply_overrides(get_preset("tiny"), {**LEGACY_CFG, "keep_checkpoints": 2})

    class KillAt4(Trainer):
        def on_step_end(self, step, logs):
            if step == 4:
                raise Killed

    with pytest.raises(Killed):
        KillAt4(cfg, cache, tmp_path / "run").fit()
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.safetensors", "rng-0.json", "state.json"]
    _plant(ckpt, marker, ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin",
                          "checkpoint.pt", "weights.pkl"])
    _plant(tmp_path / "run", marker, ["checkpoint.pt", "state.pkl", "custom_checkpoint_0.pkl"])
    Trainer(cfg, cache, tmp_path / "run", resume=True).fit()
    assert not marker.exists()

    # a pre-engine checkpoint is read with weights_only=True: a planted object is refused, not run
    legacy = tmp_path / "legacy"
    shutil.copytree(LEGACY, legacy)
    _plant(legacy / "checkpoints" / "checkpoint-00000006", marker, ["custom_checkpoint_0.pkl"])
    with pytest.raises(InputError, match="cannot read .*custom_checkpoint_0.pkl safely"):
        Trainer(apply_overrides(get_preset("tiny"), LEGACY_CFG), cache, legacy, resume=True).fit()
    assert not marker.exists()


def test_a_run_of_the_pre_engine_trainer_resumes_exactly(cache, tmp_path):
    """The legacy run (killed at step 7) resumed on the engine ends with the weights the old
    trainer reached uninterrupted: same data order, same per-step randomness, same optimizer state."""
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY, run)
    Trainer(apply_overrides(get_preset("tiny"), LEGACY_CFG), cache, run, resume=True).fit()
    assert (run / "checksums" / "rank-0.txt").read_text() == (LEGACY / "uninterrupted-checksum.txt").read_text()
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-00000009"]
    assert (list_checkpoints(run)[-1] / "state.json").is_file()  # new checkpoints in the safe format


# ----------------------------------------------------------------------------- failures, defaults
def test_a_failed_start_leaves_no_run_folder(cache, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(InputError, match="fewer than one global batch"):
        Trainer(apply_overrides(get_preset("tiny"), {"batch_size": 64}), cache, run).fit()
    assert not run.exists()
    run.mkdir()
    (run / "notes.txt").write_text("mine")  # a folder that existed keeps what it held
    with pytest.raises(InputError):
        Trainer(apply_overrides(get_preset("tiny"), {"batch_size": 64}), cache, run).fit()
    assert [p.name for p in run.iterdir()] == ["notes.txt"]


def test_image_folder_without_components_uses_the_bundled_ones(shared_data, tmp_path, capsys):
    images = tiny_image_folder(shared_data / "lc25000-lung", tmp_path / "images", per_class=2)
    run = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--data", str(images), "--out", str(run), "--mpp", "3.5",
                 "--max-steps", "1", "--batch-size", "2", "--set", "image_size=32"])
    assert code == 0
    out = capsys.readouterr().out
    assert "bundled components" in out and "pixgen-default/vae" in out and "pixgen-ssl" in out
    index = json.loads((run / "cache" / "index.json").read_text())
    assert index["encoder"]["name"] == "pixgen-ssl" and index["vae"]["latent_channels"] == 4
    from pixgen.pipeline import Generator

    gen = Generator.from_pretrained(run / "final")
    assert gen.config["encoder"] == "pixgen-ssl"


# ----------------------------------------------------------------------------- ControlNet task
@pytest.fixture(scope="module")
def mask_cache(cache, tmp_path_factory):
    """The tiny cache plus ``mask`` (a disc or a bar per tile, by label) and ``hint``: each tile's own
    latents, a control that tells the ControlNet the answer (so its loss must fall)."""
    from training.features import FeatureCache, add_field

    root = tmp_path_factory.mktemp("masks") / "cache"
    shutil.copytree(cache, root)
    labels = FeatureCache(root).array("labels")
    yy, xx = np.mgrid[:32, :32]
    shapes = [((yy - 16) ** 2 + (xx - 16) ** 2 < 64), (abs(xx - 16) < 4), (abs(yy - 16) < 4)]
    add_field(root, "mask", np.stack([shapes[k] for k in labels]).astype(np.uint8))
    add_field(root, "hint", FeatureCache(root).array("latents"))
    return root


def _eval_loss(task, controlnet) -> float:
    """The task's loss over the whole cache, averaged over 16 fixed seeds (same noise for every model)."""
    data = task.dataset()
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in ("latents", "condition", "control")}
    with torch.no_grad():
        return float(np.mean([task.loss(controlnet, batch, torch.Generator().manual_seed(s))[0].item()
                              for s in range(16)]))


def test_controlnet_task_trains_over_a_frozen_base_and_exports(cache, mask_cache, tmp_path):
    from pixgen.models.controlnet import PixgenControlNet
    from pixgen.pipeline import Generator
    from training.features import FeatureCache

    # a base whose (zero-initialised) output layer has grown, so residuals can move its output
    base_cfg = {"max_steps": 40, "lr": 1e-2, "batch_size": 6, "ema_decay": 0.0, "log_every": 40, "checkpoint_every": 40}
    base_dir = Trainer(apply_overrides(get_preset("tiny"), base_cfg), cache, tmp_path / "base").fit()
    before = Generator.from_pretrained(base_dir).transformer.state_dict()
    cfg = apply_overrides(get_preset("tiny"), {"task": "controlnet", "init": str(base_dir), "max_steps": 40,
                                               "batch_size": 6, "lr": 3e-3, "ema_decay": 0.0, "cfg_dropout": 0.0,
                                               "controlnet_layers": 1, "log_every": 40, "checkpoint_every": 40,
                                               "control_field": "hint"})
    trainer = Trainer(cfg, mask_cache, tmp_path / "cn")
    final = trainer.fit()
    assert all(torch.equal(before[k], v) for k, v in trainer.task.base.state_dict().items())  # frozen, bit-identical
    start = _eval_loss(trainer.task, PixgenControlNet.from_transformer(trainer.task.base, num_layers=1))
    end = _eval_loss(trainer.task, Generator.from_pretrained(final).controlnet)
    assert end < 0.93 * start, (start, end)  # measured 0.299 -> 0.260
    raw = load_file(list_checkpoints(tmp_path / "cn")[-1] / "model.safetensors")
    assert any(k.startswith("controlnet_blocks.") for k in raw) and not torch.equal(
        raw["controlnet_blocks.0.weight"], torch.zeros_like(raw["controlnet_blocks.0.weight"]))  # learned from zero

    from training.tasks import ControlNetTask

    task = ControlNetTask(apply_overrides(cfg, {"control_field": "mask"}), mask_cache)  # masks: through the VAE
    task.configure(None)
    task.cache = FeatureCache(mask_cache, fields=("mask",))
    control = task._control_latents()
    labels = task.cache.array("labels")
    assert control.shape == (18, 4, 8, 8) and labels[0] != labels[-1]
    assert torch.equal(control[0], control[1]) == (labels[0] == labels[1]) and not torch.equal(control[0], control[-1])

    gen = Generator.from_pretrained(final)
    assert gen.controlnet is not None and gen.controlnet.config.num_layers == 1
    assert all(torch.equal(before[k], v) for k, v in gen.transformer.state_dict().items())
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    out = gen.generate(label="lung_n", control_image=mask, num_inference_steps=2, progress=False)
    off = gen.generate(label="lung_n", control_image=mask, controlnet_conditioning_scale=0.0,
                       num_inference_steps=2, progress=False)
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(off.images[0]))  # the ControlNet steers


# ----------------------------------------------------------------------------- embedding-flow task
def _mixture(n: int = 512, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Two classes in 8-D: N(+2 e_0, 0.1^2) and N(-2 e_1, 0.1^2)."""
    rng = np.random.default_rng(seed)
    means = np.zeros((2, 8), np.float32)
    means[0, 0], means[1, 1] = 2.0, -2.0
    labels = rng.integers(0, 2, n)
    return {"target": means[labels] + 0.1 * rng.standard_normal((n, 8)).astype(np.float32), "label": labels}, means


FLOW = {"max_steps": 300, "batch_size": 64, "hidden": 64, "num_blocks": 2, "lr": 3e-3, "ema_decay": 0.99,
        "checkpoint_every": 100, "keep_checkpoints": 2, "log_every": 50, "seed": 0}


def test_embedding_flow_prior_samples_each_class_mean(tmp_path):
    from pixgen.models.flow import EmbeddingFlow, sample_flow

    data, means = _mixture()
    final = Engine(EmbeddingFlowTask(FlowConfig(**FLOW), data), tmp_path / "prior").fit()
    model = EmbeddingFlow.from_pretrained(final).eval()
    assert model.config.num_classes == 2
    g = torch.Generator().manual_seed(1)
    for k in (0, 1):
        x = sample_flow(model, torch.randn(256, 8, generator=g), class_labels=torch.full((256,), k), steps=20)
        err = (x.mean(0) - torch.from_numpy(means[k])).norm().item()
        assert err < 0.25, (k, err, x.mean(0))
        assert 0.02 < x.std(0).mean().item() < 0.5  # a distribution around the mean, not a point or noise


def test_embedding_flow_translator_and_exact_resume(tmp_path):
    """A paired translator (source -> target), killed and resumed, equals the uninterrupted run."""
    rng = np.random.default_rng(0)
    source = rng.standard_normal((256, 8)).astype(np.float32)
    data = {"target": source[:, ::-1] * 0.5 + 1.0, "source": source}
    cfg = FlowConfig(**{**FLOW, "max_steps": 120, "checkpoint_every": 40})

    class KillAt50(Engine):
        def on_step_end(self, step, logs):
            if step == 50:
                raise Killed

    Engine(EmbeddingFlowTask(cfg, data), tmp_path / "a").fit()
    with pytest.raises(Killed):
        KillAt50(EmbeddingFlowTask(cfg, data), tmp_path / "b").fit()
    Engine(EmbeddingFlowTask(cfg, data), tmp_path / "b", resume=True).fit()
    a, b = (load_file(tmp_path / r / "final" / "diffusion_pytorch_model.safetensors") for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)

    from pixgen.models.flow import EmbeddingFlow, sample_flow

    model = EmbeddingFlow.from_pretrained(tmp_path / "a" / "final").eval()
    x = torch.from_numpy(source[:64])
    out = sample_flow(model, x, steps=10)
    start_err = (x - torch.from_numpy(data["target"][:64])).pow(2).mean().item()
    end_err = (out - torch.from_numpy(data["target"][:64])).pow(2).mean().item()
    assert end_err < 0.25 * start_err, (start_err, end_err)


def test_pre_engine_autoencoder_and_ssl_checkpoints_are_read_safely(tmp_path):
    from training.autoencoder import has_checkpoint, latest_weights, load_checkpoint

    rng = np.random.default_rng(3)
    state = {"step": 7, "config": {"crop": 32}, "ema": {"w": torch.arange(3.0)}, "teacher": {"w": torch.ones(2)},
             "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state}
    (tmp_path / "old").mkdir()
    torch.save(state, tmp_path / "old" / "checkpoint.pt")  # what the pre-engine trainers wrote
    assert has_checkpoint(tmp_path / "old") and load_checkpoint(tmp_path / "old")["numpy_rng"] == rng.bit_generator.state
    step, weights, config = latest_weights(tmp_path / "old", "vae", ema=True)
    assert step == 7 and torch.equal(weights["w"], torch.arange(3.0)) and config == {"crop": 32}
    marker = tmp_path / "MARKER"
    (tmp_path / "evil").mkdir()
    _plant(tmp_path / "evil", marker, ["checkpoint.pt"])
    with pytest.raises(InputError, match="safely"):
        load_checkpoint(tmp_path / "evil")
    assert not marker.exists()


def test_flow_cli_trains_a_translator_and_a_class_prior_from_a_cache(tmp_path):
    from pixgen.models.flow import EmbeddingFlow
    from training.features import add_field
    from training.tasks.flow import main as flow_main
    from training.testing import synthetic_cache

    cache = synthetic_cache(tmp_path / "cache", n=32, dim=8)
    add_field(cache, "he_embeddings", np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))
    small = ["--max-steps", "3", "--batch-size", "8", "--hidden", "16", "--num-blocks", "1", "--log-every", "1"]
    assert flow_main(["--data", str(cache), "--out", str(tmp_path / "tr"), "--source", "he_embeddings",
                      "--condition", "none", *small]) == 0
    translator = EmbeddingFlow.from_pretrained(tmp_path / "tr" / "final")
    assert (translator.config.source, translator.config.num_classes, translator.config.dim) == ("he_embeddings", 0, 8)
    assert flow_main(["--data", str(cache), "--out", str(tmp_path / "prior"), *small]) == 0
    prior = EmbeddingFlow.from_pretrained(tmp_path / "prior" / "final")
    assert prior.config.class_names == ["a", "b"] and prior.config.encoder == "synthetic"
    assert flow_main(["--data", str(cache), "--out", str(tmp_path / "prior"), "--resume", "--max-steps", "5"]) == 0
    assert json.loads((tmp_path / "prior" / "config.json").read_text())["max_steps"] == 5
