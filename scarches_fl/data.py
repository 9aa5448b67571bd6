"""Data registration: reading counts from an AnnData, aligning genes to a reference, and the
typed errors for inputs a model cannot use.

Everything here works on sparse CSR matrices. Nothing ever densifies a whole count matrix: the
trainers densify (or gather from) one minibatch at a time. A backed AnnData
(``anndata.read_h5ad(path, backed="r")``) is read in bounded row windows.

Gene alignment maps a query's genes onto the reference's ordered gene list with one sparse
selection matrix ``P`` (n_query_genes x n_reference_genes, a single 1 per mapped gene): ``X @ P``
reorders, drops the query's extra genes and zero-fills the reference genes the query lacks, all
without densifying.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from protocols.bundle import NAMESPACE_RE
from protocols.errors import ScarchesFLError

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "DataError",
    "DataWarning",
    "BackedCounts",
    "GeneAlignmentReport",
    "RegisteredData",
    "align_genes",
    "gene_alignment",
    "read_counts",
    "iter_count_windows",
    "register",
    "condition_names",
    "sanitize_batch",
    "filter_batches",
]

log = logging.getLogger(__name__)

#: Rows read at a time from a backed AnnData.
WINDOW_ROWS = 8192

_BATCH_BAD_CHARS = re.compile(r"[^A-Za-z0-9._+-]")
_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


class DataError(ScarchesFLError):
    """An AnnData cannot be used as given; the message says what is wrong and how to fix it."""

    exit_code = 2


class DataWarning(UserWarning):
    """Something in the data is unusual but usable (e.g. cells with zero total counts)."""


# --------------------------------------------------------------------------------------------
# Reading counts
# --------------------------------------------------------------------------------------------


def _matrix(adata: AnnData, layer: str | None) -> Any:
    if layer is None:
        if adata.X is None:
            raise DataError("the AnnData has no X; pass --layer NAME to read counts from a layer")
        return adata.X
    if layer not in adata.layers:
        avail = ", ".join(sorted(adata.layers.keys())) or "(none)"
        raise DataError(
            f"layer {layer!r} not found in the AnnData; available layers: {avail}. "
            "Pass one of them with --layer, or omit --layer to read X"
        )
    return adata.layers[layer]


def _to_csr(block: Any) -> sp.csr_matrix:
    if sp.issparse(block):
        out = sp.csr_matrix(block)
    else:
        out = sp.csr_matrix(np.asarray(block))
    if out.dtype != np.float32:
        out = out.astype(np.float32)
    return out


class _BackedRows:
    """Row ranges of a backed AnnData's X (or of a backed view of one) straight from the file.

    ``adata.X`` on a backed object builds a new sparse dataset on every access (re-reading the
    whole ``indptr``), and on a backed *view* it loads the view's entire matrix into memory. This
    opens the on-disk dataset once and maps view rows to file rows itself, so every read touches
    only the requested rows."""

    def __init__(self, adata: AnnData) -> None:
        import h5py
        from anndata.io import sparse_dataset

        if not adata.file.is_open:
            adata.file.open()
        node = adata.file["X"]
        self.ds = sparse_dataset(node) if isinstance(node, h5py.Group) else node
        n_file = int(node.attrs["shape"][0]) if isinstance(node, h5py.Group) else node.shape[0]
        self.rows: np.ndarray | None = None
        self.cols: Any = None
        if adata.is_view:
            oidx = adata._oidx  # the view's rows in the file (slice, mask or indices)
            rows = np.arange(n_file, dtype=np.int64)[oidx]
            if not (len(rows) == n_file and np.array_equal(rows, np.arange(n_file))):
                self.rows = rows
            vidx = adata._vidx
            if not (isinstance(vidx, slice) and vidx == slice(None)):
                self.cols = vidx

    def read(self, lo: int, hi: int) -> Any:
        if self.rows is None:
            block = self.ds[lo:hi]
        else:
            sel = self.rows[lo:hi]
            if len(sel) and np.all(np.diff(sel) == 1):
                block = self.ds[int(sel[0]):int(sel[-1]) + 1]
            else:
                block = self.ds[sel]
        if self.cols is not None:
            block = block[:, self.cols]
        return block


def _row_reader(adata: AnnData, layer: str | None) -> Any:
    """``read(lo, hi)`` over the count matrix; file-direct for backed X (see :class:`_BackedRows`)."""
    if layer is None and getattr(adata, "isbacked", False):
        return _BackedRows(adata).read
    mat = _matrix(adata, layer)
    return lambda lo, hi: mat[lo:hi]


def iter_count_windows(
    adata: AnnData, *, layer: str | None = None, window: int = WINDOW_ROWS,
    rows: np.ndarray | None = None,
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(start, csr_block)`` row windows of the count matrix (X or ``layer``), float32.

    Works for in-memory and backed AnnData (and backed views); at most ``window`` rows are
    materialised at a time. With ``rows`` (sorted integer row indices) only those rows are read;
    ``start`` then counts positions within ``rows``.
    """
    read = _row_reader(adata, layer)
    if rows is None:
        for start in range(0, adata.n_obs, window):
            yield start, _to_csr(read(start, min(start + window, adata.n_obs)))
        return
    rows = np.asarray(rows, dtype=np.int64)
    pos = 0
    for lo in range(0, adata.n_obs, window):
        hi = min(lo + window, adata.n_obs)
        a, b = np.searchsorted(rows, [lo, hi])
        if a == b:
            continue
        block = _to_csr(read(lo, hi))[rows[a:b] - lo]
        yield pos, _to_csr(block)
        pos += b - a


def read_counts(
    adata: AnnData, *, layer: str | None = None, rows: np.ndarray | None = None,
    column_map: sp.csr_matrix | None = None, window: int = WINDOW_ROWS,
) -> sp.csr_matrix:
    """The whole count matrix as one float32 CSR (memory ~ nnz), read window by window, with an
    optional gene alignment ``column_map`` (see :func:`gene_alignment`) applied per window.

    An in-memory float32 CSR with sorted indices on the model's genes is returned as is (shared,
    never written to). Other in-memory sparse input is copied once into arrays sized by its
    number of nonzeros (no list of windows to stack: peak = input + one copy + one window)."""
    src = _in_memory_csr(adata, layer) if rows is None else None
    if src is not None:
        if column_map is None and src.dtype == np.float32 and src.has_sorted_indices:
            return sp.csr_matrix(src, copy=False)
        return _read_into_preallocated(adata, layer, src.nnz, column_map, window)
    blocks = [_on_model_genes(block, column_map)
              for _start, block in iter_count_windows(adata, layer=layer, window=window,
                                                      rows=rows)]
    if not blocks:
        n_cols = column_map.shape[1] if column_map is not None else adata.n_vars
        return sp.csr_matrix((0, n_cols), dtype=np.float32)
    out = sp.vstack(blocks, format="csr").astype(np.float32, copy=False)
    out.sort_indices()
    return out


def _on_model_genes(block: sp.csr_matrix, column_map: sp.csr_matrix | None) -> sp.csr_matrix:
    """A float32 CSR window moved onto the model's genes (``column_map``, if any), indices
    sorted."""
    if column_map is not None:
        block = (block @ column_map).tocsr().astype(np.float32, copy=False)
    block.sort_indices()
    return block


def _in_memory_csr(adata: AnnData, layer: str | None) -> Any:
    """The AnnData's own CSR count matrix when it is in memory, else None."""
    if getattr(adata, "isbacked", False):
        return None
    src = adata.layers[layer] if layer is not None else adata.X
    if sp.issparse(src) and src.format == "csr":
        return src
    return None


def _read_into_preallocated(
    adata: AnnData, layer: str | None, max_nnz: int, column_map: sp.csr_matrix | None, window: int,
) -> sp.csr_matrix:
    n_rows = int(adata.n_obs)
    n_cols = int(column_map.shape[1]) if column_map is not None else int(adata.n_vars)
    idx_dtype = np.int32 if max(max_nnz, n_cols) < 2**31 - 1 else np.int64
    indptr = np.zeros(n_rows + 1, dtype=idx_dtype)
    indices = np.empty(max_nnz, dtype=idx_dtype)
    data = np.empty(max_nnz, dtype=np.float32)
    pos = 0
    for start, block in iter_count_windows(adata, layer=layer, window=window):
        block = _on_model_genes(block, column_map)
        k = int(block.nnz)
        indices[pos:pos + k] = block.indices
        data[pos:pos + k] = block.data
        indptr[start + 1:start + 1 + block.shape[0]] = pos + block.indptr[1:]
        pos += k
    if pos < max_nnz // 2:  # most genes dropped by the alignment: do not keep the slack
        indices, data = indices[:pos].copy(), data[:pos].copy()
    else:
        indices, data = indices[:pos], data[:pos]
    out = sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_cols), copy=False)
    out.has_sorted_indices = True
    return out


class BackedCounts:
    """Row windows of an on-disk (backed) count matrix, read on demand (issue 10).

    Holds no counts itself: :meth:`read` returns rows ``[lo, hi)`` as float32 CSR on the model's
    genes (``column_map`` applied, indices sorted). Works for a backed AnnData and for a view of
    one (e.g. after :func:`filter_batches`). ``rows_read`` / ``max_rows_per_read`` /
    ``reads`` instrument the reader so tests can prove that nothing larger than a window is
    ever materialised."""

    def __init__(self, adata: AnnData, *, layer: str | None = None,
                 column_map: sp.csr_matrix | None = None) -> None:
        self.adata = adata
        self.layer = layer
        self.column_map = column_map
        self.n_cells = int(adata.n_obs)
        self.n_genes = int(column_map.shape[1]) if column_map is not None else int(adata.n_vars)
        self.rows_read = 0
        self.max_rows_per_read = 0
        self.reads = 0
        self._read = _row_reader(adata, layer)

    def read(self, lo: int, hi: int) -> sp.csr_matrix:
        lo, hi = int(lo), int(min(hi, self.n_cells))
        block = _on_model_genes(_to_csr(self._read(lo, hi)), self.column_map)
        self.reads += 1
        self.rows_read += hi - lo
        self.max_rows_per_read = max(self.max_rows_per_read, hi - lo)
        return block

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_cells, self.n_genes)


# --------------------------------------------------------------------------------------------
# Conditions
# --------------------------------------------------------------------------------------------


def sanitize_batch(value: str) -> str:
    """Batch values become the ``<batch>`` part of ``<namespace>/<batch>``: characters outside
    ``[A-Za-z0-9._+-]`` are replaced by ``_`` and the result is cut to 128 characters."""
    text = _BATCH_BAD_CHARS.sub("_", str(value))[:128]
    return text or "_"


def condition_names(batches: Sequence[str], namespace: str) -> dict[str, str]:
    """Map each distinct batch value to its condition name ``<namespace>/<batch>``.

    Raises :class:`DataError` for a bad namespace or when two batch values sanitize to the same
    name."""
    if not NAMESPACE_RE.fullmatch(namespace):
        raise DataError(
            f"namespace {namespace!r} is not valid: use 1-64 characters of a-z, 0-9, '.', '_', "
            "'-', starting with a letter or digit (e.g. your site id)"
        )
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for b in batches:
        b = str(b)
        if b in out:
            continue
        name = f"{namespace}/{sanitize_batch(b)}"
        if name in seen:
            raise DataError(
                f"batch values {seen[name]!r} and {b!r} both become condition {name!r} after "
                "replacing characters outside [A-Za-z0-9._+-] with '_'; rename one of them"
            )
        seen[name] = b
        out[b] = name
    return out


def _obs_column(adata: AnnData, key: str, what: str) -> np.ndarray:
    if key not in adata.obs.columns:
        avail = ", ".join(map(str, adata.obs.columns)) or "(none)"
        flag = "--batch-key" if what == "batch" else "--label-key"
        raise DataError(
            f"{what} key {key!r} not found in adata.obs; available keys: {avail}. "
            f"Pass one of them with {flag}"
        )
    col = adata.obs[key]
    if col.isna().any():
        raise DataError(
            f"{what} key {key!r} has {int(col.isna().sum())} missing values; fill them "
            "(e.g. with 'unknown') or drop those cells"
        )
    return col.astype(str).to_numpy()


def filter_batches(adata: AnnData, batch_key: str, batches: Sequence[str]) -> Any:
    """Keep only cells whose ``obs[batch_key]`` is in ``batches`` (error names missing values)."""
    values = _obs_column(adata, batch_key, "batch")
    present = set(values)
    missing = [b for b in batches if b not in present]
    if missing:
        raise DataError(
            f"batches {missing} not found in obs[{batch_key!r}]; present values: "
            f"{sorted(present)}"
        )
    mask = np.isin(values, list(batches))
    return adata[mask]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_values(x: sp.csr_matrix, *, likelihood: str, where: str) -> None:
    data = x.data
    if data.size and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise DataError(
            f"{where} contains {bad} NaN or infinite values; counts must be finite. Fix the "
            "matrix (e.g. np.nan_to_num) or read another layer with --layer"
        )
    if data.size and (data < 0).any():
        raise DataError(
            f"{where} contains negative values ({int((data < 0).sum())} entries); the model needs "
            "raw counts. Read the raw counts layer (--layer counts) instead of scaled data"
        )
    if likelihood in ("nb", "zinb") and data.size and not np.array_equal(data, np.round(data)):
        raise DataError(
            f"{where} contains non-integer values but the negative binomial likelihood needs raw "
            "integer counts. Use raw counts (e.g. --layer counts), or train with "
            "--likelihood trvae, which works on log-normalized values"
        )


# --------------------------------------------------------------------------------------------
# Gene alignment
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneAlignmentReport:
    """How a query's genes map onto the reference genes."""

    n_reference_genes: int
    n_query_genes: int
    n_overlap: int
    coverage: float  # overlap / n_reference_genes
    n_missing: int  # reference genes absent from the query (zero-filled)
    n_extra: int  # query genes absent from the reference (dropped)
    n_duplicates: int = 0  # duplicated query gene names (first occurrence used)
    missing_examples: list[str] = field(default_factory=list)
    extra_examples: list[str] = field(default_factory=list)
    reordered: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.n_overlap}/{self.n_reference_genes} reference genes covered "
            f"({100 * self.coverage:.1f}%), {self.n_missing} zero-filled, "
            f"{self.n_extra} query genes dropped"
        )


def _id_kind(genes: Sequence[str]) -> str:
    sample = [str(g) for g in list(genes)[:200]]
    if not sample:
        return "empty"
    frac = sum(bool(_ENSEMBL_RE.match(g)) for g in sample) / len(sample)
    return "ensembl" if frac > 0.8 else ("symbol" if frac < 0.2 else "mixed")


def gene_alignment(
    query_genes: Sequence[str], reference_genes: Sequence[str], *, min_coverage: float = 0.5,
) -> tuple[sp.csr_matrix, GeneAlignmentReport]:
    """The sparse selection matrix ``P`` (query genes x reference genes) and the report.

    Raises :class:`DataError` when the coverage is below ``min_coverage`` (or zero), naming the
    overlap, a likely cause (Ensembl IDs vs symbols, letter case) and the fix."""
    q = [str(g) for g in query_genes]
    r = [str(g) for g in reference_genes]
    ref_index = {g: i for i, g in enumerate(r)}
    rows, cols = [], []
    seen: set[str] = set()
    dups = 0
    extra: list[str] = []
    for qi, g in enumerate(q):
        if g in seen:
            dups += 1
            continue
        seen.add(g)
        ri = ref_index.get(g)
        if ri is None:
            extra.append(g)
        else:
            rows.append(qi)
            cols.append(ri)
    overlap = len(rows)
    covered = set(cols)
    missing = [g for i, g in enumerate(r) if i not in covered]
    coverage = overlap / len(r) if r else 0.0
    reordered = overlap != len(r) or cols != list(range(len(r))) or len(q) != len(r)
    report = GeneAlignmentReport(
        n_reference_genes=len(r), n_query_genes=len(q), n_overlap=overlap,
        coverage=round(coverage, 6), n_missing=len(missing), n_extra=len(extra),
        n_duplicates=dups, missing_examples=missing[:10], extra_examples=extra[:10],
        reordered=reordered,
    )
    if overlap == 0 or coverage < min_coverage:
        hint = ""
        rk, qk = _id_kind(r), _id_kind(q)
        if {rk, qk} == {"ensembl", "symbol"}:
            hint = (
                f" The reference genes look like {rk} IDs and the query's like {qk}s: convert "
                "the query's var_names to the reference's kind (e.g. from a gene_ids column)."
            )
        else:
            upper_overlap = len({g.upper() for g in q} & {g.upper() for g in r})
            if upper_overlap > 2 * max(overlap, 1):
                hint = (
                    f" Ignoring letter case, {upper_overlap} genes would match: the query may be "
                    "from another species or use another capitalisation convention."
                )
        what = "no genes in common with" if overlap == 0 else "too few genes in common with"
        raise DataError(
            f"the query has {what} the reference: {overlap} of {len(r)} reference genes present "
            f"(coverage {100 * coverage:.1f}%, minimum {100 * min_coverage:.1f}%; query has "
            f"{len(q)} genes, e.g. {q[:3]}; reference e.g. {r[:3]}).{hint} Fix: give the query "
            "the reference's gene identifiers, or lower the minimum coverage "
            "(min_gene_coverage / --min-gene-coverage) if zero-filling that many genes is "
            "acceptable"
        )
    pmat = sp.csr_matrix(
        (np.ones(overlap, dtype=np.float32), (np.asarray(rows, dtype=np.int64),
                                              np.asarray(cols, dtype=np.int64))),
        shape=(len(q), len(r)),
    )
    return pmat, report


def align_genes(
    adata: AnnData, reference_genes: Sequence[str], *, min_coverage: float = 0.5,
    layer: str | None = None,
) -> tuple[Any, GeneAlignmentReport]:
    """A copy of ``adata`` whose X holds the counts (X or ``layer``) on exactly the reference
    genes, in the reference order: missing genes zero-filled, extra genes dropped (sparse, no
    densify). ``obs`` is kept. Returns ``(aligned, report)``."""
    import anndata as ad
    import pandas as pd

    pmat, report = gene_alignment(adata.var_names, reference_genes, min_coverage=min_coverage)
    x = read_counts(adata, layer=layer, column_map=None if not report.reordered else pmat)
    aligned = ad.AnnData(
        X=x, obs=adata.obs.copy(), var=pd.DataFrame(index=pd.Index(list(reference_genes)))
    )
    return aligned, report


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


@dataclass
class RegisteredData:
    """Counts and per-cell covariates ready for a model (CSR float32 on the model's genes)."""

    x: sp.csr_matrix | None  # None when streaming from disk (see ``source``)
    batches: np.ndarray  # original batch values (str)
    conditions: np.ndarray  # "<namespace>/<batch>" (str)
    labels: np.ndarray | None
    registration: dict[str, Any]
    alignment: GeneAlignmentReport | None = None
    n_zero_cells: int = 0
    source: BackedCounts | None = None  # streaming reader of a backed AnnData
    lib: np.ndarray | None = None  # per-cell total counts on the model's genes (float32)

    @property
    def n_cells(self) -> int:
        return self.x.shape[0] if self.x is not None else int(self.batches.shape[0])


def register(
    adata: AnnData, *, batch_key: str, namespace: str, likelihood: str = "nb",
    label_key: str | None = None, layer: str | None = None,
    reference_genes: Sequence[str] | None = None, min_gene_coverage: float = 0.5,
    stream: bool | None = None,
) -> RegisteredData:
    """Validate an AnnData and read it for a model.

    ``stream`` (default: whether ``adata`` is backed) keeps the counts on disk: the result holds
    a :class:`BackedCounts` reader and the per-cell library sizes instead of the matrix, and the
    trainers read bounded row windows (memory independent of the number of cells).

    Checks (each a :class:`DataError` naming the fix): empty AnnData, missing batch or label key
    (lists the available keys), NaN/Inf, negative values, non-integer counts with the NB
    likelihood, gene coverage below ``min_gene_coverage`` when ``reference_genes`` is given.
    Cells with zero total counts are kept and counted in a :class:`DataWarning`.
    """
    if adata.n_obs == 0:
        raise DataError("the AnnData has no cells (n_obs == 0); pass a dataset with cells")
    if adata.n_vars == 0:
        raise DataError("the AnnData has no genes (n_vars == 0); pass a dataset with genes")
    batches = _obs_column(adata, batch_key, "batch")
    labels = _obs_column(adata, label_key, "label") if label_key is not None else None
    cond_map = condition_names(list(dict.fromkeys(batches)), namespace)
    conditions = np.asarray([cond_map[b] for b in batches], dtype=object)

    alignment = None
    column_map = None
    if reference_genes is not None:
        column_map, alignment = gene_alignment(
            adata.var_names, reference_genes, min_coverage=min_gene_coverage
        )
        if not alignment.reordered:
            column_map = None
        log.info("gene alignment: %s", alignment.summary())
    else:
        names = [str(g) for g in adata.var_names]
        if len(set(names)) != len(names):
            raise DataError(
                "the AnnData has duplicated gene names (var_names); make them unique "
                "(adata.var_names_make_unique()) before training a reference"
            )
    where = f"layer {layer!r}" if layer else "X"
    if stream is None:
        stream = bool(getattr(adata, "isbacked", False))
    x: sp.csr_matrix | None = None
    source: BackedCounts | None = None
    if stream:
        from scarches_fl._memory import pin_mmap_threshold

        pin_mmap_threshold()  # a pass over every window: resident memory bounded, ADR 0082
        # One pass over the file: validate every stored value and sum the library sizes.
        source = BackedCounts(adata, layer=layer, column_map=column_map)
        totals = np.empty(adata.n_obs, dtype=np.float32)
        for start, block in iter_count_windows(adata, layer=layer):
            _check_values(block, likelihood=likelihood, where=where)
            if column_map is not None:
                block = block @ column_map
            totals[start:start + block.shape[0]] = np.asarray(block.sum(axis=1)).ravel()
    else:
        # Validate on the original columns (every stored value), window by window.
        for _s, block in iter_count_windows(adata, layer=layer):
            _check_values(block, likelihood=likelihood, where=where)
        x = read_counts(adata, layer=layer, column_map=column_map)
        totals = np.asarray(x.sum(axis=1), dtype=np.float32).ravel()
    n_zero = int((totals <= 0).sum())
    if n_zero:
        warnings.warn(
            f"{n_zero} of {len(totals)} cells have zero total counts on the model's genes; they "
            "are kept but carry no information (filter them, e.g. sc.pp.filter_cells(min_counts=1))",
            DataWarning,
            stacklevel=3,
        )
    registration = {"batch_key": batch_key, "label_key": label_key, "layer": layer}
    return RegisteredData(
        x=x, batches=batches, conditions=conditions, labels=labels,
        registration=registration, alignment=alignment, n_zero_cells=n_zero,
        source=source, lib=totals,
    )
