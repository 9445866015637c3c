"""`pixgen train` under `accelerate launch` with 2 CPU processes (gloo): ranks end identical."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from pixgen.pipeline import Generator
from training.testing import tiny_cache


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_processes_end_with_identical_weights(tmp_path, shared_data):
    cache = tiny_cache(tmp_path, shared_data / "lc25000-lung", per_class=6)
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "-m", "pixgen.cli", "train", "--preset", "tiny", "--data", str(cache), "--out", str(run),
        "--max-steps", "6", "--batch-size", "4", "--set", "checkpoint_every=3", "--set", "log_every=3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sums = [(run / "checksums" / f"rank-{r}.txt").read_text() for r in (0, 1)]
    assert sums[0] == sums[1] and len(sums[0].strip()) == 64
    info = (run / "run.json").read_text()
    assert '"processes": 2' in info and "MULTI_CPU" in info
    ckpt = run / "checkpoints" / "checkpoint-00000006"
    assert {p.name for p in ckpt.glob("rng-*.json")} == {"rng-0.json", "rng-1.json"}
    assert not list(ckpt.glob("*.pkl")) and not list(ckpt.glob("*.bin"))  # nothing that would be unpickled
    gen = Generator.from_pretrained(run / "final")
    assert gen.generate(label="lung_aca", num_inference_steps=2, progress=False).images[0].size == (32, 32)
    assert "Traceback" not in proc.stderr  # clean exit: process group destroyed, no abort at exit
