"""Synthetic reference bundles and site diffs for coordinator tests and benchmarks.

numpy + protocols.bundle only (no torch): the tensor layout of the default conditional VAE
(two hidden layers, latent 10, NB likelihood with per-condition dispersion), with random
weights. The coordinator never looks at what the numbers mean, only at roles, shapes and
finiteness.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from protocols.bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, ReferenceBundle, make_bundle

__all__ = ["synthetic_reference", "synthetic_diff"]


def _layout(n_genes: int, n_cond: int, n_hidden: int, n_latent: int, n_layers: int) -> dict:
    """name -> (shape, role, axis)."""
    spec: dict[str, tuple[tuple[int, ...], str, int | None]] = {}
    spec["encoder.0.W_x"] = ((n_hidden, n_genes), "frozen", None)
    spec["encoder.0.W_s"] = ((n_hidden, n_cond), "condition", 1)
    spec["encoder.0.bias"] = ((n_hidden,), "frozen", None)
    for i in range(1, n_layers):
        spec[f"encoder.{i}.weight"] = ((n_hidden, n_hidden), "frozen", None)
        spec[f"encoder.{i}.bias"] = ((n_hidden,), "frozen", None)
    spec["encoder.mean.weight"] = ((n_latent, n_hidden), "frozen", None)
    spec["encoder.mean.bias"] = ((n_latent,), "frozen", None)
    spec["encoder.var.weight"] = ((n_latent, n_hidden), "frozen", None)
    spec["encoder.var.bias"] = ((n_latent,), "frozen", None)
    spec["decoder.0.W_x"] = ((n_hidden, n_latent), "frozen", None)
    spec["decoder.0.W_s"] = ((n_hidden, n_cond), "condition", 1)
    spec["decoder.0.bias"] = ((n_hidden,), "frozen", None)
    for i in range(1, n_layers):
        spec[f"decoder.{i}.weight"] = ((n_hidden, n_hidden), "frozen", None)
        spec[f"decoder.{i}.bias"] = ((n_hidden,), "frozen", None)
    spec["decoder.scale.weight"] = ((n_genes, n_hidden), "frozen", None)
    spec["decoder.scale.bias"] = ((n_genes,), "frozen", None)
    spec["px_r"] = ((n_genes, n_cond), "condition", 1)
    return spec


def synthetic_reference(
    *,
    n_genes: int = 50,
    conditions: Sequence[str] = ("ref/study1", "ref/study2"),
    n_hidden: int = 16,
    n_latent: int = 4,
    n_layers: int = 2,
    seed: int = 0,
    labels: dict | None = None,
) -> ReferenceBundle:
    rng = np.random.default_rng(seed)
    layout = _layout(n_genes, len(conditions), n_hidden, n_latent, n_layers)
    tensors = {
        name: (rng.standard_normal(shape) * 0.1).astype(np.float32)
        for name, (shape, _r, _a) in layout.items()
    }
    specs = {}
    for name, (shape, role, axis) in layout.items():
        s: dict = {"role": role, "dtype": "float32", "shape": list(shape)}
        if role == "condition":
            s["axis"] = axis
        specs[name] = s
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "model_class": "scarches_fl.CVAE",
        "hyperparameters": {
            "likelihood": "nb",
            "dispersion": "gene-batch",
            "n_hidden": n_hidden,
            "n_layers": n_layers,
            "n_latent": n_latent,
        },
        "genes": [f"GENE{i:05d}" for i in range(n_genes)],
        "conditions": list(conditions),
        "tensors": specs,
        "registration": {"batch_key": "batch", "layer": None},
        "labels": labels or {},
    }
    return make_bundle(manifest, tensors)


def synthetic_diff(
    base: ReferenceBundle, m: int, *, seed: int = 1, scale: float = 0.1
) -> dict[str, np.ndarray]:
    """Random condition slices for ``m`` new conditions of ``base``."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in base.manifest["tensors"].items():
        if spec["role"] != "condition":
            continue
        shape = list(spec["shape"])
        shape[spec["axis"]] = m
        out[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    return out
