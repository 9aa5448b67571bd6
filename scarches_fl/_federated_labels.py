"""Label knowledge for a federated reference, from per-site sufficient statistics (no Flower,
no keys: the ServerApp and the ClientApp are thin shells around these functions).

When a federation trains with a label key, training ends with two exchanges on the final model:

1. **Statistics.** Every site embeds its cells (posterior means) and sends, for each cell type
   with at least ``site_floor`` labelled cells at that site, the count, the sum of the latent
   vectors and the scatter matrix about the site's own type mean (:func:`site_statistics`). A
   type with fewer cells at a site does not leave it. The coordinator pools the shares
   (:func:`pool_statistics`: the pooled mean and within-type scatter are exact, the same numbers
   the pooled cells would give) and keeps a type only when the pooled count reaches
   ``min_cells`` (the k of the label policy, default 20). Each type becomes one prototype (mean,
   per-dimension spread, count); the shared covariance is the pooled within-type scatter; class
   priors are the pooled counts (:func:`prototype_model`).
2. **Calibration.** The coordinator sends that prototype model back; every site scores its own
   labelled cells with it and sends, summed over those cells, the negative log-likelihood of the
   true type at each temperature of the grid :func:`scarches_fl.labels` fits on, a histogram of
   the novelty statistic (smallest squared Mahalanobis distance to a prototype) over fixed bins,
   and the number classified correctly (:func:`site_calibration`). The coordinator picks the
   temperature with the smallest pooled NLL and reads the novelty quantiles off the pooled
   histogram (:func:`calibrate`). No per-cell value leaves a site in either exchange.

The result has the schema of :func:`scarches_fl.labels.build_label_knowledge`
(``manifest["labels"]``), so ``map --label-key`` uses it as it uses a central reference's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scarches_fl import labels as L

__all__ = [
    "DEFAULT_SITE_FLOOR",
    "TEMPERATURE_GRID",
    "NOVELTY_BINS",
    "TypeStatistics",
    "site_label_types",
    "label_codes",
    "site_statistics",
    "statistics_to_arrays",
    "statistics_from_arrays",
    "pool_statistics",
    "prototype_model",
    "site_calibration",
    "calibrate",
    "label_knowledge",
]

#: A type leaves a site only with at least this many labelled cells there (ADR 0036).
DEFAULT_SITE_FLOOR = 5
#: The temperatures :func:`scarches_fl.labels._fit_temperature` searches.
TEMPERATURE_GRID = np.exp(np.linspace(math.log(0.05), math.log(200.0), 61))
#: Right edges of the novelty histogram (squared Mahalanobis distance), log-spaced; the last
#: bin also holds everything beyond.
NOVELTY_BINS = np.concatenate([[0.0], np.geomspace(1e-3, 1e5, 400)])


@dataclass
class TypeStatistics:
    """Sufficient statistics of one cell type's latent vectors: count, sum, and the scatter
    matrix about their own mean."""

    n: int
    total: np.ndarray  # (d,)
    scatter: np.ndarray  # (d, d)

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.n


def site_label_types(labels: Any, *, site_floor: int = DEFAULT_SITE_FLOOR) -> list[str]:
    """The names of the types with at least ``site_floor`` labelled cells (what a site's
    descriptor announces when the federation trains with a label key)."""
    y = L._clean_labels(labels, len(np.asarray(labels, dtype=object).reshape(-1)), "labels")
    names, counts = np.unique([v for v in y if v is not None], return_counts=True)
    return [str(n) for n, c in zip(names, counts, strict=True) if c >= max(1, int(site_floor))]


def label_codes(labels: Any, classes: Sequence[str]) -> np.ndarray:
    """int64 code of each cell's label in ``classes``; -1 for unlabelled cells and types not in
    ``classes`` (trained as unlabelled)."""
    y = L._clean_labels(labels, len(np.asarray(labels, dtype=object).reshape(-1)), "labels")
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index.get(v, -1) if v is not None else -1 for v in y], dtype=np.int64)


def site_statistics(
    latent: Any, labels: Any, *, site_floor: int = DEFAULT_SITE_FLOOR
) -> dict[str, TypeStatistics]:
    """Per type with at least ``site_floor`` labelled cells: its :class:`TypeStatistics`.
    Unlabelled cells (missing or "unknown"-like values) count for nothing."""
    z = L._check_latent(latent, "the site's latent")
    y = L._clean_labels(labels, z.shape[0], "labels")
    out: dict[str, TypeStatistics] = {}
    names = sorted({v for v in y if v is not None})
    for name in names:
        zc = z[np.array([v == name for v in y])]
        if zc.shape[0] < max(1, int(site_floor)):
            continue
        mean = zc.mean(axis=0)
        r = zc - mean
        out[name] = TypeStatistics(int(zc.shape[0]), zc.sum(axis=0), r.T @ r)
    return out


def statistics_to_arrays(
    stats: Mapping[str, TypeStatistics],
) -> tuple[list[str], dict[str, np.ndarray]]:
    """(type names in order, arrays ``counts`` (T,), ``sums`` (T, d), ``scatter`` (T, d, d))."""
    names = sorted(stats)
    if not names:
        return [], {}
    return names, {
        "counts": np.asarray([stats[n].n for n in names], dtype=np.float64),
        "sums": np.stack([stats[n].total for n in names]).astype(np.float64),
        "scatter": np.stack([stats[n].scatter for n in names]).astype(np.float64),
    }


def statistics_from_arrays(
    names: Sequence[str], arrays: Mapping[str, np.ndarray], *, n_latent: int
) -> dict[str, TypeStatistics]:
    """The inverse of :func:`statistics_to_arrays`; ``ValueError`` for shapes that do not fit
    ``len(names)`` types in ``n_latent`` dimensions, non-finite numbers or counts that are not
    positive integers."""
    t = len(names)
    if t == 0:
        return {}
    if len(set(names)) != t:
        raise ValueError("a type is named twice")
    want = {"counts": (t,), "sums": (t, n_latent), "scatter": (t, n_latent, n_latent)}
    if set(arrays) != set(want):
        raise ValueError(f"arrays must be exactly {sorted(want)}")
    for k, shape in want.items():
        a = np.asarray(arrays[k])
        if a.shape != shape:
            raise ValueError(f"{k} has shape {list(a.shape)}, expected {list(shape)}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{k} holds NaN or infinity")
    counts = np.asarray(arrays["counts"])
    if np.any(counts < 1) or np.any(counts != np.round(counts)):
        raise ValueError("counts must be positive integers")
    return {
        str(n): TypeStatistics(
            int(counts[i]),
            np.asarray(arrays["sums"][i], dtype=np.float64),
            np.asarray(arrays["scatter"][i], dtype=np.float64),
        )
        for i, n in enumerate(names)
    }


def pool_statistics(shares: Sequence[Mapping[str, TypeStatistics]]) -> dict[str, TypeStatistics]:
    """Exact pooling: counts and sums add; the pooled within-type scatter adds each share's
    scatter and its between-share term ``n_s (m_s - m)(m_s - m)^T``."""
    out: dict[str, TypeStatistics] = {}
    for name in sorted({n for s in shares for n in s}):
        parts = [s[name] for s in shares if name in s]
        n = sum(p.n for p in parts)
        total = np.sum([p.total for p in parts], axis=0)
        mean = total / n
        scatter = np.zeros_like(parts[0].scatter)
        for p in parts:
            dm = (p.mean - mean)[:, None]
            scatter = scatter + p.scatter + p.n * (dm @ dm.T)
        out[name] = TypeStatistics(int(n), total, scatter)
    return out


def prototype_model(pooled: Mapping[str, TypeStatistics], *, min_cells: int) -> dict[str, Any]:
    """One prototype per type with at least ``min_cells`` pooled cells; the fields of a central
    reference's prototype level except the calibration. Raises ``ValueError`` when no type
    qualifies."""
    kept = sorted(n for n, s in pooled.items() if s.n >= int(min_cells))
    if not kept:
        raise ValueError(
            f"no cell type has {min_cells} labelled cells across the sites; lower the label "
            "floor or train without --label-key"
        )
    d = pooled[kept[0]].total.shape[0]
    n_total = sum(pooled[n].n for n in kept)
    within = np.sum([pooled[n].scatter for n in kept], axis=0)
    cov = within / max(n_total - len(kept), 1)
    ridge = 1e-3 * float(np.trace(cov)) / d + 1e-9
    cov = cov + ridge * np.eye(d)
    protos = []
    for n in kept:
        s = pooled[n]
        var = np.diag(s.scatter) / max(s.n - 1, 1)
        protos.append(
            {
                "label": n,
                "mean": L._floats(s.mean),
                "std": L._floats(np.sqrt(np.maximum(var, 1e-12))),
                "weight": 1.0,
                "n_cells": int(s.n),
            }
        )
    counts = np.asarray([pooled[n].n for n in kept], dtype=np.float64)
    return {
        "min_cells": int(min_cells),
        "type_cell_counts": {n: int(pooled[n].n) for n in kept},
        "few_cell_types": {},
        "excluded_types": {},
        "classes": kept,
        "cell_counts": [int(c) for c in counts],
        "prototypes": protos,
        "shared_covariance": L._floats(cov),
        "class_prior": L._floats(counts / counts.sum()),
    }


def site_calibration(model: Mapping[str, Any], latent: Any, labels: Any) -> dict[str, np.ndarray]:
    """Sums over the site's cells of a kept type: ``nll`` (per temperature of
    :data:`TEMPERATURE_GRID`), ``novelty_hist`` (counts per bin of :data:`NOVELTY_BINS`, the
    last bin open-ended), ``counts`` = [cells scored, cells classified correctly]."""
    z = L._check_latent(latent, "the site's latent")
    y = L._clean_labels(labels, z.shape[0], "labels")
    classes = list(model["classes"])
    index = {c: i for i, c in enumerate(classes)}
    rows = np.array([v is not None and v in index for v in y])
    nll = np.zeros(len(TEMPERATURE_GRID))
    hist = np.zeros(len(NOVELTY_BINS) - 1)
    counts = np.zeros(2)
    if rows.any():
        yk = np.array([index[v] for v in y[rows]])
        logits, maha = L._proto_scores(z[rows], model, classes)
        for i, t in enumerate(TEMPERATURE_GRID):
            p = L._softmax(logits / t)
            nll[i] = -np.sum(np.log(np.clip(p[np.arange(len(yk)), yk], 1e-12, None)))
        bins = np.clip(np.searchsorted(NOVELTY_BINS, maha, side="right") - 1, 0, len(hist) - 1)
        hist = np.bincount(bins, minlength=len(hist)).astype(np.float64)
        counts = np.asarray([len(yk), int(np.sum(logits.argmax(axis=1) == yk))], dtype=np.float64)
    return {"nll": nll, "novelty_hist": hist, "counts": counts}


def calibrate(shares: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """The calibration block of a prototype level from the sites' :func:`site_calibration`
    sums: the temperature with the smallest pooled NLL, the novelty quantiles read off the
    pooled histogram (linear within a bin), and the pooled in-sample accuracy."""
    nll = np.sum([s["nll"] for s in shares], axis=0)
    hist = np.sum([s["novelty_hist"] for s in shares], axis=0)
    counts = np.sum([s["counts"] for s in shares], axis=0)
    if counts[0] <= 0:
        raise ValueError("no site scored a labelled cell of a kept type")
    temperature = float(TEMPERATURE_GRID[int(np.argmin(nll))])
    quantiles = _histogram_quantiles(hist, NOVELTY_BINS, np.linspace(0.0, 1.0, L._N_QUANTILES))
    return {
        "temperature": float(np.float32(temperature)),
        "novelty_statistic": "min squared Mahalanobis distance to a prototype",
        "novelty_quantiles": L._floats(quantiles),
        "out_of_fold_accuracy": float(np.float32(counts[1] / counts[0])),
        "in_sample": True,
    }


def _histogram_quantiles(hist: np.ndarray, edges: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Quantiles of the values binned in ``hist`` (bin i spans ``edges[i]..edges[i+1]``),
    linear within a bin; 0 and 1 are the outer edges of the first and last non-empty bins."""
    total = hist.sum()
    cum = np.cumsum(hist) / total
    nonempty = np.flatnonzero(hist > 0)
    lo, hi = int(nonempty[0]), int(nonempty[-1])
    out = np.empty(len(qs))
    for k, q in enumerate(qs):
        if q <= 0:
            out[k] = edges[lo]
            continue
        i = min(int(np.searchsorted(cum, q, side="left")), hi)
        before = cum[i - 1] if i > 0 else 0.0
        frac = 0.0 if hist[i] == 0 else (q - before) / (hist[i] / total)
        out[k] = edges[i] + min(max(frac, 0.0), 1.0) * (edges[i + 1] - edges[i])
    return out


def label_knowledge(
    level: str,
    model: Mapping[str, Any],
    calibration: Mapping[str, Any],
    *,
    n_latent: int,
    novelty_tail: float = 0.05,
) -> dict[str, Any]:
    """``manifest["labels"]`` for a federated reference with one label level."""
    return {
        "schema": L.LABELS_SCHEMA,
        "schema_version": L.LABELS_SCHEMA_VERSION,
        "unknown_label": L.UNKNOWN,
        "n_latent": int(n_latent),
        "novelty_tail": float(novelty_tail),
        "knowledge": ["prototypes"],
        "atlas": {"included": False},
        "federated": True,
        "levels": {level: {"index": 0, "prototype": {**model, "calibration": dict(calibration)}}},
    }
