"""`pixgen synth`: spec validation, per-image seeds, resume after kill -9, 1 vs 2 processes, bad input."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pixgen.errors import InputError
from pixgen.io import SetManifest, read_provenance
from pixgen.synth import build_set, image_seed, load_spec, parse_spec, plan_batches
from pixgen.testing import TINY_ENCODER_DIM, save_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("synth") / "model")


def _spec(tmp_path: Path, model: Path, counts=(5, 4), batch_size=2, steps=2, extra: str = "", name="spec.toml") -> Path:
    classes = "".join(f'[classes.{lab}]\ncount = {n}\nlabel = "{lab}"\n' for lab, n in zip(("tumour", "stroma"), counts) if n)
    path = tmp_path / name
    path.write_text(f'model = "{model}"\nseed = 7\n{extra}[sampler]\nsteps = {steps}\nbatch_size = {batch_size}\n{classes}')
    return path


def _files(out: Path) -> dict[str, bytes]:
    """Every file of a set except manifest.json (its times and host differ between runs)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------
def test_spec_parses_into_dataclasses(tmp_path):
    (tmp_path / "refs").mkdir()
    path = tmp_path / "s.toml"
    path.write_text('model = "m"\nseed = 3\n[sampler]\nsteps = 4\nguidance = 2\nbatch_size = 3\n'
                    '[classes.a]\ncount = 5\nlabel = "tumour"\n[classes.b]\ncount = 2\nreference = "refs"\n')
    spec = load_spec(path)
    assert [(c.name, c.kind, c.count) for c in spec.classes] == [("a", "label", 5), ("b", "reference", 2)]
    assert spec.sampler.guidance == 2.0 and isinstance(spec.sampler.guidance, float)
    assert spec.path("refs") == tmp_path / "refs" and spec.total == 7
    assert [b.indices for b in plan_batches(spec)] == [(0, 1, 2), (3, 4), (0, 1)]
    assert spec.sha256() != parse_spec(path.read_text().replace("batch_size = 3", "batch_size = 2")).sha256()


@pytest.mark.parametrize("text, needle", [
    ('[classes.a]\ncount = 0\nlabel = "x"\n', "line 2: classes.a.count: must be >= 1, got 0"),
    ('[classes.a]\nlabel = "x"\n', "classes.a.count: missing"),
    ('[classes.a]\ncount = 2\nlabel = "x"\nreference = "r"\n', "give exactly one condition source"),
    ('[classes.a]\ncount = 2\nlable = "x"\n', "line 3: classes.a.lable: unknown key"),
    ('[sampler]\nsteps = "ten"\n[classes.a]\ncount = 2\nlabel = "x"\n', "line 2: sampler.steps: must be int"),
    ('[sampler]\nguidance = nan\n[classes.a]\ncount = 2\nlabel = "x"\n', "sampler.guidance: must be a finite number"),
    ('[output]\nlayout = "coco"\n[classes.a]\ncount = 2\nlabel = "x"\n', "output.layout: unknown layout"),
    ('[output]\nlayout = "segmentation"\n[classes.a]\ncount = 2\nlabel = "x"\n', "needs a mask source"),
    ('[classes."../x"]\ncount = 2\nlabel = "x"\n', "not a safe folder name"),
    ('seed = 1\nseed = 2\n', "not valid TOML"),
    ('model = "m"\n', "classes: no classes"),
    ('[classes.a]\ncount = 2\nlabel = "x"\nstrength = 0.5\n', "classes.a.strength: only applies to a reference class"),
    ('[classes.a]\ncount = 2\nreference = "r"\nstrength = 0\n', "line 4: classes.a.strength: must be in (0, 1], got 0"),
    ('[sampler]\nquality = "fastest"\n[classes.a]\ncount = 2\nlabel = "x"\n', "line 2: sampler.quality: unknown quality"),
    ('[sampler]\nsampler = "ddim"\n[classes.a]\ncount = 2\nlabel = "x"\n', "line 2: sampler.sampler: unknown sampler"),
])
def test_spec_errors_name_the_key(text, needle):
    with pytest.raises(InputError, match=None) as err:
        parse_spec(text, "s.toml")
    assert needle in str(err.value) and str(err.value).startswith("s.toml")


def test_layouts():
    from pixgen.synth import Layout

    assert Layout().image("lung_aca", 7) == "lung_aca/0007.png" and Layout().masks("lung_aca", 7) is None
    seg = Layout("segmentation")
    assert (seg.image("a", 7), seg.masks("a", 7)) == ("images/a_00007.png", ("inst/a_00007.png", "types/a_00007.png"))


def test_image_seed_depends_on_seed_class_index_and_attempt_only():
    seeds = {image_seed(0, "a", 0), image_seed(1, "a", 0), image_seed(0, "b", 0), image_seed(0, "a", 1), image_seed(0, "a", 0, 1)}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)


# ---------------------------------------------------------------------------------------------
# Building a set
# ---------------------------------------------------------------------------------------------
def test_set_layout_manifest_and_records(tmp_path, model):
    out = tmp_path / "out"
    m = build_set(load_spec(_spec(tmp_path, model)), out, progress=False)
    assert sorted(p.name for p in (out / "tumour").iterdir()) == [f"{i:04d}.png" for i in range(5)]
    assert len(list((out / "stroma").iterdir())) == 4
    assert (out / "contact_sheet_tumour.png").is_file() and (out / "contact_sheet_stroma.png").is_file()
    loaded = SetManifest.load(out)
    assert loaded.complete and [e.file for e in loaded.files][:2] == ["tumour/0000.png", "tumour/0001.png"]
    assert loaded.files[6].seed == image_seed(7, "stroma", 1) and loaded.files[6].condition.label == "stroma"
    assert loaded.spec["classes"]["tumour"] == {"count": 5, "kind": "label", "source": "tumour"}
    assert loaded.spec["rejected_near_copies"] == 0 and loaded.sampler.n == 9
    rec = read_provenance(out / "stroma/0001.png")
    assert rec["seed"] == image_seed(7, "stroma", 1) and rec["attempts"] == 1 and rec["spec_sha256"] == m.spec["sha256"]
    from safetensors.torch import load_file

    assert load_file(str(out / "conditions.safetensors"))["embeddings"].shape == (9, 1, TINY_ENCODER_DIM)
    # image i of a class is the same whatever the other classes' counts are
    other = build_set(load_spec(_spec(tmp_path, model, counts=(2, 0), name="b.toml")), tmp_path / "b", progress=False)
    assert len(other.files) == 2
    from pixgen.io import load_rgb

    assert np.array_equal(load_rgb(tmp_path / "b/tumour/0001.png"), load_rgb(out / "tumour/0001.png"))


def test_quality_preset_sets_the_sampler_and_is_recorded(tmp_path, model):
    from pixgen.sampling import quality_preset

    path = tmp_path / "q.toml"
    path.write_text(f'model = "{model}"\n[sampler]\nquality = "fast"\n[classes.tumour]\ncount = 2\nlabel = "tumour"\n')
    m = build_set(load_spec(path), tmp_path / "out", progress=False)
    preset = quality_preset("fast")
    assert m.sampler.steps == preset.num_inference_steps and m.sampler.scheduler == "DPMSolverMultistepScheduler"
    plain = build_set(load_spec(_spec(tmp_path, model, counts=(2, 0), steps=preset.num_inference_steps, name="p.toml")),
                      tmp_path / "plain", progress=False)
    assert plain.sampler.scheduler != m.sampler.scheduler  # without the key: the model's own sampler


def test_rerun_skips_finished_images_and_refills_missing_ones(tmp_path, model):
    spec, out = load_spec(_spec(tmp_path, model)), tmp_path / "out"
    build_set(spec, out, progress=False)
    before = _files(out)
    keep = out / "tumour/0000.png"
    stamp = keep.stat().st_mtime_ns
    (out / "tumour/0003.png").unlink()
    (out / "stroma/0001.png").unlink()
    build_set(spec, out, progress=False)
    assert _files(out) == before and keep.stat().st_mtime_ns == stamp


def test_cancelled_by_the_callback_keeps_finished_batches_and_resumes_to_the_same_set(tmp_path, model, one_thread):
    from pixgen.sampling import SamplingCancelled

    spec, cut, straight = load_spec(_spec(tmp_path, model)), tmp_path / "cut", tmp_path / "straight"
    steps = []
    build_set(spec, straight, progress=False, callback=lambda step, *_: steps.append(step))
    assert steps == [0, 1] * 5  # 2 steps per batch; batches of 2: tumour 5 -> 3, stroma 4 -> 2
    calls = []
    with pytest.raises(SamplingCancelled):
        build_set(spec, cut, progress=False, callback=lambda *a: calls.append(1) or len(calls) < 5)  # in batch 3
    assert len(calls) == 5 and not SetManifest.load(cut).complete
    assert sorted(p.relative_to(cut).as_posix() for p in cut.glob("*/*.png")) == [f"tumour/000{i}.png" for i in range(4)]
    build_set(spec, cut, progress=False)  # the rerun finishes it
    assert SetManifest.load(cut).complete and _files(cut) == _files(straight)


def test_reference_and_embeddings_classes(tmp_path, model):
    from PIL import Image

    from pixgen.embeddings import Embeddings, save_embeddings

    refs = tmp_path / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(refs / f"r{k}.png")
    save_embeddings(tmp_path / "e.safetensors", Embeddings(torch.randn(3, 1, TINY_ENCODER_DIM), encoder="tiny-test"))
    path = tmp_path / "s.toml"
    path.write_text(f'model = "{model}"\n[sampler]\nsteps = 2\n[classes.ref]\ncount = 3\nreference = "refs"\n'
                    '[classes.emb]\ncount = 4\nembeddings = "e.safetensors"\n')
    m = build_set(load_spec(path), tmp_path / "out", progress=False)
    assert [e.condition.id for e in m.files[:3]] == ["r0.png", "r1.png", "r0.png"]
    assert m.files[0].condition.reference_sha256 and m.files[0].condition.kind == "reference"
    assert [e.condition.id for e in m.files[3:]] == [f"e.safetensors[{i}]" for i in (0, 1, 2, 0)]


def test_reference_strength_starts_from_the_reference(tmp_path, model):
    """strength < 1: img2img from each image's own reference; a small strength stays near its
    start (the reference through the autoencoder), strength 1 (the default) does not."""
    from PIL import Image

    from pixgen.io import load_rgb
    from pixgen.pipeline import Generator

    refs = tmp_path / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(refs / f"r{k}.png")
    sets = {}
    for strength in (0.1, None):
        path = tmp_path / f"s{strength}.toml"
        extra = "" if strength is None else f"strength = {strength}\n"
        path.write_text(f'model = "{model}"\n[sampler]\nsteps = 10\n[classes.ref]\ncount = 2\nreference = "refs"\n{extra}')
        m = build_set(load_spec(path), tmp_path / f"out{strength}", progress=False)
        sets[strength] = [load_rgb(tmp_path / f"out{strength}" / e.file).astype(float) for e in m.files]
    gen = Generator.from_pretrained(model)
    pixels = torch.from_numpy(np.stack([load_rgb(refs / f"r{k}.png") for k in range(2)])).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        start = gen.vae.decode(gen.vae.encode(pixels / 127.5 - 1))
    start = ((start.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    near = [np.abs(a - b).mean() for a, b in zip(sets[0.1], start)]
    far = [np.abs(a - b).mean() for a, b in zip(sets[None], start)]
    assert max(near) < min(far)
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(refs / "big.png")
    with pytest.raises(InputError, match="big.png is 48x48 px; with strength < 1"):
        build_set(load_spec(tmp_path / "s0.1.toml"), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# Masks classes (segmentation layout)
# ---------------------------------------------------------------------------------------------
_SEG = '[output]\nlayout = "segmentation"\n'


def _layouts(k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` 32 px layouts: two touching nuclei each (shifted), classes 1..3."""
    out = []
    for j in range(k):
        inst = np.zeros((32, 32), np.uint16)
        inst[4:12, 4 + j:12 + j], inst[14:24, 12 + j:20 + j] = 1, 2
        out.append((inst, np.where(inst > 0, 1 + j % 3, 0).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def mask_model(tmp_path_factory) -> Path:
    from pixgen.testing import save_tiny_mask_model

    items = [{"inst": i, "types": t, "tissue": "consep"} for i, t in _layouts(6)]
    return save_tiny_mask_model(tmp_path_factory.mktemp("synth-masks") / "mm", items)


def test_masks_classes_from_a_folder_and_sampled(tmp_path, model, mask_model):
    from PIL import Image

    from pixgen.mask_sampler import MaskSampler
    from pixgen.masks import fit_layout

    for k, (inst, types) in enumerate(_layouts(2)):
        for folder, arr in (("inst", inst), ("types", types)):
            (tmp_path / "masks" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(tmp_path / "masks" / folder / f"m{k}.png")
    path = tmp_path / "s.toml"
    path.write_text(f'model = "{model}"\nmask_model = "{mask_model}"\nseed = 7\n[sampler]\nsteps = 2\nbatch_size = 2\n'
                    f'{_SEG}[classes.a]\ncount = 3\nmasks = "masks"\nlabel = "tumour"\n'
                    '[classes.b]\ncount = 2\nmasks = "sampled:consep"\n')
    out = tmp_path / "out"
    m = build_set(load_spec(path), out, progress=False)
    names = ["a_00000.png", "a_00001.png", "a_00002.png", "b_00000.png", "b_00001.png"]
    for folder in ("images", "inst", "types"):
        assert sorted(p.name for p in (out / folder).iterdir()) == names

    def read(rel: str) -> np.ndarray:
        return np.asarray(Image.open(out / rel))

    for i in range(3):  # image i of a folder class uses layout i mod n
        inst, types = _layouts(2)[i % 2]
        assert read(f"inst/a_{i:05d}.png").dtype == np.uint16 and np.array_equal(read(f"inst/a_{i:05d}.png"), inst)
        assert np.array_equal(read(f"types/a_{i:05d}.png"), types)
    sampler = MaskSampler.from_json(mask_model / "mask_stats.json", "consep")
    for i in range(2):  # a sampled class: the sampler at the image's own seed
        want = fit_layout(sampler.sample(image_seed(7, "b", i)), 32)
        assert np.array_equal(read(f"inst/b_{i:05d}.png"), want.inst)
    assert [e.control_image for e in m.files] == [f"inst/{n}" for n in names]
    assert [e.condition.label for e in m.files[:3]] == ["tumour"] * 3 and m.files[3].condition.kind == "bank"
    assert m.spec["classes"]["a"] == {"count": 3, "kind": "masks", "source": "masks"}
    # a rerun writes nothing new
    pairs = [p for f in ("images", "inst", "types") for p in sorted((out / f).iterdir())]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in pairs}
    build_set(load_spec(path), out, progress=False)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in pairs} == before
    assert sum(1 for _ in out.rglob("*.png")) == len(pairs) + 2  # + the two contact sheets
    # the masks steer: the same image (seed, label draw) with the other layout differs
    (tmp_path / "swapped").mkdir()
    (tmp_path / "masks").rename(tmp_path / "swapped" / "masks")
    for folder in ("inst", "types"):
        (tmp_path / "swapped/masks" / folder / "m0.png").rename(tmp_path / "swapped/masks" / folder / "m2.png")
    (tmp_path / "swapped" / "s.toml").write_text(path.read_text().replace("count = 3", "count = 1"))
    build_set(load_spec(tmp_path / "swapped" / "s.toml"), tmp_path / "out2", progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out2/inst/a_00000.png")), _layouts(2)[1][0])
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "out2/images/a_00000.png")), read("images/a_00000.png"))


def test_a_masks_class_needs_the_segmentation_layout():
    with pytest.raises(InputError, match="needs the segmentation layout"):
        parse_spec('[classes.a]\ncount = 2\nmasks = "m"\n', "s.toml")
    spec = parse_spec(_SEG + '[classes.a]\ncount = 2\nmasks = "m"\nlabel = "consep"\n', "s.toml")
    assert (spec.classes[0].kind, spec.classes[0].source, spec.classes[0].label) == ("masks", "m", "consep")


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, needle", [
    ('[classes.a]\ncount = 2\nlabel = "lung_aca"\n', "unknown label 'lung_aca'"),
    ('[classes.a]\ncount = 2\nprompt = "adenocarcinoma"\n', "prompt conditions are not available in this model"),
    ('[classes.a]\ncount = 2\nreference = "nothing-here"\n', "no images in"),
    (_SEG + '[classes.a]\ncount = 2\nmasks = "nothing-here"\n', "no mask file or folder at"),
    (_SEG + '[classes.a]\ncount = 2\nmasks = "empty"\n', "no mask images in"),
    (_SEG + '[classes.a]\ncount = 2\nmasks = "sampled:lung"\n', "no mask statistics for tissue 'lung'"),
    (_SEG + '[classes.a]\ncount = 2\nmasks = "empty"\nlabel = "lung_aca"\n', "no mask images in"),
    (_SEG + '[classes.a]\ncount = 2\nmasks = "sampled:consep"\nlabel = "lung_aca"\n', "unknown label 'lung_aca'"),
])
def test_bad_classes_are_refused_before_anything_is_written(tmp_path, model, mask_model, body, needle):
    (tmp_path / "empty").mkdir()
    path = tmp_path / "s.toml"
    path.write_text(f'model = "{model}"\nmask_model = "{mask_model}"\n{body}')
    with pytest.raises(InputError, match=needle):
        build_set(load_spec(path), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_another_set_is_refused(tmp_path, model, monkeypatch):
    out = tmp_path / "out"
    build_set(load_spec(_spec(tmp_path, model)), out, progress=False)
    before = _files(out)
    with pytest.raises(InputError, match="holds the set of another spec"):
        build_set(load_spec(_spec(tmp_path, model, batch_size=3, name="other.toml")), out, progress=False)
    from pixgen.cli import main

    assert main(["generate", "--model", str(model), "--label", "tumour", "--n", "1", "--steps", "1",
                 "--out", str(tmp_path / "gen")]) == 0
    with pytest.raises(InputError, match="holds a set written by `pixgen generate`"):
        build_set(load_spec(_spec(tmp_path, model)), tmp_path / "gen", progress=False)
    (out / "tumour" / "0000.png").unlink()  # resumed over changed weights: refused
    import pixgen.io.manifest

    monkeypatch.setattr(pixgen.io.manifest, "weights_sha256", lambda folder: ("0" * 64, 3))
    with pytest.raises(InputError, match="started with other weights"):
        build_set(load_spec(_spec(tmp_path, model)), out, progress=False)
    monkeypatch.undo()
    build_set(load_spec(_spec(tmp_path, model)), out, progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        build_set(load_spec(_spec(tmp_path, model)), tmp_path / "foreign", progress=False)
    assert _files(out) == before


def test_disk_full_is_a_clear_error_and_leaves_nothing_half_written(tmp_path, model, monkeypatch):
    from PIL import Image

    spec, out = load_spec(_spec(tmp_path, model)), tmp_path / "out"
    real_save, calls = Image.Image.save, []

    def save(self, fp, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:  # the 4th file: a few bytes reach the disk, then it is full
            fp.write(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(InputError, match="disk full") as err:
        build_set(spec, out, progress=False)
    assert "rerun the same command" in str(err.value)
    assert not [p for p in out.rglob("*") if ".part" in p.name]
    written = sorted(out.rglob("*.png"))
    assert len(written) == 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    assert not SetManifest.load(out).complete
    monkeypatch.setattr(Image.Image, "save", real_save)
    build_set(spec, out, progress=False)
    reference = tmp_path / "ref"
    build_set(spec, reference, progress=False)
    assert _files(out) == _files(reference)


# ---------------------------------------------------------------------------------------------
# Processes: kill -9 and resume; 2 processes = 1 process
# ---------------------------------------------------------------------------------------------
def _build_one_thread(spec: Path, out: Path) -> None:
    """The in-process reference run with one torch thread, as the subprocesses run (OMP_NUM_THREADS=1):
    CPU matrix products reduce in another order with more threads, so bytes are compared at equal threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_set(load_spec(spec), out, progress=False)
    finally:
        torch.set_num_threads(threads)


def _cli(spec: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pixgen.cli", "synth", str(spec), "--out", str(out), "--no-progress"]


@pytest.mark.timeout(300)
def test_killed_run_resumed_equals_an_uninterrupted_one(tmp_path, model):
    spec = _spec(tmp_path, model, counts=(80, 80), batch_size=4, steps=4)
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    proc = subprocess.Popen(_cli(spec, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 200
    while len(list(killed.glob("*/*.png"))) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert not SetManifest.load(killed).complete and len(list(killed.glob("*/*.png"))) < 160
    subprocess.run(_cli(spec, killed), env=_env(), check=True, capture_output=True, timeout=250)
    _build_one_thread(spec, straight)
    assert not [p for p in killed.rglob("*") if ".part" in p.name]
    assert _files(killed) == _files(straight) and len(_files(straight)) == 160 + 3
    assert [e.file for e in SetManifest.load(killed).files] == [e.file for e in SetManifest.load(straight).files]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_processes_write_the_same_set_as_one(tmp_path, model):
    spec = _spec(tmp_path, model, counts=(7, 6), batch_size=2, steps=3)
    two, one = tmp_path / "two", tmp_path / "one"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "pixgen.cli", "synth", str(spec), "--out", str(two), "--no-progress"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _build_one_thread(spec, one)
    assert _files(two) == _files(one) and len(_files(one)) == 13 + 3
    m2, m1 = SetManifest.load(two), SetManifest.load(one)
    assert m2.complete and [(e.file, e.seed, e.condition) for e in m2.files] == [(e.file, e.seed, e.condition) for e in m1.files]
    assert "wrote 13 images" in proc.stdout and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# --reject-near-copies and --eval
# ---------------------------------------------------------------------------------------------
def test_reject_near_copies_regenerates_planted_copies_and_counts_them(tmp_path, model, monkeypatch):
    import metrics.report

    from pixgen.cli import main

    spec = _spec(tmp_path, model, counts=(6, 0))
    train, baseline, out = tmp_path / "train", tmp_path / "baseline", tmp_path / "out"
    build_set(load_spec(spec), train, progress=False)  # the "training set" holds exactly what the spec makes
    other = tmp_path / "other.toml"
    other.write_text(spec.read_text().replace("seed = 7", "seed = 99").replace("count = 6", "count = 30"))
    build_set(load_spec(other), baseline, progress=False)
    calls = []
    monkeypatch.setattr(metrics.report, "evaluate", lambda *a, **k: calls.append((a, k)))
    assert main(["synth", str(spec), "--out", str(out), "--reject-near-copies", "--train", str(train),
                 "--eval", str(baseline / "tumour"), "--no-progress"]) == 0
    m = SetManifest.load(out)
    records = [read_provenance(out / e.file) for e in m.files]
    assert m.spec["rejected_near_copies"] == sum(r["attempts"] - 1 for r in records) >= 6
    assert m.spec["kept_near_copies"] == 0 and all(r["attempts"] >= 2 for r in records)
    assert all(e.seed != image_seed(7, "tumour", i) for i, e in enumerate(m.files))
    assert m.spec["eval_report"] == "eval/report.md"
    (args, kwargs), = calls
    assert args == (str(baseline / "tumour"), str(out), str(train)) and kwargs["out"] == out / "eval"


def test_reject_near_copies_needs_a_baseline(tmp_path, model):
    from pixgen.cli import main

    assert main(["synth", str(_spec(tmp_path, model)), "--out", str(tmp_path / "o"), "--reject-near-copies"]) == 1
    assert not (tmp_path / "o").exists()
