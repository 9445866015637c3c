"""The ControlNet task on pixel-grid mask channels: the cache field's shape gives the ControlNet its
mask encoder, training lowers the loss over a frozen base, and the export generates from layouts."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from training.presets import apply_overrides, get_preset
from training.testing import tiny_cache
from training.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def pixel_cache(tmp_path_factory, shared_data):
    """The tiny cache (32 px tiles, 4x8x8 latents) plus ``mask``: (6, 32, 32) pixel-grid channels
    that carry each tile's own latents upsampled x4 (a control that tells the answer)."""
    from training.features import FeatureCache, add_field

    root = tmp_path_factory.mktemp("pixmask")
    cache = tiny_cache(root / "t", shared_data / "lc25000-lung", per_class=6)
    lat = FeatureCache(cache).array("latents").astype(np.float32)  # (N, 4, 8, 8)
    field = np.zeros((len(lat), 6, 32, 32), np.float32)
    field[:, :4] = lat.repeat(4, -1).repeat(4, -2)
    out = root / "cache"
    shutil.copytree(cache, out)
    add_field(out, "mask", field)
    return out


@pytest.mark.parametrize("base_model", [{}, {"model": "pixgen-tiny-H", "patch_size": 2}], ids=["plain", "hourglass"])
def test_pixel_field_trains_a_mask_encoder_controlnet(pixel_cache, tmp_path, base_model):
    from pixgen.models.controlnet import PixgenControlNet
    from pixgen.pipeline import Generator

    base_cfg = {"max_steps": 30, "lr": 1e-2, "batch_size": 6, "ema_decay": 0.0, "log_every": 30, "checkpoint_every": 30,
                **base_model}
    base_dir = Trainer(apply_overrides(get_preset("tiny"), base_cfg), pixel_cache, tmp_path / "base").fit()
    cfg = apply_overrides(get_preset("tiny"), {"task": "controlnet", "init": str(base_dir), "max_steps": 30,
                                               "batch_size": 6, "lr": 3e-3, "ema_decay": 0.0, "cfg_dropout": 0.0,
                                               "controlnet_layers": 1, "log_every": 30, "checkpoint_every": 30})
    trainer = Trainer(cfg, pixel_cache, tmp_path / "cn")
    final = trainer.fit()
    task = trainer.task
    data = task.dataset()
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in ("latents", "condition", "control")}
    assert batch["control"].shape[1:] == (6, 32, 32)

    def loss(cn) -> float:
        with torch.no_grad():
            return float(np.mean([task.loss(cn, batch, torch.Generator().manual_seed(s))[0].item() for s in range(8)]))

    fresh = PixgenControlNet.from_transformer(task.base, num_layers=1, conditioning_channels=6, conditioning_downsample=4)
    gen = Generator.from_pretrained(final)
    cn = gen.controlnet
    assert cn.mask_encoder is not None and cn.config.conditioning_channels == 6 and cn.config.conditioning_downsample == 4
    assert (cn.conv_stages is not None) == bool(base_model)  # an hourglass base gets an hourglass ControlNet
    assert loss(cn.float()) < 0.95 * loss(fresh)

    from pixgen.masks import Layout

    inst = np.zeros((32, 32), np.uint16)
    inst[8:16, 8:16], inst[20:28, 4:12] = 1, 2
    lay = Layout(inst, np.where(inst > 0, 3, 0).astype(np.uint8))
    on = gen.generate(label="lung_n", control_image=lay, num_inference_steps=2, progress=False)
    off = gen.generate(label="lung_n", control_image=lay, controlnet_conditioning_scale=0.0,
                       num_inference_steps=2, progress=False)
    assert not np.array_equal(np.asarray(on.images[0]), np.asarray(off.images[0]))


def test_recipe_exports_an_int8_hourglass_mask_model_tied_to_its_base(tmp_path):
    """``recipes.mask_controlnet.export(int8=True)``: half the bytes, loads through the mask loader
    with weights within int8 rounding, and refuses another base."""
    from pixgen.errors import ModelLoadError
    from pixgen.io.int8 import INT8_WEIGHTS
    from pixgen.masks import attach_mask_model
    from pixgen.models.controlnet import PixgenControlNet
    from pixgen.pipeline import Generator
    from pixgen.testing import tiny_generator
    from recipes.mask_controlnet import export

    hourglass = dict(conv_channels=(16, 32), conv_groups=8, patch_size=2)
    base = tiny_generator(**hourglass).save_pretrained(tmp_path / "base")
    cn = PixgenControlNet.from_transformer(Generator.from_pretrained(base).transformer, 1, conditioning_channels=6,
                                           conditioning_downsample=4)
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cn.save_pretrained(tmp_path / "final" / "controlnet")
    (tmp_path / "stats.json").write_text("{}")
    dest = export(tmp_path / "final", base, tmp_path / "stats.json", tmp_path / "mm", int8=True)
    stored = (dest / "controlnet" / INT8_WEIGHTS).stat().st_size
    fp32 = (tmp_path / "final" / "controlnet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert stored < 0.4 * fp32

    gen = attach_mask_model(Generator.from_pretrained(base), dest)
    for (name, a), b in zip(cn.state_dict().items(), gen.controlnet.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=2e-3 + 0.01 * a.abs().max().item()), name
    other = tiny_generator(seed=1, **hourglass).save_pretrained(tmp_path / "other")
    with pytest.raises(ModelLoadError, match="another generator"):
        attach_mask_model(Generator.from_pretrained(other), dest)
