"""Mapping a query onto a reference: the one path behind ``scarches-fl map``,
``scarches-fl site map`` and :meth:`scarches_fl.Reference.map`.

:func:`map_query` does, in order:

1. optionally renames the genes from a ``var`` column (``var_names_column``);
2. checks everything about the query before any training
   (:func:`scarches_fl.query.check_query`: cells, batch key, batch sizes, where the counts are,
   gene coverage, the label key to predict);
3. keeps only ``batches`` when given;
4. when every batch is already a condition of the reference (contributed earlier under the
   same namespace), embeds with those conditions and fine-tunes nothing; when only some are,
   refuses and says how to split the run; otherwise performs architecture surgery for the new
   batches (:meth:`scarches_fl.model.ReferenceModel.surgery`);
5. collects the data warnings (cells with zero counts on the reference genes) as notes;
6. transfers labels (:func:`scarches_fl.refine.transfer_labels`: the expression prototypes
   with a per-batch offset where the bundle has them, ADR 0070) when ``label_key`` is given.

It returns a :class:`MappedQuery`; :meth:`MappedQuery.annotate` writes ``obsm["X_scarches"]``,
``obs["<label>_pred"]``, ``obs["<label>_uncertainty"]`` and ``uns["scarches_fl"]`` into an
AnnData, the same keys in every caller. Every refusal is a :class:`~scarches_fl.data.DataError`
naming the problem and the fix. Writing the file is the caller's (the CLI streams a backed
input's counts into its output; a site writes atomically into its own folder).
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from scarches_fl.data import DataError, DataWarning, GeneAlignmentReport, condition_names
from scarches_fl.query import MIN_CELLS_PER_BATCH, check_query, mapping_record

if TYPE_CHECKING:
    from anndata import AnnData

    from scarches_fl.model import ReferenceModel

__all__ = ["LATENT_KEY", "MappedQuery", "map_query", "sharing_counts"]

#: ``obsm`` key of the embedding in every mapped AnnData.
LATENT_KEY = "X_scarches"

_ZERO_CELLS = re.compile(r"(\d+) of \d+ cells have zero")


@dataclass
class MappedQuery:
    """What :func:`map_query` produced. ``adata`` is the query as mapped (after the gene rename
    and the batch selection; the caller's object when neither applied); ``model`` the reference
    grown by the new conditions (the reference itself when nothing was new); ``diff`` the new
    condition columns (empty unless ``mode == "conditions"`` added conditions)."""

    adata: AnnData
    latent: np.ndarray
    model: ReferenceModel
    reference_digest: str
    new_conditions: list[str]
    diff: dict[str, np.ndarray]
    alignment: GeneAlignmentReport
    mode: str
    namespace: str
    batch_key: str
    counts: str
    epochs: int
    trainable_parameters: int
    label_key: str | None = None
    label_method: str | None = None
    threshold: float | None = None
    pred: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    #: per cell, where its label came from: ``genesis`` or ``<site>#<ledger entry>`` (a label
    #: contribution; ``scarches_fl.labels.LabelPrediction.source``)
    source: np.ndarray | None = None
    n_zero_cells: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: the fine-tuning history (``scarches_fl.train.fit``: ``stop_reason``, ``passes``,
    #: ``checks``, ...); empty when nothing new was fitted
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> Any:
        """The grown reference as a :class:`scarches_fl.Reference`."""
        from scarches_fl.api import Reference

        return Reference(self.model)

    def obs_columns(self) -> dict[str, np.ndarray]:
        """``{"<label>_pred": ..., "<label>_uncertainty": ..., "<label>_source": ...}``, empty
        without labels."""
        if self.label_key is None or self.pred is None or self.uncertainty is None:
            return {}
        cols = {
            f"{self.label_key}_pred": self.pred,
            f"{self.label_key}_uncertainty": self.uncertainty,
        }
        if self.source is not None and len(self.source) == len(self.pred):
            cols[f"{self.label_key}_source"] = self.source
        return cols

    def record(self, ledger: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``uns["scarches_fl"]`` (:func:`scarches_fl.query.mapping_record`); ``ledger`` adds
        the reference version a site mapped on."""
        return mapping_record(
            reference_digest=self.reference_digest,
            model_digest=self.model.digest,
            mode=self.mode,
            namespace=self.namespace,
            new_conditions=self.new_conditions,
            epochs=self.epochs,
            trainable_parameters=self.trainable_parameters,
            batch_key=self.batch_key,
            counts=self.counts,
            alignment=self.alignment,
            label_key=self.label_key if self.label_method else None,
            label_method=self.label_method,
            threshold=self.threshold if self.label_method else None,
            ledger=ledger,
        )

    def annotate(self, adata: AnnData, *, ledger: Mapping[str, Any] | None = None) -> None:
        """Write the embedding, the labels and the record into ``adata`` (same cells, same
        order as the mapped query)."""
        if adata.n_obs != self.latent.shape[0]:
            raise DataError(
                f"the AnnData has {adata.n_obs} cells but {self.latent.shape[0]} were mapped; "
                "annotate the query that was mapped (MappedQuery.adata)"
            )
        adata.obsm[LATENT_KEY] = self.latent
        for key, values in self.obs_columns().items():
            adata.obs[key] = values
        adata.uns["scarches_fl"] = self.record(ledger)


def _apply_var_names(adata: AnnData, column: str | None) -> Any:
    if column is None:
        return adata
    if column not in adata.var.columns:
        avail = ", ".join(map(str, adata.var.columns)) or "(none)"
        raise DataError(
            f"--var-names-column {column!r} is not a column of var; the columns are: {avail}"
        )
    adata = adata.to_memory() if getattr(adata, "isbacked", False) else sharing_counts(adata)
    adata.var_names = adata.var[column].astype(str).to_numpy()
    adata.var_names_make_unique()
    return adata


def sharing_counts(adata: AnnData) -> Any:
    """A new AnnData over the same count matrix (not a copy of X): obs, obsm and uns are its
    own, so the caller's object is left as it was."""
    import anndata as ad

    return ad.AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        layers=dict(adata.layers),
        obsm=dict(adata.obsm),
        uns=dict(adata.uns),
    )


def map_query(
    adata: AnnData,
    model: ReferenceModel,
    *,
    batch_key: str,
    namespace: str = "query",
    label_key: str | None = None,
    layer: str | None = None,
    batches: Sequence[str] | None = None,
    var_names_column: str | None = None,
    mode: str = "conditions",
    max_epochs: int | None = None,
    seed: int = 0,
    threshold: float = 0.5,
    min_gene_coverage: float = 0.5,
    min_cells_per_batch: int = MIN_CELLS_PER_BATCH,
    progress: bool = False,
    device: str = "cpu",
    label_method: str = "auto",
) -> MappedQuery:
    """Check, align, surgery (or embed with conditions the reference already has), embed and
    transfer labels; the steps are in the module docstring. ``namespace`` names the new
    conditions (``<namespace>/<batch>``; a site uses its site id). ``label_method``: see
    :func:`scarches_fl.refine.transfer_labels` (``auto``: the expression prototypes where the
    bundle has them, ADR 0070)."""
    from scarches_fl.refine import LABEL_METHODS

    if label_method not in LABEL_METHODS:
        raise DataError(f"label method {label_method!r} is not one of {', '.join(LABEL_METHODS)}")
    t0 = time.perf_counter()
    likelihood = str(model.hyperparameters.get("likelihood", "nb"))
    adata = _apply_var_names(adata, var_names_column)
    checked = check_query(
        adata,
        reference_genes=model.genes,
        batch_key=batch_key,
        likelihood=likelihood,
        layer=layer,
        label_key=label_key,
        labels_manifest=model.labels,
        batches=batches,
        min_cells_per_batch=min_cells_per_batch,
        min_gene_coverage=min_gene_coverage,
    )
    notes = list(checked.notes)
    if batches:
        mask = np.isin(adata.obs[batch_key].astype(str).to_numpy(), list(batches))
        adata = adata[mask]
        adata = adata.to_memory() if getattr(adata, "isbacked", False) else adata.copy()
    wanted = condition_names(
        list(dict.fromkeys(adata.obs[batch_key].astype(str).to_numpy())), namespace
    )
    have = set(model.conditions)
    present = [c for c in wanted.values() if c in have]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        if present and len(present) == len(wanted):
            notes.append(
                f"conditions {present} are already in the reference (contributed earlier): "
                "embedding with them; nothing new to contribute"
            )
            from scarches_fl.data import gene_alignment

            latent = model.get_latent(
                adata,
                batch_key=batch_key,
                namespace=namespace,
                layer=layer,
                min_gene_coverage=min_gene_coverage,
                device=device,
            )
            _, alignment = gene_alignment(
                adata.var_names, model.genes, min_coverage=min_gene_coverage
            )
            grown, new_conditions, diff = model, [], {}
            epochs, trainable, training = 0, 0, {}
        elif present:
            fresh = [b for b, c in wanted.items() if c not in have]
            raise DataError(
                f"conditions {present} are already in the reference (contributed earlier) "
                f"but {sorted(set(wanted.values()) - have)} are new; map them in two "
                f"runs, e.g. --batches {','.join(fresh)} to contribute the new ones"
            )
        else:
            result = model.surgery(
                adata,
                batch_key=batch_key,
                namespace=namespace,
                layer=layer,
                mode=mode,
                max_epochs=max_epochs,
                seed=seed,
                min_gene_coverage=min_gene_coverage,
                progress=progress,
                device=device,
            )
            latent, alignment, grown = result.latent, result.alignment, result.model
            new_conditions, diff = list(result.new_conditions), dict(result.diff)
            epochs = int(result.history.get("epochs", 0))
            trainable = int(result.trainable_parameters)
            training = dict(result.history)
    n_zero = 0
    for w in caught:
        if issubclass(w.category, DataWarning):
            notes.append(str(w.message))
            m = _ZERO_CELLS.match(str(w.message))
            if m:
                n_zero = int(m.group(1))
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes.append(f"gene alignment: {alignment.summary()}")
    mapped = MappedQuery(
        adata=adata,
        latent=np.asarray(latent, dtype=np.float32),
        model=grown,
        reference_digest=str(model.digest),
        new_conditions=new_conditions,
        diff=diff,
        alignment=alignment,
        mode=mode,
        namespace=namespace,
        batch_key=batch_key,
        counts=checked.counts,
        epochs=epochs,
        trainable_parameters=trainable,
        n_zero_cells=n_zero,
        notes=notes,
        training=training,
    )
    if label_key is not None:
        _transfer_labels(mapped, label_key, threshold, method=label_method, layer=layer)
    mapped.seconds = time.perf_counter() - t0
    return mapped


def _transfer_labels(
    mapped: MappedQuery, label_key: str, threshold: float, *, method: str, layer: str | None
) -> None:
    from scarches_fl.labels import LabelTransferError
    from scarches_fl.refine import transfer_labels

    mapped.label_key, mapped.threshold = label_key, float(threshold)
    n = mapped.latent.shape[0]
    if n == 0:
        mapped.pred, mapped.uncertainty = np.zeros(0, dtype=str), np.zeros(0, dtype=np.float32)
        return
    try:
        p = transfer_labels(
            mapped.model,
            mapped.adata,
            mapped.latent,
            label_key=label_key,
            batch_key=mapped.batch_key,
            layer=layer,
            method=method,
            threshold=threshold,
        )
    except LabelTransferError as exc:
        raise DataError(
            f"label transfer for {label_key!r} failed: {exc}. Leave out --label-key to map "
            "without labels"
        ) from exc
    mapped.pred = np.asarray(p.pred).astype(str)
    mapped.uncertainty = np.asarray(p.uncertainty, dtype=np.float32)
    # where each label came from; knowledge without contributions (the expression rule, kNN on
    # the atlas) is the reference's own
    source = np.asarray(getattr(p, "source", np.zeros(0)))
    mapped.source = source.astype(str) if len(source) == n else np.full(n, "genesis")
    mapped.label_method = str(p.method)
    n_unknown = int(np.sum(mapped.pred == "Unknown"))
    # the expression rule calls a cell Unknown on its novelty alone (ADR 0071)
    rule = "novelty" if p.method == "expression" else "uncertainty"
    mapped.notes.append(
        f"labels ({p.method}): {n_unknown} of {n} cells called Unknown ({rule} > {threshold})"
    )
