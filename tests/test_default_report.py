"""The bundled model's quality report: its target verdicts and side-by-side sheets."""

from __future__ import annotations

from PIL import Image

from metrics.report import FLOOR, SYNTHETIC
from recipes.default_report import before_after_markdown, key_figures, side_by_side, targets_markdown


def _est(value: float, lo: float | None = None, hi: float | None = None) -> dict:
    return {"value": value, "ci": [value if lo is None else lo, value if hi is None else hi]}


def _nuclei(synthetic: float, floor: float = 0.1) -> dict:
    return {"rows": {"synthetic": {"distance": {"aggregate": _est(synthetic)}},
                     "floor: real-train vs real-test": {"distance": {"aggregate": _est(floor)}}}}


RETRIEVAL = {"detector": "classifier-detector-cnn", "top1": _est(0.7, 0.5, 0.85), "chance": {"top1": 0.1}}


def _report(fd: float, c2st: float, suspects: int, tstr: float, gain_hi: float, nuclei: float = 0.15) -> dict:
    return {
        "nuclei": _nuclei(nuclei),
        "fidelity": {SYNTHETIC: {"FD_pixgen-ssl": _est(fd), "C2ST_pixgen-ssl": _est(c2st)}, FLOOR: {"FD_pixgen-ssl": _est(10.0)}},
        "memorisation": {"pixgen-ssl": {"n_suspects": suspects}},
        "conditional": {"detector": "pixgen-ssl", "cos_generated_condition": _est(0.8, 0.78, 0.82),
                        "cos_real_same_class": _est(0.5, 0.49, 0.51)},
        "utility": {
            "tstr": {"linear-probe": {"train_on_synthetic": {"accuracy": _est(tstr)}, "train_on_real": {"accuracy": _est(0.9)}}},
            "augmentation": {"linear-probe": [{"fraction": 0.01, "real": {"accuracy": _est(0.7)},
                                               "real+synthetic": {"accuracy": _est(0.69)}, "accuracy_gain": _est(-0.01, -0.03, gain_hi)}]},
        },
    }


def _verdicts(md: str) -> dict[str, str]:
    rows = [line.split(" | ") for line in md.splitlines()[2:]]
    return {r[0].lstrip("| "): r[-1].rstrip(" |") for r in rows}


def test_targets_met_and_missed_are_both_reported():
    good = _verdicts(targets_markdown({"consep": _report(15.0, 0.7, 0, 0.85, 0.01)}, 40.0, RETRIEVAL))
    assert set(good.values()) == {"met"} and len(good) == 9
    bad_retrieval = {**RETRIEVAL, "top1": _est(0.3)}
    bad = _verdicts(targets_markdown({"consep": _report(25.0, 0.9, 2, 0.7, -0.001, nuclei=0.3)}, 70.0, bad_retrieval))
    assert [k for k, v in bad.items() if v == "met"] == ["consep: conditional fidelity (cosine, `pixgen-ssl`)"]
    assert "25 / 10 = 2.50" in targets_markdown({"consep": _report(25.0, 0.9, 2, 0.7, -0.001)}, None)
    assert "0.300 / 0.100 = 3.00" in targets_markdown({"consep": _report(25.0, 0.9, 2, 0.7, -0.001, nuclei=0.3)}, None)
    lc = _verdicts(targets_markdown({"lc25000": _report(15.0, 0.7, 0, 0.85, 0.01)}, None))
    assert lc["lc25000: C2ST `pixgen-ssl`"] == "**not met**"  # LC25000's C2ST target is 0.62, not 0.75


def test_before_after_pairs_the_same_figures():
    before = key_figures({"consep": _report(36.3, 0.89, 0, 0.8, 0.0, nuclei=0.42)}, None, 16.8)
    after = key_figures({"consep": _report(18.0, 0.74, 0, 0.8, 0.0, nuclei=0.19)}, RETRIEVAL, 21.0)
    table = before_after_markdown(before, after)
    assert "| consep: nuclear statistics / floor | <= 2 | 0.420 / 0.100 = 4.20 | 0.190 / 0.100 = 1.90 |" in table
    assert "| consep: C2ST `pixgen-ssl` | <= 0.75 | 0.890 | 0.740 |" in table
    assert "retrieval" not in table  # measured after only: no pair, no row


def test_side_by_side_puts_real_left_and_generated_right():
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    sheet = side_by_side([red] * 4, [blue] * 4, "lung_scc")
    assert sheet.getpixel((5, 25))[0] > 200 and sheet.getpixel((sheet.width - 6, 25))[2] > 200


def test_fd_without_a_floor_row_is_left_out():
    rep = _report(25.0, 0.7, 0, 0.85, 0.01)
    del rep["fidelity"][FLOOR]
    assert "FD `" not in targets_markdown({"lc": rep}, None)


def test_a_model_without_an_embedding_bank_is_refused(tmp_path):
    import pytest

    from pixgen.errors import InputError
    from pixgen.testing import save_tiny_model
    from recipes.default_report import _ensure_synthetic

    model = save_tiny_model(tmp_path / "tiny")
    (model / "embedding_bank.safetensors").unlink(missing_ok=True)
    with pytest.raises(InputError, match="no embedding bank"):
        _ensure_synthetic(str(model), tmp_path / "syn", n=1, steps=1, seed=0)
    assert not (tmp_path / "syn").exists()  # nothing half-written


def test_synthetic_sets_per_label_declare_their_files_and_conditions(tmp_path):
    from safetensors.torch import load_file

    from metrics.images import load_image_folder
    from pixgen.io import SetManifest
    from pixgen.testing import save_tiny_model
    from recipes.default_report import _ensure_synthetic

    syn = _ensure_synthetic(str(save_tiny_model(tmp_path / "tiny")), tmp_path / "syn", n=2, steps=1, seed=0)
    for label in ("stroma", "tumour"):
        m = SetManifest.load(syn / label)
        assert m.complete and [e.file for e in m.files] == [f"{label}_0000.png", f"{label}_0001.png"]
        assert {e.condition.kind for e in m.files} == {"label"} and m.files[0].condition.label == label
        assert load_file(str(syn / label / m.conditions["file"]))["embeddings"].shape == (2, 1, 32)
    images = load_image_folder(syn)
    assert images.classes == ["stroma", "tumour"] and len(images) == 4
    before = (syn / "stroma" / "stroma_0000.png").stat().st_mtime_ns
    _ensure_synthetic(str(tmp_path / "tiny"), syn, n=2, steps=1, seed=0)  # complete sets are kept
    assert (syn / "stroma" / "stroma_0000.png").stat().st_mtime_ns == before


def test_retrieval_stage_maps_each_variation_to_its_reference_and_is_cached(tmp_path):
    import json

    import numpy as np

    from pixgen.testing import save_tiny_model
    from recipes.default_report import REFERENCES_PER_SOURCE, VARIATIONS, _ensure_retrieval

    rng = np.random.default_rng(0)
    for src in ("consep", "monuseg"):
        (tmp_path / "real" / src).mkdir(parents=True)
        for i in range(7):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "real" / src / f"{i:05d}.png")
    model = str(save_tiny_model(tmp_path / "tiny"))
    scores = _ensure_retrieval(model, tmp_path / "real", tmp_path / "ret", "random-conv", seed=0)
    refs = sorted(p.name for p in (tmp_path / "ret" / "references").iterdir())
    variations = sorted(p.name for p in (tmp_path / "ret" / "variations").iterdir())
    # both sources number their tiles 00000.png, ...: every reference and variation must still be kept
    assert len(refs) == 2 * REFERENCES_PER_SOURCE and len(variations) == len(refs) * VARIATIONS
    assert {v.rsplit("_v", 1)[0] + ".png" for v in variations} == set(refs)
    assert scores["chance"]["top1"] == 1 / len(refs) and 0 <= scores["top1"]["value"] <= 1
    (tmp_path / "ret" / "references" / refs[0]).unlink()  # cached: a second call reads retrieval.json
    assert _ensure_retrieval(model, tmp_path / "real", tmp_path / "ret", "random-conv", seed=0) == json.loads(
        (tmp_path / "ret" / "retrieval.json").read_text())
