"""Mapping a site's private dataset onto a verified reference, with the model library.

Reading the data is where real sites stumble. Every check on the query (batch key, batch
sizes, where the counts are, gene coverage, label key) is the library's
(:func:`scarches_fl.query.check_query`, shared with ``scarches-fl map``); this module adds what
is particular to a site's file:

* a gzip-compressed ``.h5ad.gz`` (read through a private temporary copy, never uploaded);
* a file too large to read whole comfortably (streamed in row windows,
  :func:`scarches_fl.query.choose_backed`);
* its refusals as :class:`SiteDataError` (exit code 2), and an output written atomically.

Checking, surgery, embedding, label transfer and the notes (cells with zero counts on the
reference genes, batches contributed earlier) are the library's one mapping path
(:func:`scarches_fl.mapping.map_query`, the same as ``scarches-fl map`` and
``scarches_fl.Reference.map``); nothing here re-implements them. The mapped dataset stays at the
site.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protocols.errors import ScarchesFLError

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "SiteDataError",
    "MappingOutcome",
    "open_query",
    "map_query",
    "write_mapped",
]

logger = logging.getLogger(__name__)



class SiteDataError(ScarchesFLError):
    """The site's dataset cannot be mapped as given; the message names the fix."""

    exit_code = 2


@dataclass
class MappingOutcome:
    """What mapping produced: the output AnnData (stays here), the diff (may leave), and the
    library's :class:`scarches_fl.mapping.MappedQuery` it came from."""

    adata: AnnData
    mapped: Any
    notes: list[str] = field(default_factory=list)

    @property
    def diff(self) -> dict[str, np.ndarray]:
        return dict(self.mapped.diff)

    @property
    def new_conditions(self) -> list[str]:
        return list(self.mapped.new_conditions)

    @property
    def n_zero_cells(self) -> int:
        return int(self.mapped.n_zero_cells)


@contextlib.contextmanager
def open_query(path: str | Path, *, backed: bool | None = None) -> Iterator[Any]:
    """The site's h5ad, opened by :func:`scarches_fl.query.open_h5ad` (the one reader every
    command uses: plain or gzip-compressed, streamed when it would not fit); a file it cannot
    use is a :class:`SiteDataError` naming the fix, as every data error at the site is.
    Yields an AnnData."""
    from scarches_fl.data import DataError
    from scarches_fl.query import open_h5ad

    try:
        with open_h5ad(path, backed=backed, what="--data") as adata:
            yield adata
    except DataError as exc:
        raise SiteDataError(str(exc)) from exc


def map_query(
    adata: AnnData, model: Any, *, site_id: str, batch_key: str, label_key: str | None,
    layer: str | None, batches: Sequence[str] | None, min_gene_coverage: float,
    label_threshold: float, min_cells_per_batch: int, max_epochs: int | None, seed: int,
    var_names_column: str | None = None, progress: bool = False, label_method: str = "auto",
) -> MappingOutcome:
    """The library's one mapping path (:func:`scarches_fl.mapping.map_query`: every check
    before any training, surgery under the site's namespace, embedding, label transfer) with its
    refusals as :class:`SiteDataError`; the output AnnData shares the input's counts (a backed
    input's output holds everything but X)."""
    from scarches_fl.data import DataError
    from scarches_fl.mapping import map_query as library_map_query
    from scarches_fl.mapping import sharing_counts

    try:
        mapped = library_map_query(
            adata, model, batch_key=batch_key, namespace=site_id, label_key=label_key,
            layer=layer, batches=batches, var_names_column=var_names_column,
            mode="conditions", max_epochs=max_epochs, seed=seed, threshold=label_threshold,
            min_gene_coverage=min_gene_coverage, min_cells_per_batch=min_cells_per_batch,
            progress=progress, label_method=label_method,
        )
    except DataError as exc:
        raise SiteDataError(str(exc)) from exc
    notes = list(mapped.notes)
    query = mapped.adata
    if getattr(query, "isbacked", False):
        # the library read the counts in row windows; the output carries everything but X
        # (join it to the input on obs_names), so a large matrix is never copied into memory
        import anndata as ad

        out = ad.AnnData(obs=query.obs.copy(), var=query.var.copy())
        notes.append("the input was read backed: the output holds obs, var, the embedding and "
                     "labels, not the count matrix (join on obs_names)")
    else:
        out = sharing_counts(query)
    out.obsm["X_scarches"] = mapped.latent
    for key, values in mapped.obs_columns().items():
        out.obs[key] = values
    return MappingOutcome(adata=out, mapped=mapped, notes=notes)


def write_mapped(outcome: MappingOutcome, path: str | Path, *,
                 provenance: dict[str, Any]) -> None:
    """Write the mapped dataset with ``uns["scarches_fl"]`` =
    :meth:`scarches_fl.mapping.MappedQuery.record` (what was mapped, and from ``provenance`` the
    reference version in the ledger: ``tree_size``, ``checkpoint_root``, ``origin``,
    ``site_id``)."""
    path = Path(path).expanduser()
    adata = outcome.adata
    adata.uns["scarches_fl"] = outcome.mapped.record(ledger=provenance)
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
