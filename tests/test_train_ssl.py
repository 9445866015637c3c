"""training.ssl and the bundled encoder: H&E augmentations, DINO learns on a repeated batch,
checkpoint + resume, evaluation, and the ``bundled`` loader round trip."""

from __future__ import annotations

import csv
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pixgen.encoders import get_encoder_spec, load_encoder
from pixgen.encoders.bundled import SSL_MODEL_ARGS, BundledEncoder, build_vit
from pixgen.encoders.spec import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec
from pixgen.errors import ModelLoadError
from test_train_autoencoder import make_tiny_data  # tests/ is on sys.path (pytest rootdir)
from training.autoencoder import load_rgb
from training.ssl import (
    DINO,
    SSLConfig,
    dino_loss,
    finalize,
    gaussian_blur,
    he_view,
    hed_jitter,
    normalise,
    random_resized_crop,
    teacher_entropy,
    train_ssl,
)

TINY_ARGS = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "dynamic_img_size": True}
TINY = dict(model_args=TINY_ARGS, global_size=16, local_size=8, n_local=2, batch_size=4, out_dim=64, head_hidden=32,
            bottleneck=16, threads=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def he_tile(shared_data: Path) -> np.ndarray:
    return load_rgb(next((shared_data / "consep" / "train" / "images").glob("*.jpg")))


def test_augmentations_keep_uint8_range_and_shape(he_tile: np.ndarray):
    rng = np.random.default_rng(0)
    for out, shape in [
        (hed_jitter(he_tile, rng), he_tile.shape),
        (gaussian_blur(he_tile, rng), he_tile.shape),
        (random_resized_crop(he_tile, 48, (0.1, 0.5), rng), (48, 48, 3)),
        (he_view(he_tile, 64, (0.35, 1.0), rng, blur_p=1.0), (64, 64, 3)),
    ]:
        assert out.dtype == np.uint8 and out.shape == shape
    jittered = hed_jitter(he_tile, rng, scale=0.0, bias=0.0)  # identity up to HED round-trip rounding
    assert np.abs(jittered.astype(int) - he_tile).mean() < 2.0


def test_dino_learns_on_a_repeated_real_batch(he_tile: np.ndarray):
    cfg = SSLConfig(**TINY)
    rng = np.random.default_rng(0)
    glob = np.stack([np.stack([he_view(he_tile, 16, (0.35, 1), rng) for _ in range(4)]) for _ in range(2)])
    loc = np.stack([np.stack([he_view(he_tile, 8, (0.1, 0.35), rng) for _ in range(4)]) for _ in range(2)])
    student, teacher = DINO(cfg), DINO(cfg)
    teacher.load_state_dict(student.state_dict())
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    g, local, center = normalise(glob), normalise(loc), torch.zeros(cfg.out_dim)
    kls = []
    for _ in range(10):
        with torch.no_grad():
            t_out = teacher([g])
        loss = dino_loss(student([g, local]), t_out, center, 4, 2, cfg.student_temp, cfg.teacher_temp)
        opt.zero_grad()
        loss.backward()
        opt.step()
        kls.append(float(loss.detach()) - teacher_entropy(t_out, center, cfg.teacher_temp))  # KL(teacher||student)
    assert np.isfinite(kls).all()
    assert kls[-1] < kls[0], kls


def test_train_resume_evaluate_export(shared_data: Path, tmp_path: Path):
    data = make_tiny_data(tmp_path / "data", shared_data)
    out = tmp_path / "run"
    cfg = SSLConfig(data=str(data), out=str(out), max_steps=2, log_every=1, checkpoint_every=1, eval_every=0,
                    lc_split=str(data / "lc_split.json"), **TINY)
    assert train_ssl(cfg)["step"] == 2
    cfg.max_steps = 4
    resumed = train_ssl(cfg, resume=True)
    assert resumed["step"] == 4 and np.isfinite(resumed["last_loss"])
    with (out / "log.csv").open() as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4]
    from safetensors.torch import load_file

    from training.engine import Engine
    from training.ssl import SSLTask

    class Killed(Exception):
        pass

    class KillAt3(Engine):
        def on_step_end(self, step, logs):
            if step == 3:
                raise Killed

    kwargs = {**dataclasses.asdict(cfg), "max_steps": 4}
    with pytest.raises(Killed):
        KillAt3(SSLTask(SSLConfig(**{**kwargs, "out": str(tmp_path / "killed")})), tmp_path / "killed").fit()
    killed = train_ssl(SSLConfig(**{**kwargs, "out": str(tmp_path / "killed")}), resume=True)
    straight = train_ssl(SSLConfig(**{**kwargs, "out": str(tmp_path / "straight")}))
    files = sorted(p.name for p in killed["final"].glob("*.safetensors"))
    assert files and files == sorted(p.name for p in straight["final"].glob("*.safetensors"))
    for name in files:  # killed at 3 + resumed == 4 straight: teacher, centre and schedules restored
        a, b = load_file(killed["final"] / name), load_file(straight["final"] / name)
        assert all(torch.equal(a[k], b[k]) for k in a)

    report = finalize(SSLConfig(data=str(data), out=str(out), threads=1), export=str(tmp_path / "enc"), eval_limit=0)
    for which in ("trained", "random_init"):
        assert 0 <= report[which]["lc25000_probe"]["accuracy"] <= 1
        assert report[which]["consep_knn"]["n_queries"] > 0
    enc = load_encoder(str(tmp_path / "enc"))
    assert enc.name == "pixgen-ssl" and enc.dim == 32 and enc.input_size == 16


def _tiny_encoder() -> BundledEncoder:
    spec = EncoderSpec(name="tiny-bundled", dim=32, input_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=1.0,
                       source="bundled", library="bundled")
    return BundledEncoder(spec, build_vit(TINY_ARGS), TINY_ARGS).eval()


def test_bundled_loader_round_trip_gives_identical_embeddings(he_tile: np.ndarray, tmp_path: Path):
    enc = _tiny_encoder()
    enc.save_pretrained(tmp_path / "tiny")
    loaded = load_encoder(str(tmp_path / "tiny"))
    assert type(loaded).__name__ == "BundledEncoder" and loaded.spec == enc.spec
    tiles = np.stack([he_tile[:64, :64], he_tile[64:128, 64:128]])
    assert torch.equal(loaded.embed(tiles), enc.embed(tiles))


def test_pixgen_ssl_is_registered_and_loads_from_local_path(he_tile: np.ndarray, tmp_path: Path):
    spec = get_encoder_spec("pixgen-ssl")
    assert (spec.library, spec.dim, spec.input_size, spec.mpp) == ("bundled", 192, 64, 1.0)
    enc = BundledEncoder(spec, build_vit(SSL_MODEL_ARGS), SSL_MODEL_ARGS).eval()
    enc.save_pretrained(tmp_path / "ssl")
    loaded = load_encoder("pixgen-ssl", local_path=str(tmp_path / "ssl"))
    assert torch.equal(loaded.embed(he_tile[None]), enc.embed(he_tile[None]))
    with pytest.raises(ModelLoadError, match="no weights for bundled encoder"):
        load_encoder("pixgen-ssl", local_path=str(tmp_path))


def test_importing_the_encoders_package_does_not_import_timm():
    import subprocess

    code = "import sys, pixgen.encoders; assert 'timm' not in sys.modules, 'timm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
