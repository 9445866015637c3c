"""Virtual staining (pixgen.staining, pixgen stain): PixCell's published layouts load strictly and
compute what PixCell's code computes; the pipeline checks domains and encoders at every step;
tiles, folders, embeddings files and slide regions run from the CLI with provenance.

PixCell's files are written by pixgen.testing from an independent description of PixCell's
``virtual_staining/`` code (key names and shapes, a functional forward), never from pixgen's
classes; nothing is downloaded.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import test_pixcell as tp
import torch
from PIL import Image
from test_pixcell import assets  # noqa: F401  (a fixture: the tiny SD3.5 VAE, UNI2-h and tiles)

from pixgen.cli import main as cli
from pixgen.embeddings import Embeddings
from pixgen.errors import EncoderMismatchError, InputError, ModelLoadError
from pixgen.io import SetManifest
from pixgen.pixcell import load_pixcell_flow_mlp, load_stain_lora, read_state
from pixgen.staining import StainPipeline, StainTranslator, looks_like_ihc, side_by_side
from pixgen.testing import (
    pixcell_flow_mlp_reference,
    pixcell_flow_mlp_state,
    pixcell_lora_state,
    save_tiny_stain_model,
    synthetic_he_ihc_pair,
    write_pixcell_stain_repo,
)

SMALL_MLP = {"in_channels": 12, "model_channels": 16, "time_embed_dim": 10, "bottleneck": 8, "out_channels": 12,
             "blocks": 2}


@pytest.fixture(scope="module")
def stain_model(tmp_path_factory) -> Path:
    return save_tiny_stain_model(tmp_path_factory.mktemp("stain") / "model", markers=("her2", "ki67"))


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("he-tiles")
    for i in range(3):
        Image.fromarray(synthetic_he_ihc_pair(32, i)[0]).save(folder / f"he_{i}.png")
    Image.fromarray(synthetic_he_ihc_pair(32, 9)[1]).save(folder.parent / "ihc.png")
    return folder


# ------------------------------------------------------------------ PixCell's flow MLP
def test_pixcell_flow_mlp_loads_strictly_and_computes_pixcells_forward(tmp_path):
    state = pixcell_flow_mlp_state(**SMALL_MLP)
    torch.save(state, tmp_path / "mist_her2_mlp.pth")
    mlp = load_pixcell_flow_mlp(tmp_path / "mist_her2_mlp.pth")
    assert dict(mlp.config)["num_res_blocks"] == 2 and mlp.config.bottleneck_channels == 8
    x, t = torch.randn(5, 12), torch.tensor([0.0, 1.0, 250.0, 700.5, 999.0])
    torch.testing.assert_close(mlp(x, t), pixcell_flow_mlp_reference(state, x, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.update({"res_blocks.0.context_layers.1.weight": torch.zeros(8, 4)}), "unexpected"),
    (lambda s: s.pop("res_blocks.1.emb_layers.1.bias"), "missing"),
    (lambda s: s.pop("input_proj.weight"), "not a PixCell flow MLP"),
])
def test_pixcell_flow_mlp_refuses_other_layouts(tmp_path, edit, words):
    state = pixcell_flow_mlp_state(**SMALL_MLP)
    edit(state)
    torch.save(state, tmp_path / "m.pth")
    with pytest.raises(ModelLoadError, match=words):
        load_pixcell_flow_mlp(tmp_path / "m.pth")


def test_pth_files_are_read_without_running_pickled_objects(tmp_path):
    torch.save({"w": torch.zeros(2), "obj": Path("x")}, tmp_path / "evil.pth")
    with pytest.raises(ModelLoadError, match="cannot read"):
        read_state(tmp_path / "evil.pth")


def test_pixcell_translator_is_pixcells_euler_from_he_to_ihc(tmp_path):
    """PixCell integrates x_{k+1} = x_k + dt * mlp(x_k, 999 t_k) from t = 0 (H&E) to 1 (IHC)."""
    state = pixcell_flow_mlp_state(**SMALL_MLP)
    torch.save(state, tmp_path / "m.pth")
    he = torch.randn(3, 12)
    x = he.clone()
    for k in range(2):
        x = x + 0.5 * pixcell_flow_mlp_reference(state, x, torch.full((3,), 999.0 * k / 2))
    tr = StainTranslator.from_pixcell(tmp_path / "m.pth", "her2", steps=2, encoder="uni2-h")
    out = tr.translate(Embeddings(he, encoder="uni2-h"))
    torch.testing.assert_close(out.values[:, 0], x, rtol=1e-4, atol=1e-4)
    assert (out.domain, out.encoder) == ("ihc-her2", "uni2-h")


# ------------------------------------------------------------------ PixCell's LoRA
@pytest.fixture(scope="module")
def pixcell_base(tmp_path_factory, assets):  # noqa: F811
    """A tiny PixCell-1024 checkpoint, tiny SD3.5 VAE and UNI2-h (tests/test_pixcell.py's writers)."""
    from safetensors.torch import load_file

    root = tp.write_pixcell(tmp_path_factory.mktemp("PixCell-1024"), tp.shrunk(tp.PIXCELL_1024_TRANSFORMER), seed=1,
                            vae=assets["vae"])
    state = load_file(str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    return root, assets, state


def test_published_lora_file_loads_strictly_and_merges(pixcell_base, tmp_path):
    root, files, base_state = pixcell_base
    lora = pixcell_lora_state(base_state)
    assert "transformer_blocks.0.attn2.to_q.lora_A.default.weight" in lora  # the published names
    assert "transformer_blocks.0.attn1.to_q.weight" in lora  # self-attention untouched
    torch.save(lora, tmp_path / "mist_her2_lora.pth")
    from pixgen.pipeline import Generator

    gen = Generator.from_pretrained(root, vae_path=files["vae"], encoder_path=files["encoder"])
    load_stain_lora(gen.transformer, tmp_path / "mist_her2_lora.pth")
    q = "transformer_blocks.1.attn2.to_q"
    merged = gen.transformer.get_submodule(q).base_layer.weight
    want = base_state[f"{q}.weight"] + lora[f"{q}.lora_B.default.weight"] @ lora[f"{q}.lora_A.default.weight"]
    torch.testing.assert_close(merged, want)  # rank 4, alpha 4: scale 1

    bad = dict(lora)
    bad.pop("transformer_blocks.1.attn2.to_v.lora_B.default.weight")
    torch.save(bad, tmp_path / "bad.pth")
    gen = Generator.from_pretrained(root, vae_path=files["vae"], encoder_path=files["encoder"])
    with pytest.raises(ModelLoadError, match="missing"):
        load_stain_lora(gen.transformer, tmp_path / "bad.pth")


def test_adapter_only_lora_in_diffusers_names_loads(pixcell_base, tmp_path):
    from safetensors.torch import save_file

    from pixgen.pipeline import Generator

    root, files, base_state = pixcell_base
    lora = pixcell_lora_state(base_state)
    adapters = {"transformer." + k.replace(".default.weight", ".weight"): v for k, v in lora.items() if ".lora_" in k}
    save_file(adapters, str(tmp_path / "pytorch_lora_weights.safetensors"))
    gen = Generator.from_pretrained(root, vae_path=files["vae"], encoder_path=files["encoder"])
    load_stain_lora(gen.transformer, tmp_path / "pytorch_lora_weights.safetensors")
    k = "transformer_blocks.0.attn2.to_out.0"
    want = base_state[f"{k}.weight"] + lora[f"{k}.lora_B.default.weight"] @ lora[f"{k}.lora_A.default.weight"]
    torch.testing.assert_close(gen.transformer.get_submodule(k).base_layer.weight, want)


def test_pixcell_stain_repo_runs_end_to_end(pixcell_base, tmp_path, one_thread):
    root, files, base_state = pixcell_base
    repo = write_pixcell_stain_repo(tmp_path / "pixcell-virtual-staining", base_state, ("mist_her2", "her2match"),
                                    mlp_sizes={"in_channels": 1536, "out_channels": 1536, "model_channels": 16,
                                               "time_embed_dim": 16, "bottleneck": 16, "blocks": 1})
    pipe = StainPipeline.from_pretrained(repo, base=root, vae_path=files["vae"], encoder_path=files["encoder"],
                                         flow_steps=2)
    assert pipe.stains == ["her2match", "mist_her2"]
    with pytest.raises(InputError, match="matches several stains: her2match, mist_her2"):
        pipe.stain_name("her2")
    result = pipe.run([str(files["tile_1024"])], "mist_her2", num_inference_steps=1)
    assert result.images[0].size == (1024, 1024)
    assert result.ihc_embeddings.values.shape == (1, 16, 1536)  # the 4 x 4 grid, translated token by token
    _, gen = pipe.components("mist_her2")
    assert gen.config["domain"] == "ihc-her2" and gen.config["guidance_scale"] == 1.2


# ------------------------------------------------------------------ the pipeline
def test_stain_is_seeded_and_translates(stain_model, tiles, one_thread):
    pipe = StainPipeline.from_pretrained(stain_model)
    files = sorted(str(p) for p in tiles.iterdir())
    a = pipe.run(files, "her2", seed=3, num_inference_steps=2)
    b = pipe.stain(files[1:2], to="HER2", seed=4, num_inference_steps=2)
    assert [im.size for im in a.images] == [(32, 32)] * 3
    assert np.array_equal(np.asarray(a.images[1]), np.asarray(b[0]))  # image i has seed + i, alone or not
    assert a.he_embeddings.domain == "he" and a.ihc_embeddings.domain == "ihc-her2"
    assert (a.ihc_embeddings.values - a.he_embeddings.values).abs().mean() > 0.05  # the translator moved them


def test_callback_sees_each_batch_step_and_cancels(stain_model, tiles, one_thread):
    from pixgen.sampling import SamplingCancelled

    pipe = StainPipeline.from_pretrained(stain_model)
    files = sorted(str(p) for p in tiles.iterdir())
    steps = []
    result = pipe.run(files, "her2", seed=3, num_inference_steps=3, batch_size=2,
                      callback=lambda step, t, x, x0: steps.append((step, len(x))))
    assert steps == [(0, 2), (1, 2), (2, 2), (0, 1), (1, 1), (2, 1)] and len(result.images) == 3
    calls = []
    with pytest.raises(SamplingCancelled, match="step 2 of 3"):  # stain() passes it on: in batch 2
        pipe.stain(files, to="her2", num_inference_steps=3, batch_size=2,
                   callback=lambda *a: calls.append(a[0]) or len(calls) < 5)
    assert calls == [0, 1, 2, 0, 1]


def test_each_step_refuses_the_wrong_domain_or_encoder(stain_model, one_thread):
    pipe = StainPipeline.from_pretrained(stain_model)
    translator, gen = pipe.components("her2")
    he = Embeddings(torch.randn(2, 32), encoder="tiny-test", domain="he")
    with pytest.raises(EncoderMismatchError, match="encoder 'uni2-h'.*fix"):
        translator.translate(Embeddings(torch.randn(2, 32), encoder="uni2-h"))
    with pytest.raises(EncoderMismatchError, match="dim 1536"):
        translator.translate(Embeddings(torch.randn(2, 1536), encoder="tiny-test"))
    with pytest.raises(EncoderMismatchError, match="'ihc-ki67' tissue"):
        translator.translate(Embeddings(torch.randn(2, 32), encoder="tiny-test", domain="ihc-ki67"))
    with pytest.raises(EncoderMismatchError, match="describe 'he' tissue.*generates 'ihc-her2'"):
        gen.generate(he, num_inference_steps=1, progress=False)  # untranslated H&E into the IHC generator
    _, ki67_gen = pipe.components("ki67")
    with pytest.raises(EncoderMismatchError, match="'ihc-her2' tissue"):
        ki67_gen.generate(translator.translate(he), num_inference_steps=1, progress=False)


def test_unknown_stain_lists_the_available_ones(stain_model):
    pipe = StainPipeline.from_pretrained(stain_model)
    with pytest.raises(InputError, match=r"no translator for 'er'.*available: her2, ki67"):
        pipe.stain(np.zeros((32, 32, 3), np.uint8), to="er")


def test_wrong_mpp_is_refused_and_ihc_input_warns(stain_model, tiles, one_thread):
    pipe = StainPipeline.from_pretrained(stain_model)
    with pytest.raises(InputError, match="at 0.25 um/px, the stain model works at 0.5"):
        pipe.stain([str(tiles / "he_0.png")], to="her2", mpp=0.25)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.stain([str(tiles.parent / "ihc.png")], to="her2", num_inference_steps=1, mpp=0.5)
    assert any("look(s) like IHC" in str(w.message) for w in caught)


def test_ihc_detection_on_real_images(shared_data):
    from pixgen.io import load_rgb

    ihc = [shared_data / "samples" / "ihc-512px-skimage.png", *sorted((shared_data / "ihc-deepliif" / "tiles").glob(
        "*_ihc.jpg"))[:2], *sorted((shared_data / "anhir-lung-lesion-3").glob("*Ki67*.jpg"))]
    he = [shared_data / "samples" / "he-500x300-stardist.jpg", *sorted((shared_data / "anhir-lung-lesion-3").glob(
        "*He*.jpg")), *sorted((shared_data / "consep" / "test" / "images").glob("*.jpg"))[:2],
          next((shared_data / "lc25000-lung" / "lung_scc").glob("*.jpeg"))]
    assert all(looks_like_ihc(load_rgb(p)) for p in ihc)
    assert not any(looks_like_ihc(load_rgb(p)) for p in he)
    assert not looks_like_ihc(np.full((64, 64, 3), 245, np.uint8))  # background: no verdict


def test_mismatched_stain_model_is_refused_at_load(stain_model, tmp_path):
    import shutil

    copy = shutil.copytree(stain_model, tmp_path / "m")
    spec = json.loads((copy / "stain_model.json").read_text())
    spec["stains"]["her2"]["generator"] = "ki67/generator"
    (copy / "stain_model.json").write_text(json.dumps(spec))
    with pytest.raises(ModelLoadError, match="makes 'ihc-ki67' images, the translator maps to 'ihc-her2'"):
        StainPipeline.from_pretrained(copy).components("her2")


def test_side_by_side_pairs_rows():
    sheet = side_by_side([np.zeros((16, 16, 3), np.uint8)] * 2, [Image.new("RGB", (8, 8), "white")] * 2)
    assert sheet.size == (2 * 10 + 2, 2 * 10 + 2)


# ------------------------------------------------------------------ CLI
def test_cli_stains_a_folder_with_provenance(stain_model, tiles, tmp_path, one_thread, capsys):
    out = tmp_path / "her2"
    assert cli(["stain", str(tiles), "--model", str(stain_model), "--to", "her2", "--out", str(out), "--steps", "2"]) == 0
    manifest = SetManifest.load(out)
    assert manifest.complete and len(manifest.image_paths(out)) == 3
    assert {e.condition.label for e in manifest.files} == {"her2"}
    assert all(len(h) == 64 for h in manifest.references.values())
    assert Image.open(out / "side_by_side.png").size == (2 * 34 + 2, 3 * 34 + 2)
    info = json.loads((out / "stain.json").read_text())
    assert (info["stain"], info["marker"], info["flow_steps"]) == ("her2", "her2", 20)
    capsys.readouterr()
    assert cli(["stain", str(tiles), "--model", str(stain_model), "--to", "her2", "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err


def test_cli_errors_are_one_line(stain_model, tiles, tmp_path, capsys):
    base = ["stain", str(tiles / "he_0.png"), "--model", str(stain_model), "--out", str(tmp_path / "o")]
    for extra, words in ((["--to", "er"], "no translator for 'er'"), (["--to", "her2", "--mpp", "2"], "um/px"),
                         ([], "needs --to")):
        assert cli(base + extra) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err and "fix:" in err or words == "needs --to"
    assert not (tmp_path / "o").exists()
    emb = tmp_path / "uni.npy"
    np.save(emb, np.zeros((2, 1536), np.float32))
    assert cli(["stain", str(emb), "--model", str(stain_model), "--to", "her2", "--out", str(tmp_path / "e")]) == 1
    assert "dim 1536" in capsys.readouterr().err


def test_cli_stains_a_slide_region_through_the_large_path(stain_model, shared_data, tmp_path, one_thread):
    out = tmp_path / "region"
    slide = shared_data / "slides" / "cmu-1-small-region.svs"
    assert cli(["stain", str(slide), "--region", "1000,1000,100,100", "--model", str(stain_model), "--to", "her2",
                "--out", str(out), "--steps", "1", "--png"]) == 0
    info = json.loads((out / "stain.json").read_text())
    assert (info["height"], info["width"], info["output"]) == (96, 96, "ihc.png")  # 3 x 3 cells of 32 px
    assert Image.open(out / "ihc.png").size == Image.open(out / "he.png").size == (96, 96)
    assert Image.open(out / "side_by_side.png").size == (2 * 98 + 2, 98 + 2)


def test_cli_list_and_offline_hub_id(stain_model, monkeypatch, tmp_path, capsys):
    assert cli(["stain", "x.png", "--model", str(stain_model), "--list"]) == 1  # inputs are checked first
    (tmp_path / "x.png").write_bytes(b"")
    assert cli(["stain", str(tmp_path / "x.png"), "--model", str(stain_model), "--list"]) == 0
    assert json.loads(capsys.readouterr().out)["ki67"]["domain"] == "ihc-ki67"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli(["stain", str(tmp_path / "x.png"), "--model", "someone/no-such-stain-model", "--list"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixgen: error: could not fetch") and "\n" not in err
