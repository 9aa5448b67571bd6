"""Expression prototypes as sums: one rule for a central reference and a federated one (ADR 0037).

Every statistic the expression rule of :mod:`scarches_fl.refine` stores is a function of sums
over cells, so cells held at several sites give the numbers the pooled cells give:

1. **Subspace.** ``(n, sum x, sum x x^T)`` of the log-normalised expression of labelled cells
   (:func:`expression_moments`, pooled by addition) give the gene mean and the gene-gene
   covariance; its leading eigenvectors are the components (:func:`subspace_from_moments`, an
   exact eigendecomposition, for gene panels up to :data:`EXACT_PCA_MAX_GENES`).
2. **Type model.** Of the scores in that subspace: per type the count and sum, per batch the
   count and sum, the type x batch count table and the second moment over all cells
   (:func:`type_batch_sums`). From these, :func:`type_model` fits one offset per batch together
   with the type means (the alternating fit :mod:`scarches_fl.refine` documents), then the type
   means and the pooled within-type scatter of the offset-corrected scores. No sum over one
   (type, batch) group is needed.
3. **Calibration.** Each cell is scored out of fold: the model fitted without the cells of its
   fold is the pooled model with those cells' sums taken out, which whoever holds the cells can
   compute from the pooled means, counts and scatter (:func:`calibration_sums`); what is
   summed over the scored cells is the negative log-likelihood of the true type at each
   temperature of :data:`scarches_fl._federated_labels.TEMPERATURE_GRID`, a histogram of the
   novelty statistic over :data:`~scarches_fl._federated_labels.NOVELTY_BINS`, and the scored and
   correct counts. :func:`calibrate_expression` picks the temperature and reads the quantiles.

A central reference is the case of one holder of all cells (no floor); a federated one pools the
sites' shares, where a type's or a batch's sums leave a site only over at least the site floor
of cells. No function here does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sp

from scarches_fl._federated_labels import NOVELTY_BINS, TEMPERATURE_GRID, _histogram_quantiles
from scarches_fl.labels import _N_QUANTILES, _softmax

__all__ = [
    "EXACT_PCA_MAX_GENES",
    "DEFAULT_N_COMPONENTS",
    "DEFAULT_KAPPA",
    "N_FOLDS",
    "ExpressionMoments",
    "TypeBatchSums",
    "ExpressionTypeModel",
    "expression_moments",
    "pool_moments",
    "moments_to_arrays",
    "moments_from_arrays",
    "subspace_from_moments",
    "included_cells",
    "type_batch_sums",
    "sums_to_arrays",
    "sums_from_arrays",
    "pool_sums",
    "type_model",
    "shrunk_covariance",
    "calibration_sums",
    "calibrate_expression",
    "model_to_json",
    "model_from_json",
    "lognormalize",
    "site_expression_moments",
    "site_sums",
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
    import scipy.sparse as sp  # model extra: the module imports without it (auditor install)

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
    import scipy.sparse as sp  # model extra: the module imports without it (auditor install)

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


@dataclass
class TypeBatchSums:
    """What the type model needs from a holder's cells (scores in the subspace): per type its
    count and sum, per batch its count and sum, the type x batch count table, and the second
    moment ``sum y y^T`` over all of them. Never a sum over one (type, batch) group."""

    types: list[str]
    batches: list[str]
    counts: np.ndarray  # (T, B) cells per (type, batch)
    type_sums: np.ndarray  # (T, p)
    batch_sums: np.ndarray  # (B, p)
    gram: np.ndarray  # (p, p)


def included_cells(
    types: Any, batches: Any, classes: Sequence[str], *, floor: int = 1
) -> np.ndarray:
    """Which cells a holder's sums cover: a type of ``classes`` with at least ``floor`` such
    cells at the holder, in a batch with at least ``floor`` such cells (dropping a batch can
    take a type under the floor, so both rules are applied until neither removes a cell)."""
    t = np.asarray([None if v is None else str(v) for v in types], dtype=object)
    b = np.asarray(batches).astype(str)
    wanted = set(classes)
    keep = np.asarray([v in wanted for v in t], dtype=bool)
    floor = max(1, int(floor))
    while True:
        before = int(keep.sum())
        for values in (t, b):
            names, inverse = np.unique(values[keep].astype(str), return_inverse=True)
            small = names[np.bincount(inverse, minlength=len(names)) < floor]
            if small.size:
                keep &= ~np.isin(values.astype(str), small)
        if int(keep.sum()) == before:
            return keep


def type_batch_sums(
    scores: np.ndarray, types: Any, batches: Any, classes: Sequence[str], *, floor: int = 1
) -> TypeBatchSums:
    """:class:`TypeBatchSums` of the cells :func:`included_cells` keeps."""
    keep = included_cells(types, batches, classes, floor=floor)
    y = np.asarray(scores, dtype=np.float64)[keep]
    t = np.asarray([str(v) for v in np.asarray(types, dtype=object)[keep]])
    b = np.asarray(batches).astype(str)[keep]
    tn, ti = np.unique(t, return_inverse=True)
    bn, bi = np.unique(b, return_inverse=True)
    p = y.shape[1] if y.ndim == 2 else 0
    counts = np.zeros((len(tn), len(bn)))
    np.add.at(counts, (ti, bi), 1.0)
    type_sums = np.zeros((len(tn), p))
    np.add.at(type_sums, ti, y)
    batch_sums = np.zeros((len(bn), p))
    np.add.at(batch_sums, bi, y)
    return TypeBatchSums(
        [str(v) for v in tn], [str(v) for v in bn], counts, type_sums, batch_sums, y.T @ y
    )


def sums_to_arrays(s: TypeBatchSums) -> tuple[list[str], dict[str, np.ndarray]]:
    """(names: ``json.dumps(["type", name])`` per type then ``json.dumps(["batch", name])`` per
    batch, arrays ``counts`` (T, B), ``type_sums``, ``batch_sums``, ``gram``)."""
    if not s.types:
        return [], {}
    names = [json.dumps(["type", t]) for t in s.types] + [
        json.dumps(["batch", b]) for b in s.batches
    ]
    return names, {
        "counts": np.asarray(s.counts, dtype=np.float64),
        "type_sums": np.asarray(s.type_sums, dtype=np.float64),
        "batch_sums": np.asarray(s.batch_sums, dtype=np.float64),
        "gram": np.asarray(s.gram, dtype=np.float64),
    }


def sums_from_arrays(
    names: Sequence[str],
    arrays: Mapping[str, np.ndarray],
    *,
    n_components: int,
    classes: Sequence[str],
    floor: int = 1,
    batch_prefix: str = "",
) -> TypeBatchSums:
    """The inverse of :func:`sums_to_arrays` (batch names prefixed with ``batch_prefix``, so
    that two holders' batches never share an offset). ``ValueError`` for a name that is not a
    ``["type" | "batch", name]`` pair, a type not in ``classes``, shapes that do not fit,
    non-finite values, counts that are not whole numbers, the sums of a type or a batch over
    fewer than ``floor`` cells, or per-type and per-batch sums that disagree."""
    kinds: dict[str, list[str]] = {"type": [], "batch": []}
    for name in names:
        try:
            pair = json.loads(name)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"name {name!r} is not JSON") from exc
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and pair[0] in kinds
            and isinstance(pair[1], str)
        ):
            raise ValueError(f'name {name!r} is not a ["type" or "batch", name] pair')
        kinds[pair[0]].append(pair[1])
    types, batches = kinds["type"], kinds["batch"]
    if len(set(types)) != len(types) or len(set(batches)) != len(batches):
        raise ValueError("a type or a batch is named twice")
    if any(t not in classes for t in types):
        raise ValueError("a type the federation does not keep was sent")
    t, b, p = len(types), len(batches), int(n_components)
    _check_arrays(
        arrays, {"counts": (t, b), "type_sums": (t, p), "batch_sums": (b, p), "gram": (p, p)}
    )
    counts = np.asarray(arrays["counts"], dtype=np.float64)
    if np.any(counts < 0) or np.any(counts != np.round(counts)):
        raise ValueError("counts must be whole numbers")
    if t == 0 or b == 0:
        raise ValueError("sums name no type or no batch")
    if counts.sum(axis=1).min() < max(1, floor) or counts.sum(axis=0).min() < max(1, floor):
        raise ValueError(f"a type or a batch has fewer than {floor} cells")
    ts, bs = np.asarray(arrays["type_sums"]), np.asarray(arrays["batch_sums"])
    if not np.allclose(
        ts.sum(axis=0), bs.sum(axis=0), rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(ts).max()))
    ):
        raise ValueError("the per-type and per-batch sums do not cover the same cells")
    return TypeBatchSums(
        list(types),
        [batch_prefix + v for v in batches],
        counts,
        np.asarray(ts, dtype=np.float64),
        np.asarray(bs, dtype=np.float64),
        np.asarray(arrays["gram"], dtype=np.float64),
    )


def pool_sums(parts: Sequence[TypeBatchSums]) -> TypeBatchSums:
    """Several holders' sums together (a type or batch named by two holders adds up)."""
    types = sorted({t for s in parts for t in s.types})
    batches = sorted({b for s in parts for b in s.batches})
    ti = {t: i for i, t in enumerate(types)}
    bi = {b: i for i, b in enumerate(batches)}
    p = next((s.gram.shape[0] for s in parts), 0)
    counts = np.zeros((len(types), len(batches)))
    type_sums = np.zeros((len(types), p))
    batch_sums = np.zeros((len(batches), p))
    gram = np.zeros((p, p))
    for s in parts:
        rows = [ti[t] for t in s.types]
        cols = [bi[b] for b in s.batches]
        counts[np.ix_(rows, cols)] += s.counts
        type_sums[rows] += s.type_sums
        batch_sums[cols] += s.batch_sums
        gram += s.gram
    return TypeBatchSums(types, batches, counts, type_sums, batch_sums, gram)


def type_model(s: TypeBatchSums, n_components: int) -> ExpressionTypeModel:
    """Batch offsets fitted with the type means (``y = mean[type] + offset[batch]``: alternate
    means and offsets ten times, the offsets centred on zero over cells; none with one batch),
    then the type means and pooled within-type scatter of ``y - offset[batch]``, all from the
    sums (the expansion of ``sum (y - o - m)(y - o - m)^T`` needs no per-group sum)."""
    p = int(n_components)
    n_cb = s.counts
    n_c = n_cb.sum(axis=1)
    n_b = n_cb.sum(axis=0)
    present = n_c > 0
    offsets = np.zeros((len(s.batches), p))

    def means_given(off: np.ndarray) -> np.ndarray:
        m = np.zeros((len(s.types), p))
        num = s.type_sums - n_cb @ off
        m[present] = num[present] / n_c[present, None]
        return m

    if len(s.batches) >= 2:
        for _ in range(_OFFSET_ITERATIONS):
            means = means_given(offsets)
            offsets = (s.batch_sums - n_cb.T @ means) / np.maximum(n_b, 1.0)[:, None]
            offsets -= (n_b @ offsets / max(n_b.sum(), 1.0))[None, :]
    means = means_given(offsets)
    so = s.batch_sums.T @ offsets
    sm = s.type_sums.T @ means
    om = offsets.T @ n_cb.T @ means
    within = (
        s.gram
        - so
        - so.T
        - sm
        - sm.T
        + offsets.T @ (n_b[:, None] * offsets)
        + om
        + om.T
        + means.T @ (n_c[:, None] * means)
    )
    within = 0.5 * (within + within.T)
    return ExpressionTypeModel(
        list(s.types), n_c, means, within, {b: offsets[i] for i, b in enumerate(s.batches)}
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
    import scipy.sparse as sp  # model extra: the module imports without it (auditor install)

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
    """(scores, types, batches) of the cells :func:`included_cells` keeps."""
    import scipy.sparse as sp  # model extra: the module imports without it (auditor install)

    lab = np.asarray([None if v is None else str(v) for v in labels], dtype=object)
    bat = np.asarray(batches).astype(str)
    idx = np.flatnonzero(included_cells(lab, bat, classes, floor=floor))
    gene_mean, comps = (np.asarray(a, dtype=np.float64) for a in projection)
    y = _project(lognormalize(sp.csr_matrix(counts)[idx]), gene_mean, comps)
    return y, [str(v) for v in lab[idx]], bat[idx]


def site_sums(
    counts: Any,
    labels: Any,
    batches: Any,
    projection: tuple[np.ndarray, np.ndarray],
    classes: Sequence[str],
    *,
    floor: int,
) -> TypeBatchSums:
    """Step 2 at a site: :func:`type_batch_sums` of its cells on the pooled subspace
    (``projection`` = (gene mean, components) as the bundle stores them)."""
    y, types, bat = _site_cells(counts, labels, batches, projection, classes, floor)
    return type_batch_sums(y, types, bat, classes, floor=floor)


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
