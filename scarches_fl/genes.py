"""Gene selection for a reference: batch-aware highly variable genes on raw counts.

Rule (one place; ``reference train --n-top-genes N`` and
``ReferenceModel.train_reference(n_top_genes=N)`` both call :func:`select_highly_variable_genes`):
scanpy's ``highly_variable_genes(flavor="seurat_v3", batch_key=...)`` -- per batch, the variance
of the counts standardised by a loess fit of variance on mean (Seurat v3), genes ranked by their
median rank over batches, ties broken by the number of batches in which a gene is highly
variable. The N chosen genes keep the order they have in the input; they become the bundle's
ordered gene list, and a query aligns to that list as to any reference (missing genes zero,
extra genes dropped).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from scarches_fl.data import DataError

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["GENE_SELECTION_METHOD", "select_highly_variable_genes"]

logger = logging.getLogger(__name__)

GENE_SELECTION_METHOD = "scanpy highly_variable_genes flavor=seurat_v3 (batch-aware)"


def select_highly_variable_genes(
    adata: AnnData, *, n_top_genes: int, batch_key: str, layer: str | None = None
) -> list[str]:
    """The ``n_top_genes`` most variable genes of ``adata`` (raw counts in ``X`` or ``layer``),
    chosen within every batch of ``batch_key`` and combined, in the input's gene order."""
    n_genes = int(adata.n_vars)
    if n_top_genes < 1:
        raise DataError(f"--n-top-genes must be at least 1 (got {n_top_genes})")
    if n_top_genes >= n_genes:
        raise DataError(
            f"--n-top-genes {n_top_genes} is not below the {n_genes} genes of the data; "
            "leave it out to train on every gene"
        )
    if getattr(adata, "isbacked", False):
        raise DataError(
            "--n-top-genes needs the counts in memory, and this file is streamed from disk (by "
            "--backed, or because reading it whole would not fit comfortably); pass --in-memory "
            "if the machine holds it, or select the genes beforehand and pass the subset"
        )
    if batch_key not in adata.obs:
        raise DataError(f"batch key {batch_key!r} not in obs; it has {list(adata.obs.columns)}")
    try:
        import scanpy as sc
    except ImportError as exc:  # pragma: no cover - scanpy is in the model extra
        raise DataError(
            "--n-top-genes needs scanpy and scikit-misc: pip install 'scarches-fl[model]'"
        ) from exc
    try:
        table = sc.pp.highly_variable_genes(
            adata,
            n_top_genes=int(n_top_genes),
            flavor="seurat_v3",
            batch_key=batch_key,
            layer=layer,
            inplace=False,
        )
    except ImportError as exc:
        raise DataError(
            "--n-top-genes (Seurat v3 flavour) needs scikit-misc: pip install scikit-misc"
        ) from exc
    except ValueError as exc:
        raise DataError(
            f"highly variable gene selection failed ({exc}); it needs raw counts in "
            f"{'layer ' + repr(layer) if layer else 'X'} and a few dozen cells per batch of "
            f"{batch_key!r}"
        ) from exc
    mask = table["highly_variable"].to_numpy(dtype=bool)
    genes = [str(g) for g, keep in zip(adata.var_names, mask, strict=True) if keep]
    logger.info("selected %d of %d genes (%s)", len(genes), n_genes, GENE_SELECTION_METHOD)
    return genes
