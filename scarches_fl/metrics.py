"""Integration and label-transfer metrics, one code path for every method we compare.

Formulas (``Z`` is the n x d embedding, ``N_k(i)`` the k nearest neighbours of cell i in
Euclidean distance, excluding i itself):

* **Entropy of batch mixing** (EBM, scArches/scGen; k = 15): pick ``n_pools`` times
  ``n_samples`` random cells; for each, ``p_b`` = fraction of its k neighbours from batch b;
  ``E_i = -sum_b p_b log p_b``. EBM = mean over all picks, divided by ``log B`` (B = number of
  batches) so it lies in [0, 1]: 0 = neighbourhoods contain one batch only, 1 = every
  neighbourhood has the batches in equal parts. (``normalize=False`` returns nats.)
* **kNN purity** (k = 15): ``purity_i = |{j in N_k(i): y_j = y_i}| / k``; averaged within each
  label, then over labels (so small types count as much as large ones). 1 = every neighbour
  shares the cell's label.
* **Label silhouette**: ``(mean_i s_i + 1) / 2`` with the silhouette
  ``s_i = (b_i - a_i) / max(a_i, b_i)`` computed with the labels as clusters (a_i: mean distance
  to its own label, b_i: mean distance to the nearest other label). In [0, 1], higher = types
  better separated.
* **Batch silhouette** (scIB): within each label ``c``, silhouettes ``s_i`` with the batches as
  clusters; ``1 - |s_i|`` averaged over the label's cells, then over labels (labels present in
  one batch only are skipped). In [0, 1], 1 = batches perfectly overlapping inside every type.
* **NMI / ARI**: k-means (k = number of labels, 10 restarts, seeded) on ``Z``, compared with the
  labels by normalised mutual information (arithmetic mean normalisation) and the adjusted Rand
  index. 1 = clustering identical to the labels; ARI about 0 for a random clustering.
* **Label accuracy**: ``mean_i [pred_i == true_i]`` over query cells ("Unknown" counts as wrong).
* **Open-set accuracy**: ``mean_i [pred_i == true_i or (pred_i == "Unknown" and true_i not in
  K)]`` with ``K`` the types the reference can name (its prototype classes): "Unknown" is the right
  answer for a cell whose type the reference does not know, and wrong for every other cell. Equal
  to the label accuracy when every query type is in ``K``.
* **Macro-F1**: the unweighted mean over the true classes of ``F1_c = 2 P_c R_c / (P_c + R_c)``.
* **Unknown-detection AUROC**: ``P(u_novel > u_known) + 0.5 P(u_novel = u_known)`` for the
  uncertainty ``u`` of query cells whose true type is absent from the reference ("novel") against
  the other query cells: 1 = every novel cell is more uncertain than every known cell, 0.5 = chance.

Silhouettes are quadratic in the number of cells; above ``max_cells`` (default 5000) a seeded
random subset is used, and the result says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from protocols.errors import ScarchesFLError

__all__ = [
    "MetricError",
    "entropy_of_batch_mixing",
    "knn_purity",
    "label_silhouette",
    "batch_silhouette",
    "clustering_nmi_ari",
    "label_accuracy",
    "open_set_accuracy",
    "macro_f1",
    "unknown_detection_auroc",
    "integration_metrics",
    "label_transfer_metrics",
]

logger = logging.getLogger(__name__)


class MetricError(ScarchesFLError):
    """A metric cannot be computed from the inputs given (the message says what is missing)."""

    exit_code = 2


def _latent(z: Any) -> np.ndarray:
    arr = np.asarray(z, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise MetricError("the embedding must be a 2-D array with at least 2 cells")
    if not np.all(np.isfinite(arr)):
        raise MetricError("the embedding contains NaN or inf values; recompute it")
    return arr


def _labels(y: Any, n: int, what: str) -> np.ndarray:
    arr = np.asarray(y).astype(str).reshape(-1)
    if arr.shape[0] != n:
        raise MetricError(f"{what} has {arr.shape[0]} entries, the embedding has {n} cells")
    return arr


def _neighbours(z: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    k_eff = min(k, z.shape[0] - 1)
    nn = NearestNeighbors(n_neighbors=k_eff + 1).fit(z)
    _, ind = nn.kneighbors(z)
    # drop the cell itself (first column unless duplicates tie; remove it explicitly)
    out = np.empty((z.shape[0], k_eff), dtype=np.int64)
    for i, row in enumerate(ind):
        row = row[row != i][:k_eff]
        out[i] = row
    return out


def entropy_of_batch_mixing(
    latent: Any,
    batches: Any,
    *,
    k: int = 15,
    n_pools: int = 50,
    n_samples: int = 100,
    normalize: bool = True,
    seed: int = 0,
) -> float:
    """Entropy of batch mixing in k-neighbourhoods (see module docstring)."""
    z = _latent(latent)
    b = _labels(batches, z.shape[0], "batches")
    cats, codes = np.unique(b, return_inverse=True)
    if cats.size < 2:
        raise MetricError("entropy of batch mixing needs at least 2 batches")
    nbrs = _neighbours(z, k)
    rng = np.random.default_rng(seed)
    ents = []
    for _ in range(n_pools):
        idx = rng.choice(z.shape[0], size=min(n_samples, z.shape[0]), replace=False)
        counts = np.stack([np.bincount(codes[nbrs[i]], minlength=cats.size) for i in idx])
        p = counts / counts.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            e = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
        ents.append(e.mean())
    value = float(np.mean(ents))
    return value / math.log(cats.size) if normalize else value


def knn_purity(latent: Any, labels: Any, *, k: int = 15) -> float:
    """Mean over labels of the mean fraction of a cell's k neighbours sharing its label."""
    z = _latent(latent)
    y = _labels(labels, z.shape[0], "labels")
    nbrs = _neighbours(z, k)
    per_cell = (y[nbrs] == y[:, None]).mean(axis=1)
    return float(np.mean([per_cell[y == c].mean() for c in np.unique(y)]))


def _subsample(n: int, max_cells: int, seed: int) -> np.ndarray:
    if n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))


def label_silhouette(latent: Any, labels: Any, *, max_cells: int = 5000, seed: int = 0) -> float:
    """``(silhouette + 1) / 2`` with the labels as clusters, in [0, 1]."""
    from sklearn.metrics import silhouette_score

    z = _latent(latent)
    y = _labels(labels, z.shape[0], "labels")
    idx = _subsample(z.shape[0], max_cells, seed)
    if np.unique(y[idx]).size < 2:
        raise MetricError("the label silhouette needs at least 2 labels")
    return float((silhouette_score(z[idx], y[idx]) + 1.0) / 2.0)


def batch_silhouette(
    latent: Any, batches: Any, labels: Any, *, max_cells: int = 5000, seed: int = 0
) -> float:
    """scIB batch ASW: mean over labels of mean ``1 - |s_i|`` with batches as clusters."""
    from sklearn.metrics import silhouette_samples

    z = _latent(latent)
    b = _labels(batches, z.shape[0], "batches")
    y = _labels(labels, z.shape[0], "labels")
    idx = _subsample(z.shape[0], max_cells, seed)
    z, b, y = z[idx], b[idx], y[idx]
    scores = []
    for c in np.unique(y):
        m = y == c
        if np.unique(b[m]).size < 2 or m.sum() < 3:
            continue
        s = silhouette_samples(z[m], b[m])
        scores.append(float(np.mean(1.0 - np.abs(s))))
    if not scores:
        raise MetricError("the batch silhouette needs at least one label present in 2 batches")
    return float(np.mean(scores))


def clustering_nmi_ari(latent: Any, labels: Any, *, seed: int = 0) -> dict[str, float]:
    """NMI and ARI between k-means clusters of the embedding (k = number of labels) and labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    z = _latent(latent)
    y = _labels(labels, z.shape[0], "labels")
    n_clusters = min(np.unique(y).size, z.shape[0])
    clusters = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(z)
    return {
        "nmi": float(normalized_mutual_info_score(y, clusters, average_method="arithmetic")),
        "ari": float(adjusted_rand_score(y, clusters)),
    }


def label_accuracy(true: Any, pred: Any) -> float:
    """Fraction of cells whose predicted label equals the true one ("Unknown" is wrong)."""
    t = np.asarray(true).astype(str)
    p = _labels(pred, t.shape[0], "pred")
    if t.size == 0:
        raise MetricError("no cells to score")
    return float(np.mean(t == p))


def open_set_accuracy(true: Any, pred: Any, known_labels: Sequence[str], *,
                      unknown: str = "Unknown") -> float:
    """Fraction of cells labelled correctly, where "Unknown" is correct exactly for the cells whose
    true type is not in ``known_labels`` (the types the reference can name)."""
    t = np.asarray(true).astype(str)
    p = _labels(pred, t.shape[0], "pred")
    if t.size == 0:
        raise MetricError("no cells to score")
    known = set(map(str, known_labels))
    if unknown in known:
        raise MetricError(f"{unknown!r} cannot be a reference label and the unknown label at once")
    absent = np.array([v not in known for v in t])
    return _open_set_accuracy(t, p, absent, unknown)


def _open_set_accuracy(t: np.ndarray, p: np.ndarray, absent: np.ndarray, unknown: str) -> float:
    """Right = the true label, or ``unknown`` for a cell whose type is ``absent``."""
    return float(np.mean((t == p) | ((p == unknown) & absent)))


def macro_f1(true: Any, pred: Any) -> float:
    """Unweighted mean F1 over the true classes."""
    from sklearn.metrics import f1_score

    t = np.asarray(true).astype(str)
    p = _labels(pred, t.shape[0], "pred")
    if t.size == 0:
        raise MetricError("no cells to score")
    return float(f1_score(t, p, labels=np.unique(t), average="macro", zero_division=0))


def unknown_detection_auroc(uncertainty: Any, is_novel: Any) -> float:
    """AUROC of the uncertainty for separating novel-type cells (``is_novel``) from the rest."""
    from sklearn.metrics import roc_auc_score

    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    novel = np.asarray(is_novel, dtype=bool).reshape(-1)
    if u.shape != novel.shape:
        raise MetricError("uncertainty and is_novel differ in length")
    if novel.all() or not novel.any():
        raise MetricError(
            "the unknown-detection AUROC needs query cells of types both absent from and present "
            "in the reference"
        )
    return float(roc_auc_score(novel, u))


def integration_metrics(
    latent: Any,
    batches: Any,
    labels: Any,
    *,
    k: int = 15,
    max_cells: int = 5000,
    seed: int = 0,
) -> dict[str, Any]:
    """All embedding metrics at once (EBM, kNN purity, silhouettes, NMI, ARI)."""
    z = _latent(latent)
    out: dict[str, Any] = {"n_cells": int(z.shape[0]), "k": int(k)}
    b = _labels(batches, z.shape[0], "batches")
    y = _labels(labels, z.shape[0], "labels")
    if np.unique(b).size >= 2:
        out["entropy_of_batch_mixing"] = entropy_of_batch_mixing(z, b, k=k, seed=seed)
        try:
            out["batch_silhouette"] = batch_silhouette(z, b, y, max_cells=max_cells, seed=seed)
        except MetricError as exc:
            logger.info("batch silhouette skipped: %s", exc)
    out["knn_purity"] = knn_purity(z, y, k=k)
    if np.unique(y).size >= 2:
        out["label_silhouette"] = label_silhouette(z, y, max_cells=max_cells, seed=seed)
        out.update(clustering_nmi_ari(z, y, seed=seed))
    if z.shape[0] > max_cells:
        out["silhouette_subsample"] = int(max_cells)
    return out


def label_transfer_metrics(
    true: Any,
    pred: Any,
    uncertainty: Any | None = None,
    *,
    reference_labels: Sequence[str] | None = None,
    unknown: str = "Unknown",
) -> dict[str, Any]:
    """Accuracy, macro-F1, fraction called Unknown and, when some true types are absent from
    ``reference_labels``, the unknown-detection AUROC and how many of those were called Unknown.
    """
    t = np.asarray(true).astype(str)
    p = _labels(pred, t.shape[0], "pred")
    out: dict[str, Any] = {
        "n_cells": int(t.size),
        "accuracy": label_accuracy(t, p),
        "macro_f1": macro_f1(t, p),
        "fraction_unknown": float(np.mean(p == unknown)),
    }
    if reference_labels is not None:
        known = set(map(str, reference_labels))
        novel = np.array([v not in known for v in t])
        out["open_set_accuracy"] = _open_set_accuracy(t, p, novel, unknown)
        out["novel_types"] = sorted(set(t[novel].tolist()))
        out["n_novel_cells"] = int(novel.sum())
        if (~novel).any():
            out["accuracy_known_types"] = label_accuracy(t[~novel], p[~novel])
        if novel.any():
            out["novel_fraction_called_unknown"] = float(np.mean(p[novel] == unknown))
        if uncertainty is not None and novel.any() and (~novel).any():
            out["novel_auroc"] = unknown_detection_auroc(uncertainty, novel)
    if uncertainty is not None:
        u = np.asarray(uncertainty, dtype=np.float64)
        out["mean_uncertainty"] = float(np.mean(u))
    return out
