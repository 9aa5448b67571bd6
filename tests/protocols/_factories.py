"""Small bundles, keys and updates for the protocols tests (tiny, seeded, fast)."""

from __future__ import annotations

import numpy as np

from protocols.bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, ReferenceBundle, make_bundle


def tiny_manifest_and_tensors(
    n_genes: int = 4, n_cond: int = 2, hidden: int = 3, seed: int = 0
) -> tuple[dict, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    conditions = [f"ref/study{i}" for i in range(n_cond)]
    tensors = {
        "encoder.W_x": rng.normal(size=(hidden, n_genes)).astype(np.float32),
        "encoder.W_s": rng.normal(size=(hidden, n_cond)).astype(np.float32),
        "decoder.W_s": rng.normal(size=(hidden, n_cond)).astype(np.float32),
        "decoder.bias": rng.normal(size=(hidden,)).astype(np.float32),
        "px_r": rng.normal(size=(n_genes, n_cond)).astype(np.float32),
    }
    spec = {
        "encoder.W_x": {"role": "frozen"},
        "encoder.W_s": {"role": "condition", "axis": 1},
        "decoder.W_s": {"role": "condition", "axis": 1},
        "decoder.bias": {"role": "frozen"},
        "px_r": {"role": "condition", "axis": 1},
    }
    for name, arr in tensors.items():
        spec[name].update({"dtype": "float32", "shape": list(arr.shape)})
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "model_class": "scarches_fl.CVAE",
        "hyperparameters": {"likelihood": "nb", "n_hidden": hidden, "dropout": 0.1},
        "genes": [f"G{i}" for i in range(n_genes)],
        "conditions": conditions,
        "tensors": spec,
        "registration": {"batch_key": "batch"},
        "labels": {},
    }
    return manifest, tensors


def tiny_bundle(**kw) -> ReferenceBundle:
    manifest, tensors = tiny_manifest_and_tensors(**kw)
    return make_bundle(manifest, tensors)


def tiny_diff(base: ReferenceBundle, m: int = 1, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in base.manifest["tensors"].items():
        if spec["role"] == "condition":
            shape = list(spec["shape"])
            shape[spec["axis"]] = m
            out[name] = rng.normal(size=shape).astype(np.float32)
    return out
