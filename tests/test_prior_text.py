"""The text-encoder registry on tiny random CLIP towers written by the test in the Hub layouts."""

from __future__ import annotations

import json

import pytest
import torch

from pixgen.encoders.text import (TEXT_ENCODERS, TextEncoderSpec, get_text_encoder_spec, list_text_encoders,
                                  load_text_encoder, register_text_encoder)
from pixgen.errors import InputError, ModelLoadError

WORDS = ["lung", "colon", "adenocarcinoma", "benign", "inflammatory", "sparse", "dense", "tissue"]


def write_tiny_clip(folder, seed: int = 0, projection: int = 16):
    """A random CLIPModel (text and vision towers) + a word-level fast tokenizer, saved as the Hub has them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16), projection_dim=projection)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return model


@pytest.fixture
def tiny_spec():
    spec = register_text_encoder(TextEncoderSpec("tiny-text", 16, "hf-hub:example/none", "clip", context_length=16),
                                 overwrite=True)
    yield spec
    TEXT_ENCODERS.pop("tiny-text")


def test_registry_lists_the_pathology_towers():
    names = [s.name for s in list_text_encoders()]
    assert {"conch", "plip", "quiltnet"} <= set(names)
    assert get_text_encoder_spec("CONCH").gated and get_text_encoder_spec("plip").hub_id == "vinid/plip"
    with pytest.raises(InputError, match="unknown text encoder") as err:
        get_text_encoder_spec("biogpt")
    assert "plip" in err.value.fix


def test_tiny_clip_round_trip(tmp_path, tiny_spec):
    model = write_tiny_clip(tmp_path / "tower")
    enc = load_text_encoder("tiny-text", local_path=tmp_path / "tower")
    prompts = ["lung adenocarcinoma", "colon inflammatory dense"]
    got = enc.encode(prompts)
    ids = enc.tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.text_projection(model.text_model(**ids).pooler_output), dim=-1)
    torch.testing.assert_close(got, want)
    assert got.shape == (2, 16) and not torch.allclose(got[0], got[1])


def test_refused_folders(tmp_path, tiny_spec):
    write_tiny_clip(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "evil.Model"}}))
    with pytest.raises(ModelLoadError, match="custom Python code"):
        load_text_encoder("tiny-text", local_path=tmp_path / "t")
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "t" / "model.safetensors").rename(tmp_path / "t" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="never unpickles"):
        load_text_encoder("tiny-text", local_path=tmp_path / "t")
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="open_clip"):
        load_text_encoder("quiltnet", local_path=tmp_path / "oc")
    with pytest.raises(ModelLoadError, match="conch") as err:
        load_text_encoder("conch")  # no download attempted: the layout needs conversion
    assert "request access" in err.value.fix


def test_width_mismatch_is_named(tmp_path):
    write_tiny_clip(tmp_path / "t", projection=16)
    with pytest.raises(ModelLoadError, match="16-d, 'plip' is 512-d"):
        load_text_encoder("plip", local_path=tmp_path / "t")
