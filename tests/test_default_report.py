"""The bundled model's quality report: its target verdicts and side-by-side sheets."""

from __future__ import annotations

from PIL import Image

from metrics.report import FLOOR, SYNTHETIC
from recipes.default_report import side_by_side, targets_markdown


def _est(value: float, lo: float | None = None, hi: float | None = None) -> dict:
    return {"value": value, "ci": [value if lo is None else lo, value if hi is None else hi]}


def _report(fd: float, c2st: float, suspects: int, tstr: float, gain_hi: float) -> dict:
    return {
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
    good = _verdicts(targets_markdown({"lc": _report(25.0, 0.7, 0, 0.85, 0.01)}, 40.0))
    assert set(good.values()) == {"met"} and len(good) == 7
    bad = _verdicts(targets_markdown({"lc": _report(35.0, 0.9, 2, 0.7, -0.001)}, 130.0))
    assert [k for k, v in bad.items() if v == "met"] == ["lc: conditional fidelity (cosine, `pixgen-ssl`)"]
    assert "35 / 10 = 3.50" in targets_markdown({"lc": _report(35.0, 0.9, 2, 0.7, -0.001)}, None)


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
