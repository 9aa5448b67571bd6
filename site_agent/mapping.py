"""Mapping a site's private dataset onto a verified reference, with the model library.

Reading the data is where real sites stumble, so this module turns the usual surprises into
messages that say what is wrong and how to fix it:

* a gzip-compressed ``.h5ad.gz`` (read through a private temporary copy, never uploaded);
* a file too large for memory (read backed, in row windows);
* counts in a layer while ``X`` holds normalised values (names the layer to pass with --layer);
* a batch key with a single value (fine: one new condition) or with one value per cell (refused:
  that is a cell id, not a study);
* Ensembl gene ids in the query while the reference uses symbols (or the reverse): names the
  ``var`` column that holds the other kind and the flag that uses it;
* cells with zero counts on the reference genes (kept, embedded, and reported);
* batches too small to contribute (refused, naming them and the flag that leaves them out).

The surgery itself, the gene alignment, the embedding and the label transfer are the library's
(``scarches_fl.model``, ``scarches_fl.data``, ``scarches_fl.labels``); nothing here re-implements
them. The mapped dataset stays at the site.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocols.errors import ScarchesFLError

__all__ = [
    "SiteDataError",
    "MappingOutcome",
    "open_query",
    "check_query",
    "map_query",
    "write_mapped",
]

logger = logging.getLogger(__name__)

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_GZIP_MAGIC = b"\x1f\x8b"
#: Files above this size are opened backed (read in row windows) instead of loaded whole.
BACKED_ABOVE_BYTES = 2 * 1024**3
_SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "gene_name", "gene_names",
                   "symbol", "symbols", "name")
_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl", "feature_id", "gene_ids-0")


class SiteDataError(ScarchesFLError):
    """The site's dataset cannot be mapped as given; the message names the fix."""

    exit_code = 2


@dataclass
class MappingOutcome:
    """What mapping produced: the mapped AnnData (stays here) and the diff (may leave)."""

    adata: Any
    latent: np.ndarray
    diff: dict[str, np.ndarray]
    new_conditions: list[str]
    alignment: Any
    new_model: Any
    label_method: str | None = None
    n_zero_cells: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@contextlib.contextmanager
def open_query(path: str | Path, *, backed: bool | None = None) -> Iterator[Any]:
    """Open the site's h5ad (plain or gzip-compressed; backed when large). Yields an AnnData."""
    import anndata as ad

    path = Path(path).expanduser()
    if not path.is_file():
        raise SiteDataError(f"no dataset at {path}; pass the query .h5ad with --data")
    with open(path, "rb") as fh:
        magic = fh.read(8)
    tmpdir = None
    try:
        if magic.startswith(_GZIP_MAGIC):
            tmpdir = tempfile.mkdtemp(prefix="scarches-fl-site-")
            os.chmod(tmpdir, 0o700)
            plain = Path(tmpdir) / (path.name.removesuffix(".gz") or "query.h5ad")
            logger.info("%s is gzip-compressed; reading it through a private temporary copy",
                        path)
            try:
                with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=4 * 1024 * 1024)
            except (OSError, EOFError) as exc:
                raise SiteDataError(
                    f"{path} looks gzip-compressed but does not decompress ({exc}); check the "
                    f"file, or decompress it yourself (gunzip -k {path}) and pass the .h5ad"
                ) from exc
            with open(plain, "rb") as fh:
                magic = fh.read(8)
            path = plain
        if not magic.startswith(_HDF5_MAGIC):
            raise SiteDataError(
                f"{path} is not an HDF5 .h5ad file; convert it first (e.g. "
                "anndata.read_loom / read_csv / scanpy.read_10x_mtx, then .write_h5ad)"
            )
        if backed is None:
            backed = path.stat().st_size > BACKED_ABOVE_BYTES
        try:
            adata = ad.read_h5ad(path, backed="r" if backed else None)
        except Exception as exc:  # h5py / anndata raise many types for a broken file
            raise SiteDataError(
                f"cannot read {path} as AnnData ({type(exc).__name__}: {exc}); check that it "
                "was written by anndata (adata.write_h5ad)"
            ) from exc
        if backed:
            logger.info("reading %s backed (row windows), it is large", path)
        try:
            yield adata
        finally:
            if backed and getattr(adata, "file", None) is not None:
                with contextlib.suppress(Exception):
                    adata.file.close()
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _is_integer_matrix(mat: Any, rows: int = 500) -> tuple[bool, bool]:
    """(all integer, all non-negative) on the first ``rows`` rows (sparse or dense)."""
    import scipy.sparse as sp

    block = mat[: min(rows, mat.shape[0])]
    data = block.data if sp.issparse(block) else np.asarray(block).ravel()
    data = np.asarray(data, dtype=np.float64)
    if data.size == 0:
        return True, True
    finite = np.isfinite(data).all()
    return bool(finite and np.array_equal(data, np.round(data))), bool((data >= 0).all())


def _gene_kind(names: Sequence[str]) -> str:
    sample = [str(g) for g in list(names)[:300]]
    if not sample:
        return "empty"
    frac = sum(bool(_ENSEMBL_RE.match(g)) for g in sample) / len(sample)
    return "ensembl" if frac > 0.8 else ("symbol" if frac < 0.2 else "mixed")


def _best_var_column(adata: Any, reference_genes: Sequence[str]) -> tuple[str, float] | None:
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


def check_query(
    adata: Any, *, batch_key: str, reference_genes: Sequence[str], layer: str | None,
    likelihood: str, min_gene_coverage: float, batches: Sequence[str] | None,
    min_cells_per_batch: int, var_names_column: str | None = None,
) -> list[str]:
    """Friendly checks before the library sees the data; returns notes for the admin, raises
    :class:`SiteDataError` with the fix otherwise."""
    notes: list[str] = []
    if adata.n_obs == 0:
        raise SiteDataError("the dataset has no cells")
    if batch_key not in adata.obs.columns:
        avail = ", ".join(map(str, adata.obs.columns)) or "(none)"
        raise SiteDataError(
            f"batch key {batch_key!r} is not a column of obs; the columns are: {avail}. Pass the "
            "one that names the study / sample with --batch-key (or batch_key: in site.yaml)"
        )
    values = adata.obs[batch_key].astype(str)
    counts = values.value_counts()
    if batches:
        missing = [b for b in batches if b not in counts.index]
        if missing:
            raise SiteDataError(
                f"batches {missing} are not values of obs[{batch_key!r}]; its values are "
                f"{sorted(counts.index)[:20]}. Fix --batches"
            )
        counts = counts[list(batches)]
    if len(counts) == 1:
        notes.append(
            f"obs[{batch_key!r}] has a single value ({counts.index[0]!r}): the whole dataset "
            "becomes one new condition"
        )
    elif len(counts) > 0.5 * int(counts.sum()) and len(counts) > 20:
        raise SiteDataError(
            f"obs[{batch_key!r}] has {len(counts)} distinct values for {int(counts.sum())} cells: "
            "that looks like a cell id or barcode, not a study. Pass the column that names the "
            "study / sample / technology with --batch-key"
        )
    small = {str(b): int(n) for b, n in counts.items() if n < min_cells_per_batch}
    if small:
        keep = [str(b) for b, n in counts.items() if n >= min_cells_per_batch]
        raise SiteDataError(
            f"batches {small} have fewer than {min_cells_per_batch} cells: too few to fit a "
            "condition, and a condition fitted on so few cells says too much about them. Leave "
            f"them out with --batches {','.join(keep) or '...'} or lower "
            "thresholds.min_cells_per_batch in site.yaml"
        )

    # counts: X or a layer
    if layer is not None and layer not in adata.layers:
        avail = ", ".join(adata.layers.keys()) or "(none)"
        raise SiteDataError(f"layer {layer!r} not found; the layers are: {avail}. Fix --layer")
    mat = adata.layers[layer] if layer else adata.X
    if mat is None:
        raise SiteDataError("the dataset has no X; pass --layer NAME to read counts from a layer")
    is_int, non_neg = _is_integer_matrix(mat)
    if likelihood == "nb" and not (is_int and non_neg):
        where = f"layer {layer!r}" if layer else "X"
        hints = []
        for name in adata.layers.keys():
            if name == layer:
                continue
            li, ln = _is_integer_matrix(adata.layers[name])
            if li and ln:
                hints.append(f"--layer {name}")
        if getattr(adata, "raw", None) is not None and layer is None:
            hints.append("the counts in adata.raw (write them to a layer: "
                         "adata.layers['counts'] = adata.raw.X, then --layer counts)")
        what = "negative values" if not non_neg else "non-integer values"
        fix = ("; the raw counts look to be in " + " or ".join(hints)) if hints else (
            "; give the dataset its raw integer counts (X or a layer)"
        )
        raise SiteDataError(
            f"{where} holds {what} (normalised or log-transformed data), but the reference "
            f"models raw counts (negative binomial){fix}"
        )

    # genes
    names = [str(g) for g in (adata.var[var_names_column] if var_names_column
                              else adata.var_names)]
    ref = {str(g) for g in reference_genes}
    overlap = len(set(names) & ref)
    coverage = overlap / max(len(ref), 1)
    if coverage < min_gene_coverage:
        qk, rk = _gene_kind(names), _gene_kind(list(reference_genes))
        alt = _best_var_column(adata, reference_genes)
        msg = (
            f"only {overlap} of the reference's {len(ref)} genes are in the dataset "
            f"(coverage {coverage:.1%}, the minimum is {min_gene_coverage:.0%})"
        )
        if qk != rk and {qk, rk} <= {"ensembl", "symbol"}:
            msg += (
                f": the dataset names genes by {'Ensembl ids' if qk == 'ensembl' else 'symbols'} "
                f"(e.g. {names[:2]}) while the reference uses "
                f"{'Ensembl ids' if rk == 'ensembl' else 'symbols'} (e.g. "
                f"{list(reference_genes)[:2]})"
            )
        if alt is not None and alt[1] >= min_gene_coverage:
            msg += (
                f". The var column {alt[0]!r} matches {alt[1]:.1%} of the reference genes: pass "
                f"--var-names-column {alt[0]}"
            )
        else:
            cols = [c for c in (_SYMBOL_COLUMNS if rk == "symbol" else _ID_COLUMNS)]
            msg += (
                ". Map the gene ids first, e.g. in Python: adata.var_names = "
                f"adata.var[{cols[0]!r}] (with a column holding the reference's kind of "
                "names; a table such as Ensembl BioMart gives the mapping), then "
                "adata.var_names_make_unique()"
            )
        raise SiteDataError(msg)
    return notes


def _apply_var_names(adata: Any, column: str | None) -> Any:
    if column is None:
        return adata
    if column not in adata.var.columns:
        avail = ", ".join(map(str, adata.var.columns)) or "(none)"
        raise SiteDataError(
            f"--var-names-column {column!r} is not a column of var; the columns are: {avail}"
        )
    if getattr(adata, "isbacked", False):
        adata = adata.to_memory()
    adata = adata.copy()
    adata.var_names = adata.var[column].astype(str).to_numpy()
    adata.var_names_make_unique()
    return adata


def _embed_only(model: Any, adata: Any, *, batch_key: str, site_id: str, layer: str | None,
                min_gene_coverage: float) -> Any:
    """A surgery-shaped result for batches whose conditions the reference already has."""
    from types import SimpleNamespace

    from scarches_fl.data import gene_alignment

    latent = model.get_latent(adata, batch_key=batch_key, namespace=site_id, layer=layer,
                              min_gene_coverage=min_gene_coverage)
    _, report = gene_alignment(adata.var_names, model.genes, min_coverage=min_gene_coverage)
    return SimpleNamespace(model=model, latent=latent, diff={}, new_conditions=[],
                           alignment=report)


def map_query(
    adata: Any, model: Any, *, site_id: str, batch_key: str, label_key: str | None,
    layer: str | None, batches: Sequence[str] | None, min_gene_coverage: float,
    label_threshold: float, min_cells_per_batch: int, max_epochs: int | None, seed: int,
    var_names_column: str | None = None, progress: bool = False,
) -> MappingOutcome:
    """Check, align, surgery (condition-only fine-tuning), embed and transfer labels."""
    import time

    from scarches_fl.data import DataError, DataWarning

    t0 = time.perf_counter()
    likelihood = str(model.hyperparameters.get("likelihood", "nb"))
    adata = _apply_var_names(adata, var_names_column)
    notes = check_query(
        adata, batch_key=batch_key, reference_genes=model.genes, layer=layer,
        likelihood=likelihood, min_gene_coverage=min_gene_coverage, batches=batches,
        min_cells_per_batch=min_cells_per_batch,
    )
    if batches:
        mask = np.isin(adata.obs[batch_key].astype(str).to_numpy(), list(batches))
        adata = adata[mask]
    backed = bool(getattr(adata, "isbacked", False))
    if backed and batches:
        adata = adata.to_memory()  # only the selected batches
        backed = False
    elif getattr(adata, "is_view", False):
        adata = adata.copy()
    from scarches_fl.data import condition_names

    wanted = condition_names(
        list(dict.fromkeys(adata.obs[batch_key].astype(str).to_numpy())), site_id
    )
    present = [c for c in wanted.values() if c in set(model.conditions)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        try:
            if present and len(present) == len(wanted):
                # every batch was contributed before: embed with the existing conditions
                notes.append(
                    f"conditions {present} are already in the reference (contributed earlier): "
                    "embedding with them; nothing new to contribute"
                )
                result = _embed_only(model, adata, batch_key=batch_key, site_id=site_id,
                                     layer=layer, min_gene_coverage=min_gene_coverage)
            elif present:
                fresh = [b for b, c in wanted.items() if c not in present]
                raise SiteDataError(
                    f"conditions {present} are already in the reference (contributed earlier) "
                    f"but {sorted(set(wanted.values()) - set(present))} are new; map them in two "
                    f"runs, e.g. --batches {','.join(fresh)} to contribute the new ones"
                )
            else:
                result = model.surgery(
                    adata, batch_key=batch_key, namespace=site_id, layer=layer,
                    mode="conditions", max_epochs=max_epochs, seed=seed,
                    min_gene_coverage=min_gene_coverage, progress=progress,
                )
        except DataError as exc:
            raise SiteDataError(str(exc)) from exc
    n_zero = 0
    for w in caught:
        if issubclass(w.category, DataWarning):
            notes.append(str(w.message))
            m = re.match(r"(\d+) of \d+ cells have zero", str(w.message))
            if m:
                n_zero = int(m.group(1))
    notes.append(f"gene alignment: {result.alignment.summary()}")
    if backed:
        # the library read the counts in row windows; the output carries everything but X
        # (join it to the input on obs_names), so a large matrix is never copied into memory
        import anndata as ad

        out = ad.AnnData(obs=adata.obs.copy(), var=adata.var.copy())
        notes.append("the input was read backed: the output holds obs, var, the embedding and "
                     "labels, not the count matrix (join on obs_names)")
    else:
        out = adata.copy()
    out.obsm["X_scarches"] = np.asarray(result.latent, dtype=np.float32)
    label_method = None
    if label_key:
        from scarches_fl.labels import LabelTransferError, predict_labels

        new_model = result.model
        try:
            pred = predict_labels(
                new_model.labels, new_model.extra_tensors, result.latent, label_key=label_key,
                threshold=label_threshold,
            )
        except LabelTransferError as exc:
            raise SiteDataError(
                f"label transfer for {label_key!r} failed: {exc}. Leave out --label-key to map "
                "without labels"
            ) from exc
        out.obs[f"{label_key}_pred"] = np.asarray(pred.pred, dtype=str)
        out.obs[f"{label_key}_uncertainty"] = np.asarray(pred.uncertainty, dtype=np.float32)
        label_method = pred.method
        n_unknown = int(np.sum(np.asarray(pred.pred, dtype=str) == "Unknown"))
        notes.append(
            f"labels ({pred.method}): {n_unknown} of {out.n_obs} cells called Unknown "
            f"(uncertainty > {label_threshold})"
        )
    return MappingOutcome(
        adata=out, latent=result.latent, diff=dict(result.diff),
        new_conditions=list(result.new_conditions), alignment=result.alignment,
        new_model=result.model, label_method=label_method, n_zero_cells=n_zero, notes=notes,
        seconds=time.perf_counter() - t0,
    )


def write_mapped(outcome: MappingOutcome, path: str | Path, *, provenance: dict[str, Any]) -> None:
    """Write the mapped dataset with ``uns["scarches_fl"]`` = the reference version it was
    mapped on (tree size, checkpoint root, digest) and what was added."""
    path = Path(path).expanduser()
    adata = outcome.adata
    meta = dict(provenance)
    meta["new_conditions"] = list(outcome.new_conditions)
    meta["gene_alignment"] = {
        k: v for k, v in outcome.alignment.to_dict().items() if not isinstance(v, list)
    }
    if outcome.label_method:
        meta["label_method"] = outcome.label_method
    adata.uns["scarches_fl"] = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        adata.write_h5ad(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
