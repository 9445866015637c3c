"""Nuclear statistics (bundled segmenter, distances, the eval section) and reference retrieval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metrics.images import blurred, colour_matched_noise
from metrics.nuclei import (
    BUNDLED,
    NUCLEUS_FEATURES,
    NucleiSegmenter,
    NuclearFeatures,
    _rescale,
    foreground_boundary_target,
    instances_from_maps,
    match_f1,
    nuclear_distances,
    nuclear_features,
)
from metrics.retrieval import BUNDLED_DETECTOR, reference_retrieval, retrieval_from_folders
from metrics.segmentation import MaskSet, train_segmenter
from pixgen.cli import main
from pixgen.errors import InputError, ModelLoadError


def _consep_tiles(shared_data: Path, n: int) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """The first ``n`` CoNSeP test tiles of every 4th file, at the segmenter's 0.5 um/px (128 px)."""
    files = sorted((shared_data / "consep" / "test" / "images").glob("*.jpg"))[::4][:n]
    images = [_rescale(np.asarray(Image.open(f).convert("RGB")), 0.5) for f in files]
    inst = [_rescale(np.asarray(Image.open(f.parent.parent / "inst" / f"{f.stem}.png")).astype(np.int64), 0.5) for f in files]
    return images, inst, [f.name for f in files]


@pytest.fixture(scope="module")
def consep(shared_data):
    return _consep_tiles(shared_data, 48)


@pytest.fixture(scope="module")
def segmenter() -> NucleiSegmenter:
    return NucleiSegmenter.load()


def test_instances_from_maps_splits_touching_nuclei_at_the_boundary():
    fg = np.zeros((20, 30))
    fg[5:15, 2:28] = 1  # two 10 x 13 nuclei touching along columns 14-15
    bd = np.zeros_like(fg)
    bd[5:15, 14:16] = 1
    two = instances_from_maps(fg, bd)
    assert two.max() == 2 and (two[10, 5] != two[10, 25]) and (two > 0).sum() == fg.sum()
    assert instances_from_maps(fg, np.zeros_like(fg)).max() == 1  # no boundary: one nucleus
    speck = fg.copy()
    speck[0, 0] = 1
    assert instances_from_maps(speck, bd, min_size=8)[0, 0] == 0


def test_match_f1_by_hand():
    gt = np.zeros((10, 10), int)
    gt[0:4, 0:4], gt[6:10, 6:10] = 1, 2
    pred = np.zeros_like(gt)
    pred[0:4, 0:3] = 7  # IoU 0.75 with nucleus 1
    pred[6:8, 6:8] = 8  # IoU 0.25 with nucleus 2: no match
    assert match_f1(gt, pred) == pytest.approx(2 * 1 / 4)
    assert match_f1(gt, gt) == 1.0 and match_f1(np.zeros_like(gt), np.zeros_like(gt)) == 1.0


def test_toy_training_and_fp16_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    inst = np.zeros((32, 32), np.int64)
    inst[4:12, 4:12], inst[4:12, 12:20] = 1, 2
    image = np.where(inst[..., None] > 0, 60, 220).astype(np.uint8) + rng.integers(0, 5, (32, 32, 3), dtype=np.uint8)
    assert foreground_boundary_target(inst).shape == (2, 32, 32)
    model = train_segmenter(MaskSet([image], [inst], ["toy"]), steps=3, crop=32, batch_size=2, targets=foreground_boundary_target)
    seg = NucleiSegmenter(model)
    seg.save(tmp_path / "seg", name="toy")
    back = NucleiSegmenter.load(tmp_path / "seg")
    assert back.info["name"] == "toy" and back.mpp == 0.5
    np.testing.assert_allclose(back.probabilities([image])[0], seg.probabilities([image])[0], atol=0.02)
    with pytest.raises(ModelLoadError, match="python -m metrics.nuclei"):
        NucleiSegmenter.load(tmp_path / "nothing")


def test_bundled_segmenter_is_small_and_documents_its_test_scores(segmenter):
    assert (BUNDLED / "model.safetensors").stat().st_size < 2_000_000
    assert segmenter.info["outputs"] == ["foreground", "boundary"] and segmenter.mpp == 0.5
    assert segmenter.info["test"]["consep"]["f1_iou50"] > 0.4


def test_bundled_segmenter_counts_the_nuclei_of_real_tiles(consep, segmenter):
    images, truth, _ = consep
    found = np.array([m.max() for m in segmenter.instances(images)])
    true = np.array([len(np.unique(m)) - 1 for m in truth])
    assert abs(found.sum() / true.sum() - 1) < 0.35  # loosely the right number overall
    assert np.corrcoef(found, true)[0, 1] > 0.6  # and more where there are more
    busiest = int(np.argmax(true))
    assert 0.5 * true[busiest] < found[busiest] < 1.5 * true[busiest]


def test_planted_blur_and_noise_are_far_from_real_and_real_halves_are_close(consep, segmenter):
    images = consep[0]
    ref, other = images[0::2], images[1::2]
    f_ref = nuclear_features(ref, segmenter)
    agg = {
        name: nuclear_distances(f_ref, nuclear_features(cand, segmenter), n_boot=0)["aggregate"]["value"]
        for name, cand in (("real", other), ("blur", blurred(other)), ("noise", colour_matched_noise(other)))
    }
    assert agg["blur"] > 2 * agg["real"] and agg["noise"] > 2 * agg["real"], agg
    assert f_ref.summary()["nuclei_per_field"] > 10


def test_w1_matches_scipy():
    from scipy.stats import wasserstein_distance

    from metrics.nuclei import _w1

    rng = np.random.default_rng(0)
    a, b = rng.gamma(2.0, size=500), rng.normal(1.0, 2.0, size=77)
    assert _w1(a, b) == pytest.approx(wasserstein_distance(a, b), rel=1e-9)


def test_nuclear_distances_by_hand_and_tile_bootstrap():
    one = NuclearFeatures({"nuclei_per_field": np.array([1.0, 3.0]), "nuclear_fraction": np.array([0.1, 0.3])},
                          {k: np.array([1.0, 2.0, 3.0, 4.0]) for k in NUCLEUS_FEATURES}, np.array([0, 1, 1, 1]))
    shifted = NuclearFeatures({k: v + 1.0 for k, v in one.per_tile.items()}, {k: v + 1.0 for k, v in one.per_nucleus.items()}, one.tile)
    d = nuclear_distances(one, shifted, n_boot=20)
    assert d["nuclei_per_field"]["value"] == pytest.approx(1.0)  # W1 = 1, spread (std) = 1
    assert d["area_um2"]["value"] == pytest.approx(1 / np.std([1.0, 2.0, 3.0, 4.0]))
    assert d["aggregate"]["ci"][0] <= d["aggregate"]["value"] + 1e-9
    taken = one.take(np.array([1, 1]))
    assert list(taken.tile) == [0, 0, 0, 1, 1, 1] and list(taken.per_tile["nuclei_per_field"]) == [3.0, 3.0]


def test_pixgen_eval_reports_nuclear_statistics_with_floor_and_baselines(consep, tmp_path):
    images, _, names = consep
    for i, folder in enumerate(("real", "synthetic", "train")):  # 16 real tiles each; "synthetic" is real too
        (tmp_path / folder).mkdir()
        for im, name in zip(images[i::3], names[i::3]):
            Image.fromarray(im).save(tmp_path / folder / f"{Path(name).stem}.png")
    code = main(["eval", "--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "synthetic"), "--train", str(tmp_path / "train"),
                 "--out", str(tmp_path / "r"), "--detectors", "random-conv", "--n-boot", "10", "--utility", "none"])
    assert code == 0
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    agg = {name: row["distance"]["aggregate"]["value"] for name, row in rep["nuclei"]["rows"].items()}
    real_like = max(agg["synthetic"], agg["floor: real-train vs real-test"])
    assert agg["baseline: blurred real"] > 2 * real_like and agg["baseline: colour-matched noise"] > 2 * real_like, agg
    assert "## Nuclear statistics" in (tmp_path / "r" / "report.md").read_text()


@pytest.fixture(scope="module")
def references(shared_data, tmp_path_factory) -> Path:
    """10 real 128 px tiles as references, and 4 noisy copies of each as "variations"."""
    root = tmp_path_factory.mktemp("retrieval")
    files = sorted((shared_data / "consep" / "test" / "images").glob("*.jpg"))[::20][:5]
    files += sorted((shared_data / "lc25000-lung" / "lung_n").glob("*.jpeg"))[::900][:5]
    rng = np.random.default_rng(0)
    (root / "refs").mkdir()
    (root / "var").mkdir()
    mapping = {}
    for i, f in enumerate(files):
        im = np.asarray(Image.open(f).convert("RGB").resize((128, 128), Image.LANCZOS))
        Image.fromarray(im).save(root / "refs" / f"ref{i}.png")
        for v in range(4):
            noisy = np.clip(im + rng.normal(0, 6, im.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / "var" / f"ref{i}_v{v}.png")
            mapping[f"ref{i}_v{v}.png"] = f"ref{i}.png"
    (root / "map.json").write_text(json.dumps(mapping))
    return root


def test_retrieval_of_near_copies_is_perfect_and_of_a_shuffled_map_near_chance(references):
    detector = f"classifier:{BUNDLED_DETECTOR}" if (BUNDLED_DETECTOR / "model.safetensors").is_file() else "random-conv"
    right = retrieval_from_folders(references / "refs", references / "var", references / "map.json", detector, n_boot=20)
    assert right["n_references"] == 10 and right["n_variations"] == 40 and right["chance"] == {"top1": 0.1, "top3": 0.3}
    assert right["top1"]["value"] == 1.0 and right["mean_rank"] == 1.0
    mapping = json.loads((references / "map.json").read_text())
    keys = list(mapping)
    shuffled = dict(zip(keys, np.random.default_rng(1).permutation([mapping[k] for k in keys]).tolist()))
    wrong = retrieval_from_folders(references / "refs", references / "var", shuffled, detector, n_boot=0)
    assert wrong["top1"]["value"] <= 0.3 and wrong["top3"]["value"] <= 0.6


def test_retrieval_chance_on_random_features_and_input_errors():
    rng = np.random.default_rng(0)
    refs = rng.normal(size=(10, 16))
    syn = rng.normal(size=(2000, 16))
    out = reference_retrieval(refs, syn, rng.integers(0, 10, 2000), n_boot=0)
    assert abs(out["top1"]["value"] - 0.1) < 0.03 and abs(out["top3"]["value"] - 0.3) < 0.04
    with pytest.raises(InputError):
        reference_retrieval(refs[:1], syn, np.zeros(2000, int))


def test_retrieval_cli_reports_a_missing_reference(references, tmp_path, capsys):
    from metrics.retrieval import main as retrieval_main

    bad = tmp_path / "map.json"
    bad.write_text(json.dumps({"ref0_v0.png": "nope.png"}))
    assert retrieval_main(["--references", str(references / "refs"), "--synthetic", str(references / "var"), "--map", str(bad),
                           "--detector", "random-conv"]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_evaluate_scores_reference_retrieval_per_detector(references, tmp_path):
    from metrics.report import evaluate

    rep = evaluate(references / "refs", references / "var", detectors=["random-conv"], n_boot=0, utility=(), nuclei=False,
                   references=references / "refs", reference_map=references / "map.json", out=tmp_path)
    assert rep["retrieval"]["random-conv"]["top1"]["value"] == 1.0
    assert "## Reference retrieval" in (tmp_path / "report.md").read_text()
