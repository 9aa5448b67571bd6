"""Everything checked about a query before mapping, in one place, and the one record a mapped
file carries.

``scarches-fl map``, ``scarches-fl site map`` and the Python API call :func:`check_query` (and
:func:`check_output_path`) before any training, so a mistake costs seconds, not a fine-tuning
run. Each refusal is a :class:`~scarches_fl.data.DataError` whose message names the problem and
the fix. The rules:

* the output path is writable: its folder exists or is created; an existing file (or bundle
  directory) is refused unless ``force`` (``--force``);
* the dataset has cells; the batch key is a column of ``obs``; ``batches``, when given, are
  values of it;
* the batch key names studies, not cells: more than ``MAX_BATCH_FRACTION`` of the cells in
  distinct values (and more than ``MAX_BATCHES_UNCHECKED`` values) is refused as a cell id, and
  every batch needs at least ``min_cells_per_batch`` cells (a condition fitted on fewer says
  too much about them and too little about the study);
* the counts are where the reference expects them: the layer exists; a negative binomial
  reference needs raw integer counts, and when ``X`` is normalised the layer that holds the
  counts is named in the error; the source used ("X" or the layer) is recorded in the result and
  written to the output's ``uns["scarches_fl"]["counts"]``;
* the genes cover at least ``min_gene_coverage`` of the reference's (Ensembl ids against
  symbols: names the ``var`` column to use);
* a label key to predict is one of the reference's label levels (its label knowledge).

:func:`choose_backed` decides whether a file is read whole or streamed in row windows, from
the size of its count matrix and the memory available (see ADR 0017). :func:`mapping_record`
builds ``uns["scarches_fl"]``: one schema (``MAPPING_RECORD_FIELDS``) for every mapped file.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scarches_fl.data import DataError, GeneAlignmentReport, _id_kind

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "MAPPING_RECORD_FIELDS",
    "MAPPING_RECORD_SCHEMA",
    "MAX_BATCH_FRACTION",
    "QueryCheck",
    "ReadPlan",
    "check_output_path",
    "check_query",
    "choose_backed",
    "open_h5ad",
    "count_matrix_bytes",
    "mapping_record",
]

log = logging.getLogger(__name__)

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_GZIP_MAGIC = b"\x1f\x8b"

#: A batch key with more distinct values than this fraction of its cells names cells, not
#: studies (refused when it also has more than ``MAX_BATCHES_UNCHECKED`` values).
MAX_BATCH_FRACTION = 0.5
MAX_BATCHES_UNCHECKED = 20
#: Default minimum number of cells per batch (site.yaml ``thresholds.min_cells_per_batch``).
MIN_CELLS_PER_BATCH = 10
#: Reading a count matrix whole costs about this many times its size in CSR (the matrix, the
#: float32 copy the trainer reads, the output); measured at 1,000,000 cells (docs/benchmarks.md).
IN_MEMORY_FACTOR = 3.0
#: Stream when the in-memory estimate exceeds this fraction of the available memory.
STREAM_ABOVE_FRACTION = 0.25

_SYMBOL_COLUMNS = (
    "gene_symbols",
    "gene_symbol",
    "feature_name",
    "gene_name",
    "gene_names",
    "symbol",
    "symbols",
    "name",
)
_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl", "feature_id", "gene_ids-0")


# --------------------------------------------------------------------------------------------
# Output path
# --------------------------------------------------------------------------------------------


def check_output_path(
    path: str | os.PathLike[str], *, force: bool = False, what: str = "--out"
) -> Path:
    """The output path, its folder created; refuses an existing file or directory unless
    ``force``. ``what`` names the option in the message."""
    out = Path(path).expanduser()
    if out.exists() and not force:
        kind = "directory" if out.is_dir() else "file"
        raise DataError(
            f"{what} {out} already exists (a {kind}); pass --force to replace it, or choose "
            "another path"
        )
    if out.is_dir() and not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise DataError(
            f"{what} {out} is a directory that is not a model bundle; choose another path "
            "(--force replaces only a file or a bundle)"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the folder of {what} {out} ({exc}); choose another path"
        ) from exc
    if not os.access(out.parent, os.W_OK):
        raise DataError(f"the folder of {what} {out} is not writable; choose another path")
    return out


# --------------------------------------------------------------------------------------------
# Memory: read whole or stream
# --------------------------------------------------------------------------------------------


def count_matrix_bytes(path: str | os.PathLike[str], layer: str | None = None) -> int:
    """Bytes the count matrix (X or ``layer``) of an .h5ad would take in memory as stored:
    nonzeros x (value + index) + row pointers for sparse, cells x genes x value for dense. Read
    from the HDF5 metadata only (no counts are read)."""
    import h5py

    with h5py.File(path, "r") as f:
        node = f["X"] if layer is None else f["layers"][layer]
        if isinstance(node, h5py.Dataset):
            return int(np.prod(node.shape)) * int(node.dtype.itemsize)
        data, indices, indptr = node["data"], node["indices"], node["indptr"]
        return int(
            data.shape[0] * (data.dtype.itemsize + indices.dtype.itemsize)
            + indptr.shape[0] * indptr.dtype.itemsize
        )


def available_memory_bytes() -> int | None:
    """Memory this process may still use: ``MemAvailable``, capped by a cgroup v2 limit."""
    avail: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


@dataclass(frozen=True)
class ReadPlan:
    """How to open a query file: ``backed`` (stream row windows) or whole, and why."""

    backed: bool
    reason: str
    matrix_bytes: int | None = None
    available_bytes: int | None = None


def choose_backed(
    path: str | os.PathLike[str], *, backed: bool | None = None, available_bytes: int | None = None
) -> ReadPlan:
    """Stream the file when reading it whole would not fit comfortably: when
    ``IN_MEMORY_FACTOR`` x its ``X`` exceeds ``STREAM_ABOVE_FRACTION`` of the available
    memory (only ``X`` streams; layers are read whole either way). ``backed`` True / False
    (``--backed`` / ``--in-memory``) forces either way."""
    if backed is not None:
        return ReadPlan(bool(backed), "--backed" if backed else "--in-memory")
    try:
        size = count_matrix_bytes(path)
    except (OSError, KeyError) as exc:
        log.debug("cannot size the count matrix of %s (%s): reading it whole", path, exc)
        return ReadPlan(False, "count matrix size unknown")
    avail = available_memory_bytes() if available_bytes is None else available_bytes
    if avail is None:
        return ReadPlan(False, "available memory unknown", size, None)
    need = IN_MEMORY_FACTOR * size
    stream = need > STREAM_ABOVE_FRACTION * avail
    gb = 1e9
    reason = (
        f"count matrix {size / gb:.2f} GB, about {need / gb:.1f} GB to read whole, "
        f"{avail / gb:.1f} GB available: "
        + (
            "streaming it in row windows (--in-memory reads it whole)"
            if stream
            else "reading it whole (--backed streams it)"
        )
    )
    return ReadPlan(stream, reason, size, avail)


# --------------------------------------------------------------------------------------------
# The query
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryCheck:
    """What :func:`check_query` found: the batches and their sizes, where the counts are, the
    gene coverage, and notes for the person mapping."""

    n_cells: int
    batch_key: str
    batch_sizes: dict[str, int]
    counts: str  # "X" or "layers['<name>']"
    layer: str | None
    label_key: str | None
    gene_coverage: float
    notes: tuple[str, ...] = field(default_factory=tuple)


def _is_integer_matrix(adata: AnnData, layer: str | None, rows: int = 500) -> tuple[bool, bool]:
    """(all integer, all non-negative) on the first ``rows`` rows of X or ``layer``, read
    with the data module's row reader (a backed file or view reads only those rows)."""
    from scarches_fl.data import iter_count_windows

    _start, block = next(iter_count_windows(adata, layer=layer, window=rows))
    data = np.asarray(block.data, dtype=np.float64)
    if data.size == 0:
        return True, True
    finite = np.isfinite(data).all()
    return bool(finite and np.array_equal(data, np.round(data))), bool((data >= 0).all())


def _best_var_column(adata: AnnData, reference_genes: Sequence[str]) -> tuple[str, float] | None:
    ref = {str(g) for g in reference_genes}
    best = None
    for col in adata.var.columns:
        try:
            vals = adata.var[col].astype(str)
        except Exception:  # noqa: BLE001 - odd dtypes are just not candidates
            continue
        cov = len(set(vals) & ref) / max(len(ref), 1)
        if cov > 0 and (best is None or cov > best[1]):
            best = (str(col), cov)
    return best


def _check_batches(
    adata: AnnData,
    batch_key: str,
    batches: Sequence[str] | None,
    min_cells_per_batch: int,
    notes: list[str],
) -> dict[str, int]:
    if batch_key not in adata.obs.columns:
        avail = ", ".join(map(str, adata.obs.columns)) or "(none)"
        raise DataError(
            f"batch key {batch_key!r} is not a column of obs; the columns are: {avail}. Pass the "
            "one that names the study / sample with --batch-key"
        )
    col = adata.obs[batch_key]
    if col.isna().any():
        raise DataError(
            f"batch key {batch_key!r} has {int(col.isna().sum())} missing values; fill them "
            "(e.g. with 'unknown') or drop those cells"
        )
    counts = col.astype(str).value_counts()
    if batches:
        missing = [b for b in batches if b not in counts.index]
        if missing:
            raise DataError(
                f"batches {missing} are not values of obs[{batch_key!r}]; its values are "
                f"{sorted(counts.index)[:20]}. Fix --batches"
            )
        counts = counts[list(batches)]
    n = int(counts.sum())
    if len(counts) == 1:
        notes.append(
            f"obs[{batch_key!r}] has a single value ({counts.index[0]!r}): the whole dataset "
            "becomes one new condition"
        )
    elif len(counts) > MAX_BATCH_FRACTION * n and len(counts) > MAX_BATCHES_UNCHECKED:
        raise DataError(
            f"obs[{batch_key!r}] has {len(counts)} distinct values for {n} cells: that looks "
            "like a cell id or barcode, not a study, and would add one condition per cell. Pass "
            "the column that names the study / sample / technology with --batch-key"
        )
    small = {str(b): int(c) for b, c in counts.items() if c < min_cells_per_batch}
    if small:
        keep = [str(b) for b, c in counts.items() if c >= min_cells_per_batch]
        raise DataError(
            f"batches {small} have fewer than {min_cells_per_batch} cells: too few to fit a "
            "condition, and a condition fitted on so few cells says too much about them. Leave "
            f"them out with --batches {','.join(keep) or '...'}, or lower the minimum "
            "(--min-cells-per-batch; thresholds.min_cells_per_batch in site.yaml)"
        )
    return {str(b): int(c) for b, c in counts.items()}


def _check_counts(adata: AnnData, layer: str | None, likelihood: str) -> str:
    if layer is not None and layer not in adata.layers:
        avail = ", ".join(adata.layers.keys()) or "(none)"
        raise DataError(f"layer {layer!r} not found; the layers are: {avail}. Fix --layer")
    if layer is None and not getattr(adata, "isbacked", False) and adata.X is None:
        raise DataError("the dataset has no X; pass --layer NAME to read counts from a layer")
    where = f"layers[{layer!r}]" if layer else "X"
    is_int, non_neg = _is_integer_matrix(adata, layer)
    if likelihood == "nb" and not (is_int and non_neg):
        hints = []
        for name in adata.layers.keys():
            if name == layer:
                continue
            li, ln = _is_integer_matrix(adata, name)
            if li and ln:
                hints.append(f"--layer {name}")
        if getattr(adata, "raw", None) is not None and layer is None:
            hints.append(
                "the counts in adata.raw (write them to a layer: "
                "adata.layers['counts'] = adata.raw.X, then --layer counts)"
            )
        what = "negative values" if not non_neg else "non-integer values"
        fix = (
            ("; the raw counts look to be in " + " or ".join(hints))
            if hints
            else ("; give the dataset its raw integer counts (X or a layer)")
        )
        raise DataError(
            f"{where} holds {what} (normalised or log-transformed data), but the reference "
            f"models raw counts (negative binomial){fix}"
        )
    return where


def _check_genes(
    names: Sequence[str], adata: AnnData, reference_genes: Sequence[str], min_gene_coverage: float
) -> float:
    ref = {str(g) for g in reference_genes}
    overlap = len(set(names) & ref)
    coverage = overlap / max(len(ref), 1)
    if coverage >= min_gene_coverage:
        return coverage
    qk, rk = _id_kind(names), _id_kind(list(reference_genes))
    alt = _best_var_column(adata, reference_genes)
    msg = (
        f"only {overlap} of the reference's {len(ref)} genes are in the dataset "
        f"(coverage {coverage:.1%}, the minimum is {min_gene_coverage:.0%})"
    )
    if qk != rk and {qk, rk} <= {"ensembl", "symbol"}:
        msg += (
            f": the dataset names genes by {'Ensembl ids' if qk == 'ensembl' else 'symbols'} "
            f"(e.g. {list(names)[:2]}) while the reference uses "
            f"{'Ensembl ids' if rk == 'ensembl' else 'symbols'} (e.g. "
            f"{list(reference_genes)[:2]})"
        )
    if alt is not None and alt[1] >= min_gene_coverage:
        msg += (
            f". The var column {alt[0]!r} matches {alt[1]:.1%} of the reference genes: pass "
            f"--var-names-column {alt[0]}"
        )
    else:
        cols = _SYMBOL_COLUMNS if rk == "symbol" else _ID_COLUMNS
        msg += (
            ". Map the gene ids first, e.g. in Python: adata.var_names = "
            f"adata.var[{cols[0]!r}] (with a column holding the reference's kind of "
            "names; a table such as Ensembl BioMart gives the mapping), then "
            "adata.var_names_make_unique(); or lower --min-gene-coverage"
        )
    raise DataError(msg)


def _check_label_key(
    label_key: str, labels_manifest: Mapping[str, Any] | None, adata: AnnData, notes: list[str]
) -> None:
    levels = sorted((labels_manifest or {}).get("levels", {}))
    if not levels:
        raise DataError(
            f"--label-key {label_key!r}: this reference carries no label knowledge, so it "
            "cannot predict labels; leave out --label-key, or train the reference with "
            "--label-key (a federated reference trained with --label-key carries its labels in "
            "its bundle, not yet in the ledger: map against that bundle with --reference)"
        )
    if label_key not in levels:
        raise DataError(
            f"--label-key {label_key!r} is not a label level of the reference; it knows "
            f"{levels}. Pass one of those with --label-key"
        )
    if label_key not in adata.obs.columns:
        notes.append(
            f"obs has no {label_key!r} column: predictions only (scarches-fl evaluate needs the "
            "true labels to score them)"
        )


def check_query(
    adata: AnnData,
    *,
    reference_genes: Sequence[str],
    batch_key: str,
    likelihood: str = "nb",
    layer: str | None = None,
    label_key: str | None = None,
    labels_manifest: Mapping[str, Any] | None = None,
    batches: Sequence[str] | None = None,
    min_cells_per_batch: int = MIN_CELLS_PER_BATCH,
    min_gene_coverage: float = 0.5,
    var_names_column: str | None = None,
) -> QueryCheck:
    """Check a query against a reference before any training (the rules are in the module
    docstring). Returns a :class:`QueryCheck`; raises :class:`~scarches_fl.data.DataError`
    naming the problem and the fix."""
    notes: list[str] = []
    if adata.n_obs == 0:
        raise DataError("the dataset has no cells; pass a dataset with cells")
    sizes = _check_batches(adata, batch_key, batches, int(min_cells_per_batch), notes)
    counts = _check_counts(adata, layer, likelihood)
    names = [str(g) for g in (adata.var[var_names_column] if var_names_column else adata.var_names)]
    coverage = _check_genes(names, adata, reference_genes, min_gene_coverage)
    if label_key is not None:
        _check_label_key(label_key, labels_manifest, adata, notes)
    notes.append(f"counts read from {counts}")
    return QueryCheck(
        n_cells=int(sum(sizes.values())),
        batch_key=batch_key,
        batch_sizes=sizes,
        counts=counts,
        layer=layer,
        label_key=label_key,
        gene_coverage=round(coverage, 6),
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------------------------
# uns["scarches_fl"]: one record for every mapped file
# --------------------------------------------------------------------------------------------

MAPPING_RECORD_SCHEMA = "scarches-fl.mapping/1"
#: Every key of ``uns["scarches_fl"]``, in every mapped file (None-valued keys are left out of
#: the file, as HDF5 stores no None: ``label_key``, ``label_method``, ``threshold`` without
#: label prediction; the ``tree_size`` / ``checkpoint_root`` / ``origin`` / ``site_id`` of the
#: ledger only after ``site map``).
MAPPING_RECORD_FIELDS = (
    "schema",
    "reference_digest",
    "model_digest",
    "mode",
    "namespace",
    "new_conditions",
    "epochs",
    "trainable_parameters",
    "batch_key",
    "counts",
    "gene_alignment",
    "label_key",
    "label_method",
    "threshold",
    "tree_size",
    "checkpoint_root",
    "origin",
    "site_id",
)


def mapping_record(
    *,
    reference_digest: str,
    model_digest: str,
    mode: str,
    namespace: str,
    new_conditions: Sequence[str],
    epochs: int,
    trainable_parameters: int,
    batch_key: str,
    counts: str,
    alignment: GeneAlignmentReport,
    label_key: str | None = None,
    label_method: str | None = None,
    threshold: float | None = None,
    ledger: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``uns["scarches_fl"]`` of a mapped file (fields: ``MAPPING_RECORD_FIELDS``; meanings in
    docs/model.md). ``ledger`` holds ``tree_size``, ``checkpoint_root``, ``origin`` and
    ``site_id`` when the reference came from a coordinator's ledger."""
    ledger = dict(ledger or {})
    unknown = set(ledger) - {"tree_size", "checkpoint_root", "origin", "site_id"}
    if unknown:
        raise ValueError(f"unknown ledger fields {sorted(unknown)}")
    record: dict[str, Any] = {
        "schema": MAPPING_RECORD_SCHEMA,
        "reference_digest": str(reference_digest),
        "model_digest": str(model_digest),
        "mode": str(mode),
        "namespace": str(namespace),
        "new_conditions": [str(c) for c in new_conditions],
        "epochs": int(epochs),
        "trainable_parameters": int(trainable_parameters),
        "batch_key": str(batch_key),
        "counts": str(counts),
        "gene_alignment": {k: v for k, v in alignment.to_dict().items() if not isinstance(v, list)},
        "label_key": label_key,
        "label_method": label_method,
        "threshold": None if threshold is None else float(threshold),
        **{k: ledger.get(k) for k in ("tree_size", "checkpoint_root", "origin", "site_id")},
    }
    assert tuple(record) == MAPPING_RECORD_FIELDS
    return {k: v for k, v in record.items() if v is not None}


@contextlib.contextmanager
def open_h5ad(
    path: str | os.PathLike[str], *, backed: bool | None = None, what: str = "--data"
) -> Iterator[Any]:
    """Open an h5ad for any command (plain or gzip-compressed ``.h5ad.gz``, read through a
    private temporary copy that is removed on exit; streamed when it would not fit comfortably
    in memory, see :func:`choose_backed`; ``backed`` forces either way). A file that is missing,
    not HDF5 or not written by anndata is a :class:`scarches_fl.data.DataError` naming the fix;
    ``what`` is the option that named the file. Yields an AnnData."""
    import anndata as ad

    from scarches_fl.data import DataError

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{what} {path}: file not found; pass an existing .h5ad or .h5ad.gz")
    with open(path, "rb") as fh:
        magic = fh.read(8)
    tmpdir = None
    try:
        if magic.startswith(_GZIP_MAGIC):
            tmpdir = tempfile.mkdtemp(prefix="scarches-fl-site-")
            os.chmod(tmpdir, 0o700)
            plain = Path(tmpdir) / (path.name.removesuffix(".gz") or "query.h5ad")
            log.info("%s is gzip-compressed; reading it through a private temporary copy",
                        path)
            try:
                with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=4 * 1024 * 1024)
            except (OSError, EOFError) as exc:
                raise DataError(
                    f"{path} looks gzip-compressed but does not decompress ({exc}); check the "
                    f"file, or decompress it yourself (gunzip -k {path}) and pass the .h5ad"
                ) from exc
            with open(plain, "rb") as fh:
                magic = fh.read(8)
            path = plain
        if not magic.startswith(_HDF5_MAGIC):
            raise DataError(
                f"{path} is not an HDF5 .h5ad file; convert it first (e.g. "
                "anndata.read_loom / read_csv / scanpy.read_10x_mtx, then .write_h5ad)"
            )
        plan = choose_backed(path, backed=backed)
        backed = plan.backed
        try:
            adata = ad.read_h5ad(path, backed="r" if backed else None)
        except Exception as exc:  # h5py / anndata raise many types for a broken file
            raise DataError(
                f"cannot read {path} as AnnData ({type(exc).__name__}: {exc}); check that it "
                "was written by anndata (adata.write_h5ad)"
            ) from exc
        log.info("%s: %s", path.name, plan.reason)
        try:
            yield adata
        finally:
            if backed and getattr(adata, "file", None) is not None:
                with contextlib.suppress(Exception):
                    adata.file.close()
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
