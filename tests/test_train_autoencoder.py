"""training.autoencoder: loss falls on real H&E crops, checkpoint + resume, latent scale, export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.autoencoder import (
    AEConfig,
    augment_d4,
    build_autoencoder,
    finalize,
    load_rgb,
    reconstruction_loss,
    to_model,
    train_autoencoder,
)

TINY = dict(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4, crop=32, batch_size=2, threads=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def make_tiny_data(root: Path, shared: Path, n: int = 3) -> Path:
    """A data folder in the shared layout with a handful of real images (symlinks) + an LC split JSON."""
    for split in ("train", "test"):
        src = shared / "consep" / split
        for stem in [p.stem for p in sorted((src / "images").glob("*.jpg"))[:n]]:
            for sub, ext in (("images", "jpg"), ("inst", "png"), ("types", "png")):
                (root / "consep" / split / sub).mkdir(parents=True, exist_ok=True)
                (root / "consep" / split / sub / f"{stem}.{ext}").symlink_to(src / sub / f"{stem}.{ext}")
        (root / "monuseg" / split / "images").mkdir(parents=True)
        first = sorted((shared / "monuseg" / split / "images").glob("*.jpg"))[0]
        (root / "monuseg" / split / "images" / first.name).symlink_to(first)
    lc = {"method": "test", "train": [], "test": []}
    for label, cls in enumerate(("lung_aca", "lung_n", "lung_scc")):
        files = sorted((shared / "lc25000-lung" / cls).glob("*.jpeg"))
        lc["train"] += [[str(p), label] for p in files[:2]]
        lc["test"] += [[str(p), label] for p in files[-2:]]
    (root / "lc_split.json").write_text(json.dumps(lc))
    return root


def read_log(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_loss_falls_on_a_repeated_real_batch(shared_data: Path):
    image = load_rgb(next((shared_data / "consep" / "train" / "images").glob("*.jpg")))
    x = to_model(np.stack([image[i : i + 32, i : i + 32] for i in (0, 64, 128, 192)]))
    cfg = AEConfig(**TINY)
    model = build_autoencoder(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss, terms, rec = reconstruction_loss(model, x, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all() and rec.shape == x.shape
    assert losses[-1] < 0.8 * losses[0], losses


def test_train_checkpoint_resume_and_finalize(shared_data: Path, tmp_path: Path):
    from safetensors.torch import load_file

    from training.engine import list_checkpoints

    data = make_tiny_data(tmp_path / "data", shared_data)
    out = tmp_path / "run"
    common = dict(data=str(data), log_every=1, checkpoint_every=1, eval_limit=2, lc_split=str(data / "lc_split.json"), **TINY)
    cfg = AEConfig(out=str(out), max_steps=3, eval_every=0, **common)
    first = train_autoencoder(cfg)
    assert first["step"] == 3 and np.isfinite(first["last_loss"])
    ckpt = list_checkpoints(out)[-1]
    assert ckpt.name == "checkpoint-00000003" and not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))

    cfg.max_steps, cfg.eval_every = 5, 5
    resumed = train_autoencoder(cfg, resume=True)
    assert resumed["step"] == 5
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [1, 2, 3, 4, 5]
    assert {"consep_psnr", "monuseg_ssim", "lc25000_psnr"} <= set(read_log(out / "eval.csv")[0])
    straight = train_autoencoder(AEConfig(out=str(tmp_path / "straight"), max_steps=5, eval_every=5, **common))
    a, b = (load_file(f / "diffusion_pytorch_model.safetensors") for f in (resumed["final"], straight["final"]))
    assert all(torch.equal(a[k], b[k]) for k in a)  # 3 steps + resume == 5 steps, bit for bit

    report = finalize(AEConfig(data=str(data), out=str(out), threads=1), export=str(tmp_path / "ae"), eval_limit=2)
    assert report["step"] == 5 and report["scaling_factor"] > 0
    from pixgen.models.autoencoders import load_autoencoder

    ae = load_autoencoder(tmp_path / "ae")
    assert ae.model.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert ae.downsample_factor == 2 and ae.latent_channels == 4


def test_flips_and_rotations_keep_uint8_crops():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = augment_d4(img, np.random.default_rng(1))
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert sorted(out.ravel().tolist()) == sorted(img.ravel().tolist())  # a permutation of the pixels


def test_patch_gan_trains_the_discriminator_only_on_its_own_term(shared_data: Path, tmp_path: Path):
    """With the GAN on, the discriminator moves, and the generator term does not reach it."""
    from training.autoencoder import _AutoencoderGAN

    cfg = AEConfig(gan_weight=0.5, bf16=False, **TINY)
    model = _AutoencoderGAN(cfg)
    x = to_model(np.stack([load_rgb(next((shared_data / "consep" / "train" / "images").glob("*.jpg")))[:32, :32]] * 2))
    loss, terms = model(x, torch.Generator().manual_seed(0), use_gan=True)
    assert {"g", "d"} <= set(terms)
    loss.backward()
    disc_grads = [p.grad.clone() for p in model.disc.parameters()]
    model.zero_grad()
    d_only = torch.nn.functional.relu(1 - model.disc(x)).mean()
    rec = model.vae.decode(model.vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0))).sample
    (d_only + torch.nn.functional.relu(1 + model.disc(rec.detach())).mean()).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(disc_grads, model.disc.parameters()))

    data = make_tiny_data(tmp_path / "data", shared_data)
    run = AEConfig(data=str(data), out=str(tmp_path / "run"), max_steps=2, gan_start=1, log_every=1, eval_every=0,
                   lc_split=str(data / "lc_split.json"), gan_weight=0.5, **TINY)
    train_autoencoder(run)
    rows = read_log(tmp_path / "run" / "log.csv")
    assert rows[0]["g"] == "" and float(rows[1]["d"]) > 0  # the GAN starts at gan_start
