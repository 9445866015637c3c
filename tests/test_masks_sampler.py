"""The mask sampler: seeded layouts whose statistics match the training masks they were fitted on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pixgen.errors import InputError
from pixgen.mask_sampler import MaskSampler, fit_stats, layout_stats


@pytest.fixture(scope="module")
def consep(shared_data):
    from training.data.masks import CoNSePDataset

    ds = CoNSePDataset(shared_data / "consep", "train")
    items = [{"inst": s["inst"], "types": s["types"], "tissue": "consep"} for s in (ds[i] for i in range(0, 432, 6))]
    return items, fit_stats(items)


def _summary(layouts) -> dict[str, float]:
    s = [layout_stats(inst, types) for inst, types in layouts]
    cls = np.concatenate([x["cls"] for x in s])
    return {"count": np.mean([x["count"] for x in s]), "major": np.median(np.concatenate([x["major"] for x in s])),
            "area": np.median(np.concatenate([x["area"] for x in s])),
            "nn": np.median(np.concatenate([x["nn"] for x in s])),
            **{f"class{k}": float(np.mean(cls == k)) for k in (1, 2, 3, 4)}}


def test_sampled_layouts_match_the_training_statistics(consep):
    from pixgen.masks import downsample_layout

    items, stats = consep
    json.dumps(stats)  # small and JSON-able
    real = _summary(downsample_layout(it["inst"], it["types"], 2) for it in items)
    sampler = MaskSampler(stats, "consep")
    fake = _summary((lay.inst, lay.types) for lay in (sampler.sample(i) for i in range(60)))
    assert abs(fake["count"] - real["count"]) < 0.15 * real["count"], (real, fake)
    for key in ("major", "area"):
        assert abs(fake[key] - real[key]) < 0.25 * real[key], (key, real, fake)
    assert abs(fake["nn"] - real["nn"]) < 0.3 * real["nn"], (real, fake)
    for k in (1, 2, 3, 4):
        assert abs(fake[f"class{k}"] - real[f"class{k}"]) < 0.1, (k, real, fake)


def test_layouts_are_seeded_and_valid(consep):
    sampler = MaskSampler(consep[1], "consep")
    a, b, c = sampler.sample(5), sampler.sample(5), sampler.sample(6)
    assert np.array_equal(a.inst, b.inst) and not np.array_equal(a.inst, c.inst)
    assert a.shape == (128, 128) and a.types is not None and set(np.unique(a.types)) <= {0, 1, 2, 3, 4}
    assert ((a.types > 0) == (a.inst > 0)).all()  # every nucleus has a class
    assert np.array_equal(np.unique(a.inst), np.arange(a.inst.max() + 1))  # ids 1..N, no overlaps lost


def test_unknown_tissue_is_refused(consep, tmp_path):
    with pytest.raises(InputError, match="no mask statistics for tissue 'lung'"):
        MaskSampler(consep[1], "lung")
    with pytest.raises(InputError, match="no mask statistics at"):
        MaskSampler.from_json(tmp_path / "none.json", "consep")
