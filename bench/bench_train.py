"""Training throughput on this machine: presets x precision x processes, against the matmul peak.

Each configuration runs the real trainer (``training.trainer.Trainer``) in a fresh process
(``accelerate launch --multi_gpu --num_processes 2`` for two CPU processes, gloo) on a synthetic
feature cache, times the optimizer steps after a warm-up, and reports samples/s and the FLOP/s
achieved (3 x forward matmul FLOPs from the config, :mod:`training.flops`) next to the peak of a
plain ``torch.matmul`` at the same precision, measured by the same processes (same threads) right
before and after the timed steps, so a busy shared machine lowers both sides alike.

Usage:
    python bench/bench_train.py                      # tiny + S, fp32/bf16, 1/2 processes (~4 min, 2 cores)
    python bench/bench_train.py --presets tiny --steps 20

Not a test: it prints a table (and ``--json`` writes the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# (trainer preset, latent (C, H, W), condition dim, per-process batch): tiny as in the tests
# (32 px tiles, f4 VAE); S = pixgen-S/2 on 256 px tiles through an f8, 16-channel VAE (SD3.5-like)
# conditioned on one 1536-d token (UNI2-h-like).
SETUPS = {
    "tiny": ("tiny", (4, 8, 8), 32, 16),
    "S": ("S-256", (16, 32, 32), 1536, 4),
}


def worker(args: argparse.Namespace) -> None:
    """One configuration, inside ``accelerate launch`` or a plain process: time the steps."""
    from training.presets import apply_overrides, get_preset
    from training.trainer import Trainer

    preset, _, _, batch = SETUPS[args.setup]
    cfg = apply_overrides(get_preset(preset), {
        "max_steps": args.warmup + args.steps, "batch_size": batch, "mixed_precision": args.precision,
        "checkpoint_every": 10_000, "sample_every": 0, "log_every": 10_000, "tensorboard": False,
        "ema_decay": 0.999, "warmup_steps": 0,
    })
    from training.flops import measure_matmul_rate

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    marks: dict[str, float] = {}
    peaks: list[float] = []

    class Timed(Trainer):
        """Peak matmul rate of this process right before and after the timed steps (all ranks
        measure at the same moment, after a synchronising step), then the steps in between."""

        def on_step_end(self, step, logs):
            if step == args.warmup:
                peaks.append(measure_matmul_rate(dtype, seconds=1.0))
                marks["start"] = time.perf_counter()
            if step == args.warmup + args.steps:
                marks["end"] = time.perf_counter()
                peaks.append(measure_matmul_rate(dtype, seconds=1.0))

    Timed(cfg, args.cache, args.out, cpu=True).fit()
    rank = int(os.environ.get("RANK", 0))
    Path(f"{args.result}.rank{rank}").write_text(json.dumps({
        "seconds_per_step": (marks["end"] - marks["start"]) / args.steps, "peak": sum(peaks) / len(peaks)}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(setup: str, precision: str, processes: int, cache: Path, steps: int, warmup: int, tmp: Path
               ) -> tuple[float, float]:
    """(seconds per optimizer step, machine matmul peak in FLOP/s summed over the processes, measured
    by the same processes around the timed steps) of one configuration, in fresh process(es)."""
    result, out = tmp / f"{setup}-{precision}-{processes}.json", tmp / f"run-{setup}-{precision}-{processes}"
    inner = [str(Path(__file__).resolve()), "--worker", "--setup", setup, "--precision", precision, "--cache",
             str(cache), "--out", str(out), "--result", str(result), "--steps", str(steps), "--warmup", str(warmup)]
    if processes == 1:
        cmd = [sys.executable, *inner]
        env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *inner]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{setup} {precision} x{processes} failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(processes)]
    return ranks[0]["seconds_per_step"], sum(r["peak"] for r in ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"], choices=["no", "bf16"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: 30 tiny, 3 S)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write the rows here")
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from training.flops import model_flops
    from training.presets import get_preset
    from training.testing import synthetic_cache
    from training.trainer import build_transformer

    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for setup in args.presets:
            preset, latent, dim, batch = SETUPS[setup]
            cache = synthetic_cache(tmp / f"cache-{setup}", n=max(64, 4 * batch * max(args.processes)), latent=latent, dim=dim)
            fwd = model_flops(build_transformer(get_preset(preset), latent, dim, None, "meta").config)["total"]
            steps = args.steps or (30 if setup == "tiny" else 3)
            for precision in args.precisions:
                for processes in args.processes:
                    sps, peak = run_config(setup, precision, processes, cache, steps, args.warmup, tmp)
                    samples = batch * processes / sps
                    achieved = 3 * fwd * samples
                    rows.append({"preset": setup, "precision": "fp32" if precision == "no" else precision,
                                 "processes": processes, "global_batch": batch * processes,
                                 "s_per_step": sps, "samples_per_s": samples, "gflops_per_s": achieved / 1e9,
                                 "peak_gflops_per_s": peak / 1e9, "of_peak": achieved / peak,
                                 "fwd_gflop_per_sample": fwd / 1e9, "load_average": os.getloadavg()[0]})
                    print(_row(rows[-1]), flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, torch {torch.__version__}, load average "
          f"{load:.1f} at start; peak = torch.matmul 2048^2 at the run's precision, measured by the same "
          "process(es) right before and after the timed steps (summed over processes)")
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def _row(r: dict) -> str:
    return (f"{r['preset']:>5} {r['precision']:>5} x{r['processes']}  batch {r['global_batch']:>3}  "
            f"{r['s_per_step']:.3f} s/step  {r['samples_per_s']:8.1f} samples/s  "
            f"{r['gflops_per_s']:6.1f} GFLOP/s ({r['of_peak']:.0%} of {r['peak_gflops_per_s']:.0f})")


def _table(rows: list[dict]) -> str:
    head = "| preset | precision | processes | global batch | s/step | samples/s | achieved GFLOP/s | matmul peak GFLOP/s | of peak |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['precision']} | {r['processes']} | {r['global_batch']} | {r['s_per_step']:.3f} | "
                     f"{r['samples_per_s']:.1f} | {r['gflops_per_s']:.1f} | {r['peak_gflops_per_s']:.0f} | {r['of_peak']:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
