"""Mask inputs (pixgen.masks): encoding that keeps touching nuclei apart, the accepted files, and
every kind of bad input; the mask-encoder ControlNet (shapes, zero start, PixCell layout kept)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from pixgen.errors import InputError, ModelLoadError
from pixgen.masks import (
    MASK_CHANNELS, PALETTE, Layout, control_channels, encode_masks, fit_layout, load_layout, load_layouts,
)
from pixgen.models.controlnet import PixgenControlNet
from pixgen.testing import tiny_transformer


def _two_touching() -> tuple[np.ndarray, np.ndarray]:
    inst = np.zeros((16, 16), np.uint16)
    inst[4:10, 2:8], inst[4:10, 8:14] = 1, 2  # share the edge between columns 7 and 8
    types = np.where(inst == 1, 2, np.where(inst == 2, 3, 0)).astype(np.uint8)
    return inst, types


def test_encoding_keeps_touching_nuclei_apart_and_one_hot_classes():
    inst, types = _two_touching()
    x = encode_masks(inst, types)
    assert x.shape == (MASK_CHANNELS, 16, 16) and x.dtype == np.uint8
    assert np.array_equal(x[0], inst > 0) and x[2].sum() == 36 and x[3].sum() == 36 and x[1].sum() == x[4].sum() == 0
    assert x[1:5].sum(0).max() == 1  # one class per pixel
    assert x[5, 6, 7] == 1 and x[5, 6, 8] == 1 and x[5, 6, 5] == 0  # the contact line is marked on both sides
    from skimage.measure import label

    interior = (x[0] > 0) & (x[5] == 0)
    assert label(interior, connectivity=1).max() == 2  # nucleus minus boundary: two blobs, as the instances
    assert label(x[0], connectivity=1).max() == 1  # (the nucleus channel alone would merge them)


def test_binary_layout_has_no_classes():
    x = encode_masks(_two_touching()[0])
    assert x[0].sum() == 72 and x[1:5].sum() == 0 and x[5].sum() > 0


@pytest.mark.parametrize("bad, match", [
    (np.full((4, 4), 0.5, np.float32), "float"),
    (np.zeros((4, 4, 2), np.uint8), r"\(H, W\)"),
    (-np.ones((4, 4), np.int32), "negative"),
])
def test_bad_instance_maps_are_refused(bad, match):
    with pytest.raises(InputError, match=match):
        encode_masks(bad)


def test_unknown_class_ids_and_classes_on_background_are_refused():
    inst, types = _two_touching()
    with pytest.raises(InputError, match=r"unknown class ids \[7\]"):
        encode_masks(inst, np.where(inst > 0, 7, 0))
    types[0, 0] = 2
    with pytest.raises(InputError, match="background"):
        encode_masks(inst, types)
    with pytest.raises(InputError, match="same size"):
        encode_masks(inst, types[:8])


def test_sizes_match_downsample_by_an_integer_factor_or_refuse():
    inst, types = _two_touching()
    assert fit_layout(Layout(inst, types), 16).shape == (16, 16)
    with pytest.warns(UserWarning, match="downsampled nearest-neighbour by 2"):
        small = fit_layout(Layout(inst, types, "a"), 8)
    assert small.shape == (8, 8) and set(np.unique(small.inst)) == {0, 1, 2} and set(np.unique(small.types)) == {0, 2, 3}
    with pytest.raises(InputError, match="12x12"):
        fit_layout(Layout(inst[:12, :12]), 8)
    with pytest.raises(InputError, match="16x16, the images are 32x32"):
        fit_layout(Layout(inst), 32)  # never upsampled


def test_an_empty_mask_warns_and_asks_for_no_nuclei():
    with pytest.warns(UserWarning, match="no nuclei"):
        x = control_channels(np.zeros((8, 8), np.uint16), 8)
    assert x.shape == (1, 6, 8, 8) and x.sum() == 0


def test_control_channels_accepts_every_form():
    inst, types = _two_touching()
    a = control_channels(Layout(inst, types), 16)
    assert torch.equal(a, control_channels((inst, types), 16))
    assert torch.equal(a, control_channels(encode_masks(inst, types), 16))
    binary = control_channels((inst > 0).astype(np.uint8), 16)  # 0/1: connected components (one blob here)
    assert binary[0, 5].sum() < a[0, 5].sum() and binary[0, 1:5].sum() == 0
    assert control_channels([inst, inst], 16).shape == (2, 6, 16, 16)


def test_files_in_every_format(tmp_path):
    inst, types = _two_touching()
    Image.fromarray(inst).save(tmp_path / "i.png")
    Image.fromarray(types).save(tmp_path / "t.png")
    lay = load_layout(tmp_path / "i.png", "instance", types=tmp_path / "t.png")
    assert np.array_equal(lay.inst, inst) and np.array_equal(lay.types, types) and lay.name == "i"
    by_types = load_layout(tmp_path / "t.png", "types")  # different classes: still two nuclei
    assert by_types.inst.max() == 2 and np.array_equal(by_types.types, types)
    Image.fromarray(((inst > 0) * 255).astype(np.uint8)).save(tmp_path / "b.png")
    assert load_layout(tmp_path / "b.png").inst.max() == 1 and load_layout(tmp_path / "b.png").types is None
    rgb = np.zeros((16, 16, 3), np.uint8)
    for k in (1, 2, 3, 4):
        rgb[k * 3:k * 3 + 2, 2:6] = PALETTE[k]
    rgb[14:16, 10:12] = (255, 255, 255)  # a nucleus of unknown class
    Image.fromarray(rgb).save(tmp_path / "c.png")
    col = load_layout(tmp_path / "c.png")  # guessed: colour
    assert col.inst.max() == 5 and [int(col.types[k * 3, 2]) for k in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert col.types[14, 10] == 0 and col.inst[14, 10] > 0


def test_bad_files(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[2:4, 2:4] = (250, 0, 0)  # almost red: not in the palette
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.raises(InputError, match=r"outside the palette \(\(250, 0, 0\): 4 px\)"):
        load_layout(tmp_path / "c.png", "colour")
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(InputError, match="float image"):
        load_layout(tmp_path / "f.tiff")
    Image.fromarray(np.array([[0, 3], [9, 0]], np.uint8)).save(tmp_path / "t.png")
    with pytest.raises(InputError, match="unknown class ids"):
        load_layout(tmp_path / "t.png", "types")
    with pytest.raises(InputError, match="colour image"):
        load_layout(tmp_path / "c.png", "binary")
    with pytest.raises(InputError, match="not found"):
        load_layout(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read mask .*junk.png.*fix: pass an integer PNG"):
        load_layout(tmp_path / "junk.png")


def test_consep_folder(shared_data):
    layouts = load_layouts(shared_data / "consep" / "test")
    assert len(layouts) == 224 and layouts[0].types is not None and layouts[0].shape == (256, 256)
    assert layouts[0].types.max() <= 4 and layouts[0].inst.max() > 5


# ----------------------------------------------------------------------------- the ControlNet
def test_mask_encoder_controlnet_starts_at_zero_and_reads_pixel_grid_masks():
    base = tiny_transformer()
    cn = PixgenControlNet.from_transformer(base, num_layers=1, conditioning_channels=6, conditioning_downsample=4)
    assert cn.mask_encoder is not None and cn.config.conditioning_channels == 6
    h = base.config.sample_size
    x, y, t = torch.randn(2, 4, h, h), torch.randn(2, 1, base.config.caption_channels), torch.tensor([10, 500])
    masks = control_channels([_two_touching()[0]] * 2, 16) if h * 4 == 16 else torch.rand(2, 6, h * 4, h * 4)
    res = cn(x, t, y, masks).controlnet_block_samples
    assert len(res) == 1 and torch.count_nonzero(res[0]) == 0  # zero-initialised: the base is unchanged
    with pytest.raises(InputError, match="4x the latent size"):
        cn(x, t, y, torch.rand(2, 6, h, h))
    torch.nn.init.normal_(cn.cond_pos_embed.proj.weight)
    torch.nn.init.normal_(cn.controlnet_blocks[0].weight)
    a = cn(x, t, y, masks).controlnet_block_samples[0]
    b = cn(x, t, y, torch.zeros_like(masks)).controlnet_block_samples[0]
    assert not torch.allclose(a, b)  # the mask reaches the residuals


def test_default_controlnet_keeps_pixcell_layout(tmp_path):
    cn = PixgenControlNet.from_transformer(tiny_transformer(), num_layers=1)
    assert cn.mask_encoder is None and not any(k.startswith("mask_encoder") for k in cn.state_dict())
    cn.save_pretrained(tmp_path / "cn")
    again = PixgenControlNet.from_pretrained(tmp_path / "cn")  # strict: same keys
    assert again.config.conditioning_downsample == 1 and again.mask_encoder is None
    with pytest.raises(InputError, match="power of 2"):
        PixgenControlNet.from_transformer(tiny_transformer(), 1, conditioning_channels=6, conditioning_downsample=3)


def test_attach_mask_model_refuses_a_missing_folder(tmp_path):
    from pixgen.masks import attach_mask_model

    with pytest.raises(ModelLoadError, match="no mask model"):
        attach_mask_model(object(), tmp_path)


def test_pair_set_callback_counts_steps_and_a_cancelled_set_leaves_nothing(tmp_path, one_thread):
    from pixgen.io import ModelId, SamplerSettings, SetManifest
    from pixgen.masks import attach_mask_model, write_pair_set
    from pixgen.sampling import SamplingCancelled
    from pixgen.testing import save_tiny_mask_model, tiny_generator

    inst, _ = _two_touching()
    big = np.zeros((32, 32), np.uint32)
    big[:inst.shape[0], :inst.shape[1]] = inst
    cls = np.where(big > 0, 3, 0).astype(np.uint8)
    layouts = [Layout(big, cls, "a"), Layout(np.roll(big, 9, 1), np.roll(cls, 9, 1), "b")]
    mm = save_tiny_mask_model(tmp_path / "mm", [{"inst": big, "types": cls, "tissue": "consep"}])
    gen = attach_mask_model(tiny_generator(), mm, check_base=False)

    def manifest():
        return SetManifest(ModelId("tiny"), SamplerSettings(3, 2.0, "Euler", 1, 2))

    kw = {"label": "tumour", "n": 1, "steps": 3, "guidance": 2.0, "batch_size": 1}
    calls = []
    with pytest.raises(SamplingCancelled, match="step 1 of 3"):  # the 2nd batch's first step
        write_pair_set(gen, layouts, tmp_path / "cut", manifest(), callback=lambda *a: calls.append(a[0]) or len(calls) < 4, **kw)
    assert calls == [0, 1, 2, 0] and not (tmp_path / "cut").exists()  # all pairs are written at the end: nothing half
    steps = []
    write_pair_set(gen, layouts, tmp_path / "full", callback=lambda *a: steps.append(a[0]), **kw)  # default manifest
    assert steps == [0, 1, 2] * 2  # per step of each batch (the Paint page's progress total)
    m = SetManifest.load(tmp_path / "full")
    assert m.complete and [e.control_image for e in m.files] == ["inst/a.png", "inst/b.png"]
    assert (m.sampler.steps, m.sampler.guidance, m.sampler.n, m.sampler.control_scale) == (3, 2.0, 2, 1.0)
