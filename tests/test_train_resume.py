"""Checkpoints: atomic, pruned, and an interrupted + resumed run == an uninterrupted one, bit for bit."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from pixgen.cli import main
from pixgen.errors import InputError
from training.presets import apply_overrides, get_preset
from training.testing import tiny_cache
from training.trainer import Trainer, list_checkpoints


@pytest.fixture(scope="module")
def cache(tmp_path_factory, shared_data):
    return tiny_cache(tmp_path_factory.mktemp("resume"), shared_data / "lc25000-lung", per_class=6)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


# 18 tiles / batch 4 = 4 batches per epoch; 2 micro-batches per step, so the kill at step 7 falls
# after the step-6 checkpoint, in the middle of epoch 3: resuming must skip into that epoch.
CFG = {"max_steps": 9, "batch_size": 4, "grad_accum": 2, "checkpoint_every": 3, "keep_checkpoints": 2,
       "log_every": 1, "sample_every": 4, "num_samples": 2, "sample_steps": 2, "ema_decay": 0.9, "warmup_steps": 4}


class Killed(Exception):
    pass


class KilledAt7(Trainer):
    def on_step_end(self, step, logs):
        if step == 7:
            raise Killed


def _weights(run):
    return load_file(run / "final" / "transformer" / "diffusion_pytorch_model.safetensors")


def test_interrupted_and_resumed_equals_uninterrupted(cache, tmp_path):
    cfg = apply_overrides(get_preset("tiny"), CFG)
    Trainer(cfg, cache, tmp_path / "a").fit()
    with pytest.raises(Killed):
        KilledAt7(cfg, cache, tmp_path / "b").fit()
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-00000003", "checkpoint-00000006"]
    assert not list((tmp_path / "b" / "checkpoints").glob(".tmp-*"))
    with pytest.raises(InputError, match="--resume"):
        Trainer(cfg, cache, tmp_path / "b").fit()
    Trainer(cfg, cache, tmp_path / "b", resume=True).fit()

    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # EMA weights, bit-identical
    raw = [load_file(tmp_path / r / "checkpoints" / "checkpoint-00000009" / "model.safetensors") for r in "ab"]
    assert all(torch.equal(raw[0][k], raw[1][k]) for k in raw[0])  # raw weights too
    assert (tmp_path / "a/checksums/rank-0.txt").read_text() == (tmp_path / "b/checksums/rank-0.txt").read_text()
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-00000006", "checkpoint-00000009"]
    for run in "ab":  # one log row per step, no duplicates from the replayed step 7
        with (tmp_path / run / "log.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert [int(r["step"]) for r in rows] == list(range(1, 10))
    losses = [[float(r["loss"]) for r in csv.DictReader((tmp_path / run / "log.csv").open())] for run in "ab"]
    assert losses[0] == losses[1]


def test_resume_extends_a_finished_run_and_refuses_config_changes(cache, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--preset", "tiny", "--data", str(cache), "--out", str(run), "--set", "checkpoint_every=2",
            "--set", "log_every=2"]
    assert main([*base, "--max-steps", "2"]) == 0
    assert main(["train", "--data", str(cache), "--out", str(run), "--resume", "--max-steps", "4"]) == 0
    assert json.loads((run / "config.json").read_text())["max_steps"] == 4
    assert main(["train", "--data", str(cache), "--out", str(run), "--resume", "--lr", "0.5"]) == 1
    assert "different lr" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-00000002", "checkpoint-00000004"]


def test_a_cooldown_added_on_resume_takes_the_rate_linearly_to_zero(cache, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--preset", "tiny", "--data", str(cache), "--out", str(run), "--set", "checkpoint_every=2",
            "--set", "log_every=1", "--set", "sample_every=0"]
    assert main([*base, "--max-steps", "4"]) == 0
    assert main([*base, "--resume", "--max-steps", "8", "--set", "decay_steps=4"]) == 0
    with open(run / "log.csv") as f:
        lrs = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    lr = get_preset("tiny").lr  # the tiny preset has no warm-up
    assert main([*base, "--resume", "--max-steps", "8", "--set", "decay_steps=9"]) == 1  # longer than the run: refused
    assert "decay_steps must be in [0, max_steps=8], got 9" in capsys.readouterr().err
    assert [lrs[s] for s in range(1, 9)] == pytest.approx([lr] * 5 + [lr * 0.75, lr * 0.5, lr * 0.25])
