"""Expression prototypes: cell-type labels that hold when the query carries a biological shift.

Why (issue 22, ADR 0070): conditions-only surgery moves every cell of a query batch by the same
amount in the first encoder layer. A response that the reference never saw (a stimulation, a
disease) and whose size differs by type cannot be undone there, so in the latent the query's
types land on other types' reference positions, and a rule on the latent alone (prototypes,
kNN, the classifier head) follows them. In log-normalised expression the same response is
close to one additive offset per query batch, shared by every type. The bundle therefore
carries a small summary of the reference's expression, and the query's labels are read from it
after that offset is estimated from the query itself:

Reference side (:func:`fit_expression_prototypes`, at ``reference train`` with a label key):

* ``x -> log1p(1e4 * x / total)`` on the bundle's genes (``total`` over those genes);
* a principal subspace of ``n_components`` (default 100) fitted on labelled reference cells
  (at most ``max_cells_per_type`` cells per type): the leading eigenvectors of their gene-gene
  covariance, from sums (:mod:`scarches_fl._expression_sums`, ADR 0037: a federation computes
  the same numbers from its sites' sums; a seeded randomized SVD above
  ``EXACT_PCA_MAX_GENES`` genes), stored as the tensors ``expression.gene_mean`` (genes) and
  ``expression.components`` (components x genes);
* per label level and type: the mean of its cells in that subspace
  (``expression.<i>.means``), and one pooled within-type covariance
  (``expression.<i>.covariance``) shrunk towards its mean variance with ``kappa`` pseudo-cells
  (default 200), both after removing one offset per reference batch fitted with the labels.
  A type with ``n`` cells is scored under ``(1 + 1 / n) S``: every labelled type can be named, a type seen in few cells with the uncertainty of its mean (ADR 0018's rule);
* from out-of-fold reference cells (five folds): the softmax temperature and the quantiles of
  the novelty statistic (the smallest inflated squared Mahalanobis distance to a type), read
  off sums (the NLL on a grid of temperatures, a fixed-bin histogram of the statistic).

Per-cell expression values never enter the bundle: the subspace, type means and covariance are
summaries of hundreds of cells each, like the latent prototypes beside them.

Query side (:func:`expression_label_posteriors`): project the query, then per query batch

1. start from the latent classifier's probabilities (the bundle's ``classifier.*`` head on the
   query latent; none: the expression rule without offset);
2. offset = the confidence-weighted mean over the batch's confident cells of (cell - the
   probability-weighted type means); relabel with the offset removed; ``rounds`` times;
3. the batch's residual scale = median novelty statistic of its confident cells over the
   reference's median (at least 1): distances of a sparser technology are larger for every
   type, which is not novelty.

No weight of the reference (or of the query's new conditions) moves: the offset is a per-batch
vector at the site, used for labelling and then dropped. The final class probabilities are the
product of the expression posterior and the latent classifier's (``latent_weight``), and the
uncertainty is ``1 - p_top * novelty_factor`` with the expression novelty statistic divided by
the batch scale, on the reference's out-of-fold quantiles (:mod:`scarches_fl.labels`).

Limit: a query batch made only of a type the reference lacks has no confident cell of a known
type to anchor its offset; its cells keep the offset 0 and are judged as they are.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sp

from scarches_fl import _expression_sums as ES
from scarches_fl._expression_sums import _distances, _project, _whiten, lognormalize
from scarches_fl.labels import (
    UNKNOWN,
    LabelPrediction,
    LabelTransferError,
    _clean_labels,
    _novelty_factor,
    _softmax,
)

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "EXPRESSION_GENE_MEAN",
    "EXPRESSION_COMPONENTS",
    "LABEL_METHODS",
    "contributed_expression_types",
    "contributed_pass",
    "fit_expression_prototypes",
    "reference_expression_prototypes",
    "sample_reference_rows",
    "read_type_means",
    "shrunken_means",
    "expression_label_posteriors",
    "has_expression_prototypes",
    "latent_classifier_probabilities",
    "latent_novelty_factor",
    "lognormalize",
    "predict_cell_labels",
    "project_counts",
    "query_scores",
    "transfer_labels",
]

logger = logging.getLogger(__name__)

EXPRESSION_GENE_MEAN = "expression.gene_mean"
EXPRESSION_COMPONENTS = "expression.components"
#: what ``map --label-method`` accepts; ``auto`` = expression where the bundle has it
LABEL_METHODS = ("auto", "expression", "prototype", "knn")
#: types with fewer reference cells than this are rare (ADR 0018's prototype floor): their
#: expression means are read shrunk (ADR 0072)
RARE_BELOW = 20
_N_QUANTILES = 41


def _means_name(level_index: int) -> str:
    return f"expression.{int(level_index)}.means"


def _covariance_name(level_index: int) -> str:
    return f"expression.{int(level_index)}.covariance"


def expression_projection_info(n_components: int, n_cells: int) -> dict[str, Any]:
    """``manifest["labels"]["expression"]``: how a query is projected."""
    return {
        "normalisation": "log1p(1e4 * counts / total over the bundle's genes)",
        "n_components": int(n_components),
        "gene_mean_tensor": EXPRESSION_GENE_MEAN,
        "components_tensor": EXPRESSION_COMPONENTS,
        "n_cells_fitted": int(n_cells),
    }


def expression_level(
    level_index: int,
    model: ES.ExpressionTypeModel,
    *,
    cell_counts: Sequence[int],
    kappa: float,
    temperature: float,
    quantiles: Sequence[float],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(``manifest["labels"]["levels"][name]["expression"]``, its float32 tensors) of a fitted
    type model: the means and the shrunk pooled covariance; ``cell_counts``: the reference cells
    behind each class (what the ``(1 + 1/n)`` inflation reads)."""
    cov = ES.shrunk_covariance(model.within, model.counts, kappa)
    tensors = {
        _means_name(level_index): model.means.astype(np.float32),
        _covariance_name(level_index): cov.astype(np.float32),
    }
    info = {
        "classes": list(model.classes),
        "cell_counts": [int(v) for v in cell_counts],
        "kappa": float(kappa),
        "temperature": float(temperature),
        "novelty_quantiles": [float(q) for q in quantiles],
        "means_tensor": _means_name(level_index),
        "covariance_tensor": _covariance_name(level_index),
    }
    return info, tensors


def _randomized_pca(
    x: sp.csr_matrix, n_components: int, seed: int, n_iter: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """(gene mean, components) of the centred sparse matrix, by a seeded randomized SVD that
    never densifies ``x`` (centring is folded into each product)."""
    rng = np.random.default_rng(seed)
    mean = np.asarray(x.mean(axis=0), dtype=np.float64).ravel()
    n, g = x.shape
    q = min(n_components + 10, n, g)

    def times(m: np.ndarray) -> np.ndarray:  # (X - 1 mean^T) m
        return np.asarray(x @ m, dtype=np.float64) - np.outer(np.ones(n), mean @ m)

    def t_times(m: np.ndarray) -> np.ndarray:  # (X - 1 mean^T)^T m
        return np.asarray(x.T @ m, dtype=np.float64) - np.outer(mean, m.sum(axis=0))

    y = times(rng.standard_normal((g, q)))
    for _ in range(n_iter):
        y, _r = np.linalg.qr(y)
        y, _r = np.linalg.qr(t_times(y))
        y = times(y)
    basis, _r = np.linalg.qr(y)
    b = t_times(basis).T  # q x g
    _u, _s, vt = np.linalg.svd(b, full_matrices=False)
    comps = vt[:n_components]
    # a sign convention, so that the same data give the same tensors
    signs = np.sign(comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)])
    return mean, comps * np.where(signs == 0, 1.0, signs)[:, None]


def sample_reference_rows(
    labels: Any, *, max_cells_per_type: int = 1000, seed: int = 0
) -> np.ndarray:
    """Sorted row indices of a seeded sample of at most ``max_cells_per_type`` labelled cells
    per type (``labels``: one label per cell, missing ones skipped)."""
    if max_cells_per_type < 2:
        raise LabelTransferError("max_cells_per_type must be at least 2 (default 1000)")
    y = _clean_labels(labels, len(labels), "labels")
    rng = np.random.default_rng(seed)
    labelled = np.flatnonzero(np.array([v is not None for v in y], dtype=bool))
    keep: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    for t in sorted({str(v) for v in y[labelled]}):
        rows = labelled[y[labelled] == t]
        if rows.size > max_cells_per_type:
            rows = np.sort(rng.choice(rows, max_cells_per_type, replace=False))
        keep.append(rows)
    return np.sort(np.concatenate(keep))


def fit_expression_prototypes(
    counts: Any,
    labels: Mapping[str, Any],
    *,
    type_cell_counts: Mapping[str, Mapping[str, int]] | None = None,
    batches: Any = None,
    n_components: int = ES.DEFAULT_N_COMPONENTS,
    kappa: float = ES.DEFAULT_KAPPA,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Expression prototypes of the reference (module docstring).

    ``counts``: cells x genes raw counts on the bundle's genes (scipy sparse or dense), e.g. the
    rows :func:`sample_reference_rows` chose; ``labels``: ``{level name: one label per row}`` in
    the order of ``manifest["labels"]["levels"]``; ``type_cell_counts``: ``{level: {type:
    reference cells}}`` when ``counts`` is a sample (the uncertainty of a type's mean follows
    from how many cells the reference has of it; default: counted in ``labels``). Returns
    ``(info, tensors)``: ``info["levels"][name]`` is the JSON for
    ``manifest["labels"]["levels"][name]["expression"]``, ``info["projection"]`` the JSON for
    ``manifest["labels"]["expression"]``, ``tensors`` the float32 arrays to store.
    """
    import scipy.sparse as sp  # model extra: the module imports without it (auditor install)

    if n_components < 1 or kappa < 0:
        raise LabelTransferError(
            "expression prototypes need n_components >= 1 and kappa >= 0; the defaults are "
            "100 and 10"
        )
    x_all = sp.csr_matrix(counts, dtype=np.float32)
    n = x_all.shape[0]
    rng = np.random.default_rng(seed)
    cleaned = {str(k): _clean_labels(v, n, str(k)) for k, v in labels.items()}
    if not cleaned:
        raise LabelTransferError("expression prototypes need at least one label level")
    first = next(iter(cleaned.values()))
    rows = np.flatnonzero(np.array([v is not None for v in first], dtype=bool))
    if rows.size < 2:
        raise LabelTransferError("expression prototypes need at least two labelled cells")
    x = lognormalize(x_all[rows])
    p = int(min(n_components, x.shape[0] - 1, x.shape[1]))
    if p < 1:
        raise LabelTransferError("too few reference cells or genes for expression prototypes")
    if x.shape[1] <= ES.EXACT_PCA_MAX_GENES:
        gene_mean, comps = ES.subspace_from_moments(ES.expression_moments(x), p)
    else:
        gene_mean, comps = _randomized_pca(x, p, seed)
    tensors: dict[str, np.ndarray] = {
        EXPRESSION_GENE_MEAN: gene_mean.astype(np.float32),
        EXPRESSION_COMPONENTS: comps.astype(np.float32),
    }
    # the stored float32 tensors are what a query will use: score with them
    y_raw = _project(
        x,
        tensors[EXPRESSION_GENE_MEAN].astype(np.float64),
        tensors[EXPRESSION_COMPONENTS].astype(np.float64),
    )
    info: dict[str, Any] = {
        "projection": expression_projection_info(p, int(rows.size)),
        "levels": {},
    }
    fold = rng.permutation(rows.size) % ES.N_FOLDS
    batch_names = (
        np.asarray(batches).astype(str)[rows] if batches is not None else np.zeros(rows.size, str)
    )
    for i, (name, values) in enumerate(cleaned.items()):
        lab = values[rows]
        ok = np.array([v is not None for v in lab])
        classes = sorted({str(v) for v in lab[ok]})
        if not classes:
            continue
        counts_all = {c: 0 for c in classes}
        for v in values:
            if v is not None and str(v) in counts_all:
                counts_all[str(v)] += 1
        given = (type_cell_counts or {}).get(name, {})
        counts_all = {c: max(int(given.get(c, 0)), counts_all[c]) for c in classes}
        types = [str(v) for v in lab[ok]]
        model = ES.type_model(ES.type_batch_sums(y_raw[ok], types, batch_names[ok], classes), p)
        corrected = y_raw[ok] - np.stack([model.offsets[b] for b in batch_names[ok]])
        calibration = ES.calibration_sums(model, corrected, types, fold[ok], kappa=kappa)
        temperature, quantiles = ES.calibrate_expression([calibration])
        level, level_tensors = expression_level(
            i,
            model,
            cell_counts=[counts_all[c] for c in classes],
            kappa=kappa,
            temperature=temperature,
            quantiles=quantiles,
        )
        tensors.update(level_tensors)
        info["levels"][name] = level
    return info, tensors


def _rows_of(reg: Any, rows: np.ndarray, window: int = 16384) -> sp.csr_matrix:
    """Counts of ``rows`` (sorted) of registered data, in memory or streamed window by
    window from disk."""
    import scipy.sparse as sp  # model extra: the module imports without it (auditor install)

    if reg.x is not None:
        return sp.csr_matrix(reg.x[rows])
    source = reg.source
    blocks = []
    for lo in range(0, source.n_cells, window):
        hi = min(lo + window, source.n_cells)
        a, b = np.searchsorted(rows, [lo, hi])
        if a < b:
            blocks.append(source.read(lo, hi)[rows[a:b] - lo])
    if not blocks:
        return sp.csr_matrix((0, source.n_genes), dtype=np.float32)
    return sp.vstack(blocks, format="csr")


def reference_expression_prototypes(
    reg: Any, label_key: str, *, seed: int = 0, max_cells_per_type: int = 1000
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """:func:`fit_expression_prototypes` for registered reference data
    (:class:`scarches_fl.data.RegisteredData` with labels), on a seeded sample of at most
    ``max_cells_per_type`` cells per type."""
    labels = np.asarray(reg.labels, dtype=object)
    rows = sample_reference_rows(labels, max_cells_per_type=max_cells_per_type, seed=seed)
    cleaned = _clean_labels(labels, len(labels), label_key)
    counts: dict[str, int] = {}
    for v in cleaned:
        if v is not None:
            counts[str(v)] = counts.get(str(v), 0) + 1
    return fit_expression_prototypes(
        _rows_of(reg, rows),
        {label_key: labels[rows]},
        type_cell_counts={label_key: counts},
        batches=np.asarray(reg.batches)[rows],
        seed=seed,
    )


def has_expression_prototypes(
    labels_manifest: Mapping[str, Any], tensors: Mapping[str, Any], label_key: str
) -> bool:
    """Whether the bundle carries expression prototypes for ``label_key``."""
    level = (labels_manifest or {}).get("levels", {}).get(label_key, {})
    expr = level.get("expression")
    return bool(
        expr
        and EXPRESSION_GENE_MEAN in tensors
        and EXPRESSION_COMPONENTS in tensors
        and expr.get("means_tensor") in tensors
        and expr.get("covariance_tensor") in tensors
    )


def latent_classifier_probabilities(
    model_tensors: Mapping[str, Any],
    classifier_classes: Sequence[str],
    latent: Any,
    classes: Sequence[str],
) -> np.ndarray | None:
    """The reference's latent classifier head (``classifier.weight`` / ``.bias``) on the query
    latent, as probabilities over ``classes`` (a class the head lacks gets 0); ``None`` when
    the bundle has no head."""
    if "classifier.weight" not in model_tensors or not classifier_classes:
        return None
    w = np.asarray(model_tensors["classifier.weight"], dtype=np.float64)
    b = np.asarray(model_tensors["classifier.bias"], dtype=np.float64)
    z = np.asarray(latent, dtype=np.float64)
    if w.shape != (len(classifier_classes), z.shape[1]):
        return None
    head = _softmax(z @ w.T + b[None, :])
    out = np.zeros((z.shape[0], len(classes)))
    index = {c: j for j, c in enumerate(classifier_classes)}
    for j, c in enumerate(classes):
        if c in index:
            out[:, j] = head[:, index[c]]
    s = out.sum(axis=1, keepdims=True)
    return np.where(s > 0, out / np.maximum(s, 1e-300), 1.0 / len(classes))


def project_counts(
    projection: Mapping[str, Any], tensors: Mapping[str, Any], blocks: Any
) -> np.ndarray:
    """Scores (cells x components, float32) of raw-count row blocks on the bundle's genes
    (one matrix, or an iterable of CSR windows: the query is never read whole)."""
    import scipy.sparse as sp  # model extra: the module imports without it (auditor install)

    gene_mean = np.asarray(tensors[projection["gene_mean_tensor"]], dtype=np.float64)
    comps = np.asarray(tensors[projection["components_tensor"]], dtype=np.float64)
    if sp.issparse(blocks) or isinstance(blocks, np.ndarray):
        blocks = [blocks]
    out = []
    for block in blocks:
        x = sp.csr_matrix(block, dtype=np.float32)
        if x.shape[1] != gene_mean.shape[0]:
            raise LabelTransferError(
                f"the query counts have {x.shape[1]} genes but the expression prototypes "
                f"{gene_mean.shape[0]}; align the query to the bundle's genes first"
            )
        out.append(_project(lognormalize(x), gene_mean, comps).astype(np.float32))
    if not out:
        return np.zeros((0, comps.shape[0]), dtype=np.float32)
    return np.concatenate(out)


def query_scores(
    projection: Mapping[str, Any],
    tensors: Mapping[str, Any],
    adata: AnnData,
    genes: Sequence[str],
    *,
    layer: str | None = None,
) -> np.ndarray:
    """:func:`project_counts` of an AnnData (in memory or backed), aligned to the bundle's
    ``genes`` (missing genes zero, extra genes dropped), read in row windows."""
    from scarches_fl.data import _on_model_genes, gene_alignment, iter_count_windows

    column_map, _report = gene_alignment(adata.var_names, list(genes), min_coverage=0.0)
    return project_counts(
        projection,
        tensors,
        (
            _on_model_genes(block, column_map)
            for _start, block in iter_count_windows(adata, layer=layer)
        ),
    )


def shrunken_means(
    nu: np.ndarray, cell_counts: Sequence[int], shrink: float, *, below: int = RARE_BELOW
) -> np.ndarray:
    """Type means (whitened, types x components) of the types with fewer than ``below``
    reference cells shrunk towards the count-weighted centre of all types by soft thresholding
    (nearest shrunken centroids, Tibshirani et al. 2002; ADR 0072): each component of such a
    type's deviation from the centre loses ``shrink`` standard errors of its mean,
    ``sqrt(1/n - 1/N)`` in whitened units (``n`` its reference cells, ``N`` all), and stops at
    0. A type seen in 15 cells keeps the components that set it apart and loses the noise of
    its mean in the others; the other types' means are as stored."""
    n = np.maximum(np.asarray(cell_counts, dtype=np.float64), 1.0)
    total = n.sum()
    centre = (n[:, None] * nu).sum(axis=0) / total
    se = np.sqrt(np.maximum(1.0 / n - 1.0 / total, 0.0))[:, None]
    dev = nu - centre[None, :]
    shrunk = centre[None, :] + np.sign(dev) * np.maximum(np.abs(dev) - shrink * se, 0.0)
    return np.where((n < below)[:, None], shrunk, nu)


def read_type_means(
    means: np.ndarray, cov: np.ndarray, cell_counts: Sequence[int], shrink: float
) -> np.ndarray:
    """Type means (types x components, in the subspace's own units) as the expression rule
    reads them: :func:`shrunken_means` in the whitened frame of ``cov``, mapped back (``shrink``
    0: as given). One reading for every type, the reference's and the contributed ones."""
    if shrink <= 0:
        return np.asarray(means, dtype=np.float64)
    chol = np.linalg.cholesky(cov)
    nu = np.linalg.solve(chol, np.asarray(means, dtype=np.float64).T).T
    return shrunken_means(nu, cell_counts, shrink) @ chol.T


def expression_label_posteriors(
    level_info: Mapping[str, Any],
    tensors: Mapping[str, Any],
    scores: np.ndarray,
    batches: Any,
    *,
    start: np.ndarray | None = None,
    rounds: int = 3,
    confident: float = 0.5,
    latent_weight: float = 1.0,
    shrink: float = 0.0,
    trust_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class probabilities, the novelty statistic (batch-scaled) and the per-batch offsets
    (batches x components, whitened) of query cells (module docstring). ``scores``: the
    query's :func:`project_counts`; ``start`` the latent classifier's probabilities over
    ``level_info["classes"]`` (or ``None``); ``shrink``: the type means are read through
    :func:`shrunken_means` with that many standard errors (0: as stored). ``trust_out`` (one
    float per cell): filled with how far the latent is trusted on each cell's batch,
    ``max(0, 2a - 1)^2`` for the batch's agreement ``a`` between the head and the expression
    labels (1 without a head: nothing to measure the latent by)."""
    classes = list(level_info["classes"])
    means = np.asarray(tensors[level_info["means_tensor"]], dtype=np.float64)
    cov = np.asarray(tensors[level_info["covariance_tensor"]], dtype=np.float64)
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != means.shape[1]:
        raise LabelTransferError(
            f"query scores of shape {scores.shape} do not fit expression prototypes of "
            f"{means.shape[1]} components; project the query with project_counts"
        )
    batches = np.asarray(batches).astype(str)
    if batches.shape[0] != scores.shape[0]:
        raise LabelTransferError("pass one batch value per query cell")
    wm = _whiten(cov)
    w = (scores @ wm.T.astype(np.float32)).astype(np.float32)
    nu = means @ wm.T
    if shrink > 0:
        nu = shrunken_means(nu, level_info["cell_counts"], shrink)
    inflation = 1.0 + 1.0 / np.maximum(np.asarray(level_info["cell_counts"], float), 1.0)
    if "spread_factor" in level_info:  # contributed types: a wider or noisier region (ADR 0045)
        inflation = inflation * np.asarray(level_info["spread_factor"], dtype=np.float64)
    temperature = float(level_info["temperature"])
    quantiles = np.asarray(level_info["novelty_quantiles"], dtype=np.float64)
    ref_median = float(quantiles[quantiles.size // 2])
    log_norm = 0.5 * w.shape[1] * np.log(inflation)  # the (d / 2) log a of each class
    k = len(classes)
    log_start = np.log(np.clip(start, 1e-12, 1.0)) if start is not None else np.zeros((len(w), k))
    prior = np.asarray(level_info["cell_counts"], dtype=np.float64)
    prior = prior / max(prior.sum(), 1.0)
    probs = np.empty((len(w), k))
    stat = np.empty(len(w))
    names = sorted(set(batches.tolist()))
    offsets = np.zeros((len(names), w.shape[1]))
    weights = np.zeros(len(names))
    for bi, b in enumerate(names):
        rows = batches == b
        wb = w[rows].astype(np.float64).astype(np.float64)
        cur = start[rows] if start is not None else None
        # without a starting label: the batch's mean against the reference's (the same
        # composition assumed), refined from the labels that follow
        offset = np.zeros(w.shape[1]) if cur is not None else wb.mean(axis=0) - prior @ nu
        scale = 1.0
        for _ in range(max(rounds, 0) + 1):
            if cur is not None:
                conf = cur.max(axis=1)
                sure = conf >= confident
                if sure.sum() >= max(3, int(0.05 * len(wb))):
                    resid = wb[sure] - cur[sure] @ nu
                    offset = np.average(resid, axis=0, weights=conf[sure])
            d2 = _distances(wb - offset[None, :], nu) / inflation[None, :]
            nearest = d2.min(axis=1)
            expr_logits = -0.5 * d2 - log_norm[None, :]
            cur_expr = _softmax(expr_logits / (temperature * scale))
            if cur is not None:
                sure = cur_expr.max(axis=1) >= confident
                if sure.sum() >= 3:
                    scale = max(1.0, float(np.median(nearest[sure])) / max(ref_median, 1e-12))
            cur = _softmax(expr_logits / (temperature * scale))
        assert cur is not None  # the loop above runs at least once
        weight = 0.0
        if start is not None:
            # how far the latent head is to be trusted on this batch: its agreement with the
            # expression labels (a shift the latent could not absorb lowers it)
            agree = float(np.mean(cur.argmax(axis=1) == start[rows].argmax(axis=1)))
            weight = latent_weight * max(0.0, 2.0 * agree - 1.0) ** 2
            if trust_out is not None:
                trust_out[rows] = max(0.0, 2.0 * agree - 1.0) ** 2
        elif trust_out is not None:
            trust_out[rows] = 1.0  # no head to measure the latent by
        combined = np.log(np.clip(cur, 1e-300, 1.0)) + weight * log_start[rows]
        weights[bi] = weight
        probs[rows] = _softmax(combined)
        stat[rows] = nearest / scale
        offsets[bi] = offset
    return probs, stat, offsets


def contributed_expression_types(
    level_info: Mapping[str, Any], tensors: Mapping[str, Any], *, shrink: float = 0.0
) -> dict[str, Any] | None:
    """The types that sites' label contributions add to the expression rule (ADR 0045), from
    ``level_info["contributed"]`` (:func:`protocols.labels.merge_label_knowledge`), or None.

    A contribution's prototypes are means of the site's own cells, in its technology's frame.
    Its prototypes of types the reference already holds (``anchor``) place that frame: the
    site's offset is their count-weighted mean of (contributed mean - the reference's mean of
    the type) (0 without anchors). Each new type's mean is moved by its site's offset; a type
    contributed by several sites gets the count-weighted mean ``m`` of theirs, ``N`` cells in
    all, the per-component spread ``v = sum n_i (s_i^2 + sigma_i^2 + (m_i - m)^2) / N`` (``s_i``
    the pooled covariance's where the spread was not sent, under DP), and is scored under
    ``(1 + 1/N) max(1, mean_d(v_d / S_dd)) S``. Anchors never change the reference's own
    types. An anchor is compared with the reference's mean as the rule reads it
    (:func:`read_type_means` with ``shrink``: a rare type's mean shrunk, ADR 0072), the mean a
    query cell of that type is compared with. Returns ``{"classes", "means" (types x
    components), "cell_counts", "spread_factor", "sources"}``."""
    entries = list(level_info.get("contributed") or [])
    classes = list(level_info["classes"])
    index = {c: j for j, c in enumerate(classes)}
    cov = np.asarray(tensors[level_info["covariance_tensor"]], dtype=np.float64)
    means = np.asarray(tensors[level_info["means_tensor"]], dtype=np.float64)
    if shrink > 0:
        means = read_type_means(means, cov, level_info["cell_counts"], shrink)
    diag = np.diag(cov)
    offsets: dict[str, np.ndarray] = {}
    for src in sorted({str(e["source"]) for e in entries}):
        anchors = [e for e in entries if e["source"] == src and e["label"] in index]
        n = np.array([float(e["n_cells"]) for e in anchors])
        if n.sum() <= 0:
            offsets[src] = np.zeros(means.shape[1])
            continue
        d = np.array([np.asarray(e["mean"], float) - means[index[e["label"]]] for e in anchors])
        offsets[src] = (n[:, None] * d).sum(axis=0) / n.sum()
    new: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        if e["label"] not in index:
            new.setdefault(str(e["label"]), []).append(e)
    if not new:
        return None
    out: dict[str, Any] = {
        "classes": [],
        "means": [],
        "cell_counts": [],
        "spread_factor": [],
        "sources": [],
    }
    for label, group in new.items():
        n = np.array([float(e["n_cells"]) for e in group])
        m = np.array([np.asarray(e["mean"], float) - offsets[str(e["source"])] for e in group])
        total = float(n.sum())
        mean = (n[:, None] * m).sum(axis=0) / total
        var = np.zeros_like(mean)
        for ni, mi, e in zip(n, m, group, strict=True):
            s2 = diag if e["std"] is None else np.square(np.asarray(e["std"], float))
            var += ni * (s2 + float(e["sigma"]) ** 2 + np.square(mi - mean))
        var /= total
        out["classes"].append(label)
        out["means"].append(mean)
        out["cell_counts"].append(int(total))
        out["spread_factor"].append(max(1.0, float(np.mean(var / diag))))
        out["sources"].append("+".join(sorted({str(e["source"]) for e in group})))
    out["means"] = np.asarray(out["means"])
    return out


def contributed_pass(
    level_info: Mapping[str, Any],
    tensors: Mapping[str, Any],
    scores: np.ndarray,
    batches: Any,
    *,
    shrink: float = 1.0,
) -> dict[str, Any] | None:
    """The second pass of the expression rule where sites contributed types (ADR 0045, read
    by one rule with the reference's types since ADR 0047): the reference's and the
    contributed types (:func:`contributed_expression_types`) in one table, read by
    :func:`expression_label_posteriors` without the latent head (the offset starts from the
    batch mean, three rounds) and with the same ``shrink`` as the first pass. None without
    contributed types. Returns ``{"classes"`` (the reference's, then the contributed ones),
    ``"probabilities"``, ``"novelty_statistic"``, ``"offsets"`` (per batch, whitened),
    ``"extra"`` (:func:`contributed_expression_types`' result)``}``."""
    extra = contributed_expression_types(level_info, tensors, shrink=shrink)
    if extra is None:
        return None
    own = list(level_info["classes"])
    classes = own + list(extra["classes"])
    means = np.vstack([np.asarray(tensors[level_info["means_tensor"]], np.float64), extra["means"]])
    info = {
        **level_info,
        "classes": classes,
        "cell_counts": [*level_info["cell_counts"], *extra["cell_counts"]],
        "spread_factor": [1.0] * len(own) + list(extra["spread_factor"]),
        "means_tensor": "contributed.means",
        "covariance_tensor": level_info["covariance_tensor"],
    }
    probs, stat, offsets = expression_label_posteriors(
        info,
        {**tensors, "contributed.means": means},
        scores,
        batches,
        start=None,
        rounds=3,
        latent_weight=0.0,
        shrink=shrink,
    )
    return {
        "classes": classes,
        "probabilities": probs,
        "novelty_statistic": stat,
        "offsets": offsets,
        "extra": extra,
    }


def _with_contributed(
    prediction: LabelPrediction,
    level_info: Mapping[str, Any],
    tensors: Mapping[str, Any],
    scores: np.ndarray,
    batches: Any,
    *,
    tail: float,
    threshold: float,
    unknown: str = "novel",
    shrink: float = 0.0,
    latent_factor: np.ndarray | None = None,
) -> LabelPrediction:
    """``prediction`` (the reference's own types) with the types sites contributed
    (:func:`contributed_expression_types`): a second pass over the reference's and the
    contributed types, which reads expression alone (the latent head was trained without the
    contributed types, so its confident cells of a batch that holds them are confidently wrong
    and cannot anchor the batch's offset): the offset starts from the batch mean and is then
    re-estimated from the confident cells, three rounds, as ADR 0070's rule does after the
    head. A cell whose top type in that pass is a contributed one takes that pass's label and
    uncertainty; every other cell keeps the first pass's call, so a contribution adds names and
    never re-decides between the reference's own types (ADR 0045).

    Every type is read by the first pass's rule (ADR 0047): means through the same
    ``shrink`` (a type with fewer than 20 cells, the reference's or a contributed one, is read
    shrunk; anchors are compared with the reference's means as read), and the novelty that
    calls "Unknown" is the expression factor, read on the first pass's ``tail`` (half the
    novelty tail beside a latent factor, ADR 0073), times ``latent_factor`` (the first pass's
    latent factor raised to its batch's trust, over every accepted latent prototype; None: the
    expression factor alone)."""
    second = contributed_pass(level_info, tensors, scores, batches, shrink=shrink)
    if second is None:
        return prediction
    own, classes = list(level_info["classes"]), list(second["classes"])
    probs, stat, extra = second["probabilities"], second["novelty_statistic"], second["extra"]
    top = probs.argmax(axis=1)
    p_top = probs[np.arange(len(top)), top]
    factor = _novelty_factor(stat, level_info["novelty_quantiles"], tail)
    if latent_factor is not None:
        factor = factor * latent_factor
    uncertainty = np.clip(1.0 - p_top * factor, 0.0, 1.0).astype(np.float32)
    top_label = np.array(classes, dtype=object)[top]
    takes = top >= len(own)
    old_probs = np.zeros((len(top), len(classes)), dtype=np.float32)
    old_probs[:, : len(own)] = prediction.probabilities
    source = np.full(len(top), "genesis", dtype=object)
    source[takes] = np.array(extra["sources"], dtype=object)[top[takes] - len(own)]
    # "Unknown" by the same rule as the first pass (ADR 0071)
    called = (1.0 - factor) > threshold if unknown == "novel" else uncertainty > threshold
    pred = np.where(called, UNKNOWN, top_label).astype(object)
    return LabelPrediction(
        pred=np.where(takes, pred, prediction.pred).astype(object),
        uncertainty=np.where(takes, uncertainty, prediction.uncertainty).astype(np.float32),
        top_label=np.where(takes, top_label, prediction.top_label).astype(object),
        probabilities=np.where(takes[:, None], probs.astype(np.float32), old_probs),
        classes=classes,
        method=prediction.method,
        novelty=np.where(takes, (1.0 - factor).astype(np.float32), prediction.novelty),
        source=source,
    )


def _with_latent_only_types(
    prediction: LabelPrediction,
    overlay: LabelPrediction,
    types: Sequence[str],
    *,
    novelty: np.ndarray | None = None,
    threshold: float = 0.5,
) -> LabelPrediction:
    """``prediction`` (expression) where ``overlay`` (the latent prototypes over every accepted
    prototype) does not put a cell on one of ``types`` (contributed without an expression
    part); the overlay's label, uncertainty and source where it does. As for contributed
    expression types, a contribution adds names and never re-decides between the types the
    expression rule reads (ADR 0045). ``novelty`` (per cell): where given, a cell the overlay
    puts on one of ``types`` is "Unknown" where its novelty is above ``threshold`` and named
    otherwise, as the expression rule calls every other type (ADR 0071: Unknown means novel;
    ADR 0047: one rule for every type); None: the overlay's own call (its uncertainty)."""
    takes = np.isin(np.asarray(overlay.top_label).astype(str), list(types))
    classes = list(prediction.classes) + [c for c in overlay.classes if c not in prediction.classes]
    col = {c: j for j, c in enumerate(classes)}
    probs = np.zeros((len(takes), len(classes)), dtype=np.float32)
    probs[:, : len(prediction.classes)] = prediction.probabilities
    over = np.zeros_like(probs)
    over[:, [col[c] for c in overlay.classes]] = overlay.probabilities
    source = (
        np.asarray(prediction.source, dtype=object)
        if len(prediction.source) == len(takes)
        else np.full(len(takes), "genesis", dtype=object)
    )
    first_novelty = (
        prediction.novelty if len(prediction.novelty) == len(takes) else np.zeros(len(takes))
    )
    over_novelty: np.ndarray
    if novelty is not None:
        over_novelty = np.asarray(novelty, dtype=np.float32)
        over_pred = np.where(over_novelty > threshold, UNKNOWN, overlay.top_label)
    else:
        over_novelty = np.asarray(
            overlay.novelty if len(overlay.novelty) == len(takes) else np.zeros(len(takes)),
            dtype=np.float32,
        )
        over_pred = np.asarray(overlay.pred, dtype=object)
    return LabelPrediction(
        pred=np.where(takes, over_pred, prediction.pred).astype(object),
        uncertainty=np.where(takes, overlay.uncertainty, prediction.uncertainty).astype(np.float32),
        top_label=np.where(takes, overlay.top_label, prediction.top_label).astype(object),
        probabilities=np.where(takes[:, None], over, probs),
        classes=classes,
        method=prediction.method,
        novelty=np.where(takes, over_novelty, first_novelty).astype(np.float32),
        source=np.where(takes, np.asarray(overlay.source, dtype=object), source).astype(object),
    )


def latent_novelty_factor(
    labels_manifest: Mapping[str, Any],
    latent: Any,
    batches: Any,
    *,
    label_key: str,
    sure: np.ndarray | None = None,
    tail: float | None = None,
) -> np.ndarray | None:
    """The latent prototypes' novelty factor of query cells (ADR 0071), or ``None`` where the
    bundle has no calibrated latent prototypes for ``label_key`` or ``latent`` does not fit them.
    ``tail``: the novelty tail it is read on (default: the bundle's ``novelty_tail``).

    The statistic is the smallest (inflated) squared Mahalanobis distance to a prototype in the
    latent, as :func:`scarches_fl.labels.predict_labels` computes it, divided per query batch by
    that batch's residual scale (median statistic of its ``sure`` cells over the reference's
    out-of-fold median, at least 1: a sparser technology lies farther from every prototype,
    which is not novelty), then read on the reference's out-of-fold quantiles."""
    from scarches_fl.labels import _proto_scores

    level = (labels_manifest or {}).get("levels", {}).get(label_key, {})
    proto = level.get("prototype") or {}
    calibration = proto.get("calibration") or {}
    if not proto.get("prototypes") or "novelty_quantiles" not in calibration or latent is None:
        return None
    z = np.asarray(latent, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != len(proto["prototypes"][0]["mean"]):
        return None
    stat = np.empty(z.shape[0])
    for lo in range(0, z.shape[0], 8192):
        _scores, stat[lo : lo + 8192] = _proto_scores(z[lo : lo + 8192], proto, proto["classes"])
    quantiles = np.asarray(calibration["novelty_quantiles"], dtype=np.float64)
    ref_median = max(float(quantiles[quantiles.size // 2]), 1e-12)
    batches = np.asarray(batches).astype(str)
    for b in sorted(set(batches.tolist())):
        rows = batches == b
        pick = rows & sure if sure is not None else rows
        if pick.sum() >= 3:
            stat[rows] /= max(1.0, float(np.median(stat[pick])) / ref_median)
    if tail is None:
        tail = float(labels_manifest.get("novelty_tail", 0.05))
    return _novelty_factor(stat, quantiles, tail)


def predict_cell_labels(
    labels_manifest: Mapping[str, Any],
    tensors: Mapping[str, Any],
    scores: np.ndarray,
    batches: Any,
    latent: Any,
    *,
    label_key: str,
    classifier_classes: Sequence[str] = (),
    threshold: float = 0.5,
    rounds: int = 3,
    latent_weight: float = 1.0,
    latent_novelty: bool = True,
    unknown: str = "novel",
    balanced_head: bool = True,
    shrink: float = 1.0,
    split_tail: bool = True,
) -> LabelPrediction:
    """Labels from the bundle's expression prototypes, the per-batch offset and the latent
    classifier (module docstring); ``tensors``: every tensor of the bundle (the model's and
    the extra ones). ``method`` of the result is ``"expression"``.

    ADR 0071 (the defaults; ``latent_novelty=False, unknown="uncertain", balanced_head=False``
    is ADR 0070's rule):

    * ``latent_novelty``: the novelty factor is the product of the expression rule's and the
      latent prototypes' (:func:`latent_novelty_factor`), so a type the reference lacks that
      projects onto a known type in the expression subspace is still flagged where the latent
      sets it apart, and a cell at the edge of both is ranked above one at the edge of one;
      the name stays the expression rule's.
    * ``unknown="novel"``: a cell is called Unknown when its novelty (``1 - factor``) is above
      ``threshold``: it lies outside what the reference covers. A cell torn between two known
      types keeps the more probable name; its ``uncertainty`` (``1 - p_top * factor``, as
      before) says how sure that is. ``"uncertain"``: Unknown where the uncertainty is above
      ``threshold``, as the latent rules do.
    * ``balanced_head``: the latent classifier's probabilities are divided by the reference's
      class frequencies before they are combined, so the head brings the latent's evidence
      without the reference's composition as a prior (the expression rule has none): a rare
      type is not outvoted for being rare in the reference.

    ``shrink`` (ADR 0072): the means of types with fewer than 20 reference cells are read as
    nearest shrunken centroids, :func:`shrunken_means` with one standard error (0: as stored,
    ADR 0071's rule), so a type seen in few reference cells is compared on the components that
    set it apart, not on the noise of its mean. The types contributed by sites (second pass)
    are read by the same rule (ADR 0047): the same shrinkage and the same novelty.

    ``split_tail`` (ADR 0073): where the latent factor joins the product, each space's factor
    is read on half the novelty tail (a Bonferroni split), so that a cell typical of the
    reference is called Unknown in either space at most as often as one space alone would call
    it (``tail / 2`` of the reference's out-of-fold cells, not up to twice that). ``False``:
    both on the whole tail (ADR 0072's rule). Without a latent factor the expression factor
    keeps the whole tail."""
    if unknown not in ("novel", "uncertain"):
        raise LabelTransferError(f"unknown must be 'novel' or 'uncertain', not {unknown!r}")
    if not 0.0 <= threshold <= 1.0:
        raise LabelTransferError("threshold must be in [0, 1]")
    if not has_expression_prototypes(labels_manifest, tensors, label_key):
        raise LabelTransferError(
            f"this reference carries no expression prototypes for {label_key!r}; retrain it "
            "with this version (reference train --label-key) or use --label-method prototype"
        )
    level_info = labels_manifest["levels"][label_key]["expression"]
    classes = list(level_info["classes"])
    start = latent_classifier_probabilities(tensors, classifier_classes, latent, classes)
    if start is not None and balanced_head:
        freq = np.maximum(np.asarray(level_info["cell_counts"], dtype=np.float64), 1.0)
        start = start / freq[None, :]
        start = start / np.maximum(start.sum(axis=1, keepdims=True), 1e-300)
    trust = np.ones(len(scores))
    latent_part: np.ndarray | None = None
    probs, stat, _offsets = expression_label_posteriors(
        level_info,
        tensors,
        scores,
        batches,
        trust_out=trust,
        start=start,
        # without the head the offset starts from the batch mean; relabelling rounds from
        # there drifted on a simulated strong shift (0.94 -> 0.75 accuracy), so none are run
        rounds=rounds if start is not None else 0,
        latent_weight=latent_weight if start is not None else 0.0,
        shrink=shrink,
    )
    top = probs.argmax(axis=1)
    p_top = probs[np.arange(len(top)), top]
    tail = float(labels_manifest.get("novelty_tail", 0.05))
    latent_factor = None
    if latent_novelty:
        # two spaces, each calibrated on the reference: half the tail each (ADR 0073)
        latent_factor = latent_novelty_factor(
            labels_manifest,
            latent,
            batches,
            label_key=label_key,
            sure=p_top >= 0.5,
            tail=0.5 * tail if split_tail else tail,
        )
    expression_tail = 0.5 * tail if split_tail and latent_factor is not None else tail
    factor = _novelty_factor(stat, level_info["novelty_quantiles"], expression_tail)
    if latent_factor is not None:
        # the latent is trusted on a batch as far as its head agrees with the expression
        # (a shift the latent could not absorb moves known cells away from every latent
        # prototype: that is not novelty)
        latent_part = latent_factor**trust
        factor = factor * latent_part
    uncertainty = np.clip(1.0 - p_top * factor, 0.0, 1.0).astype(np.float32)
    top_label = np.array(classes, dtype=object)[top]
    called = (1.0 - factor) > threshold if unknown == "novel" else uncertainty > threshold
    pred = np.where(called, UNKNOWN, top_label).astype(object)
    if not math.isfinite(float(uncertainty.sum())):  # pragma: no cover - defensive
        raise LabelTransferError("expression label transfer produced non-finite values")
    prediction = LabelPrediction(
        pred=pred,
        uncertainty=uncertainty,
        top_label=top_label,
        probabilities=probs.astype(np.float32),
        classes=classes,
        method="expression",
        novelty=(1.0 - factor).astype(np.float32),
    )
    return _with_contributed(
        prediction,
        level_info,
        tensors,
        scores,
        batches,
        tail=expression_tail,
        threshold=threshold,
        unknown=unknown,
        shrink=shrink,
        latent_factor=latent_part,
    )


def transfer_labels(
    model: Any,
    adata: AnnData,
    latent: Any,
    *,
    label_key: str,
    batch_key: str,
    layer: str | None = None,
    method: str = "auto",
    threshold: float = 0.5,
    expression_options: Mapping[str, Any] | None = None,
) -> LabelPrediction:
    """Labels of a mapped query as ``map`` and ``site map`` write them.

    ``model``: the :class:`~scarches_fl.model.ReferenceModel` after surgery; ``adata``: the
    query (raw counts in X or ``layer``, in memory or backed); ``latent``: its embedding.
    ``method``: ``"expression"`` (expression prototypes, this module), ``"prototype"`` /
    ``"knn"`` (:func:`scarches_fl.labels.predict_labels` on the latent), or ``"auto"``:
    expression where the bundle carries it for ``label_key``, else what
    :func:`~scarches_fl.labels.predict_labels` picks. Types contributed with an expression part
    are named by the expression rule's second pass; types contributed without one (format
    version 1, e.g. under DP) exist as latent prototypes only, and ``auto`` names them where the
    latent prototypes put a cell on one of them (ADR 0045); ``expression`` names only the types
    with expression prototypes. ``expression_options``: keyword arguments for
    :func:`predict_cell_labels` (benchmarks compare rules with them)."""
    from scarches_fl.labels import predict_labels

    if method not in LABEL_METHODS:
        raise LabelTransferError(
            f"unknown label method {method!r}; use one of {', '.join(LABEL_METHODS)}"
        )
    tensors = model.tensors()
    has_expr = has_expression_prototypes(model.labels, tensors, label_key)
    if method == "expression" and not has_expr:
        raise LabelTransferError(
            f"this reference carries no expression prototypes for {label_key!r} (trained "
            "before they existed, or without --label-key); use --label-method auto"
        )
    level = model.labels.get("levels", {}).get(label_key, {})
    proto_classes = set(level.get("prototype", {}).get("classes", []))
    expression = level.get("expression", {})
    nameable = set(expression.get("classes", [])) | {
        str(e.get("label")) for e in expression.get("contributed", [])
    }
    learned_later = sorted(proto_classes - nameable)
    if method == "auto" and learned_later and not has_expr:
        method = "latent"
    if method in ("auto", "expression") and has_expr:
        scores = query_scores(model.labels["expression"], tensors, adata, model.genes, layer=layer)
        batches = np.asarray(adata.obs[batch_key]).astype(str)
        prediction = predict_cell_labels(
            model.labels,
            tensors,
            scores,
            batches,
            latent,
            label_key=label_key,
            classifier_classes=list(model.registration.get("classifier_classes", [])),
            threshold=threshold,
            **dict(expression_options or {}),
        )
        if method == "auto" and learned_later:
            # types contributed without an expression part (format version 1, e.g. under DP)
            # exist as latent prototypes only: they are named from the latent
            logger.info(
                "label method auto: %d types were contributed without expression prototypes "
                "(%s); the latent prototypes name them",
                len(learned_later),
                ", ".join(learned_later[:5]),
            )
            overlay = predict_labels(
                model.labels,
                model.extra_tensors,
                latent,
                label_key=label_key,
                threshold=threshold,
                method="prototype",
            )
            novelty = None
            if dict(expression_options or {}).get("unknown", "novel") == "novel":
                # "Unknown" by novelty, as for every other type (ADRs 0071, 0047): the latent
                # factor alone (the whole tail), per batch as the expression rule reads it
                factor = latent_novelty_factor(
                    model.labels,
                    latent,
                    batches,
                    label_key=label_key,
                    sure=np.asarray(prediction.probabilities).max(axis=1) >= 0.5,
                )
                novelty = None if factor is None else 1.0 - factor
            return _with_latent_only_types(
                prediction, overlay, learned_later, novelty=novelty, threshold=threshold
            )
        return prediction
    return predict_labels(
        model.labels,
        model.extra_tensors,
        latent,
        label_key=label_key,
        threshold=threshold,
        method="auto" if method == "latent" else method,
    )
