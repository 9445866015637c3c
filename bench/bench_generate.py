"""Sampling speed at equal quality: pixgen's quality presets, the old default and the stock
diffusers PixArt pipeline, with the same weights, timed side by side in one run, each row with its
Frechet distance (two detectors, bootstrap intervals) to real held-out tiles.

Every row generates the same ``--n`` images (the same bank conditions and seeds) with the bundled
model, times them (seconds per image, decode included) and scores them with ``pixgen-ssl`` and the
independent tissue CNN against the held-out LC25000 + CoNSeP tiles (``--real`` holds one folder
per bank label; synthetic labels are drawn in the real set's proportions).

    # the side-by-side table: old default (28 Euler + CFG), each preset, stock PixArtSigmaPipeline
    python bench/bench_generate.py table --real /work/runs/gen-v2/test-tiles --n 256 --out /work/runs/speed/table
    # where the time goes: ms per transformer row and per decoded image, float32 / bfloat16 / autocast
    python bench/bench_generate.py parts --thread-counts 1 2
    # the quality-vs-steps curve (rows are SAMPLER:STEPS[:gi=LO-HI][:bf16][:shift=S]) and its plot
    python bench/bench_generate.py curve --real /work/runs/gen-v2/test-tiles --n 256 --out /work/runs/speed/curve \\
        --rows euler:28 euler:8 dpm++2m:8 unipc:8 heun:5 --plot docs/benchmarks/fd_vs_steps.png

The stock row needs weights that map onto ``PixArtTransformer2DModel``; an hourglass generator
(``conv_channels``, the bundled v2) has convolutional stages PixArt does not, so its table has no
stock row (the old-default row is then the obvious alternative).

A table times its rows in one run, interleaved batch by batch (each batch goes through every row
before the next), so that a shared machine's changing load falls on all rows alike. A curve's rows
are kept in ``OUT/rows.json`` as each finishes and skipped when present (resumable; ``--fresh``
recomputes them).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from pixgen.pipeline import Generator
from pixgen.sampling import QUALITY_PRESETS, QualityPreset, make_scheduler

BUNDLED = Path(__file__).resolve().parents[1] / "pixgen" / "weights" / "pixgen-default"
DETECTORS = ("encoder:pixgen-ssl", f"classifier:{Path(__file__).resolve().parents[1] / 'metrics' / 'weights' / 'detector-cnn'}")
LABELS = ("lung_aca", "lung_n", "lung_scc", "consep")
OLD_DEFAULT = QualityPreset("euler", 28)  # pixgen's default before the presets: 28 Euler steps, CFG at every step


@dataclass
class Workload:
    """The same conditions and starting noise for every row."""

    gen: Generator
    cond: torch.Tensor  # (N, 1, D)
    noise: torch.Tensor  # (N, C, h, w)
    guidance: float
    batch: int


def parse_row(spec: str) -> QualityPreset:
    """``SAMPLER:STEPS[:gi=LO-HI][:bf16][:shift=S]`` -> settings, e.g. ``dpm++2m:8:gi=0-0.7:bf16``."""
    sampler, steps, *opts = spec.split(":")
    row = QualityPreset(sampler, int(steps))
    for opt in opts:
        if opt == "bf16":
            row = replace(row, dtype="bfloat16")
        elif opt.startswith("gi="):
            lo, hi = opt[3:].split("-")
            row = replace(row, guidance_interval=(float(lo), float(hi)))
        elif opt.startswith("shift="):
            row = replace(row, shift=float(opt[6:]))
        else:
            raise SystemExit(f"unknown row option {opt!r} in {spec!r}")
    return row


def row_name(row: QualityPreset) -> str:
    gi = f":gi={row.guidance_interval[0]:g}-{row.guidance_interval[1]:g}" if row.guidance_interval else ""
    return f"{row.sampler}:{row.num_inference_steps}{gi}{':bf16' if row.dtype == 'bfloat16' else ''}" + (
        f":shift={row.shift:g}" if row.shift != 1.0 else "")


def workload(real: Path, n: int, batch: int, seed: int = 0) -> Workload:
    """``n`` bank conditions, labels in the held-out set's proportions, and their seeded noise."""
    gen = Generator.from_pretrained(BUNDLED)
    counts = np.array([len(list((real / label).glob("*.png"))) for label in LABELS], float)
    per_label = np.floor(n * counts / counts.sum()).astype(int)
    per_label[0] += n - per_label.sum()
    cond = torch.cat([gen.embedding_bank.sample(label, int(k), seed=seed + 1000 * i).values
                      for i, (label, k) in enumerate(zip(LABELS, per_label)) if k > 0])
    noise = gen.initial_noise(range(seed, seed + n))
    return Workload(gen, cond.reshape(n, 1, -1), noise, float(gen.config["guidance_scale"]), batch)


def pixgen_batch(w: Workload, row: QualityPreset, sl: slice) -> np.ndarray:
    """uint8 images of ``sl`` with ``Generator.generate`` and the row as its quality preset."""
    w.gen.set_quality(row)
    return w.gen.generate(embeddings=w.cond[sl], latents=w.noise[sl], num_images=1, batch_size=w.batch,
                          guidance_scale=w.guidance, output_type="np", progress=False).images


@torch.no_grad()
def _decode(vae, latents: torch.Tensor, chunk: int = 16) -> np.ndarray:
    dtype = next(vae.parameters()).dtype
    pixels = torch.cat([vae.decode(latents[i : i + chunk].to(dtype)).float() for i in range(0, len(latents), chunk)])
    return (((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def stock_pipeline(gen: Generator):
    """diffusers' ``PixArtSigmaPipeline`` over the same weights: the transformer's state dict loaded
    into ``PixArtTransformer2DModel`` (pixgen keeps diffusers' PixArt module names), PixArt-Sigma's
    default solver (DPM-Solver++ multistep, here in flow mode since the model predicts velocity),
    the model's null embedding as the negative prompt."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    cfg = gen.transformer.config
    stock = PixArtTransformer2DModel(
        num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, num_layers=cfg.num_layers, sample_size=cfg.sample_size, patch_size=cfg.patch_size,
        caption_channels=cfg.caption_channels, cross_attention_dim=cfg.num_attention_heads * cfg.attention_head_dim,
        use_additional_conditions=False, norm_type="ada_norm_single", norm_eps=cfg.norm_eps,
        interpolation_scale=cfg.interpolation_scale,
    ).eval()
    state = {k: v for k, v in gen.transformer.state_dict().items() if k != "caption_projection.uncond_embedding"}
    missing, unexpected = stock.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not map onto PixArtTransformer2DModel: missing {missing}, unexpected {unexpected}")
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=gen.vae.model, transformer=stock, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_batch(w: Workload, pipe, sl: slice) -> np.ndarray:
    """The stock pipeline at its call defaults (20 steps, guidance 4.5) on ``sl``; latents out, decoded
    by the same autoencoder (its latent shift is not in PixArt's decode), no resolution binning (the
    model's 128 px is not one of PixArt's bins)."""
    cond = w.cond[sl]
    ones = torch.ones(len(cond), 1, dtype=torch.long)
    null = w.gen.transformer.null_condition(len(cond)).detach()
    latents = pipe(prompt_embeds=cond, prompt_attention_mask=ones, negative_prompt=None, negative_prompt_embeds=null,
                   negative_prompt_attention_mask=ones, latents=w.noise[sl].clone(), use_resolution_binning=False,
                   output_type="latent", return_dict=False)[0]
    return _decode(w.gen.vae, latents)


def timed_rows(w: Workload, runners: dict, interleave: bool) -> dict[str, tuple[float, np.ndarray]]:
    """Seconds per image and images of every row (``runners``: name -> fn(slice) -> images), after one
    untimed warm-up image each. ``interleave``: batch by batch, each batch through every row (in a
    rotating order) before the next, so every row sees the same changing load of a shared machine."""
    for fn in runners.values():
        fn(slice(0, 1))
    seconds = dict.fromkeys(runners, 0.0)
    images: dict[str, list] = {name: [] for name in runners}
    batches = [slice(lo, lo + w.batch) for lo in range(0, len(w.noise), w.batch)]
    names = list(runners)
    order = ([(b, names[(k + j) % len(names)]) for k, b in enumerate(batches) for j in range(len(names))] if interleave
             else [(b, name) for name in names for b in batches])
    for batch, name in order:
        t0 = time.perf_counter()
        images[name].append(runners[name](batch))
        seconds[name] += time.perf_counter() - t0
    return {name: (seconds[name] / len(w.noise), np.concatenate(images[name])) for name in runners}


class Scorer:
    """FD (with bootstrap interval) of image sets to the real held-out tiles, per detector."""

    def __init__(self, real: Path, cache: Path, n_boot: int):
        from metrics.detectors import get_detector

        self.detectors = {name: get_detector(name) for name in DETECTORS}
        self.n_boot = n_boot
        if cache.is_file():
            data = np.load(cache)
            self.real = {name: data[f"f{i}"] for i, name in enumerate(DETECTORS)}
        else:
            from pixgen.io import load_image

            images = [np.asarray(load_image(p)) for label in LABELS for p in sorted((real / label).glob("*.png"))]
            self.real = {name: self._features(name, images) for name in DETECTORS}
            np.savez(cache, **{f"f{i}": self.real[name] for i, name in enumerate(DETECTORS)})

    def _features(self, name: str, images) -> np.ndarray:
        from metrics.detectors import compute_features

        return compute_features(self.detectors[name], list(images), batch_size=64)

    def __call__(self, images: np.ndarray) -> dict[str, dict]:
        import warnings

        from metrics.fidelity import fd_estimate

        out = {}
        for name in DETECTORS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # small-N warnings: every row has the same N, compared at equal N
                out[name.split("/")[-1]] = fd_estimate(self._features(name, images), self.real[name], n_boot=self.n_boot)
        return out


def _forwards(row: QualityPreset) -> int:
    """Model rows per image: steps (Heun: 2 per step but the last) times 2 inside the guidance interval."""
    scheduler = make_scheduler(row.sampler, "flow", row.shift)
    scheduler.set_timesteps(row.num_inference_steps)
    lo, hi = row.guidance_interval or (0.0, 1.0)
    return sum(2 if lo <= float(t) / 1000 <= hi else 1 for t in scheduler.timesteps)


def run_rows(args, rows: list[tuple[str, QualityPreset | None]], interleave: bool = False) -> dict[str, dict]:
    """Run (or, for a curve, reuse) each row; returns name -> {seconds, forwards, fd, settings}.
    ``None`` settings = the stock pipeline. A curve runs row after row (each kept as it finishes);
    a table interleaves its rows batch by batch (see :func:`timed_rows`)."""
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "rows.json"
    done = {} if args.fresh or not store.is_file() else json.loads(store.read_text())
    todo = [(name, row) for name, row in rows if name not in done]
    if not todo:
        return done
    w = workload(args.real, args.n, args.batch)
    scorer = Scorer(args.real, args.out.parent / f"real_features_{'_'.join(LABELS)}.npz", args.n_boot)
    pipe = stock_pipeline(w.gen) if any(row is None for _, row in todo) else None
    runner = {name: (lambda sl, row=row: pixgen_batch(w, row, sl)) if row is not None else (lambda sl: stock_batch(w, pipe, sl))
              for name, row in todo}
    groups = [todo] if interleave else [[item] for item in todo]
    for group in groups:
        print(f"{datetime.now(timezone.utc):%H:%M:%S} {', '.join(name for name, _ in group)}", flush=True)
        results = timed_rows(w, {name: runner[name] for name, _ in group}, interleave)
        for name, row in group:
            seconds, images = results[name]
            done[name] = {"seconds": seconds, "forwards": 40 if row is None else _forwards(row), "fd": scorer(images),
                          "settings": None if row is None else row.__dict__}
            np.save(args.out / f"sample_{name.replace(':', '_')}.npy", images[:16])
            print(name, json.dumps(done[name]), flush=True)
        store.write_text(json.dumps(done, indent=1))
    return done


def _fmt(est: dict) -> str:
    return f"{est['value']:.3g} [{est['ci'][0]:.3g}, {est['ci'][1]:.3g}]"


def header(args) -> str:
    return (f"# bundled pixgen-default (128 px), n={args.n} images per row, batch {args.batch}, {args.threads} thread(s), "
            f"guidance 2; {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


def table(args) -> None:
    """The old default, every preset (and any ``--rows`` candidates) and the stock pipeline, timed in
    this one run, interleaved batch by batch; rows whose settings are a preset's are named after it."""
    old = ("old default (euler:28, CFG every step, fp32)", OLD_DEFAULT)
    candidates = list(QUALITY_PRESETS.values()) + [parse_row(spec) for spec in args.rows or []]
    rows = [old] + [(row_name(p), p) for p in dict.fromkeys(candidates) if p != OLD_DEFAULT]
    stock_row = not json.loads((BUNDLED / "transformer" / "config.json").read_text()).get("conv_channels")
    if stock_row:  # PixArt has no convolutional stages: an hourglass model has no stock pipeline
        rows.append(("stock PixArtSigmaPipeline (its defaults: DPM-Solver++ 20 steps, guidance 4.5)", None))
    args.fresh = not args.reuse
    done = run_rows(args, rows, interleave=True)
    base = done[old[0]]["seconds"]
    stock = done[rows[-1][0]]["seconds"] if stock_row else None
    presets = {p: name for name, p in QUALITY_PRESETS.items()}
    dets = list(next(iter(done.values()))["fd"])
    print(header(args))
    print("| row | preset | model rows/image | s/image | speed-up vs old default | vs stock | "
          + " | ".join(f"FD {d}" for d in dets) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(dets))
    for name, row in rows:
        r = done[name]
        print(f"| {name} | {presets.get(row, '') if row else ''} | {r['forwards']} | {r['seconds']:.3f} | "
              f"{base / r['seconds']:.2f}x | " + (f"{stock / r['seconds']:.2f}x" if stock_row else "-") + " | " + " | ".join(_fmt(r["fd"][d]) for d in dets) + " |")


def curve(args) -> None:
    done = run_rows(args, [(row_name(parse_row(s)), parse_row(s)) for s in args.rows])
    print(header(args))
    if args.plot:
        plot(done, args.plot, header(args))


def plot(done: dict[str, dict], path: Path, title: str) -> None:
    """FD vs model rows per image, one line per sampler (CFG every step), per detector; the 28-step
    Euler reference's interval shaded; guidance-interval / shifted rows as separate markers."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dets = list(next(iter(done.values()))["fd"])
    fig, axes = plt.subplots(1, len(dets), figsize=(6 * len(dets), 4.2))
    for ax, det in zip(np.atleast_1d(axes), dets):
        ref = (done.get("euler:28") or done.get("euler:28:bf16") or {}).get("fd", {}).get(det)
        if ref:
            ax.axhspan(*ref["ci"], color="0.85", label="euler 28 interval")
        groups: dict[str, list] = {}
        for name, r in done.items():
            s = r["settings"]
            plain = s["guidance_interval"] is None and s["shift"] == 1.0
            groups.setdefault(s["sampler"] if plain else "variants", []).append((r["forwards"], r["fd"][det], name))
        for label, pts in groups.items():
            pts.sort(key=lambda p: p[0])
            x, y = [p[0] for p in pts], [p[1]["value"] for p in pts]
            err = np.array([[p[1]["value"] - p[1]["ci"][0], p[1]["ci"][1] - p[1]["value"]] for p in pts]).T
            ax.errorbar(x, y, yerr=err, marker="o", capsize=2, ls="none" if label == "variants" else "-", label=label)
            if label == "variants":
                for p in pts:
                    ax.annotate(p[2], (p[0], p[1]["value"]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["forwards"] for r in done.values()}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.minorticks_off()
        ax.set_xlabel("model rows per image (steps x 2 under CFG)")
        ax.set_ylabel(f"FD ({det})")
        ax.legend(fontsize=7)
    fig.suptitle(title[2:], fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


@torch.no_grad()
def parts(args) -> None:
    """Milliseconds per transformer row and per decoded image of the bundled model: float32,
    bfloat16 weights, and float32 weights under ``torch.autocast(bfloat16)``, per thread count."""
    import contextlib

    gen = Generator.from_pretrained(BUNDLED)
    b = args.batch
    x, t, y = torch.randn(b, 4, 32, 32), torch.full((b,), 500.0), torch.randn(b, 1, 192)
    print(header(args))
    print("| threads | execution | ms / transformer row | ms / decoded image |\n|---|---|---|---|")
    for threads in args.thread_counts:
        torch.set_num_threads(threads)
        for name, dtype, ctx in (("float32", torch.float32, contextlib.nullcontext),
                                 ("bfloat16 weights", torch.bfloat16, contextlib.nullcontext),
                                 ("float32 + autocast bf16", torch.float32,
                                  lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
            model, vae = gen.transformer.to(dtype), gen.vae.to(dtype)
            with ctx():
                fwd = _best_ms(lambda: model(x.to(dtype), t, y.to(dtype)), args.repeats) / b
                dec = _best_ms(lambda: vae.decode(x.to(dtype)), args.repeats) / b
            print(f"| {threads} | {name} | {fwd:.2f} | {dec:.1f} |", flush=True)
        gen.transformer.float(), gen.vae.float()


def _best_ms(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up (the least disturbed by other jobs)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    for mode in ("table", "curve"):
        p = sub.add_parser(mode)
        p.add_argument("--real", type=Path, required=True, help="held-out tiles, one folder per label (LABELS)")
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--n", type=int, default=256)
        p.add_argument("--batch", type=int, default=32)
        p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a contended CPU)")
        p.add_argument("--n-boot", type=int, default=200)
    p = sub.add_parser("parts", help="per-row and per-decode cost: float32, bfloat16, autocast; thread counts")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2])
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    sub.choices["table"].add_argument("--reuse", action="store_true", help="keep rows of an earlier run (not timed together)")
    sub.choices["table"].add_argument("--rows", nargs="*", help="extra candidate rows, as for curve")
    sub.choices["curve"].add_argument("--rows", nargs="+", required=True)
    sub.choices["curve"].add_argument("--plot", type=Path)
    sub.choices["curve"].add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    {"table": table, "curve": curve, "parts": parts}[args.mode](args)


if __name__ == "__main__":
    main()
