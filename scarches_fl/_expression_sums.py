"""Expression prototypes as sums: one rule for a central reference and a federated one (ADR 0037).

Every statistic the expression rule of :mod:`scarches_fl.refine` stores is a function of sums
over cells, so cells held at several sites give the numbers the pooled cells give:

1. **Subspace.** ``(n, sum x, sum x x^T)`` of the log-normalised expression of labelled cells
   (:func:`expression_moments`, pooled by addition) give the gene mean and the gene-gene
   covariance; its leading eigenvectors are the components (:func:`subspace_from_moments`, an
   exact eigendecomposition, for gene panels up to :data:`EXACT_PCA_MAX_GENES`).
2. **Type model.** Per (cell type, batch) group: the count, the sum and the second moment of the
   scores in that subspace (:func:`group_moments`). From the pooled groups,
   :func:`type_model` fits one offset per batch together with the type means (the alternating
   fit :mod:`scarches_fl.refine` documents), then the type means and the pooled within-type
   scatter of the offset-corrected scores.
3. **Calibration.** Each cell is scored out of fold: the model fitted without the cells of its
   fold is the pooled model with those cells' sums taken out, which whoever holds the cells can
   compute from the pooled means, counts and scatter (:func:`calibration_sums`); what is
   summed over the scored cells is the negative log-likelihood of the true type at each
   temperature of :data:`scarches_fl._federated_labels.TEMPERATURE_GRID`, a histogram of the
   novelty statistic over :data:`~scarches_fl._federated_labels.NOVELTY_BINS`, and the scored and
   correct counts. :func:`calibrate_expression` picks the temperature and reads the quantiles.

A central reference is the case of one holder of all cells (no floor); a federated one pools the
sites' shares, where a (type, batch) group leaves a site only with at least the site floor of
cells. No function here does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from scarches_fl._federated_labels import NOVELTY_BINS, TEMPERATURE_GRID, _histogram_quantiles
from scarches_fl.labels import _N_QUANTILES, _softmax

__all__ = [
    "EXACT_PCA_MAX_GENES",
    "DEFAULT_N_COMPONENTS",
    "DEFAULT_KAPPA",
    "N_FOLDS",
    "ExpressionMoments",
    "GroupMoments",
    "ExpressionTypeModel",
    "expression_moments",
    "pool_moments",
    "moments_to_arrays",
    "moments_from_arrays",
    "subspace_from_moments",
    "group_moments",
    "groups_to_arrays",
    "groups_from_arrays",
    "pool_groups",
    "type_model",
    "shrunk_covariance",
    "calibration_sums",
    "calibrate_expression",
    "model_to_json",
    "model_from_json",
    "lognormalize",
    "site_expression_moments",
    "site_groups",
    "site_calibration",
]

#: The largest gene panel whose covariance (genes x genes float64) is formed; above it a
#: central reference falls back to a randomized SVD and a federation stores no expression
#: prototypes (a share would be 8 * genes^2 bytes).
EXACT_PCA_MAX_GENES = 4096
#: components of the subspace and pseudo-cells of the covariance shrinkage (ADR 0070)
DEFAULT_N_COMPONENTS = 100
DEFAULT_KAPPA = 200.0
#: out-of-fold calibration: each fold's model sees 80 % of the cells
N_FOLDS = 5
_OFFSET_ITERATIONS = 10
_TARGET_SUM = 1e4


@dataclass
class ExpressionMoments:
    """Count, sum and second moment (``sum x x^T``) of log-normalised expression."""

    n: int
    total: np.ndarray  # (genes,)
    gram: np.ndarray  # (genes, genes)


@dataclass
class GroupMoments:
    """Count, sum and second moment of the scores (subspace coordinates) of one group."""

    n: int
    total: np.ndarray  # (p,)
    gram: np.ndarray  # (p, p)


@dataclass
class ExpressionTypeModel:
    """Per-type means of the offset-corrected scores, their counts, the pooled within-type
    scatter (unshrunk) and each batch's offset."""

    classes: list[str]
    counts: np.ndarray  # (T,) cells behind each mean (0: a class without cells)
    means: np.ndarray  # (T, p)
    within: np.ndarray  # (p, p) sum over types of the scatter about the type's mean
    offsets: dict[str, np.ndarray] = field(default_factory=dict)


def lognormalize(counts: Any) -> sp.csr_matrix:
    """``log1p(1e4 * x / total)`` per cell (CSR float32); a cell with no counts stays 0."""
    x = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    total = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    scale = np.where(total > 0, _TARGET_SUM / np.maximum(total, 1e-12), 0.0)
    x.data = np.log1p(x.data * np.repeat(scale, np.diff(x.indptr))).astype(np.float32)
    return x


def _project(x: sp.csr_matrix, gene_mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Scores of log-normalised cells on the stored subspace: ``(x - mean) C^T``."""
    return np.asarray(x @ components.T, dtype=np.float64) - (gene_mean @ components.T)[None, :]


def expression_moments(x: Any) -> ExpressionMoments:
    """:class:`ExpressionMoments` of log-normalised cells ``x`` (cells x genes, sparse or
    dense)."""
    m = sp.csr_matrix(x, dtype=np.float64)
    gram = m.T @ m
    gram = gram.toarray() if sp.issparse(gram) else np.asarray(gram)
    return ExpressionMoments(
        int(m.shape[0]), np.asarray(m.sum(axis=0), dtype=np.float64).ravel(), gram
    )


def pool_moments(parts: Sequence[ExpressionMoments]) -> ExpressionMoments:
    """The moments of the union of the parts' cells."""
    if not parts:
        raise ValueError("no expression moments to pool")
    return ExpressionMoments(
        int(sum(p.n for p in parts)),
        np.sum([p.total for p in parts], axis=0),
        np.sum([p.gram for p in parts], axis=0),
    )


def moments_to_arrays(m: ExpressionMoments) -> dict[str, np.ndarray]:
    return {
        "count": np.asarray([m.n], dtype=np.float64),
        "total": np.asarray(m.total, dtype=np.float64),
        "gram": np.asarray(m.gram, dtype=np.float64),
    }


def moments_from_arrays(arrays: Mapping[str, np.ndarray], *, n_genes: int) -> ExpressionMoments:
    """The inverse of :func:`moments_to_arrays`; ``ValueError`` on shapes that do not fit
    ``n_genes``, non-finite values, an asymmetric second moment or a count that is not a
    positive integer."""
    want = {"count": (1,), "total": (n_genes,), "gram": (n_genes, n_genes)}
    _check_arrays(arrays, want)
    gram = np.asarray(arrays["gram"], dtype=np.float64)
    if not np.array_equal(gram, gram.T):
        raise ValueError("gram is not symmetric")
    return ExpressionMoments(
        _count(arrays["count"][0]), np.asarray(arrays["total"], dtype=np.float64), gram
    )


def subspace_from_moments(m: ExpressionMoments, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """(gene mean, components: n_components x genes) of the principal subspace of the cells
    behind ``m``: the leading eigenvectors of their covariance, each signed so that its largest
    entry in absolute value is positive."""
    if m.n < 2:
        raise ValueError("a principal subspace needs at least two cells")
    mean = m.total / m.n
    cov = m.gram - m.n * np.outer(mean, mean)
    cov = 0.5 * (cov + cov.T)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][: int(n_components)]
    comps = vectors[:, order].T
    signs = np.sign(comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)])
    return mean, comps * np.where(signs == 0, 1.0, signs)[:, None]


def group_moments(
    scores: np.ndarray,
    types: Any,
    batches: Any,
    classes: Sequence[str],
    *,
    floor: int = 1,
) -> dict[tuple[str, str], GroupMoments]:
    """Per (type, batch) group of at least ``floor`` cells whose type is one of ``classes``:
    its :class:`GroupMoments`. Cells of other types (or unlabelled: ``None``) count for
    nothing; a smaller group does not leave its holder."""
    y = np.asarray(scores, dtype=np.float64)
    t = np.asarray([None if v is None else str(v) for v in types], dtype=object)
    b = np.asarray(batches).astype(str)
    wanted = set(classes)
    out: dict[tuple[str, str], GroupMoments] = {}
    keys = sorted({(str(tv), str(bv)) for tv, bv in zip(t, b, strict=True) if tv in wanted})
    for tv, bv in keys:
        rows = (t == tv) & (b == bv)
        if int(rows.sum()) < max(1, int(floor)):
            continue
        yg = y[rows]
        out[(tv, bv)] = GroupMoments(int(rows.sum()), yg.sum(axis=0), yg.T @ yg)
    return out


def groups_to_arrays(
    groups: Mapping[tuple[str, str], GroupMoments],
) -> tuple[list[str], dict[str, np.ndarray]]:
    """(group names, each ``json.dumps([type, batch])``, and arrays ``counts`` (G,), ``sums``
    (G, p), ``grams`` (G, p, p))."""
    keys = sorted(groups)
    if not keys:
        return [], {}
    return [json.dumps(list(k)) for k in keys], {
        "counts": np.asarray([groups[k].n for k in keys], dtype=np.float64),
        "sums": np.stack([groups[k].total for k in keys]).astype(np.float64),
        "grams": np.stack([groups[k].gram for k in keys]).astype(np.float64),
    }


def groups_from_arrays(
    names: Sequence[str],
    arrays: Mapping[str, np.ndarray],
    *,
    n_components: int,
    classes: Sequence[str],
    batch_prefix: str = "",
) -> dict[tuple[str, str], GroupMoments]:
    """The inverse of :func:`groups_to_arrays` (batch names prefixed with ``batch_prefix``, so
    that two holders' batches never share an offset); ``ValueError`` for a name that is not a
    ``[type, batch]`` pair of a type in ``classes``, shapes that do not fit, non-finite values or
    counts that are not positive integers."""
    g = len(names)
    if g == 0:
        return {}
    keys: list[tuple[str, str]] = []
    for name in names:
        try:
            pair = json.loads(name)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"group name {name!r} is not JSON") from exc
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)
        ):
            raise ValueError(f"group name {name!r} is not a [type, batch] pair")
        if pair[0] not in classes:
            raise ValueError(f"group {name!r} is of a type the federation does not keep")
        keys.append((pair[0], batch_prefix + pair[1]))
    if len(set(keys)) != g:
        raise ValueError("a group is named twice")
    p = int(n_components)
    _check_arrays(arrays, {"counts": (g,), "sums": (g, p), "grams": (g, p, p)})
    return {
        k: GroupMoments(
            _count(arrays["counts"][i]),
            np.asarray(arrays["sums"][i], dtype=np.float64),
            np.asarray(arrays["grams"][i], dtype=np.float64),
        )
        for i, k in enumerate(keys)
    }


def pool_groups(
    parts: Sequence[Mapping[tuple[str, str], GroupMoments]],
) -> dict[tuple[str, str], GroupMoments]:
    """Groups of several holders together (a group named by two holders adds up)."""
    out: dict[tuple[str, str], GroupMoments] = {}
    for part in parts:
        for k, g in part.items():
            if k in out:
                o = out[k]
                out[k] = GroupMoments(o.n + g.n, o.total + g.total, o.gram + g.gram)
            else:
                out[k] = GroupMoments(g.n, g.total.copy(), g.gram.copy())
    return out


def type_model(
    groups: Mapping[tuple[str, str], GroupMoments], classes: Sequence[str], n_components: int
) -> ExpressionTypeModel:
    """Batch offsets fitted with the type means (``y = mean[type] + offset[batch]``: alternate
    means and offsets ten times, the offsets centred on zero over cells; none with one batch),
    then the type means and pooled within-type scatter of ``y - offset[batch]``."""
    classes = list(classes)
    p = int(n_components)
    index = {c: i for i, c in enumerate(classes)}
    batch_names = sorted({b for _t, b in groups})
    bindex = {b: i for i, b in enumerate(batch_names)}
    n_cb = np.zeros((len(classes), len(batch_names)))
    s_cb = np.zeros((len(classes), len(batch_names), p))
    for (t, b), g in groups.items():
        n_cb[index[t], bindex[b]] += g.n
        s_cb[index[t], bindex[b]] += g.total
    n_c = n_cb.sum(axis=1)
    n_b = n_cb.sum(axis=0)
    present = n_c > 0
    offsets = np.zeros((len(batch_names), p))

    def means_given(off: np.ndarray) -> np.ndarray:
        m = np.zeros((len(classes), p))
        num = s_cb.sum(axis=1) - np.einsum("cb,bp->cp", n_cb, off)
        m[present] = num[present] / n_c[present, None]
        return m

    if len(batch_names) >= 2:
        for _ in range(_OFFSET_ITERATIONS):
            means = means_given(offsets)
            resid = s_cb.sum(axis=0) - np.einsum("cb,cp->bp", n_cb, means)
            offsets = resid / np.maximum(n_b, 1.0)[:, None]
            offsets -= (n_b @ offsets / max(n_b.sum(), 1.0))[None, :]
    means = means_given(offsets)
    within = np.zeros((p, p))
    for (_t, b), g in groups.items():
        o = offsets[bindex[b]]
        so = np.outer(g.total, o)
        within += g.gram - so - so.T + g.n * np.outer(o, o)
    within -= np.einsum("c,cp,cq->pq", n_c, means, means)
    within = 0.5 * (within + within.T)
    return ExpressionTypeModel(
        classes,
        n_c,
        means,
        within,
        {b: offsets[i] for i, b in enumerate(batch_names)},
    )


def shrunk_covariance(within: np.ndarray, counts: np.ndarray, kappa: float) -> np.ndarray:
    """The pooled within-type covariance (scatter over ``sum (n_c - 1)`` of the types with
    cells) shrunk towards its mean variance with ``kappa`` pseudo-cells."""
    p = within.shape[0]
    n_w = max(float(np.sum(np.maximum(counts[counts > 0] - 1, 0))), 1.0)
    pooled = within / n_w
    target = float(np.trace(pooled)) / p if p else 1.0
    return (n_w * pooled + kappa * max(target, 1e-6) * np.eye(p)) / (n_w + kappa)


def _whiten(cov: np.ndarray) -> np.ndarray:
    chol = np.linalg.cholesky(cov)
    return np.linalg.solve(chol, np.eye(cov.shape[0]))


def _distances(w: np.ndarray, nu: np.ndarray) -> np.ndarray:
    d = (w * w).sum(axis=1)[:, None] - 2.0 * w @ nu.T + (nu * nu).sum(axis=1)[None, :]
    return np.maximum(d, 0.0)


def calibration_sums(
    model: ExpressionTypeModel,
    corrected: np.ndarray,
    types: Sequence[str],
    folds: np.ndarray,
    *,
    kappa: float,
) -> dict[str, np.ndarray]:
    """Out-of-fold calibration sums over the holder's cells (module docstring, step 3).

    ``corrected``: the holder's cells' offset-corrected scores, exactly the cells its groups
    in ``model`` were built from; ``types`` their types; ``folds`` their fold (0 to
    :data:`N_FOLDS` - 1). Returns ``nll`` (per temperature), ``novelty_hist`` (out of fold),
    ``in_sample_hist`` (under the full model: the fallback with too few cells for folds) and
    ``counts`` = [cells scored out of fold, of which classified correctly]."""
    y = np.asarray(corrected, dtype=np.float64)
    index = {c: i for i, c in enumerate(model.classes)}
    codes = np.asarray([index[str(t)] for t in types], dtype=np.int64)
    folds = np.asarray(folds, dtype=np.int64)
    p = y.shape[1] if y.ndim == 2 else model.means.shape[1]
    n_bins = len(NOVELTY_BINS) - 1
    nll = np.zeros(len(TEMPERATURE_GRID))
    hist = np.zeros(n_bins)
    counts = np.zeros(2)
    sums_c = model.means * model.counts[:, None]
    second = model.within + np.einsum("c,cp,cq->pq", model.counts, model.means, model.means)
    for f in range(N_FOLDS):
        rows = folds == f
        if not rows.any():
            continue
        yf, cf = y[rows], codes[rows]
        n_f = model.counts - np.bincount(cf, minlength=len(model.classes))
        if n_f.sum() <= 0:
            continue
        s_f = sums_c - np.stack([yf[cf == c].sum(axis=0) for c in range(len(model.classes))])
        present = n_f > 0
        m_f = np.zeros_like(model.means)
        m_f[present] = s_f[present] / n_f[present, None]
        w_f = second - yf.T @ yf - np.einsum("c,cp,cq->pq", n_f, m_f, m_f)
        cov_f = shrunk_covariance(0.5 * (w_f + w_f.T), n_f, kappa)
        infl = 1.0 + 1.0 / np.maximum(n_f, 1.0)
        wm = _whiten(cov_f)
        d2 = _distances(yf @ wm.T, m_f @ wm.T) / infl[None, :]
        d2[:, ~present] = np.inf
        logits = -0.5 * d2 - 0.5 * p * np.log(infl)[None, :]
        stat = d2.min(axis=1)
        ok = np.isfinite(stat)
        if not ok.any():
            continue
        lg = np.where(np.isfinite(logits[ok]), logits[ok], -1e30)
        truth = cf[ok]
        for i, t in enumerate(TEMPERATURE_GRID):
            prob = _softmax(lg / t)
            nll[i] -= np.sum(np.log(np.clip(prob[np.arange(len(truth)), truth], 1e-12, None)))
        hist += _binned(stat[ok], n_bins)
        counts += [float(ok.sum()), float(np.sum(lg.argmax(axis=1) == truth))]
    cov = shrunk_covariance(model.within, model.counts, kappa)
    infl = 1.0 + 1.0 / np.maximum(model.counts, 1.0)
    wm = _whiten(cov)
    d2 = _distances(y @ wm.T, model.means @ wm.T) / infl[None, :]
    in_sample = _binned(d2.min(axis=1), n_bins) if len(y) else np.zeros(n_bins)
    return {"nll": nll, "novelty_hist": hist, "in_sample_hist": in_sample, "counts": counts}


def _binned(values: np.ndarray, n_bins: int) -> np.ndarray:
    bins = np.clip(np.searchsorted(NOVELTY_BINS, values, side="right") - 1, 0, n_bins - 1)
    return np.bincount(bins, minlength=n_bins).astype(np.float64)


def calibrate_expression(shares: Sequence[Mapping[str, np.ndarray]]) -> tuple[float, list[float]]:
    """(temperature, novelty quantiles) from the holders' :func:`calibration_sums`: the
    temperature of the grid with the smallest pooled out-of-fold NLL, the quantiles read off the
    pooled histogram; with fewer than two cells scored out of fold, temperature 1 and the
    in-sample histogram's quantiles."""
    nll = np.sum([s["nll"] for s in shares], axis=0)
    counts = np.sum([s["counts"] for s in shares], axis=0)
    qs = np.linspace(0.0, 1.0, _N_QUANTILES)
    if counts[0] >= 2:
        hist = np.sum([s["novelty_hist"] for s in shares], axis=0)
        temperature = float(TEMPERATURE_GRID[int(np.argmin(nll))])
    else:
        hist = np.sum([s["in_sample_hist"] for s in shares], axis=0)
        temperature = 1.0
    if hist.sum() <= 0:
        raise ValueError("no cell was scored for the expression calibration")
    return temperature, [float(q) for q in _histogram_quantiles(hist, NOVELTY_BINS, qs)]


def model_to_json(model: ExpressionTypeModel, batches: Sequence[str] | None = None) -> bytes:
    """What a holder needs to compute :func:`calibration_sums`: the classes, counts, means,
    pooled within-type scatter, and the offsets of ``batches`` (default: all)."""
    keep = model.offsets if batches is None else {b: model.offsets[b] for b in batches}
    doc = {
        "classes": list(model.classes),
        "counts": [float(v) for v in model.counts],
        "means": [[float(v) for v in row] for row in model.means],
        "within": [[float(v) for v in row] for row in model.within],
        "offsets": {b: [float(v) for v in o] for b, o in sorted(keep.items())},
    }
    return json.dumps(doc, sort_keys=True).encode()


def model_from_json(data: bytes) -> ExpressionTypeModel:
    doc = json.loads(bytes(data))
    return ExpressionTypeModel(
        [str(c) for c in doc["classes"]],
        np.asarray(doc["counts"], dtype=np.float64),
        np.asarray(doc["means"], dtype=np.float64),
        np.asarray(doc["within"], dtype=np.float64),
        {str(b): np.asarray(o, dtype=np.float64) for b, o in doc["offsets"].items()},
    )


# -- one holder's side (a federated site; a central reference is the holder of every cell) -----


def _labelled(labels: Any) -> np.ndarray:
    return np.asarray([v is not None for v in labels], dtype=bool)


def site_expression_moments(counts: Any, labels: Any) -> ExpressionMoments:
    """Step 1 at a site: the moments of its labelled cells' log-normalised expression
    (``labels``: one per cell, ``None`` for unlabelled; ``counts``: raw, on the bundle's genes)."""
    rows = np.flatnonzero(_labelled(labels))
    return expression_moments(lognormalize(sp.csr_matrix(counts)[rows]))


def _site_cells(
    counts: Any,
    labels: Any,
    batches: Any,
    projection: tuple[np.ndarray, np.ndarray],
    classes: Sequence[str],
    floor: int,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(scores, types, batches) of the cells whose (type, batch) group leaves the site: a type
    of ``classes`` in a group of at least ``floor`` cells."""
    lab = np.asarray([None if v is None else str(v) for v in labels], dtype=object)
    bat = np.asarray(batches).astype(str)
    wanted = set(classes)
    keep = np.asarray([v in wanted for v in lab], dtype=bool)
    for t, b in {(str(t), str(b)) for t, b in zip(lab[keep], bat[keep], strict=True)}:
        rows = keep & (lab == t) & (bat == b)
        if int(rows.sum()) < max(1, int(floor)):
            keep &= ~rows
    idx = np.flatnonzero(keep)
    gene_mean, comps = (np.asarray(a, dtype=np.float64) for a in projection)
    y = _project(lognormalize(sp.csr_matrix(counts)[idx]), gene_mean, comps)
    return y, [str(v) for v in lab[idx]], bat[idx]


def site_groups(
    counts: Any,
    labels: Any,
    batches: Any,
    projection: tuple[np.ndarray, np.ndarray],
    classes: Sequence[str],
    *,
    floor: int,
) -> dict[tuple[str, str], GroupMoments]:
    """Step 2 at a site: :func:`group_moments` of its cells on the pooled subspace
    (``projection`` = (gene mean, components) as the bundle stores them)."""
    y, types, bat = _site_cells(counts, labels, batches, projection, classes, floor)
    return group_moments(y, types, bat, classes, floor=floor)


def site_calibration(
    counts: Any,
    labels: Any,
    batches: Any,
    projection: tuple[np.ndarray, np.ndarray],
    model: ExpressionTypeModel,
    *,
    floor: int,
    kappa: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """Step 3 at a site: :func:`calibration_sums` of the cells its groups were built from
    (``model.offsets`` keyed by the site's own batch names), each in a seeded random fold."""
    y, types, bat = _site_cells(counts, labels, batches, projection, model.classes, floor)
    if len(types) == 0:
        return calibration_sums(
            model, np.zeros((0, model.means.shape[1])), [], np.zeros(0), kappa=kappa
        )
    corrected = y - np.stack([model.offsets[b] for b in bat])
    folds = np.random.default_rng(int(seed)).permutation(len(types)) % N_FOLDS
    return calibration_sums(model, corrected, types, folds, kappa=kappa)


def _check_arrays(arrays: Mapping[str, np.ndarray], want: Mapping[str, tuple[int, ...]]) -> None:
    if set(arrays) != set(want):
        raise ValueError(f"arrays must be exactly {sorted(want)}")
    for k, shape in want.items():
        a = np.asarray(arrays[k])
        if a.shape != shape:
            raise ValueError(f"{k} has shape {list(a.shape)}, expected {list(shape)}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{k} holds NaN or infinity")


def _count(v: Any) -> int:
    f = float(v)
    if f < 1 or f != round(f):
        raise ValueError("counts must be positive integers")
    return int(f)
