"""PixCell checkpoints run through pixgen's public path, proven without downloading anything.

The fixtures write random-weight checkpoints in the published Hub layout (``model_index.json``,
``transformer/config.json`` + ``diffusion_pytorch_model.safetensors``, ``scheduler/``,
``controlnet/``) from the published config dicts (``pixgen.pixcell.PIXCELL_*``), shrunk in depth
and width only (2 layers, 2 heads of 8; UNI2-h's 1536-d tokens, 16 latent channels, sample sizes
and token grids kept). The weights follow an independent description of PixCell's key families
(:func:`published_key_shapes`, written from the published architecture: diffusers'
``BasicTransformerBlock`` with ``ada_norm_single``, ``PatchEmbed``, ``AdaLayerNormSingle``,
PixCell's UNI projection / ``UNIPosEmbed`` / ControlNet), so a strict load proves every
published key is consumed and none is missing. A tiny AutoencoderKL (16 latent channels, f8,
SD3.5 scaling 1.5305 / shift 0.0609) plays the SD3.5 VAE and a tiny encoder saved under the
``uni2-h`` name plays UNI2-h (passed as ``encoder_path``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from pixgen import pixcell
from pixgen.cli import main as cli
from pixgen.encoders import (
    Encoder,
    EncoderSpec,
    get_encoder_spec,
    register_loader,
)
from pixgen.errors import InputError, ModelLoadError
from pixgen.models.autoencoders import Autoencoder
from pixgen.models.controlnet import PixgenControlNet
from pixgen.models.transformer import PixgenTransformer, grid_pos_embed
from pixgen.pipeline import Generator
from pixgen.pixcell import pixcell_controlnet_to_pixgen_config, pixcell_guidance_to_pixgen, pixcell_to_pixgen_config
from pixgen.testing import (
    PIXCELL_256_TRANSFORMER,
    PIXCELL_1024_TRANSFORMER,
    PIXCELL_CONTROLNET,
    PIXCELL_CONTROLNET_MODEL_INDEX,
    PIXCELL_CONTROLNET_TRANSFORMER,
    PIXCELL_MODEL_INDEX,
    PIXCELL_SCHEDULER,
)

# Depth and width only; everything PixCell-specific (tokens, grid, channels, sizes) is kept.
SHRINK = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "cross_attention_dim": 16}


# ------------------------------------------------------------------------------ PixCell as data
def published_key_shapes(cfg: dict, controlnet_blocks: int | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a PixCell state dict, from the published architecture (not from pixgen)."""
    d, c, p = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["in_channels"], cfg["patch_size"]
    dc, tokens, cross = cfg["caption_channels"], cfg["caption_num_tokens"], cfg["cross_attention_dim"]
    keys = {
        "pos_embed.proj.weight": (d, c, p, p), "pos_embed.proj.bias": (d,),
        "adaln_single.emb.timestep_embedder.linear_1.weight": (d, 256),
        "adaln_single.emb.timestep_embedder.linear_1.bias": (d,),
        "adaln_single.emb.timestep_embedder.linear_2.weight": (d, d),
        "adaln_single.emb.timestep_embedder.linear_2.bias": (d,),
        "adaln_single.linear.weight": (6 * d, d), "adaln_single.linear.bias": (6 * d,),
        "caption_projection.linear_1.weight": (d, dc), "caption_projection.linear_1.bias": (d,),
        "caption_projection.linear_2.weight": (d, d), "caption_projection.linear_2.bias": (d,),
        "caption_projection.uncond_embedding": (tokens, dc),
        "scale_shift_table": (2, d),
        "proj_out.weight": (p * p * cfg["out_channels"], d), "proj_out.bias": (p * p * cfg["out_channels"],),
    }
    if tokens > 1:
        keys["y_pos_embed.y_pos_embed"] = (1, tokens, dc)
    layers = cfg["num_layers"] if controlnet_blocks is None else controlnet_blocks
    for i in range(layers):
        b = f"transformer_blocks.{i}."
        keys[b + "scale_shift_table"] = (6, d)
        for attn, kv_in in (("attn1", d), ("attn2", cross)):
            for proj, fan_in in (("to_q", d), ("to_k", kv_in), ("to_v", kv_in), ("to_out.0", d)):
                keys[f"{b}{attn}.{proj}.weight"] = (d, fan_in)
                keys[f"{b}{attn}.{proj}.bias"] = (d,)
        keys[b + "ff.net.0.proj.weight"], keys[b + "ff.net.0.proj.bias"] = (4 * d, d), (4 * d,)
        keys[b + "ff.net.2.weight"], keys[b + "ff.net.2.bias"] = (d, 4 * d), (d,)
        if controlnet_blocks is not None:
            keys[f"controlnet_blocks.{i}.weight"], keys[f"controlnet_blocks.{i}.bias"] = (d, d), (d,)
    if controlnet_blocks is not None:
        keys["cond_pos_embed.proj.weight"], keys["cond_pos_embed.proj.bias"] = (d, c, p, p), (d,)
    return keys


def uni_pos_embed_reference(dim: int, tokens: int, base_size: int, interpolation: float = 2.0) -> np.ndarray:
    """PixCell's UNIPosEmbed, written from its description: a side x side grid whose coordinates
    are ``arange(side) / (side / base_size) / interpolation`` shifted by the phase
    ``base_size // tokens``; half the channels encode one axis, half the other, each as
    [sin(pos * omega), cos(pos * omega)] with omega_k = 10000^(-k / (dim / 4))."""
    side = math.isqrt(tokens)
    coords = np.arange(side) / (side / base_size) / interpolation + base_size // tokens
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    rows, cols = np.meshgrid(coords, coords, indexing="ij")  # row-major tokens: index r * side + c

    def axis(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([axis(cols), axis(rows)], axis=1)  # first half: the coordinate along a row


def shrunk(published: dict) -> dict:
    return {**published, **SHRINK}


def random_state(shapes: dict[str, tuple[int, ...]], cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in shapes.items()}
    if "y_pos_embed.y_pos_embed" in state:  # a fixed table, as PixCell stores it
        table = uni_pos_embed_reference(cfg["caption_channels"], cfg["caption_num_tokens"],
                                        cfg["sample_size"] // cfg["patch_size"])
        state["y_pos_embed.y_pos_embed"] = torch.from_numpy(table).float()[None]
    return state


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_component(directory: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    write_json(directory / "config.json", config)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "diffusion_pytorch_model.safetensors"))


def write_pixcell(root: Path, transformer: dict, *, seed: int = 0, controlnet: dict | None = None,
                  with_pos_table: bool = True, vae: Path | None = None) -> Path:
    """A PixCell checkpoint folder as the Hub holds it (random weights)."""
    shapes = published_key_shapes(transformer)
    if not with_pos_table:
        shapes.pop("y_pos_embed.y_pos_embed", None)
    write_component(root / "transformer", transformer, random_state(shapes, transformer, seed))
    write_json(root / "scheduler" / "scheduler_config.json", PIXCELL_SCHEDULER)
    index = PIXCELL_MODEL_INDEX
    if controlnet is not None:
        cn_shapes = published_key_shapes(controlnet, controlnet_blocks=controlnet["n_controlnet_blocks"])
        write_component(root / "controlnet", controlnet, random_state(cn_shapes, controlnet, seed + 1))
        index = PIXCELL_CONTROLNET_MODEL_INDEX
    write_json(root / "model_index.json", index)
    if vae is not None:  # bundled VAE weights (the ControlNet repo ships them)
        Autoencoder(AutoencoderKL.from_pretrained(vae)).save_pretrained(root / "vae")
    else:  # PixCell-256/1024 publish only the VAE config
        write_json(root / "vae" / "config.json", {"_class_name": "AutoencoderKL", "latent_channels": 16})
    return root


# ------------------------------------------------------------------------------ stand-ins
class TinyUNI(Encoder):
    """Stands in for UNI2-h: its registry name and width, a linear map of pooled pixels."""

    def forward_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls = self.backbone(F.adaptive_avg_pool2d(pixel_values, 4).flatten(1))  # (N, 1536)
        return cls, cls[:, None]

    def save_backbone(self, directory: Path) -> None:
        save_file(self.backbone.state_dict(), str(Path(directory) / "model.safetensors"))


def load_tiny_uni(spec: EncoderSpec, local_path: str | None, token: str | None) -> Encoder:
    enc = TinyUNI(spec, nn.Linear(48, spec.dim))
    enc.backbone.load_state_dict(load_file(str(Path(local_path) / "model.safetensors")))
    return enc


register_loader("pixcell-test", load_tiny_uni)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD3.5-like VAE, tiny UNI2-h, a 256 and a 1024 px reference tile, a cell mask."""
    base = tmp_path_factory.mktemp("pixcell-assets")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=2, layers_per_block=1,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    vae.save_pretrained(base / "sd35-vae")
    # the catalog's uni2-h facts (size, normalisation, resize), a tiny test backbone
    spec = dataclasses.replace(get_encoder_spec("uni2-h"), source="test", library="pixcell-test", model_kwargs={})
    TinyUNI(spec, nn.Linear(48, 1536)).save_pretrained(base / "uni2-h")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(base / "tile.png")
    Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(base / "tile_1024.png")
    mask = np.zeros((256, 256), np.uint8)
    mask[64:128, 64:160] = 255
    Image.fromarray(mask).save(base / "mask.png")
    return {"vae": base / "sd35-vae", "encoder": base / "uni2-h", "tile": base / "tile.png",
            "tile_1024": base / "tile_1024.png", "mask": base / "mask.png", "base": base}


@pytest.fixture(scope="module")
def ckpt_256(tmp_path_factory) -> Path:
    return write_pixcell(tmp_path_factory.mktemp("PixCell-256"), shrunk(PIXCELL_256_TRANSFORMER))


@pytest.fixture(scope="module")
def ckpt_1024(tmp_path_factory, assets) -> Path:
    return write_pixcell(tmp_path_factory.mktemp("PixCell-1024"), shrunk(PIXCELL_1024_TRANSFORMER), seed=1,
                         vae=assets["vae"])


@pytest.fixture(scope="module")
def ckpt_controlnet(tmp_path_factory, assets) -> Path:
    return write_pixcell(tmp_path_factory.mktemp("PixCell-256-Cell-ControlNet"), shrunk(PIXCELL_CONTROLNET_TRANSFORMER),
                         seed=2, controlnet={**shrunk(PIXCELL_CONTROLNET), "n_controlnet_blocks": 1},
                         vae=assets["vae"])


def load(root: Path, assets: dict[str, Path], **kwargs) -> Generator:
    return Generator.from_pretrained(root, vae_path=assets["vae"], encoder_path=assets["encoder"], **kwargs)


# ------------------------------------------------------------------------------ config translation
@pytest.mark.parametrize("published, tokens, pos, interp", [
    (PIXCELL_256_TRANSFORMER, 1, False, 0.5),
    (PIXCELL_1024_TRANSFORMER, 16, True, 2),
    (PIXCELL_CONTROLNET_TRANSFORMER, 1, False, 0.5),
])
def test_published_configs_translate(published, tokens, pos, interp):
    cfg = pixcell_to_pixgen_config(published)
    assert cfg["prediction_type"] == "epsilon" and cfg["out_channels"] == 32 == 2 * cfg["in_channels"]
    assert (cfg["caption_num_tokens"], cfg["condition_pos_embed"], cfg["interpolation_scale"]) == (tokens, pos, interp)
    assert cfg["encoder_name"] == "uni2-h" and cfg["caption_channels"] == 1536
    assert (cfg["num_layers"], cfg["num_attention_heads"] * cfg["attention_head_dim"]) == (28, 1152)
    translated = set(pixcell.COPIED) | set(pixcell.FIXED) | set(pixcell.DERIVED) | set(pixcell.IGNORED)
    assert {k for k in published if not k.startswith("_")} <= translated  # every published field accounted for


def test_controlnet_config_translates():
    cfg = pixcell_controlnet_to_pixgen_config(PIXCELL_CONTROLNET)
    assert (cfg["num_layers"], cfg["conditioning_channels"], cfg["out_channels"]) == (27, 16, 32)


@pytest.mark.parametrize("change, words", [
    ({"norm_type": "ada_norm_zero"}, "norm_type"),
    ({"upcast_attention": True}, "upcast_attention"),
    ({"use_additional_conditions": None}, "use_additional_conditions"),  # sample_size 128 -> PixCell turns it on
    ({"cross_attention_dim": 4096}, "cross_attention_dim"),
    ({"out_channels": 16}, "out_channels"),
    ({"caption_num_tokens": 8}, "caption_num_tokens"),
    ({"rope_theta": 10000}, "unknown config field"),
])
def test_unsupported_values_are_refused(change, words):
    with pytest.raises(ModelLoadError, match=words):
        pixcell_to_pixgen_config({**PIXCELL_1024_TRANSFORMER, **change})


def test_grid_pos_embed_reproduces_uniposembed_for_1024():
    cfg = PIXCELL_1024_TRANSFORMER
    base = cfg["sample_size"] // cfg["patch_size"]  # 64
    ref = uni_pos_embed_reference(cfg["caption_channels"], cfg["caption_num_tokens"], base)
    ours = grid_pos_embed(cfg["caption_channels"], cfg["caption_num_tokens"], base)
    assert ours.shape == (16, 1536)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)
    # the table the 1024 model adds to its tokens (coordinates 4, 12, 20, 28 on each axis)
    model = PixgenTransformer(**pixcell_to_pixgen_config(shrunk(cfg)))
    np.testing.assert_allclose(model.y_pos_embed.y_pos_embed[0].numpy(), ref, atol=1e-6)


# ------------------------------------------------------------------------------ strict loading
@pytest.mark.parametrize("published, pos_table", [
    (PIXCELL_256_TRANSFORMER, True), (PIXCELL_1024_TRANSFORMER, True), (PIXCELL_1024_TRANSFORMER, False),
])
def test_every_published_key_is_consumed(tmp_path, published, pos_table):
    root = write_pixcell(tmp_path, shrunk(published), with_pos_table=pos_table)
    model = pixcell.load_pixcell_transformer(root / "transformer")
    written = load_file(str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    loaded = model.state_dict()
    assert set(loaded) == set(published_key_shapes(shrunk(published)))  # nothing missing, nothing extra
    for key, value in written.items():  # round trip: every published tensor is where it belongs
        torch.testing.assert_close(loaded[key], value)


def test_controlnet_keys_are_consumed(ckpt_controlnet):
    cn = pixcell.load_pixcell_controlnet(ckpt_controlnet / "controlnet")
    written = load_file(str(ckpt_controlnet / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert set(cn.state_dict()) == set(written)
    for key, value in written.items():
        torch.testing.assert_close(cn.state_dict()[key], value)


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.update({"transformer_blocks.0.attn1.extra.weight": torch.zeros(1)}), "unexpected"),
    (lambda s: s.pop("caption_projection.uncond_embedding"), "missing"),
    (lambda s: s.update({"proj_out.bias": torch.zeros(3)}), "wrong shape"),
    (lambda s: s.update({"y_pos_embed.y_pos_embed": torch.zeros(1, 16, 1536)}), "y_pos_embed"),
])
def test_strict_load_refuses_mismatches(tmp_path, edit, words):
    root = write_pixcell(tmp_path, shrunk(PIXCELL_1024_TRANSFORMER))
    path = root / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match=words):
        pixcell.load_pixcell_transformer(root / "transformer")


# ------------------------------------------------------------------------------ generation
def test_pixcell_256_generates_through_from_pretrained(ckpt_256, assets):
    gen = load(ckpt_256, assets)
    assert gen.config["guidance_scale"] == 2.0 and gen.config["num_inference_steps"] == 20
    assert gen.scheduler.config.algorithm_type == "dpmsolver++" and gen.scheduler.config.solver_order == 2
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(gen.scheduler.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=0)
    out = gen.generate(reference=[assets["tile"]], num_images=2, num_inference_steps=2, progress=False)
    assert [im.size for im in out.images] == [(256, 256)] * 2
    assert out.conditions.encoder == "uni2-h" and out.conditions.values.shape == (2, 1, 1536)


def test_pixcell_1024_cli_generate_offline(ckpt_1024, assets, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli(["generate", "--model", str(ckpt_1024), "--vae-path", str(assets["vae"]), "--encoder-path",
              str(assets["encoder"]), "--reference", str(assets["tile_1024"]), "--n", "1", "--steps", "1",
              "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    with Image.open(out / "0000.png") as img:
        assert img.size == (1024, 1024)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["model"]["encoder"], manifest["sampler"]["guidance"], manifest["sampler"]["scheduler"]) == (
        "uni2-h", 2.0, "DPMSolverMultistepScheduler")


def test_1024_conditions_on_a_4x4_grid_of_tiles(ckpt_1024, assets):
    gen = load(ckpt_1024, assets)
    emb = gen.embed_references([assets["tile_1024"]]).values  # (1, 16, 1536)
    tiles = np.asarray(Image.open(assets["tile_1024"]))
    r, c = 2, 3  # token r * 4 + c is the tile in row r, column c
    tile = tiles[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256]
    torch.testing.assert_close(emb[0, r * 4 + c], gen.encoder.embed(tile)[0])


def test_info_describes_a_pixcell_checkpoint(ckpt_1024, capsys):
    assert cli(["info", str(ckpt_1024), "--json"]) == 0  # the VAE is bundled in vae/: no flags needed
    desc = json.loads(capsys.readouterr().out)
    assert desc["prediction"] == "epsilon + learned variance"
    assert (desc["condition_tokens"], desc["condition_pos_embed"], desc["encoder"]) == (16, True, "uni2-h")
    assert (desc["scheduler"], desc["num_inference_steps"], desc["image_size"]) == ("DPMSolverMultistepScheduler", 20, 1024)
    assert desc["latent"] == [16, 128, 128] and desc["mpp"] == 0.5


def test_hub_id_without_network_is_one_clear_line(monkeypatch, tmp_path, capsys):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    rc = cli(["generate", "--model", "StonyBrook-CVLab/PixCell-256", "--reference", "x.png", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert "StonyBrook-CVLab/PixCell-256" in err and "fix:" in err


# ------------------------------------------------------------------------------ guidance
def test_guidance_conventions_agree_after_conversion(ckpt_256, assets):
    gen = load(ckpt_256, assets)
    x, t = torch.randn(1, 16, 32, 32), torch.tensor([500])
    y = torch.randn(1, 1, 1536)
    with torch.no_grad():
        cond = gen.transformer(x, t, y).sample[:, :16]
        uncond = gen.transformer(x, t, y, drop_condition=torch.tensor([True])).sample[:, :16]
    assert (cond - uncond).abs().max() > 1e-4
    for w in (1.2, 2.0, 3.5):
        pixgen_w = pixcell_guidance_to_pixgen(w, "w+1")
        sample_4k = (w + 1) * cond - w * uncond  # tools/sample_4k.py
        torch.testing.assert_close(uncond + pixgen_w * (cond - uncond), sample_4k)
        dpm_solver = uncond + w * (cond - uncond)  # tools/sample_256.py via the DPM-Solver model_wrapper
        torch.testing.assert_close(uncond + pixcell_guidance_to_pixgen(w, "w") * (cond - uncond), dpm_solver)
    with pytest.raises(InputError):
        pixcell_guidance_to_pixgen(2.0, "w+2")


# ------------------------------------------------------------------------------ ControlNet
def test_controlnet_checkpoint_generates_with_a_mask(ckpt_controlnet, assets):
    index = json.loads((ckpt_controlnet / "model_index.json").read_text())
    gen = pixcell.load_pixcell(ckpt_controlnet, index, encoder_path=assets["encoder"])  # bundled VAE
    assert gen.controlnet is not None and gen.controlnet.config.num_layers == 1
    mask = np.asarray(Image.open(assets["mask"]))
    kwargs = {"reference": [assets["tile"]], "num_inference_steps": 1, "output_type": "latent", "progress": False}
    plain = gen.generate(**kwargs).images
    masked = gen.generate(control_image=mask, **kwargs).images
    off = gen.generate(control_image=mask, controlnet_conditioning_scale=0.0, **kwargs).images
    assert (masked - plain).abs().max() > 1e-4
    torch.testing.assert_close(off, plain)


def test_mask_is_encoded_as_pixcell_encodes_it(ckpt_controlnet, assets):
    index = json.loads((ckpt_controlnet / "model_index.json").read_text())
    gen = pixcell.load_pixcell(ckpt_controlnet, index, encoder_path=assets["encoder"])
    mask = np.asarray(Image.open(assets["mask"]))  # 0 / 255
    latents = gen._control_latents(mask > 0, num_conditions=1, num_images=2)  # bool mask, same result
    rgb = torch.from_numpy(np.stack([mask] * 3, -1) / 255.0).float().permute(2, 0, 1)[None]
    z = gen.vae.model.encode(2 * (rgb - 0.5)).latent_dist.mean  # PixCell's controlnet/train.py recipe
    torch.testing.assert_close(latents, ((z - 0.0609) * 1.5305).expand(2, -1, -1, -1))


def test_controlnet_from_transformer_starts_neutral_and_roundtrips(ckpt_256, assets, tmp_path):
    gen = load(ckpt_256, assets)
    gen.controlnet = PixgenControlNet.from_transformer(gen.transformer, num_layers=1)
    emb = torch.randn(1, 1536)
    mask = np.zeros((256, 256), np.uint8)
    mask[:32] = 1
    kwargs = {"embeddings": emb, "num_inference_steps": 1, "output_type": "latent", "progress": False}
    torch.testing.assert_close(gen.generate(control_image=mask, **kwargs).images, gen.generate(**kwargs).images)
    with torch.no_grad():
        gen.controlnet.controlnet_blocks[0].weight.normal_()
    expected = gen.generate(control_image=mask, **kwargs).images
    again = Generator.from_pretrained(gen.save_pretrained(tmp_path / "saved"), encoder_path=assets["encoder"])
    assert again.describe()["controlnet"] == {"layers": 1, "cfg": "both"}
    # same weights; reloaded tensors may take other BLAS paths (float32 noise ~1e-5)
    torch.testing.assert_close(again.generate(control_image=mask, **kwargs).images, expected, atol=2e-4, rtol=1e-4)


def test_control_image_errors_are_clear(ckpt_256, ckpt_controlnet, assets):
    with pytest.raises(InputError, match="no ControlNet"):
        load(ckpt_256, assets).generate(embeddings=torch.randn(1, 1536), control_image=np.ones((256, 256)))
    index = json.loads((ckpt_controlnet / "model_index.json").read_text())
    gen = pixcell.load_pixcell(ckpt_controlnet, index, encoder_path=assets["encoder"])
    with pytest.raises(InputError, match="256x256"):
        gen.generate(embeddings=torch.randn(1, 1536), control_image=np.ones((128, 128)))


def test_controlnet_layout_is_routed_by_from_pretrained(ckpt_controlnet):
    from pixgen import formats

    index = json.loads((ckpt_controlnet / "model_index.json").read_text())
    assert formats.detect(ckpt_controlnet, index) is pixcell.load_pixcell


def test_uni2h_preprocessing_resizes_as_pixcell_feature_extraction(ckpt_256, assets):
    """PixCell's tools/extract_features.py: torchvision Resize(224) (bilinear) then ImageNet
    normalisation; pixgen's uni2-h preprocessing agrees to one grey level (PIL's uint8 rounding)."""
    from torchvision import transforms as T

    enc = load(ckpt_256, assets).encoder
    assert get_encoder_spec("uni2-h").resize == enc.spec.resize == "bilinear"
    tile = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    pixcell_tf = T.Compose([T.Resize(224), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    expected = pixcell_tf(Image.fromarray(tile))[None]
    torch.testing.assert_close(enc.preprocess(tile), expected, atol=0.0045 / 0.224, rtol=0)
