"""The embedding prior: vocabulary parsing, per-image seeded prior conditions, paths, the bundled prior."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pixgen.conditioning import BankDraw, PriorPath, PriorSample
from pixgen.errors import InputError, ModelLoadError
from pixgen.models.flow import EmbeddingFlow
from pixgen.prior import EmbeddingPrior, Term, Vocabulary, mask_terms
from pixgen.testing import TINY_ENCODER_DIM, tiny_generator

TERMS = [Term("a", "organ", "class a", ("alpha",)), Term("b", "organ", "class b"), Term("dense", "density", "many nuclei",
                                                                                           ("crowded",))]
LABELS = {"A": ["a"], "B": ["b"]}


def tiny_prior(dim: int = TINY_ENCODER_DIM, seed: int = 0) -> EmbeddingPrior:
    torch.manual_seed(seed)
    flow = EmbeddingFlow(dim=dim, condition_dim=len(TERMS), hidden=16, num_blocks=1, encoder="tiny-test")
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    vocab = Vocabulary(TERMS, labels=LABELS, seen=[["a", "dense"], ["b"]])
    return EmbeddingPrior(flow, vocab, torch.zeros(dim), torch.ones(dim), steps=3)


@pytest.fixture
def gen():
    g = tiny_generator()
    g.prior = tiny_prior()
    return g


def test_vocabulary_parses_aliases_labels_and_refuses_unknown_words():
    v = Vocabulary(TERMS, labels=LABELS, seen=[["a", "dense"], ["b"]])
    assert v.terms_of("Alpha, crowded tissue") == ["a", "dense"]
    assert v.parse("A").tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(InputError, match="does not know: purple") as err:
        v.parse("a, purple")
    assert "alpha" in err.value.fix and "dense" in err.value.fix  # names the known words
    with pytest.raises(InputError, match="no training tile"):
        v.parse("b dense")  # never seen together
    with pytest.raises(InputError, match="names no term"):
        v.parse("the tissue")


def _field(n: int, kinds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """n nuclei of 3x3 px in a 256 px field, nucleus i of type kinds[i % len(kinds)]."""
    inst, types = np.zeros((256, 256), np.int32), np.zeros((256, 256), np.uint8)
    for i in range(n):
        y, x = divmod(i, 16)
        inst[y * 16:y * 16 + 3, x * 16:x * 16 + 3] = i + 1
        types[y * 16:y * 16 + 3, x * 16:x * 16 + 3] = kinds[i % len(kinds)]
    return inst, types


def test_mask_terms_count_nuclei_and_their_majority_types():
    assert mask_terms(*_field(70, [3])) == ["dense", "epithelial"]
    assert mask_terms(*_field(30, [2, 4])) == ["inflammatory-rich", "spindle"]  # 15 of each: 50 % each
    assert mask_terms(*_field(30, [1, 1, 2])) == ["inflammatory-rich"]  # a third inflammatory
    assert mask_terms(*_field(4, [3])) == ["sparse"]  # too few nuclei for a composition
    assert mask_terms(_field(70, [3])[0]) == ["dense"]  # no type map: density only
    inst, types = _field(20, [3])
    types[inst == 1] = 2
    types[0, 0] = 3  # one pixel of another type does not change nucleus 1's majority
    assert mask_terms(inst, types) == ["epithelial"]


def test_extra_terms_join_the_condition_only_where_a_training_tile_had_them(gen):
    v = gen.prior.vocabulary
    assert v.extend_seen(["a"], ["dense"]) == ["a", "dense"]
    assert v.extend_seen(["b"], ["dense"]) == ["b"]  # b was never dense: dropped, not refused
    kw = dict(num_inference_steps=2, output_type="pt", progress=False, seed=3)
    out = gen.generate(PriorSample("A", extra_terms=[["dense"], []]), num_images=2, **kw)
    assert out.condition_ids == ["A, dense[prior seed 3]", "A[prior seed 4]"]
    plain = PriorSample("A").resolve(gen, [3, 4]).values
    extra = PriorSample("A", extra_terms=[["dense"], []]).resolve(gen, [3, 4]).values
    assert not torch.allclose(plain[0], extra[0]) and torch.allclose(plain[1], extra[1])  # same noise, other condition
    with pytest.raises(InputError, match="1 entries for 2 images"):
        gen.generate(PriorSample("A", extra_terms=[["dense"]]), num_images=2, **kw)


def test_label_samples_the_prior_by_default_and_from_bank_stays(gen):
    kw = dict(num_images=2, seed=3, num_inference_steps=2, output_type="pt", progress=False)
    out = gen.generate(label="A", **kw)
    assert out.condition_ids == ["A[prior seed 3]", "A[prior seed 4]"]
    bank = gen.generate(BankDraw("tumour"), **kw)
    assert bank.condition_ids[0].startswith("tumour[")
    with pytest.raises(InputError, match="unknown label 'tumour'"):
        gen.generate(label="tumour", **kw)  # the prior's labels, not the bank's


def test_prior_sample_is_per_image_seeded(gen):
    together = PriorSample(prompt="a dense").resolve(gen, [5, 6, 7]).values
    alone = PriorSample(prompt="a dense").resolve(gen, [6]).values
    torch.testing.assert_close(together[1], alone[0])
    assert not torch.allclose(together[0], together[1])
    kw = dict(num_inference_steps=2, output_type="pt", progress=False)
    img3 = gen.generate(PriorSample("A"), num_images=3, seed=10, **kw).images
    img1 = gen.generate(PriorSample("A"), num_images=1, seed=12, **kw).images
    torch.testing.assert_close(img3[2], img1[0], atol=1e-5, rtol=0)


def test_temperature_scales_the_seeded_noise(gen):
    prior = gen.prior
    full = prior.noise([4, 5])
    prior.temperature = 0.5
    torch.testing.assert_close(prior.noise([4, 5]), 0.5 * full)


def test_label_temperatures_scale_their_labels_rows_and_round_trip(gen, tmp_path):
    """A label's own temperature applies to that label and to prompts holding its terms, moves linearly
    along a path, leaves other conditions at the global one, and survives save / load."""
    prior = gen.prior
    a, b = prior.condition("A"), prior.condition(prompt="b")
    before = prior.sample(torch.stack([a, b]), [4, 5])
    prior.label_temperatures = {"A": 0.5}
    torch.testing.assert_close(prior.temperature_of(torch.stack([a, prior.condition(prompt="a, dense"), b])),
                               torch.tensor([0.5, 0.5, 1.0]))
    torch.testing.assert_close(prior.temperature_of(0.25 * a + 0.75 * b), torch.tensor([0.875]))  # a path's row
    after = prior.sample(torch.stack([a, b]), [4, 5])
    torch.testing.assert_close(after[1], before[1])  # B keeps the global temperature
    prior.label_temperatures = {}
    prior.temperature = 0.5
    torch.testing.assert_close(after[0], prior.sample(a, [4])[0])  # = A sampled at 0.5 globally
    prior.temperature, prior.label_temperatures = 1.0, {"A": 0.5}
    path = PriorPath("A", "b", points=2).resolve(gen, [4, 5]).values[:, 0]
    torch.testing.assert_close(path, torch.stack([after[0], prior.sample(b, [4])[0]]))  # ends = the two samples
    loaded = EmbeddingPrior.load(prior.save(tmp_path / "p"))
    assert loaded.label_temperatures == {"A": 0.5} and loaded.describe()["label_temperatures"] == {"A": 0.5}
    assert loaded.describe()["labels"] == {"A": "a (temperature 0.5)", "B": "b"}  # what `pixgen info` lists
    with pytest.raises(ModelLoadError, match="unknown labels"):
        EmbeddingPrior(prior.flow, prior.vocabulary, prior.mean, prior.std, label_temperatures={"C": 1.0})


def test_prior_path_shares_noise_and_ends_at_the_endpoints(gen):
    path = PriorPath("A", "b", points=4).resolve(gen, [9, 10, 11, 12]).values[:, 0]
    prior = gen.prior
    ends = prior.sample(torch.stack([prior.condition("A"), prior.condition(prompt="b")]), [9, 9])
    torch.testing.assert_close(path[[0, 3]], ends)
    steps = (path[1:] - path[:-1]).norm(dim=1)
    assert steps.max() < (path[3] - path[0]).norm()  # moves in steps, not jumps
    with pytest.raises(InputError, match="at least 2"):
        PriorPath("A", "B", points=1)


def test_model_without_prior_says_so():
    g = tiny_generator()
    with pytest.raises(InputError, match="no embedding prior"):
        g.generate(PriorSample(prompt="a"), num_inference_steps=1, progress=False)


def test_prior_round_trips_through_the_model_folder(gen, tmp_path):
    from pixgen.pipeline import Generator

    gen.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "prior" / "prior.json").is_file()
    loaded = Generator.from_pretrained(tmp_path / "m")
    assert loaded.prior.labels == ["A", "B"] and loaded.describe()["prior"]["labels"] == {"A": "a", "B": "b"}
    c = gen.prior.condition(prompt="a, dense")
    torch.testing.assert_close(loaded.prior.sample(c, [1, 2]), gen.prior.sample(c, [1, 2]))


def test_trained_prior_matches_class_statistics(tmp_path):
    """A toy problem: two 4-d Gaussians with different means and spreads; the prior's samples of
    each label have that label's mean and spread."""
    from recipes.prior import train_prior

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    a = rng.normal(2.0, 0.5, (600, 4))
    b = rng.normal(-1.0, 1.0, (600, 4)) * np.array([1, 1, 1, 2.0])
    terms = [["a"]] * 600 + [["b"]] * 600
    prior = train_prior(np.concatenate([a, b]).astype(np.float32), terms, tmp_path / "flow", steps=600, hidden=64,
                        num_blocks=2, copies=2, encoder=None, vocabulary=TERMS[:2], labels=LABELS, batch_size=128)
    for label, real in (("A", a), ("B", b)):
        z = prior.sample(prior.condition(label), list(range(1000))).numpy()
        np.testing.assert_allclose(z.mean(0), real.mean(0), atol=0.25)
        np.testing.assert_allclose(z.std(0), real.std(0), rtol=0.25)


def test_whitened_prior_round_trips_through_save_and_load(tmp_path):
    """The whitening transform is part of the flow's weights: saved, loaded strictly, same samples."""
    torch.manual_seed(0)
    flow = EmbeddingFlow(dim=6, condition_dim=len(TERMS), hidden=16, num_blocks=1, whiten_rank=3)
    flow.fit_whitening(torch.randn(200, 6) * torch.tensor([3.0, 2.0, 1.0, 0.1, 0.1, 0.1]))
    assert flow.whiten_scale[0] > 2.5 and flow.whiten_scale[2] < 1.5  # leading directions first
    prior = EmbeddingPrior(flow, Vocabulary(TERMS, labels=LABELS), torch.zeros(6), torch.ones(6), steps=3)
    assert prior.noise([0, 1]).shape == (2, 3)  # noise lives in the 3-d whitened space
    prior.save(tmp_path / "p")
    loaded = EmbeddingPrior.load(tmp_path / "p")
    assert loaded.flow.config.whiten_rank == 3 and loaded.flow.flow_dim == 3
    torch.testing.assert_close(loaded.flow.whiten_basis, flow.whiten_basis)
    c = prior.condition("A")
    torch.testing.assert_close(loaded.sample(c, [1, 2]), prior.sample(c, [1, 2]))
    assert prior.sample(c, [1]).shape == (1, 6)
    with pytest.raises(InputError, match="whiten_rank=3 needs a noise source"):
        EmbeddingFlow(dim=6, whiten_rank=3, source="he")


def test_whitened_prior_matches_an_anisotropic_covariance_the_plain_flow_does_not(tmp_path, one_thread):
    """24-d data with 2 strong directions and 22 tiny ones (rotated): the old model spreads its error
    over the tiny directions (covariance far off), the whitened one keeps them tiny."""
    from recipes.prior import train_prior

    rng = np.random.default_rng(0)
    std = np.array([3.0, 2.0] + [0.03] * 22)
    rotation = np.linalg.qr(rng.normal(size=(24, 24)))[0]
    data = ((rng.normal(size=(2000, 24)) * std) @ rotation.T + 1.0).astype(np.float32)
    cov = np.cov(data.T)
    tiny = rotation[:, 2:]  # the data's small directions
    evals, evecs = np.linalg.eigh(cov)
    inv_sqrt = evecs @ np.diag(evals ** -0.5) @ evecs.T

    def covariance_error(rank: int) -> tuple[float, float]:
        """Relative error of the sample covariance in the data's whitened coordinates (every direction
        counts alike), and the variance the samples put in the tiny directions."""
        prior = train_prior(data, [["a"]] * len(data), tmp_path / f"flow{rank}", steps=300, hidden=64, num_blocks=2,
                            copies=1, encoder=None, vocabulary=TERMS[:1], labels={"A": ["a"]}, batch_size=128,
                            whiten_rank=rank)
        z = prior.sample(prior.condition("A"), list(range(2000))).numpy()
        zc = np.cov(z.T)
        return np.linalg.norm(inv_sqrt @ zc @ inv_sqrt - np.eye(24)) / np.sqrt(24), float(np.trace(tiny.T @ zc @ tiny))

    plain, plain_tiny = covariance_error(0)
    white, white_tiny = covariance_error(24)
    real_tiny = float(np.trace(tiny.T @ cov @ tiny))  # 22 * 0.03 ** 2 = 0.02
    assert white < 0.3 and plain > 10 * white  # measured: 0.15 vs 11.5 (the plain flow's tiny variances ~30x)
    assert white_tiny < 1.5 * real_tiny and plain_tiny > 5 * real_tiny


def _manifest(folder: Path) -> list[dict]:
    return [im["condition"] for im in json.loads((folder / "manifest.json").read_text())["files"]]


BUNDLED = Path(__file__).parents[1] / "pixgen" / "weights" / "pixgen-default"


@pytest.mark.skipif(not (BUNDLED / "prior" / "prior.json").is_file(), reason="no bundled prior")
def test_bundled_prior_is_used_by_generate_label(tmp_path):
    from pixgen.cli import main

    assert main(["generate", "--label", "lung_scc", "--n", "2", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    conds = _manifest(tmp_path / "s")
    assert [c["kind"] for c in conds] == ["prior", "prior"] and conds[0]["label"] == "lung_scc"
    assert main(["generate", "--label", "lung_scc", "--from-bank", "--n", "1", "--steps", "1",
                 "--out", str(tmp_path / "b")]) == 0
    assert _manifest(tmp_path / "b")[0]["kind"] == "label"


@pytest.fixture
def model_dir(gen, tmp_path):
    return gen.save_pretrained(tmp_path / "model")


def test_cli_prompt_interpolate_and_errors(model_dir, tmp_path, capsys):
    from pixgen.cli import main

    base = ["generate", "--model", str(model_dir), "--steps", "1"]
    assert main(base + ["--prompt", "alpha, dense", "--n", "2", "--out", str(tmp_path / "p")]) == 0
    assert [c["kind"] for c in _manifest(tmp_path / "p")] == ["prompt", "prompt"]
    assert main(base + ["--interpolate", "A", "B", "--n", "3", "--out", str(tmp_path / "i")]) == 0
    ids = [c["id"] for c in _manifest(tmp_path / "i")]
    files = json.loads((tmp_path / "i" / "manifest.json").read_text())["files"]
    assert [f["seed"] for f in files] == [0, 0, 0]  # one seed's noise for the whole path
    assert len(ids) == 3 and ids[0].startswith("A->B[t=0 seed 0]") and ids[2].startswith("A->B[t=1 seed 0]")
    assert main(base + ["--prompt", "a, purple", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "purple" in err and "crowded" in err  # the unknown word and the known ones
    assert not (tmp_path / "x" / "manifest.json").exists()
    assert main(base + ["--label", "A", "--prompt", "b", "--out", str(tmp_path / "y")]) == 1
    assert main(base + ["--from-bank", "--out", str(tmp_path / "z")]) == 1
    assert main(["info", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "prompt vocabulary" in out and "crowded" in out and "A  " in out


def test_synth_classes_sample_the_prior_for_labels_and_prompts(model_dir, tmp_path):
    from pixgen.synth import build_set, load_spec

    spec = tmp_path / "s.toml"
    spec.write_text(f'model = "{model_dir}"\n[sampler]\nsteps = 1\n'
                    '[classes.a]\ncount = 2\nlabel = "A"\n'
                    '[classes.dense]\ncount = 2\nprompt = "alpha, crowded"\n')
    m = build_set(load_spec(spec), tmp_path / "out", progress=False)
    kinds = [(e.condition.kind, e.condition.label) for e in m.files]
    assert kinds == [("prior", "A"), ("prior", "A"), ("prior", "dense"), ("prior", "dense")]
    again = build_set(load_spec(spec), tmp_path / "again", progress=False)  # per-image seeds: same bytes
    assert [(tmp_path / "out" / e.file).read_bytes() for e in m.files] == [
        (tmp_path / "again" / e.file).read_bytes() for e in again.files]
    spec.write_text(f'model = "{model_dir}"\n[classes.a]\ncount = 2\nprompt = "alpha, purple"\n')
    with pytest.raises(InputError, match="classes.a.prompt.*purple"):
        build_set(load_spec(spec), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    spec.write_text(f'model = "{model_dir}"\n[classes.a]\ncount = 1\nprompt = "alpha"\nfrom_bank = true\n')
    with pytest.raises(InputError, match="from_bank: only applies to a label"):
        load_spec(spec)


def test_large_image_label_maps_sample_the_prior_per_region(gen):
    from pixgen.large import layout_from_label_map

    label_map = np.zeros((2, 3, 3), np.uint8)
    label_map[:, 0] = (255, 0, 0)  # region 1: A (left column)
    label_map[:, 1:] = (0, 0, 255)  # region 2: B
    layout = layout_from_label_map(gen, label_map, {(255, 0, 0): "A", (0, 0, 255): "B"}, seed=5)
    grid = layout.grid.reshape(2, 3, -1)
    a = PriorSample(label="A").resolve(gen, [5]).values[0, 0]
    b = PriorSample(label="B").resolve(gen, [6]).values[0, 0]
    assert torch.allclose(grid[0, 0], a) and torch.allclose(grid[1, 0], a)
    assert torch.allclose(grid[0, 2], b) and not torch.allclose(a, b)
    bank = layout_from_label_map(gen, label_map, {(255, 0, 0): "tumour", (0, 0, 255): "stroma"}, seed=5,
                                 region_condition=BankDraw)
    assert torch.allclose(bank.grid.reshape(2, 3, -1)[0, 0], BankDraw("tumour").resolve(gen, [5]).values[0, 0])


def test_report_measures_a_candidate_prior_in_a_linked_model_folder(model_dir, tmp_path):
    """recipes.prior_report --prior: the model's components with the candidate as prior/, nothing copied."""
    from pixgen.pipeline import Generator
    from recipes.prior_report import with_prior

    candidate = tiny_prior(seed=1).save(tmp_path / "candidate")
    linked = with_prior(model_dir, candidate, tmp_path / "linked")
    again = with_prior(model_dir, candidate, tmp_path / "linked")  # idempotent
    gen = Generator.from_pretrained(again)
    c = gen.prior.condition("A")
    torch.testing.assert_close(gen.prior.sample(c, [3]), EmbeddingPrior.load(candidate).sample(c, [3]))
    assert not torch.allclose(gen.prior.sample(c, [3]), EmbeddingPrior.load(model_dir / "prior").sample(c, [3]))
    assert (linked / "prior").resolve() == candidate.resolve() and (model_dir / "prior" / "prior.json").is_file()


class _Cache:
    """The three things of a FeatureCache that the validation split reads."""

    def __init__(self, classes, labels, paths, emb):
        self.classes, self._a, self._paths = classes, {"labels": np.array(labels), "embeddings": emb}, paths

    def array(self, name):
        return self._a[name]

    def meta(self, key):
        return self._paths


def _write_fields(root: Path) -> None:
    """CoNSeP: 4 source images x 2 tiles of 256 px (with type maps); MoNuSeg: 2 images of 512 px (4 fields each)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split_dir, names, size, types in ((root / "consep" / "train", [f"train_{i}_{k:03d}" for i in (1, 2, 10, 11)
                                                                        for k in range(2)], 256, True),
                                          (root / "monuseg" / "train", ["TCGA-A", "TCGA-B"], 512, False)):
        for sub in ("images", "inst") + (("types",) if types else ()):
            (split_dir / sub).mkdir(parents=True)
        for name in names:
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(split_dir / "images" / f"{name}.jpg")
            inst = np.zeros((size, size), np.uint16)
            inst[10:20, 10:20], inst[40:50, 40:50] = 1, 2
            Image.fromarray(inst).save(split_dir / "inst" / f"{name}.png")
            if types:
                Image.fromarray((inst > 0).astype(np.uint8) * 2).save(split_dir / "types" / f"{name}.png")


def test_grouped_validation_holds_back_whole_source_images(tmp_path):
    from recipes.prior import field_sources, grouped_holdout, validation_sets

    _write_fields(tmp_path)
    assert field_sources(tmp_path) == {"consep": ["10", "10", "11", "11", "1", "1", "2", "2"], "monuseg": ["TCGA-A"] * 4 + ["TCGA-B"] * 4}
    classes = ["consep", "lung_n", "monuseg"]
    labels = [0] * 8 + [1] * 5 + [2] * 8
    paths = [f"tiles/consep/{k:05d}.png" for k in range(8)] + [f"tiles/lung_n/{k:05d}.png" for k in range(5)] + \
            [f"tiles/monuseg/{k:05d}.png" for k in range(8)]
    emb = np.arange(21, dtype=np.float32)[:, None].repeat(3, 1)
    train = _Cache(classes, labels, paths, emb)
    held = grouped_holdout(train, tmp_path, fraction=0.25)
    sources = field_sources(tmp_path)
    consep_held = {sources["consep"][k] for k in range(8) if held[k]}
    assert len(consep_held) == 1 and held[:8].sum() == 2  # one whole image (2 tiles), never half of one
    assert held[8:13].sum() == 0  # LC25000 rows all train: its validation is the grouped val split
    assert held[13:].sum() == 4 and len({sources["monuseg"][k] for k in range(8) if held[13 + k]}) == 1
    val_cache = _Cache(["lung_n"], [0, 0, 0], ["v/lung_n/0.png"] * 3, np.full((3, 3), -1.0, np.float32))
    keep, val = validation_sets(train, val_cache, tmp_path, fraction=0.25)
    assert (keep == ~held).all() and list(val) == ["consep", "lung_n", "monuseg"]
    assert len(val["consep"]) == 2 and (val["lung_n"] == -1).all() and len(val["monuseg"]) == 4


def test_validation_scores_temperatures_and_the_rule_picks_the_smallest_worst_ratio():
    from recipes.prior import choose_temperatures, score_validation

    prior = tiny_prior(dim=4)
    prior.label_temperatures = {"A": 0.7}
    rng = np.random.default_rng(0)
    train = {"A": rng.normal(size=(80, 4)).astype(np.float32), "B": rng.normal(2, 1, (80, 4)).astype(np.float32)}
    val = {"A": rng.normal(size=(30, 4)).astype(np.float32), "B": rng.normal(2, 1, (30, 4)).astype(np.float32)}
    scores = score_validation(prior, train, val, [0.5, 1.0], n_boot=5)
    assert prior.temperature == 1.0 and prior.label_temperatures == {"A": 0.7}  # restored
    assert set(scores) == {"0.5", "1.0"} and scores["0.5"]["A"]["floor"] == scores["1.0"]["A"]["floor"]
    assert scores["0.5"]["A"]["fd"] != scores["1.0"]["A"]["fd"] and 0 <= scores["1.0"]["B"]["below_p05"] <= 1

    def row(r, nov=0.0):
        return {"ratio": r, "below_p05": nov}

    made = {"0.9": {"A": row(1.2), "B": row(3.0)}, "1.0": {"A": row(2.0), "B": row(1.1, 0.3)}}
    choice = choose_temperatures(made)
    assert choice["temperature"] == 1.0 and choice["worst_ratio"] == 2.0  # worst 2.0 beats 3.0
    assert choice["label_temperatures"] == {"A": 0.9, "B": 0.9}  # B's better ratio at 1.0 fails novelty (0.3)
    assert choice["label_worst_ratio"] == 3.0
    assert choose_temperatures(made, novelty_max=0.5)["label_temperatures"] == {"A": 0.9, "B": 1.0}


def test_nuclear_properties_count_nuclei_and_type_shares():
    from recipes.prior_report import nuclear_properties

    inst = np.zeros((16, 16), int)
    for i in range(6):
        inst[2 * i, :3] = i + 1
    cls = np.where(inst > 0, 2, 0)
    cls[inst == 1], cls[inst == 2] = 3, 4  # 4 inflammatory, 1 epithelial, 1 spindle
    props = nuclear_properties([(inst, cls), (np.zeros_like(inst), np.zeros_like(cls))])
    assert props["nuclei"].tolist() == [6.0, 0.0]
    assert props["inflammatory_fraction"][0] == pytest.approx(4 / 6) and props["spindle_fraction"][0] == pytest.approx(1 / 6)
    assert np.isnan(props["epithelial_fraction"][1])  # no nuclei: no share


class _BrightnessSegmenter:
    """A stand-in for the typed segmenter: one inflammatory nucleus per 10 grey levels of mean brightness."""

    def classify(self, images):
        out = []
        for im in images:
            inst = np.zeros(im.shape[:2], int)
            for i in range(int(im.mean() // 10)):
                inst[i, 0] = i + 1
            out.append((inst, np.where(inst > 0, 2, 0)))
        return out


def test_image_adherence_pairs_images_by_seed_and_reports_the_expected_direction(gen):
    from recipes.prior_report import image_adherence

    seg = _BrightnessSegmenter()
    report = image_adherence(gen, seg, base="a", terms=("dense",), n=4, seed=7, batch_size=2, n_boot=50)
    kw = {"num_images": 4, "seed": 7, "output_type": "np", "progress": False}

    def nuclei(prompt):
        images = gen.generate(PriorSample(prompt=prompt), **kw).images
        return np.array([float(len(np.unique(i[i > 0]))) for i, _ in seg.classify(list(images))])

    diff = nuclei("a, dense") - nuclei("a")
    r = report["dense"]
    assert r["property"] == "nuclei" and r["expected"] == "+" and r["n_pairs"] == 4
    assert r["shift"]["value"] == pytest.approx(diff.mean())  # paired by seed, same images
    assert r["shift"]["ci"][0] <= diff.mean() <= r["shift"]["ci"][1]
    assert r["right_way"] == (r["shift"]["ci"][0] > 0) and report["_base"]["prompt"] == "a"


def test_real_term_differences_compare_tiles_with_and_without_each_term():
    from recipes.prior_report import real_term_differences

    images = [np.full((32, 32, 3), v, np.uint8) for v in (200, 210, 50, 60, 40)]  # bright = more nuclei (stub)
    terms = [["dense"], ["dense"], [], ["sparse"], ["sparse"]]
    out = real_term_differences(_BrightnessSegmenter(), images, terms, mask_terms=("dense", "sparse", "spindle"), n_boot=50)
    assert out["dense"]["with"] == 20.5 and out["dense"]["without"] == 5.0 and out["dense"]["difference"]["value"] == 15.5
    lo, hi = out["dense"]["difference"]["ci"]
    assert lo <= 15.5 <= hi and out["sparse"]["difference"]["value"] < 0
    assert out["spindle"]["difference"] is None  # no tile has the term
