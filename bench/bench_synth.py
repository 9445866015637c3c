"""Benchmark (not a test): `pixgen synth` images/s with 1 and 2 processes on this CPU.

Runs the same spec (the bundled model, bank labels, few steps) as one process and as two
processes under `accelerate launch` (gloo on CPU), each process with one thread, at the
lowest priority; reads the build time from each set's manifest (``seconds``: model load +
generation + manifest, not the Python start-up) and checks the two sets are identical. Then
prints the *arithmetic* for N workers from the measured per-image cost: ranks share nothing
but the final manifest, so the ideal is linear; it is arithmetic, not a measurement.

    nice -n 19 python bench/bench_synth.py --per-class 16 --steps 4 --out /tmp/bench-synth
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _spec(path: Path, per_class: int, steps: int, batch_size: int) -> Path:
    classes = "".join(f'[classes.{k}]\ncount = {per_class}\nlabel = "{k}"\n' for k in ("lung_aca", "lung_n"))
    path.write_text(f'model = "bundled"\nseed = 0\n[sampler]\nsteps = {steps}\nbatch_size = {batch_size}\n{classes}')
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(spec: Path, out: Path, processes: int) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    synth = ["-m", "pixgen.cli", "synth", str(spec), "--out", str(out), "--no-progress"]
    launch = [] if processes == 1 else ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                        "--main_process_port", str(_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    subprocess.run(["nice", "-n", "19", sys.executable, *launch, *synth], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    manifest = json.loads((out / "manifest.json").read_text())
    n = len(manifest["files"])
    return {"processes": processes, "images": n, "build_s": manifest["seconds"], "wall_s": round(wall, 1),
            "images_per_s": round(n / manifest["seconds"], 3), "s_per_image": round(manifest["seconds"] / n, 3)}


def _same(a: Path, b: Path) -> bool:
    files = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != "manifest.json"}
    return files(a) == files(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="/tmp/bench-synth")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = _spec(out / "bench.toml", args.per_class, args.steps, args.batch_size)
    rows = [_run(spec, out / f"p{p}", p) for p in (1, 2)]
    print(f"# pixgen synth on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"bundled model, {args.steps} steps, batch {args.batch_size}, 1 thread per process, nice 19")
    for r in rows:
        print(json.dumps(r))
    print(f"2-process set identical to 1-process set: {_same(out / 'p1', out / 'p2')}")
    cost = rows[0]["s_per_image"]
    print(f"# ARITHMETIC (not measured): per-image cost c = {cost} s on one worker at {args.steps} steps; "
          "N workers, perfect sharding: N / c images/s")
    for n in (1, 2, 8, 16, 64):
        print(f"#   N={n:3d}: {n / cost:8.2f} images/s, 100k images in {1e5 * cost / n / 3600:8.2f} h")
    print("# a GPU's c must be measured on it (python bench/bench_synth.py there); c scales ~linearly with steps")


if __name__ == "__main__":
    main()
