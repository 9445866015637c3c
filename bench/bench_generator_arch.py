"""Cost of generator architectures on the bundled 128 px setup: params, fp16 MB, FLOPs, s/sample.

FLOPs are torch's ``FlopCounterMode`` over one forward and one forward + backward of a real batch
(4 x 32 x 32 f4 latents, one 192-d pixgen-ssl token); time is one training step (forward +
backward, bf16 autocast, like the trainer) per sample at ``--threads`` threads, median of
``--repeats`` after a warm-up.

    nice -n 19 python bench/bench_generator_arch.py --threads 1 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pixgen.models.transformer import PixgenTransformer

# name -> (model preset, overrides): the candidates compared in docs/generator-v2.md
CANDIDATES: dict[str, tuple[str, dict]] = {
    "XS p4 (bundled)": ("pixgen-XS", dict(patch_size=4)),
    "XS p2": ("pixgen-XS", dict(patch_size=2)),
    "XS-H (64,128) p2": ("pixgen-XS-H", dict(patch_size=2)),
    "XS-H (64,128) p2, 2 conv layers": ("pixgen-XS-H", dict(patch_size=2, conv_layers=2)),
    "XS-H (96,192) p2": ("pixgen-XS-H", dict(patch_size=2, conv_channels=(96, 192))),
    "XS-H (64,128,256) p1": ("pixgen-XS-H", dict(patch_size=1, conv_channels=(64, 128, 256))),
}


def build(preset: str, overrides: dict) -> PixgenTransformer:
    return PixgenTransformer.from_preset(preset, in_channels=4, sample_size=32, caption_channels=192,
                                         encoder_name="pixgen-ssl", **overrides)


def flops(model: PixgenTransformer, batch: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per sample."""
    x, t, y = torch.randn(batch, 4, 32, 32), torch.rand(batch) * 1000, torch.randn(batch, 1, 192)
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        model(x, t, y)
    with FlopCounterMode(display=False) as train:
        model(x, t, y).sample.square().mean().backward()
    model.zero_grad(set_to_none=True)
    return fwd.get_total_flops() / batch, train.get_total_flops() / batch


def seconds_per_sample(model: PixgenTransformer, batch: int, repeats: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t, y = torch.randn(batch, 4, 32, 32), torch.rand(batch) * 1000, torch.randn(batch, 1, 192)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, t, y).sample.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times) / batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", nargs="*", help="candidate names (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| candidate | params | fp16 MB | tokens | fwd GFLOP/sample | train GFLOP/sample | s/sample (bf16) | GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (preset, overrides) in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        model = build(preset, overrides)
        params = sum(p.numel() for p in model.parameters())
        fwd, train = flops(model, 4)
        sec = seconds_per_sample(model, args.batch, args.repeats)
        tokens = model.pos_embed.height * model.pos_embed.width
        print(f"| {name} | {params / 1e6:.2f} M | {params * 2 / 1e6:.1f} | {tokens} | {fwd / 1e9:.2f} | "
              f"{train / 1e9:.2f} | {sec:.4f} | {train / sec / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
