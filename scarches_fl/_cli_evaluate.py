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


def select_reference_batches(
    ref: Any, conditions: list[str], *, batch_key: str, namespace: str,
    requested: str | None, source: str,
) -> tuple[Any, str]:
    """The cells of ``ref`` whose batch is one of the reference's studies: ``requested``
    (comma-separated) or, by default, every batch whose condition the bundle holds. Returns
    ``(cells, a note saying which batches were used and which left out)``."""
    import numpy as np

    from scarches_fl.data import condition_names
    from scarches_fl.report import EvaluationError

    values = ref.obs[batch_key].astype(str).to_numpy()
    present = list(dict.fromkeys(values.tolist()))
    names = condition_names(present, namespace)
    trained = [b for b in present if names[b] in set(conditions)]
    studies = ", ".join(c.split("/", 1)[1] for c in conditions if c.startswith(namespace + "/"))
    if requested:
        wanted = [b.strip() for b in requested.split(",") if b.strip()]
        unknown = [b for b in wanted if b not in present]
        if unknown:
            raise EvaluationError(
                f"--reference-batches {','.join(unknown)}: not batches of {source} (its "
                f"obs[{batch_key!r}] holds {', '.join(sorted(present))})"
            )
        foreign = [b for b in wanted if b not in trained]
        if foreign:
            raise EvaluationError(
                f"--reference-batches {','.join(foreign)}: the reference was not trained on "
                f"{'this study' if len(foreign) == 1 else 'these studies'} (it was trained on "
                f"{studies}); list only those, or leave out --reference-batches to pick them "
                "from the file"
            )
    else:
        wanted = trained
        if not wanted:
            raise EvaluationError(
                f"none of the batches in {source} ({', '.join(sorted(present))}) is a study the "
                f"reference was trained on ({studies}); pass the file the reference was trained "
                "on as --reference-data, or name its reference studies with --reference-batches"
            )
    left_out = [b for b in present if b not in wanted]
    mask = np.isin(values, wanted)
    note = (f"reference cells: {int(mask.sum())} of {len(values)} in {source}, batches "
            f"{', '.join(wanted)}"
            + (f" (left out, not reference studies: {', '.join(left_out)})" if left_out else ""))
    return (ref[mask].copy() if left_out else ref), note


def _known_types_from_bundle(labels_manifest: dict, label_key: str) -> list[str] | None:
    level = (labels_manifest or {}).get("levels", {}).get(label_key)
    if not level:
        return None
    known = set(level.get("prototype", {}).get("classes", []))
    known |= set(level.get("prototype", {}).get("excluded_types", {}))
    known |= set(level.get("atlas", {}).get("classes", []))
    return sorted(known)


def _handle(args: argparse.Namespace) -> int:
    import anndata as ad
    import numpy as np

    from scarches_fl.report import EvaluationError, EvaluationInput, build_report

    path = Path(args.data)
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist; pass the .h5ad written by scarches-fl map")
    query = ad.read_h5ad(path)
    if args.latent_key not in query.obsm:
        raise EvaluationError(
            f"{path} has no obsm[{args.latent_key!r}]; run `scarches-fl map` on it first "
            f"(it has obsm keys {sorted(query.obsm)})"
        )
    if args.batch_key not in query.obs:
        raise EvaluationError(
            f"{path} has no obs column {args.batch_key!r}; columns: {sorted(query.obs.columns)}"
        )
    pred_key = args.pred_key or f"{args.label_key}_pred"
    unc_key = args.uncertainty_key or f"{args.label_key}_uncertainty"
    notes = [f"query file: {path.name}"]
    true = query.obs[args.label_key].astype(str).to_numpy() if args.label_key in query.obs else None
    if true is None:
        notes.append(f"no true labels (obs[{args.label_key!r}] missing): label accuracy skipped")
    pred = query.obs[pred_key].astype(str).to_numpy() if pred_key in query.obs else None
    if pred is None:
        notes.append(f"no predictions (obs[{pred_key!r}] missing): map with --label-key")
    unc = query.obs[unc_key].to_numpy(dtype=np.float64) if unc_key in query.obs else None

    inp = EvaluationInput(
        query_latent=np.asarray(query.obsm[args.latent_key]),
        query_batches=query.obs[args.batch_key].astype(str).to_numpy(),
        query_true=true,
        query_pred=pred,
        query_uncertainty=unc,
        notes=notes,
    )
    if args.novel_types:
        novel = {t.strip() for t in args.novel_types.split(",") if t.strip()}
        if true is not None:
            inp.known_types = sorted(set(true.tolist()) - novel)
    if (args.reference_data is None) != (args.reference is None) and args.reference_data:
        raise EvaluationError(
            "--reference-data needs --reference BUNDLE_DIR (the model that embeds those cells)"
        )
    if args.reference is not None:
        from scarches_fl.model import ReferenceModel

        model = ReferenceModel.from_bundle(args.reference)
        known = _known_types_from_bundle(model.labels, args.label_key)
        if known is not None and inp.known_types is None:
            inp.known_types = known
        if args.reference_data is not None:
            ref = ad.read_h5ad(args.reference_data)
            rbk = args.reference_batch_key or args.batch_key
            rlk = args.reference_label_key or args.label_key
            if rbk not in ref.obs:
                raise EvaluationError(
                    f"{args.reference_data} has no obs column {rbk!r}; pass --reference-batch-key"
                )
            namespace = str(model.registration.get("namespace", "ref"))
            ref, note = select_reference_batches(
                ref, model.conditions, batch_key=rbk, namespace=namespace,
                requested=args.reference_batches, source=Path(args.reference_data).name,
            )
            notes.append(note)
            logger.info("%s", note)
            inp.reference_latent = model.get_latent(ref, batch_key=rbk, namespace=namespace)
            inp.reference_batches = ref.obs[rbk].astype(str).to_numpy()
            if rlk in ref.obs:
                inp.reference_labels = ref.obs[rlk].astype(str).to_numpy()
            notes.append(
                f"reference cells from {Path(args.reference_data).name} embedded by "
                f"the bundle in {args.reference}"
            )
    report_dir = Path(args.report) if args.report else path.with_name(path.stem + "_report")
    metrics = build_report(inp, report_dir, embedding=args.embedding, seed=args.seed)
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
