"""LoRA fine-tuning of a PixCell-layout checkpoint (random weights, Hub layout, no download).

The checkpoint and its stand-ins (a tiny SD3.5-like VAE, a tiny encoder under UNI2-h's name and
width) come from ``tests/test_pixcell.py``'s helpers, so this exercises the same loader users hit
with ``--init StonyBrook-CVLab/PixCell-256``: features with the model's VAE + encoder, epsilon +
learned-variance LoRA training with gradient checkpointing, and a merged ``final/``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from pixgen.cli import main
from pixgen.encoders import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec
from pixgen.pipeline import Generator
from training.testing import tiny_image_folder

pixcell_tests = pytest.importorskip("test_pixcell", reason="PixCell loader tests not present")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def test_lora_finetune_of_a_pixcell_checkpoint(tmp_path, shared_data):
    from pixgen.testing import PIXCELL_256_TRANSFORMER

    ckpt = pixcell_tests.write_pixcell(tmp_path / "PixCell-256", pixcell_tests.shrunk(PIXCELL_256_TRANSFORMER))
    torch.manual_seed(0)
    AutoencoderKL(  # f8, 16 channels, SD3.5 scaling / shift: plays the SD3.5 VAE
        block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=2, layers_per_block=1,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False,
    ).save_pretrained(tmp_path / "sd35-vae")
    spec = EncoderSpec(name="uni2-h", dim=1536, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5,
                       source="test", library="pixcell-test")
    pixcell_tests.TinyUNI(spec, nn.Linear(48, 1536)).save_pretrained(tmp_path / "uni2-h")
    images = tiny_image_folder(shared_data / "lc25000-lung", tmp_path / "images", per_class=2, size=256)

    vae, uni = str(tmp_path / "sd35-vae"), str(tmp_path / "uni2-h")
    assert main(["features", str(images), "--model", str(ckpt), "--vae", vae, "--encoder-path", uni,
                 "--mpp", "0.4375", "--out", str(tmp_path / "cache")]) == 0
    run = tmp_path / "run"
    assert main(["train", "--preset", "pixcell-finetune", "--init", str(ckpt), "--data", str(tmp_path / "cache"),
                 "--out", str(run), "--max-steps", "2", "--batch-size", "2", "--lora-rank", "2",
                 "--mixed-precision", "no", "--set", f"vae={vae}", "--set", f"encoder_path={uni}",
                 "--set", "checkpoint_every=2", "--set", "sample_every=0"]) == 0
    gen = Generator.from_pretrained(run / "final")
    base = Generator.from_pretrained(ckpt, vae_path=vae, encoder_path=uni)
    assert gen.transformer.learned_sigma and gen.config["encoder"] == "uni2-h"
    assert gen.config["finetuned_from"] == str(ckpt) and not (run / "final" / "encoder").exists()
    assert type(gen.scheduler).__name__ == type(base.scheduler).__name__
    after, before = gen.transformer.state_dict(), base.transformer.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(".attn" in k or ".ff." in k for k in changed)  # only LoRA-adapted layers moved
    out = gen.generate(label="lung_n", num_inference_steps=2, progress=False)
    assert out.images[0].size == (256, 256)


def test_dry_run_reads_the_pixcell_config(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from pixgen.pixcell import load_pixcell_transformer
    from pixgen.testing import PIXCELL_1024_TRANSFORMER
    from training.presets import LORA_TARGETS
    from training.testing import synthetic_cache

    ckpt = pixcell_tests.write_pixcell(tmp_path / "PixCell-1024", pixcell_tests.shrunk(PIXCELL_1024_TRANSFORMER))
    cache = synthetic_cache(tmp_path / "cache", n=8, latent=(16, 128, 128), dim=1536, grid=4)
    assert main(["train", "--preset", "pixcell-finetune", "--init", str(ckpt), "--data", str(cache),
                 "--out", str(tmp_path / "run"), "--dry-run", "--lora-rank", "4"]) == 0
    out = capsys.readouterr().out
    model = load_pixcell_transformer(ckpt / "transformer")
    params = sum(p.numel() for p in model.parameters())
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=list(LORA_TARGETS)))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert f"parameters: {params:,}" in out
    assert f"LoRA trainable ~{trainable:,}" in out and "condition 16 x 1536" in out
