"""Label transfer from a reference to query cells in the shared latent space, with uncertainty.

Two kinds of label knowledge can travel in a reference bundle (``manifest["labels"]``):

* **Prototypes** (always, when the reference was trained with labels). Per cell type with at
  least ``min_cells`` labelled reference cells: 1 to ``max_prototypes`` prototypes (mean,
  per-dimension spread, weight); a type gets several only where it is multimodal (BIC of a
  diagonal Gaussian mixture, every component with ``min_cells`` cells). A type with fewer
  cells (a rare type: the reference's 18 dendritic cells) still gets one prototype, its mean
  known only to within ``1 / n`` of the spread: its distances are measured under the predictive
  covariance ``a S``, ``a = (1 + 1/n) max(1, r)`` with ``r`` the type's own spread relative to
  ``S`` (``spread_inflation`` in the manifest), so the type is named, and its cells'
  uncertainty carries how little the reference saw of it. Every labelled type is
  thus a class; ``type_cell_counts`` lists each with its number of reference cells. Also the
  pooled within-prototype covariance and the class frequencies. No reference cell leaves the
  operator: only these summary numbers do. Classification is a linear-discriminant rule with
  mixture classes: ``score_c = log prior_c + log sum_j w_j N_j`` with
  ``log N_j = -D_j / (2 a_j) - (d / 2) log a_j`` (``D_j`` the squared Mahalanobis distance to
  prototype j under the pooled covariance ``S``, ``a_j`` its spread inflation, 1 for types with
  ``min_cells`` or more cells), ``P = softmax(score / T)`` with the temperature ``T`` fitted on
  out-of-fold reference cells.
* **Reference latent atlas** (only when the operator opts in, ``include_atlas=True``): the latent
  coordinates of every labelled reference cell and its label codes, stored as tensors
  ``atlas.latent`` (float32, cells x latent) and ``atlas.labels.<i>`` (float32 codes, ``-1`` =
  unlabelled) next to the model weights. Never any expression values. Used by weighted kNN
  transfer as in scArches.

Uncertainty (both methods) is ``1 - confidence`` in [0, 1], where
``confidence = p_top * novelty_factor``:

* ``p_top`` is the top class probability (kNN: summed Gaussian-kernel weight of the neighbours with
  that label; prototypes: a softmax over per-class log densities with a temperature fitted on
  out-of-fold reference cells).
* ``novelty_factor`` in [0, 1] says how typical the cell's distance to the reference is, measured
  against the same statistic on out-of-sample reference cells:
  ``min(1, F / tail) * (1 - RANGE_SLOPE * (1 - F))``, where ``F`` is the fraction of reference
  cells that lie farther from the reference than this cell, ``tail`` (default 0.05) is the
  reference tail fraction below which trust drops linearly to 0, and ``RANGE_SLOPE`` = 0.01. So
  a cell that lies where 95 % of reference cells lie keeps 99-100 % of ``p_top``, and a cell
  farther from the reference than any reference cell gets uncertainty near 1. The slope is a
  tie-breaker: it moves no cell's uncertainty by more than 0.01, but it ranks cells by their
  distance where the first term alone ties them all at 1. Without it, a held-out cell line
  lying farther out than most reference cells, yet inside the 5 % tail, ranked hardly better
  than chance against the known cells (AUROC 0.60, against 0.97 with it; ADR 0054).
  With ``novelty=False`` the kNN uncertainty is exactly scArches' ``1 - p_top``.

Cells whose uncertainty is above ``threshold`` (default 0.5) are called ``"Unknown"``.

Everything stored in the manifest is plain JSON: strings, lists of finite floats, ints.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocols.errors import ScarchesFLError

__all__ = [
    "LABELS_SCHEMA",
    "LABELS_SCHEMA_VERSION",
    "UNKNOWN",
    "LabelPrediction",
    "LabelTransferError",
    "build_label_knowledge",
    "predict_labels",
    "predict_label_levels",
    "atlas_tensor_name",
    "weighted_knn_transfer",
]

logger = logging.getLogger(__name__)

LABELS_SCHEMA = "scarches-fl.labels"
LABELS_SCHEMA_VERSION = 1
UNKNOWN = "Unknown"
ATLAS_LATENT = "atlas.latent"
_MISSING = {"", "nan", "none", "na", "n/a", "unknown", "unassigned"}
_N_QUANTILES = 41  # stored quantiles of the reference's own novelty statistic
_KNN_EXACT_MAX = 50_000  # atlases up to this size use exact sklearn kNN, larger use pynndescent
_QUERY_CHUNK = 8192
# confidence lost, at most, by a cell inside the reference's range for lying at its far edge
# (module docstring; ADR 0054)
RANGE_SLOPE = 0.01


class LabelTransferError(ScarchesFLError):
    """Label knowledge is missing or malformed, or inputs do not fit it."""

    exit_code = 2


@dataclass(frozen=True)
class LabelPrediction:
    """Predicted labels for query cells.

    ``pred``: str array (``"Unknown"`` where ``uncertainty > threshold``); ``uncertainty``:
    float32 in [0, 1]; ``top_label``: the most probable known label even where ``pred`` is
    Unknown; ``probabilities``: cells x ``classes`` float32; ``method``: ``"knn"`` or
    ``"prototype"``.
    """

    pred: np.ndarray
    uncertainty: np.ndarray
    top_label: np.ndarray
    probabilities: np.ndarray
    classes: list[str]
    method: str
    novelty: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.float32))
    #: per cell, where its top label came from: ``"genesis"`` (the reference's own knowledge) or
    #: ``"<site>#<ledger entry>"`` (a site's label contribution); prototype method only
    source: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, object))


def atlas_tensor_name(level_index: int) -> str:
    """Tensor name of the label codes of the ``level_index``-th label level in the atlas."""
    return f"atlas.labels.{int(level_index)}"


# --------------------------------------------------------------------------------------------
# helpers


def _floats(a: Any) -> list:
    """Nested lists of finite Python floats (float32 precision) for the JSON manifest."""
    arr = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise LabelTransferError(
            "label knowledge contains non-finite numbers; the latent embedding has NaN or inf "
            "values -- check the model training (learning rate, input counts)"
        )
    return np.asarray(arr, dtype=np.float32).astype(np.float64).tolist()


def _clean_labels(values: Any, n: int, level: str) -> np.ndarray:
    """Labels as an object array of str, with missing entries as None."""
    arr = np.asarray(values, dtype=object).reshape(-1)
    if arr.shape[0] != n:
        raise LabelTransferError(
            f"label level {level!r} has {arr.shape[0]} entries but the latent has {n} cells; "
            "pass one label per latent row"
        )
    out = np.empty(n, dtype=object)
    for i, v in enumerate(arr):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out[i] = None
            continue
        s = str(v)
        out[i] = None if s.strip().lower() in _MISSING else s
    return out


def _check_latent(latent: Any, what: str) -> np.ndarray:
    z = np.asarray(latent, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0:
        raise LabelTransferError(f"{what} must be a non-empty 2-D array (cells x latent dims)")
    if not np.all(np.isfinite(z)):
        raise LabelTransferError(f"{what} contains NaN or inf; re-run the embedding")
    return z


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _softmax(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=1, keepdims=True)
    e = np.exp(a - m)
    return e / e.sum(axis=1, keepdims=True)


def _novelty_factor(stat: np.ndarray, quantiles: Sequence[float] | np.ndarray, tail: float) -> np.ndarray:
    """``min(1, F / tail) * (1 - RANGE_SLOPE * (1 - F))`` where F = fraction of reference cells
    whose statistic is larger (more novel) than ``stat``. ``quantiles`` are the reference
    statistic's quantiles at evenly spaced levels 0..1 (larger = more novel)."""
    q = np.asarray(quantiles, dtype=np.float64)
    levels = np.linspace(0.0, 1.0, q.size)
    # make strictly increasing for interpolation
    q = np.maximum.accumulate(q + np.arange(q.size) * 1e-12)
    cdf = np.interp(stat, q, levels, left=0.0, right=1.0)
    frac_more_novel = 1.0 - cdf
    # beyond the largest reference value: decay exponentially with the distance past it,
    # on the scale of the reference's upper spread, instead of a hard 0
    spread = max(q[-1] - q[q.size // 2], 1e-9)
    beyond = stat > q[-1]
    frac_more_novel = np.where(
        beyond, (1.0 / q.size) * np.exp(-(stat - q[-1]) / spread), frac_more_novel
    )
    in_range = 1.0 - RANGE_SLOPE * (1.0 - frac_more_novel)  # frac_more_novel is in [0, 1]
    return np.clip(frac_more_novel / max(tail, 1e-9), 0.0, 1.0) * in_range


# --------------------------------------------------------------------------------------------
# prototypes


def _fit_type_mixture(
    z: np.ndarray, *, min_cells: int, max_components: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Prototypes of one cell type: (means, stds, weights, assignment of each cell).

    The number of prototypes (1 to ``max_components``) is chosen by the BIC of a diagonal
    Gaussian mixture, allowing only splits in which every component has ``min_cells`` cells, so
    a type gets several prototypes only where it is multimodal in the latent space.
    """
    from sklearn.mixture import GaussianMixture

    n, d = z.shape
    floor = 1e-3 + 1e-2 * float(np.median(z.std(axis=0)) if n > 1 else 1.0)
    mu1 = z.mean(axis=0, keepdims=True)
    sd1 = np.maximum(z.std(axis=0, keepdims=True), floor)
    ll1 = _diag_logpdf(z, mu1, sd1, np.zeros(1)).sum()
    best = (-2.0 * ll1 + 2 * d * math.log(n), mu1, sd1, np.ones(1), np.zeros(n, dtype=int))
    for k in range(2, max(1, min(max_components, n // max(min_cells, 1))) + 1):
        gm = GaussianMixture(
            n_components=k,
            covariance_type="diag",
            random_state=seed,
            reg_covar=floor**2,
            n_init=2,
            max_iter=200,
        ).fit(z)
        assign = gm.predict(z)
        sizes = np.bincount(assign, minlength=k)
        if sizes.min() < min_cells:
            continue
        mu = np.stack([z[assign == j].mean(axis=0) for j in range(k)])
        sd = np.maximum(np.stack([z[assign == j].std(axis=0) for j in range(k)]), floor)
        w = sizes / n
        ll = _diag_logpdf(z, gm.means_, np.sqrt(gm.covariances_), np.log(gm.weights_)).sum()
        bic = -2.0 * ll + (k * 2 * d + (k - 1)) * math.log(n)
        if bic < best[0]:
            best = (bic, mu, sd, w, assign)
    return best[1], best[2], best[3], best[4]


def _diag_logpdf(z: np.ndarray, mu: np.ndarray, sd: np.ndarray, logw: np.ndarray) -> np.ndarray:
    """log sum_j w_j N(z; mu_j, diag sd_j^2) for each row of z."""
    d = z.shape[1]
    maha = (((z[:, None, :] - mu[None, :, :]) / sd[None, :, :]) ** 2).sum(axis=2)
    comp = (
        logw[None, :]
        - 0.5 * maha
        - np.log(sd).sum(axis=1)[None, :]
        - 0.5 * d * math.log(2 * math.pi)
    )
    return _logsumexp(comp, axis=1)


def _fit_prototype_model(
    z: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    *,
    min_cells: int,
    max_prototypes: int,
    seed: int,
    few_below: int,
) -> dict[str, Any]:
    """Prototypes per class plus the pooled within-prototype covariance and class priors.
    Classes with fewer than ``few_below`` cells get one prototype with a spread inflation."""
    protos: list[dict[str, Any]] = []
    resid = []
    few: list[tuple[int, np.ndarray]] = []  # (prototype index, its cells) below few_below
    for j, c in enumerate(classes):
        zc = z[y == j]
        if zc.shape[0] == 0:  # a rare type absent from a calibration fold
            continue
        mu, sd, w, assign = _fit_type_mixture(
            zc, min_cells=min_cells, max_components=max_prototypes, seed=seed
        )
        for m in range(mu.shape[0]):
            proto = {
                "label": c,
                "mean": _floats(mu[m]),
                "std": _floats(sd[m]),
                "weight": float(np.float32(w[m])),
                "n_cells": int((assign == m).sum()),
            }
            if zc.shape[0] < few_below:
                few.append((len(protos), zc))
            protos.append(proto)
        resid.append(zc - mu[assign])
    r = np.concatenate(resid)
    cov = r.T @ r / max(r.shape[0] - len(protos), 1)
    ridge = 1e-3 * float(np.trace(cov)) / cov.shape[0] + 1e-9
    cov = cov + ridge * np.eye(cov.shape[0])
    for k, zc in few:
        protos[k]["spread_inflation"] = _spread_inflation(zc, cov)
    counts = np.bincount(y, minlength=len(classes)).astype(np.float64)
    return {
        "prototypes": protos,
        "shared_covariance": _floats(cov),
        "class_prior": _floats(counts / counts.sum()),
    }


def _spread_inflation(zc: np.ndarray, cov: np.ndarray) -> float:
    """Predictive spread factor ``a`` of a prototype fitted on the ``n`` cells ``zc`` only (a type
    below the prototype floor): a new cell of the type lies around the estimated mean with
    covariance ``a S``, ``a = (1 + 1/n) * max(1, r)``, where ``1 + 1/n`` is the uncertainty of a
    mean from n cells and ``r`` the type's own spread relative to the pooled ``S`` (its cells'
    mean squared Mahalanobis distance to their mean per dimension, ``n / (n - 1)``-corrected);
    never narrower than the pooled spread, since n cells cannot show that."""
    n, d = zc.shape
    r = 1.0
    if n > 1:
        resid = zc - zc.mean(axis=0, keepdims=True)
        maha = np.einsum("ij,ij->i", resid, np.linalg.solve(cov, resid.T).T)
        r = float(maha.mean() / d * n / (n - 1))
    return float(np.float32((1.0 + 1.0 / n) * max(1.0, r)))


def _proto_scores(
    z: np.ndarray, model: Mapping[str, Any], classes: Sequence[str], *, best: list | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(n, n_classes) class log scores ``log prior_c + log sum_j w_j exp(-maha_j / 2)`` over
    the class's prototypes j (Mahalanobis with the shared covariance), and the smallest squared
    Mahalanobis distance to any prototype. With ``best`` (a list), appends per cell the index of
    the prototype that weighs most in its top class (where its label came from)."""
    cov = np.asarray(model["shared_covariance"], dtype=np.float64)
    chol = np.linalg.cholesky(cov)
    protos = model["prototypes"]
    mu = np.array([p["mean"] for p in protos], dtype=np.float64)
    # whitened coordinates: maha = |L^-1 (z - mu)|^2
    zw = np.linalg.solve(chol, z.T).T
    mw = np.linalg.solve(chol, mu.T).T
    maha = ((zw**2).sum(axis=1)[:, None] - 2.0 * zw @ mw.T + (mw**2).sum(axis=1)[None, :]).clip(
        min=0.0
    )
    index = {c: i for i, c in enumerate(classes)}
    owner = np.array([index[p["label"]] for p in protos])
    w = np.array([p["weight"] for p in protos], dtype=np.float64)
    # few-cell prototypes: distances under the predictive covariance (1 + 1/n) S
    a = np.array([float(p.get("spread_inflation", 1.0)) for p in protos], dtype=np.float64)
    maha = maha / a[None, :]
    comp = np.log(np.maximum(w, 1e-12))[None, :] - 0.5 * maha - 0.5 * z.shape[1] * np.log(a)
    prior = np.log(np.maximum(np.asarray(model["class_prior"], dtype=np.float64), 1e-12))
    scores = np.full((z.shape[0], len(classes)), -np.inf)
    for j in range(len(classes)):
        if (owner == j).any():  # a class without prototypes (absent from a fold) scores -inf
            scores[:, j] = prior[j] + _logsumexp(comp[:, owner == j], axis=1)
    if best is not None:
        top = scores.argmax(axis=1)
        best.append(np.where(owner[None, :] == top[:, None], comp, -np.inf).argmax(axis=1))
    return scores, maha.min(axis=1)


def _fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) on held-out cells."""
    best_t, best_nll = 1.0, np.inf
    for t in np.exp(np.linspace(math.log(0.05), math.log(200.0), 61)):
        p = _softmax(logits / t)
        nll = -np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)))
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def _build_prototypes(
    z: np.ndarray,
    y: np.ndarray,
    *,
    min_cells: int,
    max_prototypes: int,
    seed: int,
    max_cells_per_type: int | None = None,
) -> dict[str, Any]:
    labelled = np.array([v is not None for v in y])
    values, counts = np.unique(y[labelled].astype(str), return_counts=True)
    # every labelled type is a class; those below min_cells get one wider prototype
    kept = [str(v) for v in values]
    few = {str(v): int(c) for v, c in zip(values, counts, strict=True) if c < min_cells}
    info: dict[str, Any] = {
        "min_cells": int(min_cells),
        "type_cell_counts": {str(v): int(c) for v, c in zip(values, counts, strict=True)},
        "few_cell_types": few,
        # kept for readers of earlier bundles: types without a prototype (none any more)
        "excluded_types": {},
    }
    if not kept:
        info.update({"classes": [], "prototypes": []})
        return info
    kept_set = set(kept)
    mask = np.array([v is not None and v in kept_set for v in y])
    zk = z[mask]
    yk = np.array([kept.index(v) for v in y[mask]])
    full_counts = np.bincount(yk, minlength=len(kept))
    if max_cells_per_type is not None and full_counts.max() > max_cells_per_type:
        # Large references: the mixtures and the calibration are fitted on at most
        # max_cells_per_type cells of each type (a seeded stratified sample); the class
        # priors and cell counts still come from every cell.
        sub_rng = np.random.default_rng([seed, 1])
        keep = np.concatenate(
            [
                idx
                if len(idx) <= max_cells_per_type
                else np.sort(sub_rng.choice(idx, max_cells_per_type, replace=False))
                for idx in (np.flatnonzero(yk == j) for j in range(len(kept)))
            ]
        )
        keep.sort()
        zk, yk = zk[keep], yk[keep]
        info["fitted_on_cells_per_type"] = int(max_cells_per_type)

    # Out-of-fold scores (5 folds, stratified) calibrate the temperature and the novelty score.
    rng = np.random.default_rng(seed)
    n_folds = 5
    folds = np.empty(len(yk), dtype=int)
    for j in range(len(kept)):
        idx = np.flatnonzero(yk == j)
        folds[idx] = rng.permutation(np.arange(len(idx)) % n_folds)
    oof = np.empty((len(yk), len(kept)))
    oof_maha = np.empty(len(yk))
    fold_min = max(2, int(min_cells * (n_folds - 1) / n_folds))
    for f in range(n_folds):
        tr, te = folds != f, folds == f
        if not te.any():
            continue
        fold_model = _fit_prototype_model(
            zk[tr],
            yk[tr],
            kept,
            min_cells=fold_min,
            max_prototypes=max_prototypes,
            seed=seed,
            few_below=min_cells,
        )
        oof[te], oof_maha[te] = _proto_scores(zk[te], fold_model, kept)
    # a rare type's cell in a fold without any other cell of its type cannot be scored out of
    # fold; such cells are left out of the calibration
    scorable = np.isfinite(oof[np.arange(len(yk)), yk])
    temperature = _fit_temperature(np.where(np.isfinite(oof), oof, -1e30)[scorable], yk[scorable])
    quantiles = np.quantile(oof_maha[scorable], np.linspace(0.0, 1.0, _N_QUANTILES))
    model = _fit_prototype_model(
        zk,
        yk,
        kept,
        min_cells=min_cells,
        max_prototypes=max_prototypes,
        seed=seed,
        few_below=min_cells,
    )
    sub_counts = np.bincount(yk, minlength=len(kept))
    if not np.array_equal(sub_counts, full_counts):
        index = {c: j for j, c in enumerate(kept)}
        for proto in model["prototypes"]:
            j = index[proto["label"]]
            proto["n_cells"] = int(round(proto["n_cells"] * full_counts[j] / sub_counts[j]))
        model["class_prior"] = _floats(full_counts / full_counts.sum())
    info.update(
        {
            "classes": kept,
            "cell_counts": [int(c) for c in full_counts],
            **model,
            "calibration": {
                "temperature": float(np.float32(temperature)),
                "novelty_statistic": "min squared Mahalanobis distance to a prototype",
                "novelty_quantiles": _floats(quantiles),
                "out_of_fold_accuracy": float(
                    np.float32(np.mean(oof.argmax(axis=1)[scorable] == yk[scorable]))
                ),
            },
        }
    )
    return info


# --------------------------------------------------------------------------------------------
# kNN


class _NeighbourIndex:
    """Nearest-neighbour index over the atlas rows, built once and queried in chunks: exact
    (sklearn) up to ``_KNN_EXACT_MAX`` rows, pynndescent above."""

    def __init__(self, atlas: np.ndarray, k: int, *, seed: int = 0, exclude_self: bool = False):
        self.exclude_self = exclude_self
        self.k_eff = min(k + (1 if exclude_self else 0), atlas.shape[0])
        self.exact = atlas.shape[0] <= _KNN_EXACT_MAX
        if self.exact:
            from sklearn.neighbors import NearestNeighbors

            self._nn = NearestNeighbors(n_neighbors=self.k_eff).fit(atlas)
        else:
            from pynndescent import NNDescent

            self._nn = NNDescent(
                atlas.astype(np.float32), n_neighbors=max(self.k_eff, 15), random_state=seed
            )

    def query(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices) of the k nearest atlas rows of each query row (one chunk)."""
        if self.exact:
            dist, ind = self._nn.kneighbors(query)
        else:
            ind, dist = self._nn.query(query.astype(np.float32), k=self.k_eff)
        dist = np.asarray(dist, dtype=np.float64)
        if self.exclude_self:
            dist, ind = dist[:, 1:], ind[:, 1:]
        return dist, ind


def _knn(
    atlas: np.ndarray, query: np.ndarray, k: int, *, seed: int = 0, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices) of the k nearest atlas rows for each query row, in chunks."""
    index = _NeighbourIndex(atlas, k, seed=seed, exclude_self=exclude_self)
    parts = [index.query(query[i : i + _QUERY_CHUNK]) for i in range(0, len(query), _QUERY_CHUNK)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _kernel_weights(dist: np.ndarray) -> np.ndarray:
    """scArches' weights: w = exp(-d / (2 / s)^2), s = std of the cell's k neighbour distances,
    normalised to sum 1 per cell."""
    s = dist.std(axis=1, keepdims=True)
    scale = (2.0 / np.maximum(s, 1e-12)) ** 2
    logits = -dist / scale
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=1, keepdims=True)


def weighted_knn_transfer(
    atlas_latent: np.ndarray,
    atlas_codes: np.ndarray,
    n_classes: int,
    query_latent: np.ndarray,
    *,
    k: int = 15,
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (cells x n_classes) by weighted kNN, and the mean neighbour distance.

    Unlabelled atlas cells (code < 0) are skipped. Probability of class c = summed kernel weight
    of the neighbours labelled c.
    """
    keep = atlas_codes >= 0
    a, codes = atlas_latent[keep], atlas_codes[keep].astype(np.int64)
    if a.shape[0] == 0:
        raise LabelTransferError("the reference atlas has no labelled cells for this level")
    # one index, queried chunk by chunk: per-chunk arrays stay small for million-cell queries
    index = _NeighbourIndex(a, k)
    n = query_latent.shape[0]
    probs = np.zeros((n, n_classes))
    mean_dist = np.zeros(n)
    for lo in range(0, n, _QUERY_CHUNK):
        dist, ind = index.query(query_latent[lo : lo + _QUERY_CHUNK])
        w = _kernel_weights(dist)
        rows = np.repeat(np.arange(lo, lo + dist.shape[0]), ind.shape[1])
        np.add.at(probs, (rows, codes[ind].reshape(-1)), w.reshape(-1))
        mean_dist[lo : lo + dist.shape[0]] = dist.mean(axis=1)
    return probs, mean_dist


def _build_atlas_level(
    z: np.ndarray, y: np.ndarray, *, k: int, seed: int
) -> tuple[dict, np.ndarray]:
    labelled = np.array([v is not None for v in y])
    classes = sorted({str(v) for v in y[labelled]})
    lookup = {c: i for i, c in enumerate(classes)}
    codes = np.array([lookup[v] if v is not None else -1 for v in y], dtype=np.float32)
    # novelty calibration: leave-one-out mean distance of labelled atlas cells to their k
    # nearest labelled atlas neighbours
    zl = z[labelled]
    if zl.shape[0] > 1:
        sub = zl
        if zl.shape[0] > 20000:
            sub = zl[np.random.default_rng(seed).choice(zl.shape[0], 20000, replace=False)]
        dist, _ = _knn(zl, sub, k, seed=seed, exclude_self=True)
        stat = dist.mean(axis=1)
    else:
        stat = np.zeros(1)
    info = {
        "classes": classes,
        "knn_k": int(k),
        "novelty_statistic": "mean distance to k nearest atlas cells",
        "novelty_quantiles": _floats(np.quantile(stat, np.linspace(0.0, 1.0, _N_QUANTILES))),
    }
    return info, codes


# --------------------------------------------------------------------------------------------
# query context (opt-in): is the cell's query neighbourhood covered by the reference?

_CONTEXT_MAX_REFERENCE = 20_000


def _prototype_sample(proto: Mapping[str, Any], n: int, seed: int) -> np.ndarray:
    """``n`` latent points drawn from the stored prototype mixture (diagonal Gaussians with the
    prototypes' means and spreads, in proportion to their cell counts): a stand-in for the
    reference cells when the bundle carries no atlas."""
    rng = np.random.default_rng(seed)
    protos = proto["prototypes"]
    counts = np.array([max(int(p.get("n_cells", 1)), 1) for p in protos], dtype=np.float64)
    per = rng.multinomial(n, counts / counts.sum())
    parts = [
        np.asarray(p["mean"], dtype=np.float64)
        + np.asarray(p["std"], dtype=np.float64) * rng.standard_normal((m, len(p["mean"])))
        for p, m in zip(protos, per, strict=True)
        if m > 0
    ]
    return np.concatenate(parts)


def _reference_coverage(
    reference: np.ndarray, query: np.ndarray, k: int, *, seed: int = 0
) -> np.ndarray:
    """Per query cell: the fraction of reference cells among its k nearest neighbours in the
    pooled reference + query cloud, divided by the fraction expected if the query were mixed
    evenly with the reference, then averaged over the cell's k nearest query cells (itself
    included). About 1 where the query lies among reference cells, near 0 where a group of query
    cells has no reference cells around it (a population the reference lacks)."""
    nr, nq = reference.shape[0], query.shape[0]
    k = int(min(k, nr, nq - 1))
    d_ref, _ = _knn(reference, query, k, seed=seed)
    d_q, i_q = _knn(query, query, k, seed=seed, exclude_self=True)
    pooled = np.concatenate([d_ref, d_q], axis=1)
    from_ref = np.r_[np.ones(k), np.zeros(k)]
    nearest = np.argsort(pooled, axis=1, kind="stable")[:, :k]
    frac_ref = from_ref[nearest].mean(axis=1)
    expected = nr / (nr + nq - 1)
    neighbourhood = np.concatenate([np.arange(nq)[:, None], i_q[:, : k - 1]], axis=1)
    return frac_ref[neighbourhood].mean(axis=1) / expected


# --------------------------------------------------------------------------------------------
# public API


def build_label_knowledge(
    latent: Any,
    labels: Mapping[str, Any],
    *,
    min_cells: int = 20,
    include_atlas: bool = False,
    seed: int = 0,
    max_prototypes: int = 3,
    knn_k: int = 15,
    novelty_tail: float = 0.05,
    max_cells_per_type: int | None = 5000,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Label knowledge for a bundle from the reference latent and one or more label levels.

    Returns ``(labels_manifest, atlas_tensors)``: the JSON dict for ``manifest["labels"]`` and,
    with ``include_atlas``, the tensors ``atlas.latent`` (float32) and ``atlas.labels.<i>``
    (float32 class codes, -1 for unlabelled), else ``{}``. Prototypes are computed only for
    types with at least ``min_cells`` labelled cells. ``novelty_tail``: the fraction of reference
    cells farthest from the reference below which confidence drops (larger = more cells called
    Unknown, both novel and known ones). ``max_cells_per_type``: types with more labelled
    cells are fitted on a seeded sample of that many (prototype means and spreads from 5,000
    cells are as good as from all; the fit's cost then stops growing with the reference), while
    class priors and cell counts use every cell; ``None`` fits on all cells.
    """
    if not isinstance(labels, Mapping) or not labels:
        raise LabelTransferError(
            "labels must be a non-empty mapping {level name: one label per cell}, "
            "e.g. {'cell_type': adata.obs['cell_type'].to_numpy()}"
        )
    if min_cells < 2:
        raise LabelTransferError("min_cells must be at least 2")
    if not 0.0 < novelty_tail <= 1.0:
        raise LabelTransferError("novelty_tail must be in (0, 1]; 0.05 is the default")
    if max_cells_per_type is not None and max_cells_per_type < min_cells:
        raise LabelTransferError(
            f"max_cells_per_type ({max_cells_per_type}) must be at least min_cells "
            f"({min_cells}); None fits on every cell"
        )
    z = _check_latent(latent, "the reference latent")
    levels: dict[str, Any] = {}
    tensors: dict[str, np.ndarray] = {}
    for i, (name, values) in enumerate(labels.items()):
        name = str(name)
        y = _clean_labels(values, z.shape[0], name)
        level: dict[str, Any] = {
            "index": i,
            "prototype": _build_prototypes(
                z,
                y,
                min_cells=min_cells,
                max_prototypes=max_prototypes,
                seed=seed,
                max_cells_per_type=max_cells_per_type,
            ),
        }
        if include_atlas:
            atlas_info, codes = _build_atlas_level(z, y, k=knn_k, seed=seed)
            atlas_info["tensor"] = atlas_tensor_name(i)
            level["atlas"] = atlas_info
            tensors[atlas_tensor_name(i)] = codes
        levels[name] = level
        logger.info(
            "label level %r: %d prototype types (%d prototypes), %d of them below min_cells=%d "
            "(one wider prototype each)%s",
            name,
            len(level["prototype"]["classes"]),
            len(level["prototype"]["prototypes"]),
            len(level["prototype"].get("few_cell_types", {})),
            min_cells,
            ", atlas included" if include_atlas else "",
        )
    if include_atlas:
        tensors[ATLAS_LATENT] = np.ascontiguousarray(z, dtype=np.float32)
    manifest = {
        "schema": LABELS_SCHEMA,
        "schema_version": LABELS_SCHEMA_VERSION,
        "unknown_label": UNKNOWN,
        "n_latent": int(z.shape[1]),
        "novelty_tail": float(novelty_tail),
        "knowledge": ["prototypes", "atlas"] if include_atlas else ["prototypes"],
        "atlas": (
            {"included": True, "latent_tensor": ATLAS_LATENT, "n_cells": int(z.shape[0])}
            if include_atlas
            else {"included": False}
        ),
        "levels": levels,
    }
    return manifest, tensors


def _level(labels_manifest: Mapping[str, Any], label_key: str) -> Mapping[str, Any]:
    if not labels_manifest or "levels" not in labels_manifest:
        raise LabelTransferError(
            "this reference carries no label knowledge; train the reference with --label-key "
            "to get label transfer"
        )
    if labels_manifest.get("schema") != LABELS_SCHEMA:
        raise LabelTransferError(
            f"manifest['labels'] has schema {labels_manifest.get('schema')!r}, expected "
            f"{LABELS_SCHEMA!r}; the bundle was written by an incompatible version"
        )
    levels = labels_manifest["levels"]
    if label_key not in levels:
        raise LabelTransferError(
            f"the reference has no label level {label_key!r}; it has {sorted(levels)}. "
            "Pass one of those as --label-key"
        )
    return levels[label_key]


def predict_labels(
    labels_manifest: Mapping[str, Any],
    atlas_tensors: Mapping[str, np.ndarray],
    query_latent: Any,
    *,
    label_key: str,
    threshold: float = 0.5,
    k: int = 15,
    method: str = "auto",
    novelty: bool = True,
    query_context: bool = False,
    context_k: int = 30,
    context_floor: float = 0.05,
) -> LabelPrediction:
    """Predict ``label_key`` for query cells from the bundle's label knowledge.

    ``method``: ``"knn"`` (needs the opt-in atlas), ``"prototype"``, or ``"auto"`` (kNN when the
    atlas tensors for this level are present, else prototypes). ``atlas_tensors`` may hold any
    tensors of the bundle; only ``atlas.*`` ones are read. ``novelty=False`` gives the plain
    scArches uncertainty ``1 - p_top``.

    ``query_context=True`` (opt-in, transductive: a cell's uncertainty then depends on the other
    query cells passed in the same call) also multiplies the confidence by
    ``min(1, coverage / context_floor)``, where ``coverage`` says how well the reference covers
    the cell's query neighbourhood (see :func:`_reference_coverage`, ``context_k`` neighbours;
    reference = the atlas for kNN, a sample of the prototype mixture for prototypes). A group of
    query cells with no reference cells around it -- a population the reference lacks -- then
    gets high uncertainty. Needs more than ``context_k`` query cells (else ignored).
    """
    if not 0.0 <= threshold <= 1.0:
        raise LabelTransferError("threshold must be in [0, 1]")
    level = _level(labels_manifest, label_key)
    z = _check_latent(query_latent, "the query latent")
    n_latent = labels_manifest.get("n_latent")
    if n_latent is not None and z.shape[1] != int(n_latent):
        raise LabelTransferError(
            f"the query latent has {z.shape[1]} dims but the label knowledge was built on "
            f"{n_latent}; embed the query with the same reference model"
        )
    tail = float(labels_manifest.get("novelty_tail", 0.05))
    atlas_info = level.get("atlas")
    has_atlas = (
        atlas_info is not None
        and ATLAS_LATENT in atlas_tensors
        and atlas_info.get("tensor") in atlas_tensors
    )
    if method == "auto":
        method = "knn" if has_atlas else "prototype"
    source = np.zeros(0, object)
    if method == "knn":
        if not has_atlas:
            raise LabelTransferError(
                "kNN label transfer needs the reference latent atlas, which this bundle does not "
                "carry; use method='prototype' or ask the operator for a bundle with the atlas"
            )
        assert atlas_info is not None
        classes = list(atlas_info["classes"])
        a = np.asarray(atlas_tensors[ATLAS_LATENT], dtype=np.float64)
        codes = np.asarray(atlas_tensors[atlas_info["tensor"]]).astype(np.int64)
        if a.shape[0] != codes.shape[0]:
            raise LabelTransferError("atlas.latent and its label codes differ in length")
        probs, stat = weighted_knn_transfer(a, codes, len(classes), z, k=k)
        quantiles = atlas_info["novelty_quantiles"]
    elif method == "prototype":
        proto = level["prototype"]
        classes = list(proto["classes"])
        if not classes:
            raise LabelTransferError(
                f"the reference has no cell type of level {label_key!r} with at least "
                f"{proto.get('min_cells')} cells, so no prototypes; ask for an atlas bundle"
            )
        temperature = float(proto["calibration"]["temperature"])
        probs = np.empty((z.shape[0], len(classes)))
        stat = np.empty(z.shape[0])
        best: list[np.ndarray] = []
        for lo in range(0, z.shape[0], _QUERY_CHUNK):
            scores, stat[lo : lo + _QUERY_CHUNK] = _proto_scores(
                z[lo : lo + _QUERY_CHUNK], proto, classes, best=best
            )
            probs[lo : lo + _QUERY_CHUNK] = _softmax(scores / temperature)
        quantiles = proto["calibration"]["novelty_quantiles"]
        sources = np.array(
            [str(p.get("source", "genesis")) for p in proto["prototypes"]], dtype=object
        )
        source = sources[np.concatenate(best)] if best else np.zeros(0, object)
    else:
        raise LabelTransferError(f"unknown method {method!r}; use 'auto', 'knn' or 'prototype'")

    top = probs.argmax(axis=1)
    p_top = probs[np.arange(len(top)), top]
    factor = _novelty_factor(stat, quantiles, tail) if novelty else np.ones_like(p_top)
    if query_context:
        if context_k < 2 or not 0.0 < context_floor <= 1.0:
            raise LabelTransferError(
                "query_context needs context_k >= 2 and context_floor in (0, 1]; "
                "the defaults are 30 and 0.05"
            )
        if z.shape[0] > context_k:
            if method == "knn":
                reference = a[codes >= 0]
            else:
                # the stand-in reference cloud comes from the prototypes of types with
                # min_cells or more cells: a few-cell prototype's spread is not known well
                # enough to draw cells from (ADR 0018)
                sampled = {
                    "prototypes": [
                        p for p in level["prototype"]["prototypes"] if "spread_inflation" not in p
                    ]
                }
                n_ref = int(sum(int(p.get("n_cells", 1)) for p in sampled["prototypes"]))
                reference = _prototype_sample(
                    sampled, min(max(n_ref, context_k), _CONTEXT_MAX_REFERENCE), 0
                )
            coverage = _reference_coverage(reference, z, context_k)
            factor = factor * np.clip(coverage / context_floor, 0.0, 1.0)
        else:
            logger.warning(
                "query_context ignored: the query has %d cells, it needs more than context_k=%d",
                z.shape[0],
                context_k,
            )
    uncertainty = np.clip(1.0 - p_top * factor, 0.0, 1.0).astype(np.float32)
    top_label = np.array(classes, dtype=object)[top]
    pred = np.where(uncertainty > threshold, UNKNOWN, top_label).astype(object)
    return LabelPrediction(
        pred=pred,
        uncertainty=uncertainty,
        top_label=top_label,
        probabilities=probs.astype(np.float32),
        classes=classes,
        method=method,
        novelty=(1.0 - factor).astype(np.float32),
        source=source if method == "prototype" else np.full(len(top), "genesis", dtype=object),
    )


def predict_label_levels(
    labels_manifest: Mapping[str, Any],
    atlas_tensors: Mapping[str, np.ndarray],
    query_latent: Any,
    *,
    threshold: float = 0.5,
    k: int = 15,
    method: str = "auto",
) -> dict[str, LabelPrediction]:
    """:func:`predict_labels` for every label level the bundle carries (e.g. coarse and fine)."""
    levels = labels_manifest.get("levels", {}) if labels_manifest else {}
    return {
        name: predict_labels(
            labels_manifest,
            atlas_tensors,
            query_latent,
            label_key=name,
            threshold=threshold,
            k=k,
            method=method,
        )
        for name in levels
    }
