"""The Python API: train a reference, save and load it, map a query onto it, evaluate.

The CLI is a thin shell over these; the three-line mapping::

    ref = scarches_fl.Reference.load("bundle")
    ref.map(query, batch_key="batch", label_key="cell_type")
    query.obsm["X_scarches"], query.obs["cell_type_pred"], query.obs["cell_type_uncertainty"]

writes the same keys as ``scarches-fl map`` (and ``site map``): every mapping goes through
:func:`scarches_fl.mapping.map_query`. Arguments after the first are keyword-only, as in
scanpy / anndata.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scarches_fl.data import DataError, _obs_column
from scarches_fl.model import REGISTERED, ReferenceModel, _Registered
from scarches_fl.query import MIN_CELLS_PER_BATCH

if TYPE_CHECKING:
    from anndata import AnnData

    from scarches_fl.mapping import MappedQuery

__all__ = ["Reference", "evaluate"]

log = logging.getLogger(__name__)


class Reference:
    """A reference model: a conditional VAE with its genes, conditions, data registration and
    label knowledge. Build one with :meth:`train` or :meth:`load`; grow it with :meth:`map`."""

    def __init__(self, model: ReferenceModel) -> None:
        self.model = model

    def __repr__(self) -> str:
        return (
            f"Reference({len(self.genes)} genes, {len(self.conditions)} conditions, "
            f"labels {self.label_keys or 'none'}, digest {self.digest[:19]}...)"
        )

    # -- what it is ----------------------------------------------------------------------------

    @property
    def genes(self) -> list[str]:
        """The ordered genes a query is aligned to."""
        return self.model.genes

    @property
    def conditions(self) -> list[str]:
        """The ordered conditions, ``<namespace>/<batch>``."""
        return self.model.conditions

    @property
    def label_keys(self) -> list[str]:
        """The label levels it can predict (``map(label_key=...)``)."""
        return sorted(self.model.labels.get("levels", {}))

    @property
    def registration(self) -> dict[str, Any]:
        """How the training data was read: ``batch_key``, ``label_key``, ``layer``, ..."""
        return dict(self.model.registration)

    @property
    def digest(self) -> str:
        """The content digest (the model's identity in a ledger)."""
        return self.model.digest

    # -- train, save, load ---------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        adata: AnnData,
        *,
        batch_key: str,
        label_key: str | None = None,
        layer: str | None = None,
        likelihood: str = "nb",
        namespace: str = "ref",
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 2,
        dispersion: str = "gene",
        n_top_genes: int | None = None,
        classifier_weight: float | None = None,
        include_atlas: bool = False,
        max_epochs: int | None = None,
        seed: int = 0,
        progress: bool = False,
        device: str = "cpu",
    ) -> Reference:
        """Train a reference on ``adata`` (raw counts in X or ``layer``): one condition per value
        of ``obs[batch_key]``; with ``label_key`` a semi-supervised reference that stores label
        knowledge for :meth:`map`. The options are ``scarches-fl reference train``'s."""
        # the columns are checked before any training (and gene selection), with the messages
        # the training itself would give
        _obs_column(adata, batch_key, "batch")
        if label_key is not None:
            _obs_column(adata, label_key, "label")
        model = ReferenceModel.train_reference(
            adata,
            batch_key=batch_key,
            label_key=label_key,
            layer=layer,
            likelihood=likelihood,
            namespace=namespace,
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_latent=n_latent,
            max_epochs=max_epochs,
            seed=seed,
            device=device,
            progress=progress,
            dispersion=dispersion,
            include_atlas=include_atlas,
            classifier_weight=classifier_weight,
            n_top_genes=n_top_genes,
        )
        return cls(model)

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write the bundle directory (``model.safetensors`` + ``manifest.json``); refuses to
        replace an existing one unless ``force``."""
        from scarches_fl.query import check_output_path

        out = check_output_path(path, force=force, what="the bundle path")
        self.model.save(out)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Reference:
        """Read a bundle directory (its digest is checked)."""
        bundle = Path(path).expanduser()
        if not (bundle / "manifest.json").is_file():
            raise DataError(
                f"{bundle} is not a reference bundle (no manifest.json); pass the directory "
                "that Reference.save or `scarches-fl reference train --out` wrote"
            )
        return cls(ReferenceModel.from_bundle(bundle))

    @classmethod
    def from_scvi(
        cls,
        model_dir: str | os.PathLike[str],
        *,
        label_key: str | None = None,
        data: AnnData | str | os.PathLike[str] | None = None,
        namespace: str = "ref",
    ) -> Reference:
        """Import a saved scvi-tools SCVI / SCANVI model directory without running its pickled
        code (``scarches-fl reference import-scvi``; ``data``: the reference's cells, for label
        prototypes). Supported options and what is refused: ``docs/model.md``."""
        from scarches_fl.scvi_interop import import_scvi

        return cls(
            import_scvi(Path(model_dir), label_key=label_key, data=data, namespace=namespace)
        )

    def to_scvi(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write a reference imported with :meth:`from_scvi` (grown by any number of sites) as a
        scvi-tools model directory (``scarches-fl reference export-scvi``)."""
        from scarches_fl.scvi_interop import export_scvi

        return export_scvi(self.model, Path(path), force=force)

    # -- use -----------------------------------------------------------------------------------

    def map(
        self,
        query: AnnData,
        *,
        batch_key: str,
        label_key: str | None = None,
        namespace: str = "query",
        layer: str | None = None,
        var_names_column: str | None = None,
        mode: str = "conditions",
        threshold: float = 0.5,
        min_gene_coverage: float = 0.5,
        min_cells_per_batch: int = MIN_CELLS_PER_BATCH,
        max_epochs: int | None = None,
        seed: int = 0,
        progress: bool = False,
        device: str = "cpu",
        label_method: str = "auto",
    ) -> MappedQuery:
        """Map ``query`` by architecture surgery and write into it, in place,
        ``obsm["X_scarches"]``, ``uns["scarches_fl"]`` and with ``label_key``
        ``obs["<label_key>_pred"]`` / ``obs["<label_key>_uncertainty"]`` (cells above
        ``threshold`` called "Unknown"; ``label_method`` as ``scarches-fl map --label-method``,
        default ``auto``: the expression prototypes where the reference has them, ADR 0070). Every input is checked before any training. Returns the
        :class:`~scarches_fl.mapping.MappedQuery`: ``.reference`` is the grown reference,
        ``.diff`` the new condition columns a site would contribute, ``.notes`` what was found.
        This reference itself is left unchanged."""
        from scarches_fl.mapping import map_query

        mapped = map_query(
            query,
            self.model,
            batch_key=batch_key,
            namespace=namespace,
            label_key=label_key,
            layer=layer,
            var_names_column=var_names_column,
            mode=mode,
            max_epochs=max_epochs,
            seed=seed,
            threshold=threshold,
            min_gene_coverage=min_gene_coverage,
            min_cells_per_batch=min_cells_per_batch,
            progress=progress,
            device=device,
            label_method=label_method,
        )
        mapped.annotate(query)
        return mapped

    def get_latent(
        self,
        adata: AnnData,
        *,
        batch_key: str | None = None,
        namespace: str | None = None,
        layer: str | None | _Registered = REGISTERED,
        device: str = "cpu",
    ) -> np.ndarray:
        """The embedding (posterior mean) of cells whose conditions this reference holds:
        its training data, or a query after :meth:`map` (on the returned ``.reference``, with
        the namespace it was mapped under). Reads the counts from the layer the reference was
        registered with unless ``layer`` says otherwise (``None``: X); ``batch_key`` and
        ``namespace`` default to the registered ones."""
        return self.model.get_latent(
            adata, batch_key=batch_key, namespace=namespace, layer=layer, device=device
        )


def evaluate(
    adata: AnnData,
    *,
    batch_key: str,
    label_key: str,
    report_dir: str | os.PathLike[str] | None = None,
    reference: Reference | None = None,
    reference_data: AnnData | None = None,
    reference_batch_key: str | None = None,
    reference_label_key: str | None = None,
    reference_batches: str | Sequence[str] | None = None,
    novel_types: Sequence[str] | None = None,
    latent_key: str = "X_scarches",
    pred_key: str | None = None,
    uncertainty_key: str | None = None,
    embedding: str = "auto",
    seed: int = 0,
    source: str = "the query",
    reference_source: str | None = None,
    reference_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Score a mapped query (what :meth:`Reference.map` or ``scarches-fl map`` wrote): label
    accuracy, macro F1, the Unknown fraction, the novel-type AUROC, batch mixing. With
    ``reference`` its label knowledge says which types are known; with ``reference_data`` too,
    the reference cells are embedded by it and scored together with the query. With
    ``report_dir`` the report (``metrics.json``, ``README.md``, PNG plots) is written there.
    Returns the metrics dict (``scarches-fl evaluate``'s ``metrics.json``)."""
    from scarches_fl.report import (
        EvaluationError,
        EvaluationInput,
        build_report,
        known_types_from_labels,
        select_reference_batches,
    )

    if latent_key not in adata.obsm:
        raise EvaluationError(
            f"{source} has no obsm[{latent_key!r}]; map it first (Reference.map or "
            f"`scarches-fl map`; it has obsm keys {sorted(adata.obsm)})"
        )
    if batch_key not in adata.obs:
        raise EvaluationError(
            f"{source} has no obs column {batch_key!r}; columns: {sorted(adata.obs.columns)}"
        )
    if reference_data is not None and reference is None:
        raise EvaluationError(
            "reference_data needs reference (the model that embeds those cells): "
            "--reference BUNDLE_DIR"
        )
    pred_key = pred_key or f"{label_key}_pred"
    unc_key = uncertainty_key or f"{label_key}_uncertainty"
    notes = [f"query file: {source}"]
    true = adata.obs[label_key].astype(str).to_numpy() if label_key in adata.obs else None
    if true is None:
        notes.append(f"no true labels (obs[{label_key!r}] missing): label accuracy skipped")
    pred = adata.obs[pred_key].astype(str).to_numpy() if pred_key in adata.obs else None
    if pred is None:
        notes.append(f"no predictions (obs[{pred_key!r}] missing): map with --label-key")
    unc = adata.obs[unc_key].to_numpy(dtype=np.float64) if unc_key in adata.obs else None
    inp = EvaluationInput(
        query_latent=np.asarray(adata.obsm[latent_key]),
        query_batches=adata.obs[batch_key].astype(str).to_numpy(),
        query_true=true,
        query_pred=pred,
        query_uncertainty=unc,
        notes=notes,
    )
    if novel_types and true is not None:
        inp.known_types = sorted(set(true.tolist()) - set(novel_types))
    if reference is not None:
        known = known_types_from_labels(reference.model.labels, label_key)
        if known is not None and inp.known_types is None:
            inp.known_types = known
    if reference is not None and reference_data is not None:
        model = reference.model
        rbk = reference_batch_key or batch_key
        rlk = reference_label_key or label_key
        rsource = reference_source or "the reference data"
        if rbk not in reference_data.obs:
            raise EvaluationError(
                f"{rsource} has no obs column {rbk!r}; pass --reference-batch-key"
            )
        namespace = str(model.registration.get("namespace", "ref"))
        requested = (
            ",".join(reference_batches)
            if reference_batches is not None and not isinstance(reference_batches, str)
            else reference_batches
        )
        ref, note = select_reference_batches(
            reference_data,
            model.conditions,
            batch_key=rbk,
            namespace=namespace,
            requested=requested,
            source=rsource,
        )
        notes.append(note)
        log.info("%s", note)
        inp.reference_latent = model.get_latent(ref, batch_key=rbk, namespace=namespace)
        inp.reference_batches = ref.obs[rbk].astype(str).to_numpy()
        if rlk in ref.obs:
            inp.reference_labels = ref.obs[rlk].astype(str).to_numpy()
        notes.append(
            f"reference cells from {rsource} embedded by the bundle"
            + (f" in {reference_path}" if reference_path is not None else "")
        )
    return build_report(inp, report_dir, embedding=embedding, seed=seed)
