"""``scarches-fl evaluate``: metrics and plots for a mapped query (and optionally its reference).

Imports only argparse at module level; anndata, matplotlib and torch load inside the handler.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a mapped query: label accuracy, uncertainty, batch mixing; plots",
        description=(
            "Read the .h5ad that `scarches-fl map` wrote (obsm['X_scarches'], obs['<L>_pred'], "
            "obs['<L>_uncertainty']) and write metrics.json, README.md and PNG plots into the "
            "report folder. With --reference-data and --reference, reference cells are embedded "
            "by the same model and shown together with the query."
        ),
    )
    p.add_argument("--data", required=True, metavar="OUT_H5AD", help="the mapped query .h5ad")
    p.add_argument("--batch-key", required=True, metavar="K", help="obs column with the batch")
    p.add_argument(
        "--label-key",
        required=True,
        metavar="L",
        help="obs column with the true labels; predictions are read from obs['L_pred']",
    )
    p.add_argument(
        "--report",
        metavar="DIR",
        default=None,
        help="folder for the report (default: <OUT_H5AD without .h5ad>_report)",
    )
    p.add_argument(
        "--reference-data",
        metavar="H5AD",
        default=None,
        help="reference cells (raw counts) to embed and show next to the query",
    )
    p.add_argument(
        "--reference",
        metavar="BUNDLE_DIR",
        default=None,
        help="the reference bundle the query was mapped with (embeds --reference-data; its label "
        "knowledge says which types the reference knows)",
    )
    p.add_argument(
        "--reference-batch-key",
        metavar="K",
        default=None,
        help="batch column of --reference-data (default: --batch-key)",
    )
    p.add_argument(
        "--reference-batches",
        metavar="A,B",
        default=None,
        help="batches of --reference-data that are the reference's studies (default: the "
        "batches the bundle was trained on; a file holding query studies too is fine)",
    )
    p.add_argument(
        "--reference-label-key",
        metavar="L",
        default=None,
        help="label column of --reference-data (default: --label-key)",
    )
    p.add_argument(
        "--latent-key", default="X_scarches", help="obsm key of the embedding (default X_scarches)"
    )
    p.add_argument("--pred-key", default=None, help="obs column of predictions (default L_pred)")
    p.add_argument(
        "--uncertainty-key",
        default=None,
        help="obs column of the uncertainty (default L_uncertainty)",
    )
    p.add_argument(
        "--novel-types",
        default=None,
        metavar="T1,T2",
        help="types absent from the reference, for the unknown-detection AUROC when no "
        "--reference is given",
    )
    p.add_argument(
        "--embedding",
        choices=("auto", "umap", "pca"),
        default="auto",
        help="2-D view: UMAP if umap-learn is installed (auto), else PCA of the latent",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the 2-D view")
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    import anndata as ad

    from scarches_fl.api import Reference, evaluate
    from scarches_fl.report import EvaluationError

    path = Path(args.data)
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist; pass the .h5ad written by scarches-fl map")
    if (args.reference_data is None) != (args.reference is None) and args.reference_data:
        raise EvaluationError(
            "--reference-data needs --reference BUNDLE_DIR (the model that embeds those cells)"
        )
    query = ad.read_h5ad(path)
    report_dir = Path(args.report) if args.report else path.with_name(path.stem + "_report")
    novel = None
    if args.novel_types:
        novel = [t.strip() for t in args.novel_types.split(",") if t.strip()]
    metrics = evaluate(
        query,
        batch_key=args.batch_key,
        label_key=args.label_key,
        report_dir=report_dir,
        reference=Reference.load(args.reference) if args.reference is not None else None,
        reference_data=ad.read_h5ad(args.reference_data) if args.reference_data else None,
        reference_batch_key=args.reference_batch_key,
        reference_label_key=args.reference_label_key,
        reference_batches=args.reference_batches,
        novel_types=novel,
        latent_key=args.latent_key,
        pred_key=args.pred_key,
        uncertainty_key=args.uncertainty_key,
        embedding=args.embedding,
        seed=args.seed,
        source=path.name,
        reference_source=Path(args.reference_data).name if args.reference_data else None,
        reference_path=args.reference,
    )
    lt = metrics.get("label_transfer", {})
    parts = []
    for key in ("accuracy", "macro_f1", "fraction_unknown", "novel_auroc"):
        if key in lt:
            parts.append(f"{key}={lt[key]:.3f}")
    for key in ("entropy_of_batch_mixing", "knn_purity"):
        if key in metrics.get("integration", {}):
            parts.append(f"{key}={metrics['integration'][key]:.3f}")
    print(f"report: {report_dir}  " + "  ".join(parts))
    return 0
