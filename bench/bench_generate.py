"""Sampling speed: pixgen's Generator against the stock diffusers PixArt transformer.

Both sides use the same width/depth/patch, the same FlowMatchEuler scheduler, the same number
of steps with classifier-free guidance (two rows per image), and the same autoencoder; weights are
random (speed does not depend on them). The stock side is diffusers' ``PixArtTransformer2DModel``
driven by the obvious hand loop (PixArt's own pipeline needs a T5 text encoder, which is not the
point here). Prints a side-by-side table of seconds per image.

    python bench/bench_generate.py                      # the bundled default's size (pixgen-XS, 128 px)
    python bench/bench_generate.py --preset pixgen-S/2 --patch 2 --latent 32 --channels 16
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel

from pixgen.models.autoencoders import Autoencoder
from pixgen.models.transformer import PRESETS, PixgenTransformer
from pixgen.pipeline import Generator

COND_DIM = 192


def build(preset: str, patch: int, latent: int, channels: int):
    size = PRESETS[preset]
    ours = PixgenTransformer.from_preset(preset, in_channels=channels, sample_size=latent, patch_size=patch,
                                         caption_channels=COND_DIM).eval()
    stock = PixArtTransformer2DModel(
        num_attention_heads=size["num_attention_heads"], attention_head_dim=size["attention_head_dim"],
        in_channels=channels, out_channels=channels, num_layers=size["num_layers"], sample_size=latent,
        patch_size=patch, caption_channels=COND_DIM, cross_attention_dim=size["num_attention_heads"] * size["attention_head_dim"],
        use_additional_conditions=False, norm_type="ada_norm_single",
    ).eval()
    vae = AutoencoderKL(block_out_channels=(32, 64, 128), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=channels, norm_num_groups=16,
                        layers_per_block=1, mid_block_add_attention=False).eval()
    return ours, stock, Autoencoder(vae)


@torch.no_grad()
def stock_generate(model, vae: Autoencoder, cond: torch.Tensor, steps: int, guidance: float, dtype) -> torch.Tensor:
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(steps)
    cfg = model.config
    x = torch.randn(cond.shape[0], cfg.in_channels, cfg.sample_size, cfg.sample_size)
    uncond = torch.zeros_like(cond)
    for t in sched.timesteps:
        out = model(torch.cat([x, x]).to(dtype), encoder_hidden_states=torch.cat([cond, uncond]).to(dtype),
                    timestep=t.expand(2 * x.shape[0])).sample.float()
        c, u = out.chunk(2)
        x = sched.step(u + guidance * (c - u), t, x).prev_sample
    return vae.decode(x)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pixgen-XS")
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    ours, stock, vae = build(args.preset, args.patch, args.latent, args.channels)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype), stock.to(dtype)
        gen = Generator(ours, vae, config={"encoder": None, "guidance_scale": 2.0})
        for batch in args.batch:
            cond = torch.randn(batch, 1, COND_DIM)
            t_ours = timed(lambda: gen.generate(embeddings=cond, num_inference_steps=args.steps, output_type="pt",
                                                batch_size=batch, progress=False), args.repeats)
            t_stock = timed(lambda: stock_generate(stock, vae, cond, args.steps, 2.0, dtype), args.repeats)
            rows.append((str(dtype).split(".")[-1], batch, t_ours / batch, t_stock / batch))
    print(f"# {args.preset}, patch {args.patch}, latent {args.channels}x{args.latent}x{args.latent}, {args.steps} steps + CFG;"
          f" {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {date.today()}")
    print("| dtype | batch | pixgen s/image | stock diffusers s/image | ratio |\n|---|---|---|---|---|")
    for dtype, batch, a, b in rows:
        print(f"| {dtype} | {batch} | {a:.3f} | {b:.3f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
