"""The audit's linear-time replay gives apply rule and content digest, version by version."""

from __future__ import annotations

import numpy as np

from protocols._audit_replay import ModelReplay
from protocols.bundle import make_bundle, manifest_leaf
from protocols.diff import apply_condition_diff


def _bundle(rng: np.random.Generator) -> object:
    genes = [f"g{i}" for i in range(30)]
    conds = ["ref/a", "ref/b"]
    tensors = {
        "enc.W_x": rng.standard_normal((6, 30)).astype(np.float32),
        "enc.W_s": rng.standard_normal((6, 2)).astype(np.float32),
        "px_r": rng.standard_normal((2, 30)).astype(np.float32),  # condition axis 0
        "z.W_s": rng.standard_normal((3, 2, 4)).astype(np.float32),  # condition axis 1 of 3
    }
    specs = {
        "enc.W_x": {"role": "frozen", "dtype": "float32", "shape": [6, 30]},
        "enc.W_s": {"role": "condition", "axis": 1, "dtype": "float32", "shape": [6, 2]},
        "px_r": {"role": "condition", "axis": 0, "dtype": "float32", "shape": [2, 30]},
        "z.W_s": {"role": "condition", "axis": 1, "dtype": "float32", "shape": [3, 2, 4]},
    }
    manifest = {
        "format": "scarches-fl.bundle", "format_version": 1, "model_class": "test",
        "hyperparameters": {"n": 1}, "genes": genes, "conditions": conds, "tensors": specs,
        "registration": {}, "labels": {"note": "ref/a \u00e9\u0001"},
    }
    return make_bundle(manifest, tensors)


def test_replay_matches_apply_condition_diff() -> None:
    rng = np.random.default_rng(7)
    bundle = _bundle(rng)
    replay = ModelReplay(bundle)  # type: ignore[arg-type]
    assert replay.digest() == bundle.digest  # type: ignore[attr-defined]
    for step in range(40):
        m = 1 + step % 3
        diff = {
            "enc.W_s": rng.standard_normal((6, m)).astype(np.float32),
            "px_r": rng.standard_normal((m, 30)).astype(np.float32),
            "z.W_s": rng.standard_normal((3, m, 4)).astype(np.float32),
        }
        names = [f"s{step % 4}/b{step}_{j}" for j in range(m)]
        bundle = apply_condition_diff(bundle, diff, names)  # type: ignore[arg-type]
        replay.apply(diff, names)
        if step % 7 == 0 or step == 39:
            assert replay.manifest_leaf() == manifest_leaf(replay.manifest())
            assert replay.digest() == bundle.digest  # type: ignore[attr-defined]
    full = replay.bundle()
    assert full.digest == bundle.digest  # type: ignore[attr-defined]
    for name, arr in bundle.tensors.items():  # type: ignore[attr-defined]
        assert np.array_equal(full.tensors[name], arr)
