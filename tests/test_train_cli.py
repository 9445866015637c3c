"""`pixgen train` from the command line: dry run arithmetic, image-folder data, presets and overrides."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pixgen.cli import main
from pixgen.errors import InputError
from pixgen.models.transformer import PixgenTransformer
from pixgen.pipeline import Generator
from training.flops import model_flops, train_step_flops
from training.presets import PRESETS, TrainConfig, apply_overrides, get_preset
from training.testing import synthetic_cache, tiny_inputs


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.mark.parametrize("tokens, out_channels", [(1, 4), (4, 8)])
def test_flops_formula_matches_torch_flop_counter(tokens, out_channels):
    model = PixgenTransformer.from_preset("pixgen-tiny", in_channels=4, out_channels=out_channels, sample_size=16,
                                          caption_channels=32, caption_num_tokens=tokens)
    x, cond = torch.randn(3, 4, 16, 16), torch.randn(3, tokens, 32)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # attention as plain matmuls
        model(x, torch.tensor([1.0, 2.0, 3.0]), cond)
    assert counter.get_total_flops() / 3 == model_flops(model.config)["total"]
    assert train_step_flops(10.0, 4) == 120.0 and train_step_flops(10.0, 4, gradient_checkpointing=True) == 160.0


def test_dry_run_prints_parameters_flops_and_time(tmp_path, capsys):
    cache = synthetic_cache(tmp_path / "cache", n=16, latent=(4, 32, 32), dim=64)
    assert main(["train", "--preset", "S-256", "--data", str(cache), "--out", str(tmp_path / "run"), "--dry-run",
                 "--batch-size", "4", "--max-steps", "1000"]) == 0
    out = capsys.readouterr().out
    model = PixgenTransformer.from_preset("pixgen-S/2", in_channels=4, sample_size=32, caption_channels=64)
    params = sum(p.numel() for p in model.parameters())
    assert f"parameters: {params:,}" in out
    step = 3 * 4 * model_flops(model.config)["total"]
    assert f"training FLOPs per step: {step / 1e12:.4f} TFLOP" in out
    assert "matmul peak fp32" in out and "matmul peak bf16" in out and "s/step" in out
    assert json.loads(out[out.index("{"): out.index("}\n") + 1])["model"] == "pixgen-S/2"
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    assert "tokens 256;" in out  # 32x32 latents, patch 2
    assert main(["train", "--preset", "default-128-v2", "--data", str(cache), "--out", str(tmp_path / "run"),
                 "--dry-run"]) == 0
    assert "tokens 64;" in capsys.readouterr().out  # the hourglass patchifies its 16x16 conv stage


def test_train_on_an_image_folder_builds_the_cache_first(tmp_path, shared_data):
    paths = tiny_inputs(tmp_path, shared_data / "lc25000-lung", per_class=4)
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(paths["images"]), "--out", str(run), "--mpp", "3.5",
                 "--set", f"vae={paths['vae']}", "--set", f"encoder={paths['encoder']}", "--max-steps", "2",
                 "--batch-size", "4", "--set", "condition_grid=2"]) == 0
    assert json.loads((run / "cache" / "index.json").read_text())["complete"]
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert cfg.max_steps == 2 and cfg.condition_grid == 2 and cfg.mpp == 3.5
    gen = Generator.from_pretrained(run / "final")
    assert gen.transformer.config.caption_num_tokens == 4  # a 2x2 grid of sub-tile embeddings
    assert gen.generate(label="lung_scc", num_inference_steps=1, progress=False).images[0].size == (32, 32)


def test_image_folder_without_vae_or_encoder_uses_the_bundled_ones(tmp_path, shared_data, capsys):
    """No VAE / encoder named: the bundled ones cache the folder (and the user is told); the run
    then fails (3 tiles < one batch of 8) and leaves only its reusable cache, no lone config.json."""
    paths = tiny_inputs(tmp_path, shared_data / "lc25000-lung", per_class=1)
    assert main(["train", "--preset", "tiny", "--data", str(paths["images"]), "--out", str(tmp_path / "r"),
                 "--mpp", "3.5", "--set", "image_size=32"]) == 1
    captured = capsys.readouterr()
    assert "bundled components" in captured.out and "pixgen-ssl" in captured.out
    assert "fewer than one global batch" in captured.err
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["cache"]


def test_presets_and_overrides():
    assert {"tiny", "S-256", "pixcell-finetune"} <= set(PRESETS)
    ft = get_preset("pixcell-finetune")
    assert ft.objective == "epsilon" and ft.learned_sigma and ft.lora_rank > 0
    cfg = apply_overrides(get_preset("tiny"), ["lr=2e-4", "mixed_precision=bf16", "lora_targets=to_q,to_v"])
    assert (cfg.lr, cfg.mixed_precision, cfg.lora_targets) == (2e-4, "bf16", ("to_q", "to_v"))
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(InputError, match="unknown training config field"):
        apply_overrides(cfg, ["learning_rate=1"])
    with pytest.raises(InputError, match="learned_sigma needs objective=epsilon"):
        apply_overrides(cfg, ["learned_sigma=true"])
    with pytest.raises(InputError, match="bad value"):
        apply_overrides(cfg, ["batch_size=many"])


@pytest.mark.parametrize("preset, command", [("pixcell-stain-lora", "training.tasks.lora"),
                                             ("pixcell-stain-controlnet", "training.tasks.stain_controlnet")])
def test_stain_presets_are_refused_by_pixgen_train(tmp_path, capsys, preset, command):
    """They would export an IHC model tagged as H&E: their own command is named instead."""
    cache = synthetic_cache(tmp_path / "cache")
    assert main(["train", "--preset", preset, "--data", str(cache), "--out", str(tmp_path / "run"), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert command in err and "fix:" in err
    assert not (tmp_path / "run").exists()
