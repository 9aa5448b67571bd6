"""``scarches-fl map``: map a query .h5ad onto a reference bundle by architecture surgery.

A thin shell over :func:`scarches_fl.mapping.map_query`, the one mapping path of ``site map``
and ``scarches_fl.Reference.map`` too: every input is checked before any training. Writes the query with ``obsm["X_scarches"]``, ``uns["scarches_fl"]``
(``scarches_fl.query.mapping_record``) and, with ``--label-key``, ``obs["<L>_pred"]`` /
``obs["<L>_uncertainty"]``; with ``--update-out`` the contributable update
(``diff.safetensors`` + ``update.json``).
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "register", "write_update", "predict_obs_labels", "training_summary", "write_mapped_h5ad",
]

log = logging.getLogger(__name__)

#: Same value as ``scarches_fl.query.MIN_CELLS_PER_BATCH`` (this module imports no numpy).
MIN_CELLS_PER_BATCH = 10
UPDATE_FORMAT = "scarches-fl.condition-update"
UPDATE_FORMAT_VERSION = 1


def register(subparsers: Any) -> None:
    from scarches_fl_cli.reference import add_data_arguments

    p = subparsers.add_parser(
        "map", help="map a query .h5ad onto a reference (surgery + fine-tuning)",
        description="Add the query's batches as new conditions of the reference, fine-tune "
                    "them, and write the embedding (and predicted labels) into a new .h5ad.",
    )
    p.add_argument("--reference", required=True, metavar="BUNDLE_DIR",
                   help="reference bundle directory")
    add_data_arguments(p)
    p.add_argument("--out", required=True, metavar="OUT_H5AD", help="output .h5ad")
    p.add_argument("--label-key", default=None, metavar="L",
                   help="predict this reference label level: obs[L_pred], obs[L_uncertainty]")
    p.add_argument("--update-out", default=None, metavar="DIR",
                   help="write the update (diff.safetensors + update.json) here")
    p.add_argument("--mode", choices=("conditions", "input_layers", "full"),
                   default="conditions", help="what fine-tuning may change (default conditions)")
    p.add_argument("--namespace", default="query",
                   help="namespace of the new conditions, e.g. your site id (default query)")
    p.add_argument("--max-epochs", type=int, default=None, metavar="N",
                   help="ceiling on fine-tuning epochs (default: from the number of cells; "
                        "conditions mode stops earlier once converged)")
    p.add_argument("--label-method", choices=("auto", "expression", "prototype", "knn"),
                   default="auto",
                   help="how labels are read: expression prototypes with a per-batch offset "
                        "(holds under a biological shift; ADR 0070), the latent prototypes, or "
                        "kNN on the reference atlas; auto = expression where the bundle has "
                        "it, else kNN with an atlas, else prototypes (default auto)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="uncertainty above which a cell is called Unknown (default 0.5)")
    p.add_argument("--min-gene-coverage", type=float, default=0.5,
                   help="refuse queries covering less than this fraction of reference genes")
    p.add_argument("--min-cells-per-batch", type=int, default=MIN_CELLS_PER_BATCH, metavar="N",
                   help=f"refuse batches with fewer cells (default {MIN_CELLS_PER_BATCH})")
    p.add_argument("--var-names-column", default=None, metavar="COLUMN",
                   help="read gene names from this var column (e.g. gene_symbols) instead of "
                        "var_names")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(handler=_map)


def training_summary(history: dict) -> str:
    """How fine-tuning went, for a person: epochs, passes over the cells and why it stopped."""
    reason = {
        "converged": "stopped: converged",
        "max_epochs": "stopped: epoch ceiling (--max-epochs)",
        "early_stopping": "stopped: no improvement (patience)",
        "no_parameters": "nothing to train",
    }.get(str(history.get("stop_reason")), "")
    passes = history.get("passes")
    text = f"{history.get('epochs', 0)} epochs"
    if passes is not None:
        text += f", {float(passes):.2f} passes over the cells"
    return f"{text}, {reason}" if reason else text


def write_update(directory: Any, result: Any, base_digest: str, n_cells: int) -> int:
    """Write ``diff.safetensors`` + ``update.json`` of a mapping (``result``: a
    :class:`scarches_fl.mapping.MappedQuery` or a surgery result, with ``mode``, ``diff``,
    ``model`` and ``new_conditions``); returns the diff's size in bytes."""
    import hashlib
    from pathlib import Path

    from protocols.bundle import atomic_write
    from protocols.canonical import canonical_json
    from protocols.diff import diff_to_bytes
    from scarches_fl.data import DataError

    if result.mode != "conditions":
        raise DataError(
            f"mode {result.mode!r} changes shared weights, so there is no condition-only update "
            "to contribute; use --mode conditions with --update-out"
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    data = diff_to_bytes(result.diff)
    atomic_write(out / "diff.safetensors", data)
    meta = {
        "format": UPDATE_FORMAT,
        "format_version": UPDATE_FORMAT_VERSION,
        "base_digest": base_digest,
        "model_digest": result.model.digest,
        "new_conditions": list(result.new_conditions),
        "tensors": {k: {"dtype": "float32", "shape": list(v.shape)}
                    for k, v in sorted(result.diff.items())},
        "diff_sha256": hashlib.sha256(data).hexdigest(),
        "diff_bytes": len(data),
        "n_values": int(sum(v.size for v in result.diff.values())),
        "n_cells": int(n_cells),
        "mode": result.mode,
    }
    atomic_write(out / "update.json", canonical_json(meta) + b"\n")
    return len(data)


def predict_obs_labels(
    labels_manifest: Any, atlas_tensors: Any, latent: Any, *, label_key: str,
    threshold: float,
) -> tuple[Any, Any, str | None]:
    """``scarches_fl.labels.predict_labels`` on the whole query; returns ``(pred as str array,
    uncertainty float32, method)``. ``predict_labels`` scores the query in chunks itself (the
    kNN index is built once), so memory stays bounded for million-cell queries."""
    import numpy as np

    from scarches_fl.labels import predict_labels

    if len(latent) == 0:
        return np.zeros(0, dtype=str), np.zeros(0, dtype=np.float32), None
    p = predict_labels(labels_manifest, atlas_tensors, latent, label_key=label_key,
                       threshold=threshold)
    return (np.asarray(p.pred).astype(str), np.asarray(p.uncertainty, dtype=np.float32),
            str(p.method))


def write_mapped_h5ad(path: Any, adata: AnnData, obs: Any, obsm: dict, uns: dict, *,
                      window: int = 16384) -> None:
    """Write the mapped query: in-memory input as a normal ``write_h5ad``; backed input as a
    shell (obs, var, obsm, uns) plus X appended window by window from the input file, so the
    count matrix is never densified nor loaded whole."""
    import anndata as ad
    import h5py
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    from scarches_fl.data import iter_count_windows

    if not getattr(adata, "isbacked", False):
        # a new AnnData over the same X (never a second copy of the counts)
        out = ad.AnnData(X=adata.X, obs=obs, var=adata.var, layers=dict(adata.layers),
                         obsm={**dict(adata.obsm), **obsm}, uns={**dict(adata.uns), **uns})
        out.write_h5ad(path)
        return
    shell = ad.AnnData(obs=obs, var=adata.var.copy())
    shell.uns.update(dict(adata.uns))
    for k, v in obsm.items():
        shell.obsm[k] = v
    shell.uns.update(uns)
    shell.write_h5ad(path)
    with h5py.File(path, "a") as f:
        x = None
        for _start, block in iter_count_windows(adata, window=window):
            block = sp.csr_matrix(block)
            if x is None:
                write_elem(f, "X", block)
                x = sparse_dataset(f["X"])
            else:
                x.append(block)
        if x is None:
            write_elem(f, "X", sp.csr_matrix((0, adata.n_vars), dtype="float32"))


def _map(args: argparse.Namespace) -> int:
    import time

    from scarches_fl.data import DataError
    from scarches_fl.mapping import map_query
    from scarches_fl.model import ReferenceModel
    from scarches_fl.query import check_output_path
    from scarches_fl_cli.reference import open_input

    t0 = time.perf_counter()
    if args.update_out and args.mode != "conditions":
        raise DataError(
            f"--update-out needs --mode conditions: mode {args.mode!r} changes shared weights, "
            "which no site may contribute"
        )
    check_output_path(args.out, force=args.force)
    model = ReferenceModel.from_bundle(args.reference)
    with open_input(args) as adata:
        mapped = map_query(
            adata, model, batch_key=args.batch_key, namespace=args.namespace,
            label_key=args.label_key, layer=args.layer, var_names_column=args.var_names_column,
            mode=args.mode, max_epochs=args.max_epochs, seed=args.seed, threshold=args.threshold,
            min_gene_coverage=args.min_gene_coverage, min_cells_per_batch=args.min_cells_per_batch,
            progress=not args.no_progress, device=args.device, label_method=args.label_method,
        )
        for note in mapped.notes:
            log.info("%s", note)
        query = mapped.adata
        update_bytes = None
        if args.update_out:
            if not mapped.new_conditions:
                raise DataError(
                    "--update-out: every batch is already a condition of the reference, so there is "
                    "nothing new to contribute; leave out --update-out, or use another --namespace"
                )
            update_bytes = write_update(args.update_out, mapped, mapped.reference_digest,
                                        query.n_obs)
        obs = query.obs.copy()
        for key, values in mapped.obs_columns().items():
            obs[key] = values
        write_mapped_h5ad(args.out, query, obs, {"X_scarches": mapped.latent},
                          {"scarches_fl": mapped.record()})
        a = mapped.alignment
        added = (
            f"conditions added: {', '.join(mapped.new_conditions)} (mode {mapped.mode}, "
            f"{mapped.trainable_parameters} trainable parameters, "
            f"{training_summary(mapped.training or {'epochs': mapped.epochs})})"
            if mapped.new_conditions
            else "no conditions added: every batch is already in the reference (embedded with them)"
        )
        lines = [
            f"mapped {query.n_obs} cells (counts from {mapped.counts}): "
            f"{a.n_overlap}/{a.n_reference_genes} reference genes "
            f"covered ({100 * a.coverage:.1f}%), {a.n_extra} query genes dropped",
            added,
            f"wrote {args.out} in {time.perf_counter() - t0:.1f} s",
        ]
        if update_bytes is not None:
            lines.append(f"update: {args.update_out} (diff {update_bytes} bytes)")
        print("\n".join(lines))
        return 0
