"""The studio's pages under Streamlit's AppTest: real generation with the bundled model (few steps,
small n), asserting on what each page shows and offers for download, and on its refusals."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("streamlit")
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

from pixgen.errors import InputError

STUDIO = Path(__file__).resolve().parents[1] / "studio"
TIMEOUT = 240


@pytest.fixture
def studio_env(monkeypatch, tmp_path, shared_data, one_thread):
    """The studio's settings as `pixgen studio` sets them: the shared data as root, a temporary work folder."""
    monkeypatch.setenv("PIXGEN_STUDIO_ROOT", str(shared_data))
    monkeypatch.setenv("PIXGEN_STUDIO_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("PIXGEN_STUDIO_MAX_UPLOAD_MB", "1")
    return tmp_path / "work"


@pytest.fixture
def downloads(monkeypatch):
    """The payloads the pages hand to download buttons, by file name (AppTest keeps no media after a run)."""
    seen: dict[str, bytes] = {}
    original = MemoryMediaFileStorage.load_and_get_id

    def record(self, path_or_data, mimetype, kind, filename=None):
        if filename:
            seen[filename] = path_or_data if isinstance(path_or_data, bytes) else Path(path_or_data).read_bytes()
        return original(self, path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", record)
    return seen


@pytest.fixture
def progress_bars(monkeypatch):
    """Every progress bar (core.StepProgress) a page shows: its total, and ``done``: how often the
    library's step callback fed it. A finished run fills its bar exactly."""
    from studio import core

    bars = []
    init = core.StepProgress.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        bars.append(self)

    monkeypatch.setattr(core.StepProgress, "__init__", record)
    return bars


def filled(bars) -> list[tuple[int, int]]:
    return [(bar.done, bar.total) for bar in bars]


def page(name: str) -> AppTest:
    at = AppTest.from_file(str(STUDIO / "pages" / f"{name}.py"), default_timeout=TIMEOUT).run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    return at


def shown_ok(at: AppTest) -> None:
    """No traceback and no error message on the page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def zip_names(payload: bytes) -> list[str]:
    return sorted(zipfile.ZipFile(io.BytesIO(payload)).namelist())


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_bytes(size: int = 128, seed: int = 0) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8))


def test_app_opens_on_generate(studio_env):
    at = AppTest.from_file(str(STUDIO / "app.py"), default_timeout=TIMEOUT).run()
    shown_ok(at)
    assert [h.value for h in at.header] == ["Generate"]
    assert any("data root" in c.value for c in at.sidebar.caption)


def test_generate_label_shows_images_and_zips_the_set(studio_env, downloads):
    at = page("generate")
    at.number_input(key="gen_n").set_value(2)
    at.number_input(key="gen_steps").set_value(2)
    at.button(key="gen_go").click().run()
    shown_ok(at)
    captions = [im.proto.imgs[0].caption for im in at.image]
    assert len(captions) == 2 and "seed 0" in captions[0] and "seed 1" in captions[1] and "prior" in captions[0]
    names = zip_names(next(v for k, v in downloads.items() if k.endswith(".zip")))
    assert names == ["0000.png", "0001.png", "conditions.safetensors", "contact_sheet.png", "manifest.json"]
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(next(iter(downloads.values())))).read("manifest.json"))
    assert manifest["complete"] and manifest["sampler"]["steps"] == 2 and len(manifest["files"]) == 2
    assert list(studio_env.iterdir()), "outputs go to the session's work folder"


def test_generate_from_an_uploaded_reference(studio_env, downloads):
    at = page("generate")
    at.radio(key="gen_kind").set_value("reference images").run()
    at.file_uploader(key="gen_refs").upload("../../my tile.png", png_bytes(), "image/png")
    at.number_input(key="gen_n").set_value(1)
    at.number_input(key="gen_steps").set_value(1)
    at.button(key="gen_go").click().run()
    shown_ok(at)
    assert len(at.image) == 1 and "reference my_tile.png" in at.image[0].proto.imgs[0].caption
    (session,) = studio_env.iterdir()
    assert (session / "references" / "my_tile.png").is_file(), "uploads are written under the session's folder"
    assert not (studio_env.parent / "my tile.png").exists() and not (studio_env.parent / "my_tile.png").exists()


def test_generate_from_an_uploaded_embeddings_file(studio_env, tmp_path):
    from pixgen.commands import DEFAULT_MODEL
    from pixgen.embeddings import EmbeddingBank, save_embeddings

    save_embeddings(tmp_path / "two.safetensors", EmbeddingBank.load(DEFAULT_MODEL).draw("lung_aca", [0, 1]))
    at = page("generate")
    at.radio(key="gen_kind").set_value("embeddings file").run()
    at.file_uploader(key="gen_emb").upload("two.safetensors", (tmp_path / "two.safetensors").read_bytes()).run()
    at.number_input(key="gen_n").set_value(1)
    at.number_input(key="gen_steps").set_value(1)
    at.button(key="gen_go").click().run()
    shown_ok(at)
    captions = [im.proto.imgs[0].caption for im in at.image]
    assert len(captions) == 2 and all("embeddings" in c for c in captions)


def test_generate_bad_and_oversized_uploads_are_messages(studio_env):
    at = page("generate")
    at.radio(key="gen_kind").set_value("reference images").run()
    at.file_uploader(key="gen_refs").upload("broken.png", b"not an image", "image/png")
    at.number_input(key="gen_steps").set_value(1)
    at.button(key="gen_go").click().run()
    assert not at.exception and len(at.error) == 1 and "broken.png" in at.error[0].value
    assert not at.image
    at.file_uploader(key="gen_refs").set_value(("big.png", b"0" * (1024 * 1024 + 1), "image/png")).run()
    assert not at.exception and "over the studio's 1 MB upload limit" in at.error[0].value
    at.radio(key="gen_kind").set_value("prompt").run()
    at.text_input(key="gen_prompt").set_value("purple unicorn")
    at.button(key="gen_go").click().run()
    assert not at.exception and "purple" in at.error[0].value


def test_paint_sampled_layouts_give_pairs(studio_env, downloads, progress_bars):
    at = page("paint")
    at.radio(key="paint_how").set_value("sample").run()
    at.number_input(key="paint_layouts").set_value(2)
    at.number_input(key="paint_steps").set_value(2)
    at.button(key="paint_go").click().run()
    shown_ok(at)
    captions = [im.proto.imgs[0].caption for im in at.image]
    assert len(captions) == 4 and captions[0].startswith("mask inst/") and captions[1].startswith("images/")
    assert filled(progress_bars) == [(2, 2)]  # 2 layouts in one batch of 8, 2 steps
    names = zip_names(next(v for k, v in downloads.items() if k.endswith(".zip")))
    for stem in ("consep_000000", "consep_000001"):
        assert {f"images/{stem}.png", f"inst/{stem}.png", f"types/{stem}.png"} <= set(names)
    assert "manifest.json" in names


def test_paint_loaded_mask_and_a_bad_one(studio_env, shared_data):
    at = page("paint")
    at.radio(key="paint_how").set_value("load a mask").run()
    inst = np.zeros((128, 128), np.uint16)
    inst[20:30, 20:30], inst[60:75, 60:70] = 1, 2
    at.file_uploader(key="paint_mask").upload("mine.png", encode_png(inst), "image/png").run()
    at.number_input(key="paint_steps").set_value(1)
    at.button(key="paint_go").click().run()
    shown_ok(at)
    assert len(at.image) == 2
    at.file_uploader(key="paint_mask").set_value(("small.png", png_bytes(50), "image/png")).run()
    assert not at.exception and at.error and "small" in at.error[0].value


def test_canvas_circles_become_separate_typed_nuclei():
    from studio.canvas import CLASS_COLOURS, layout_from_canvas

    circles = [{"type": "Circle", "left": 90, "top": 90, "radius": 15, "fill": CLASS_COLOURS["epithelial"]},  # Fabric 6
               {"type": "circle", "left": 120, "top": 90, "radius": 15, "fill": CLASS_COLOURS["inflammatory"]},
               {"type": "circle", "left": 300, "top": 300, "radius": 6, "originX": "center", "originY": "center",
                "fill": CLASS_COLOURS["spindle-shaped"]}]
    lay = layout_from_canvas({"objects": circles}, canvas_px=384, size=128)
    assert lay.shape == (128, 128) and lay.inst.max() == 3  # touching circles stay two nuclei
    assert lay.types[35, 35] == 3 and lay.types[35, 45] == 2 and lay.types[100, 100] == 4  # centres scaled by 1/3
    assert lay.inst[35, 35] != lay.inst[35, 45]
    with pytest.raises(InputError, match="no nuclei"):
        layout_from_canvas({"objects": []}, 384, 128)
    with pytest.raises(InputError, match="no class"):
        layout_from_canvas({"objects": [{**circles[0], "fill": "#123456"}]}, 384, 128)


def viewer_tiles(body: str) -> list[list[list[np.ndarray]]]:
    """The tiles the viewer's HTML embeds, per level (coarsest first), decoded."""
    import base64

    def decode(uri: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))

    data = json.loads(body.split("const data = ", 1)[1].split(";\n", 1)[0])
    return [[[decode(t) for t in row] for row in level["tiles"]] for level in data["levels"]]


def test_large_image_label_layout_viewer_and_download(studio_env, downloads, progress_bars):
    from pixgen.io.slides import open_slide

    at = page("large_image")
    at.number_input(key="large_size").set_value(384)
    at.number_input(key="large_steps").set_value(1)
    at.button(key="large_go").click().run()
    shown_ok(at)
    assert at.subheader[0].value.startswith("384 x 384 px") and not at.image
    assert filled(progress_bars) == [(1, 1)]  # 384 px: 4 x 4 overlapping windows, one batch of 16 (the default), 1 step
    (viewer,) = at.html
    assert viewer.proto.unsafe_allow_javascript and "pixgen-viewer-status" in viewer.proto.body
    tiff = studio_env / "large.ome.tiff"
    tiff.write_bytes(downloads["large.ome.tiff"])
    levels = viewer_tiles(viewer.proto.body)
    with open_slide(tiff) as slide:
        assert slide.dimensions == (384, 384) and slide.mpp() == pytest.approx(0.5)
        assert len(levels) == len(slide.level_dimensions) >= 2  # every level of the pyramid, coarsest first
        full = levels[-1]
        assert [[t.shape[:2] for t in row] for row in full] == [[(256, 256), (256, 128)], [(128, 256), (128, 128)]]
        # the viewer shows the file's own pixels (JPEG-compressed twice: small differences only)
        assert np.abs(full[1][1].astype(int) - slide.read(256, 256, 0, 128, 128)).mean() < 6
    assert "levels" in at.caption[-1].value and "tiles" in at.caption[-1].value


def test_large_image_cancel_is_a_message_and_leaves_the_work_to_resume(studio_env, monkeypatch):
    from studio import core

    monkeypatch.setattr(core.StepProgress, "__call__", lambda self, *step: False)  # Cancel pressed at the first callback
    at = page("large_image")
    at.number_input(key="large_size").set_value(256)
    at.number_input(key="large_steps").set_value(2)
    at.button(key="large_go").click().run()
    assert not at.exception and not at.error and at.warning[0].value.startswith("Cancelled")
    assert "large_out" not in at.session_state and not at.html  # no earlier or half image shown
    (work,) = studio_env.glob("*/large/*/large.ome.tiff.partial")
    assert not (work.parent / "large.ome.tiff").exists()


def test_large_image_from_a_class_map_and_a_slide_region(studio_env):
    at = page("large_image")
    at.radio(key="large_how").set_value("a painted class map").run()
    classes = np.zeros((2, 2, 3), np.uint8)
    classes[:, 0] = (255, 0, 0)
    classes[:, 1] = (0, 0, 255)
    at.file_uploader(key="large_map").upload("map.png", encode_png(classes), "image/png").run()
    at.number_input(key="large_steps").set_value(1)
    at.button(key="large_go").click().run()
    shown_ok(at)
    assert at.subheader[0].value.startswith("256 x 256 px")  # one 128 px window per map pixel
    at.text_area(key="large_colours").set_value("255,0,0=lung_scc").run()
    at.button(key="large_go").click().run()
    assert not at.exception and "colours with no label" in at.error[0].value
    at.radio(key="large_how").set_value("a slide region").run()
    at.text_input(key="large_region").set_value("500,1000,300,300").run()
    at.button(key="large_go").click().run()
    shown_ok(at)
    assert at.subheader[0].value.startswith("256 x 256 px")


def test_large_image_from_a_prompt_and_an_unknown_word(studio_env):
    at = page("large_image")
    at.radio(key="large_how").set_value("a prompt").run()
    at.number_input(key="large_prompt_size").set_value(256)
    at.number_input(key="large_steps").set_value(1)
    at.text_input(key="large_prompt").set_value("colon, spindle").run()
    at.button(key="large_go").click().run()
    shown_ok(at)
    assert at.subheader[0].value.startswith("256 x 256 px")
    at.text_input(key="large_prompt").set_value("colon, purple").run()
    at.button(key="large_go").click().run()
    assert not at.exception and "purple" in at.error[0].value


def test_folders_outside_the_root_are_refused(studio_env, shared_data):
    at = page("large_image")
    at.radio(key="large_how").set_value("a slide region").run()
    at.text_input(key="large_slide").set_value("../../etc/passwd").run()
    assert not at.exception and "outside the studio's data root" in at.error[0].value
    at = page("augment")
    at.text_input(key="aug_folder").set_value(str(shared_data.parent)).run()
    assert not at.exception and "outside the studio's data root" in at.error[0].value


def test_under_root_follows_links_before_deciding(monkeypatch, tmp_path):
    from studio.core import under_root

    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "out").symlink_to(tmp_path)
    monkeypatch.setenv("PIXGEN_STUDIO_ROOT", str(root))
    assert under_root("data") == (root / "data").resolve() and under_root(str(root / "data")) == under_root("data")
    for bad in ("out", "data/../..", "/etc"):
        with pytest.raises(InputError, match="outside the studio's data root"):
            under_root(bad)
    with pytest.raises(InputError, match="no folder at missing"):
        under_root("missing")


def test_augment_writes_the_set_through_synth(studio_env, downloads, progress_bars):
    at = page("augment")
    at.selectbox(key="aug_src_lung_n").set_value("interpolations")
    at.selectbox(key="aug_src_lung_scc").set_value("prior")
    for c in ("lung_aca", "lung_n", "lung_scc"):
        at.number_input(key=f"aug_n_{c}").set_value(2)
        at.number_input(key=f"aug_orig_{c}").set_value(3)
    at.number_input(key="aug_steps").set_value(1)
    at.button(key="aug_go").click().run()
    shown_ok(at)
    assert at.subheader[0].value == "6 images in 3 classes"
    assert filled(progress_bars) == [(3, 3)]  # one batch per class, 1 step
    kinds = [im.proto.imgs[0].caption.split(" · ")[1] for im in at.image]
    assert kinds == ["reference"] * 2 + ["embeddings"] * 2 + ["prior"] * 2
    names = zip_names(next(v for k, v in downloads.items() if k.endswith(".zip")))
    assert {"lung_aca/0000.png", "lung_n/0001.png", "lung_scc/0001.png", "manifest.json"} <= set(names)


def test_augment_variation_strength_sets_the_distance_from_the_originals(studio_env, monkeypatch, tmp_path, shared_data,
                                                                         progress_bars):
    """The same two originals as two classes, varied at strength 0.3 and 0.9 (real img2img, 6 steps):
    the 0.3 images stay measurably closer to their original's tile than the 0.9 ones."""
    import shutil

    from pixgen.io import SetManifest, load_rgb

    root = tmp_path / "root"
    originals = sorted((shared_data / "lc25000-lung" / "lung_aca").iterdir())[:2]
    for name in ("near", "far"):
        (root / "lc25000-lung" / name).mkdir(parents=True)  # the page's default folder name
        for f in originals:
            shutil.copy(f, root / "lc25000-lung" / name / f.name)
    monkeypatch.setenv("PIXGEN_STUDIO_ROOT", str(root))
    at = page("augment")
    for name, strength in (("near", 0.3), ("far", 0.9)):
        at.number_input(key=f"aug_n_{name}").set_value(2)
        at.number_input(key=f"aug_orig_{name}").set_value(2)
        at.slider(key=f"aug_strength_{name}").set_value(strength)
    at.number_input(key="aug_steps").set_value(6)
    at.button(key="aug_go").click().run()
    shown_ok(at)
    assert at.subheader[0].value == "4 images in 2 classes"
    assert filled(progress_bars) == [(6, 6)]  # img2img runs the last int(6 x strength) steps: 1 at 0.3, 5 at 0.9
    assert list(at.table[0].value["strength"]) == ["0.9", "0.3"]  # far, near (sorted class names)
    out = Path(at.session_state["augment_out"])
    manifest = SetManifest.load(out)
    refs = {c["name"]: Path(c["reference"]) for c in manifest.spec["spec"]["classes"]}
    assert all(r.is_relative_to(studio_env) for r in refs.values()), "the tiles are written under the session folder"
    distance = {}
    for entry in manifest.files:
        name = entry.file.split("/")[0]
        tile = load_rgb(refs[name] / entry.condition.id)
        assert tile.shape == (128, 128, 3)  # 224 px originals at 0.5 um/px: their central 128 px tile
        distance.setdefault(name, []).append(np.abs(load_rgb(out / entry.file).astype(float) - tile).mean())
    near, far = np.mean(distance["near"]), np.mean(distance["far"])
    print(f"mean |image - original tile|: strength 0.3 {near:.1f}, 0.9 {far:.1f} grey levels")
    assert near < 0.7 * far, (near, far)


def test_originals_are_cut_into_model_size_tiles_at_the_model_mpp(tmp_path):
    from pixgen.io import load_rgb
    from pixgen.synth import cut_reference_tiles

    arr = np.zeros((200, 300, 3), np.uint8)
    arr[:, 150:] = 255  # left half black, right half white
    Image.fromarray(arr).save(tmp_path / "scan.png")
    tiles = cut_reference_tiles([tmp_path / "scan.png"], tmp_path / "tiles", size=64, mpp=0.5, source_mpp=0.25)
    assert [t.name for t in tiles] == ["scan_r0c0.png", "scan_r0c1.png"]  # 150x100 px at 0.5 um/px: a centred 2x1 grid
    left, right = (load_rgb(t) for t in tiles)
    assert left.shape == (64, 64, 3) and left.mean() < 5 and right.mean() > 250
    with pytest.raises(InputError, match=r"scan.png is 300x200 px at 0.25 um/px: smaller than one 128 px tile"):
        cut_reference_tiles([tmp_path / "scan.png"], tmp_path / "big", size=128, mpp=0.5, source_mpp=0.25)


def test_explore_map_and_report(studio_env, monkeypatch, tmp_path):
    at = page("explore")
    at.text_input(key="explore_real").set_value("lc25000-lung/lung_aca")
    at.text_input(key="explore_syn").set_value("lc25000-lung/lung_n")
    at.number_input(key="explore_max").set_value(12)
    at.number_input(key="explore_k").set_value(3)
    at.button(key="explore_go").click().run()
    shown_ok(at)
    table = at.dataframe[0].value
    assert table["real"].sum() == 12 and table["synthetic"].sum() == 12 and len(table) == 3
    assert len(at.get("vega_lite_chart")) == 1 and at.image  # the map and one cluster's thumbnails
    report = tmp_path / "root" / "report"
    report.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(report / "pca.png")
    (report / "report.md").write_text("# pixgen evaluation report\n\n| row | FD |\n|---|---|\n| synthetic | 1.8 |\n\n"
                                      "![pca.png](pca.png)\n\n![x](../../secret.png)\n")
    monkeypatch.setenv("PIXGEN_STUDIO_ROOT", str(tmp_path / "root"))
    at = page("explore")
    at.text_input(key="explore_report").set_value("report").run()
    shown_ok(at)
    assert [im.proto.imgs[0].caption for im in at.image] == ["pca.png"]  # links out of the folder are not shown
    assert any("| synthetic | 1.8 |" in m.value for m in at.markdown)


def test_stain_page_without_or_with_virtual_staining(studio_env):
    at = page("stain")
    try:
        import pixgen.staining  # noqa: F401
    except ImportError:
        assert "not available" in at.warning[0].value
    else:
        assert at.header[0].value == "Stain" and "Type the folder of a stain model" in at.info[0].value


def test_stain_page_stains_and_quantifies(studio_env, monkeypatch, tmp_path, downloads, progress_bars):
    pytest.importorskip("pixgen.staining")
    from pixgen.testing import save_tiny_stain_model, synthetic_he_ihc_pair

    root = tmp_path / "root"
    save_tiny_stain_model(root / "stain")
    monkeypatch.setenv("PIXGEN_STUDIO_ROOT", str(root))
    at = page("stain")
    at.text_input(key="stain_dir").set_value("stain").run()
    he, _ = synthetic_he_ihc_pair(32)
    at.file_uploader(key="stain_he").upload("he.png", encode_png(he), "image/png").run()
    at.number_input(key="stain_steps").set_value(2)
    at.button(key="stain_go").click().run()
    shown_ok(at)
    captions = [im.proto.imgs[0].caption for im in at.image]
    assert captions[:2] == ["H&E he.png", "IHC (her2)"]
    assert filled(progress_bars) == [(2, 2)]  # one tile, 2 steps
    try:
        import metrics.staining  # noqa: F401
    except ImportError:
        assert "DAB quantification is not available" in at.info[0].value
    else:
        assert captions[2].startswith("DAB") and "h_score" in at.table[0].value.columns
    assert zip_names(next(v for k, v in downloads.items() if k.endswith(".zip"))) == ["he_her2.png"]


def test_cancel_stops_generation_and_keeps_an_incomplete_set(tmp_path, one_thread):
    from pixgen.commands import DEFAULT_MODEL
    from pixgen.io import SetManifest
    from pixgen.pipeline import Generator
    from pixgen.sampling import SamplingCancelled
    from pixgen.sets import write_set
    from studio import jobs

    gen = Generator.from_pretrained(DEFAULT_MODEL)
    args = jobs.cli_args(["generate", "--label", "lung_aca", "--n", "4", "--batch-size", "2", "--steps", "3",
                          "--out", tmp_path / "set"])
    calls = []
    with pytest.raises(SamplingCancelled):
        write_set(gen, args, callback=lambda *a: calls.append(1) or len(calls) < 4, progress=False)  # cancel in batch 2
    manifest = SetManifest.load(tmp_path / "set")
    assert not manifest.complete and len(manifest.files) == 2


def test_pixgen_studio_command(tmp_path, monkeypatch):
    import argparse

    from studio import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["studio", "--root", str(tmp_path), "--port", "8765", "--max-upload-mb", "5"])
    cmd = cli.streamlit_command(args)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and Path(cmd[4]) == STUDIO / "app.py"
    assert cmd[cmd.index("--server.port") + 1] == "8765" and cmd[cmd.index("--server.maxUploadSize") + 1] == "5"
    assert cmd[cmd.index("--client.showErrorDetails") + 1] == "none"
    seen = {}
    monkeypatch.setattr(cli.os, "execve", lambda exe, c, env: seen.update(env=env))
    assert cli.run_studio(args) == 0 and seen["env"]["PIXGEN_STUDIO_ROOT"] == str(tmp_path.resolve())
    with pytest.raises(InputError, match="not a folder"):
        cli.run_studio(parser.parse_args(["studio", "--root", str(tmp_path / "missing")]))
    monkeypatch.setattr(cli, "find_spec", lambda name: None if name == "streamlit_drawable_canvas" else object())
    with pytest.raises(InputError, match=r"streamlit_drawable_canvas, which is not installed.*pixgen\[studio\]"):
        cli.run_studio(args)
    pyproject = (STUDIO.parent / "pyproject.toml").read_text()  # as text: tomllib is 3.11+, pixgen supports 3.10
    commands = pyproject.split('[project.entry-points."pixgen.commands"]')[1].split("\n[")[0]
    assert 'studio = "studio.cli:add_parser"' in commands.splitlines()
