"""Mapping a site's private dataset onto a verified reference, with the model library.

Reading the data is where real sites stumble. Every check on the query (batch key, batch
sizes, where the counts are, gene coverage, label key) is the library's
(:func:`scarches_fl.query.check_query`, shared with ``scarches-fl map``); this module adds what
is particular to a site's file:

* a gzip-compressed ``.h5ad.gz`` (read through a private temporary copy, never uploaded);
* a file too large to read whole comfortably (streamed in row windows,
  :func:`scarches_fl.query.choose_backed`);
* cells with zero counts on the reference genes (kept, embedded, and reported).

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
    "map_query",
    "write_mapped",
]

logger = logging.getLogger(__name__)

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_GZIP_MAGIC = b"\x1f\x8b"


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
    #: keyword arguments of :func:`scarches_fl.query.mapping_record` (less the ledger fields)
    record: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def open_query(path: str | Path, *, backed: bool | None = None) -> Iterator[Any]:
    """Open the site's h5ad (plain or gzip-compressed; streamed when it would not fit
    comfortably in memory, see :func:`scarches_fl.query.choose_backed`; ``backed`` forces
    either way). Yields an AnnData."""
    import anndata as ad

    from scarches_fl.query import choose_backed

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
        plan = choose_backed(path, backed=backed)
        backed = plan.backed
        try:
            adata = ad.read_h5ad(path, backed="r" if backed else None)
        except Exception as exc:  # h5py / anndata raise many types for a broken file
            raise SiteDataError(
                f"cannot read {path} as AnnData ({type(exc).__name__}: {exc}); check that it "
                "was written by anndata (adata.write_h5ad)"
            ) from exc
        logger.info("%s: %s", path.name, plan.reason)
        try:
            yield adata
        finally:
            if backed and getattr(adata, "file", None) is not None:
                with contextlib.suppress(Exception):
                    adata.file.close()
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _apply_var_names(adata: Any, column: str | None) -> Any:
    if column is None:
        return adata
    if column not in adata.var.columns:
        avail = ", ".join(map(str, adata.var.columns)) or "(none)"
        raise SiteDataError(
            f"--var-names-column {column!r} is not a column of var; the columns are: {avail}"
        )
    adata = adata.to_memory() if getattr(adata, "isbacked", False) else _sharing_counts(adata)
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
    """Check (:func:`scarches_fl.query.check_query`, before any training), align, surgery
    (condition-only fine-tuning), embed and transfer labels."""
    import time

    from scarches_fl.data import DataError, DataWarning
    from scarches_fl.query import check_query

    t0 = time.perf_counter()
    likelihood = str(model.hyperparameters.get("likelihood", "nb"))
    adata = _apply_var_names(adata, var_names_column)
    try:
        checked = check_query(
            adata, reference_genes=model.genes, batch_key=batch_key, likelihood=likelihood,
            layer=layer, label_key=label_key, labels_manifest=model.labels, batches=batches,
            min_cells_per_batch=min_cells_per_batch, min_gene_coverage=min_gene_coverage,
        )
    except DataError as exc:
        raise SiteDataError(str(exc)) from exc
    notes = list(checked.notes)
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
        out = _sharing_counts(adata)
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
    history = getattr(result, "history", {}) or {}
    record = {
        "reference_digest": str(model.digest), "model_digest": str(result.model.digest),
        "mode": "conditions", "namespace": site_id,
        "new_conditions": list(result.new_conditions),
        "epochs": int(history.get("epochs", 0)),
        "trainable_parameters": int(getattr(result, "trainable_parameters", 0)),
        "batch_key": batch_key, "counts": checked.counts, "alignment": result.alignment,
        "label_key": label_key if label_method else None, "label_method": label_method,
        "threshold": float(label_threshold) if label_method else None,
    }
    return MappingOutcome(
        adata=out, latent=result.latent, diff=dict(result.diff),
        new_conditions=list(result.new_conditions), alignment=result.alignment,
        new_model=result.model, label_method=label_method, n_zero_cells=n_zero, notes=notes,
        seconds=time.perf_counter() - t0, record=record,
    )


def _sharing_counts(adata: Any) -> Any:
    """A new AnnData over the same count matrix (not a copy of X): obs, obsm and uns are the
    output's own, so the caller's object is left as it was."""
    import anndata as ad

    return ad.AnnData(X=adata.X, obs=adata.obs.copy(), var=adata.var.copy(),
                      layers=dict(adata.layers), obsm=dict(adata.obsm), uns=dict(adata.uns))


def write_mapped(outcome: MappingOutcome, path: str | Path, *,
                 provenance: dict[str, Any]) -> None:
    """Write the mapped dataset with ``uns["scarches_fl"]`` =
    :func:`scarches_fl.query.mapping_record` (what was mapped, and from ``provenance`` the
    reference version in the ledger: ``tree_size``, ``checkpoint_root``, ``origin``,
    ``site_id``)."""
    from scarches_fl.query import mapping_record

    path = Path(path).expanduser()
    adata = outcome.adata
    adata.uns["scarches_fl"] = mapping_record(**outcome.record, ledger=provenance)
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
