"""``scarches-fl reference train``: train a reference model on an .h5ad and write a bundle."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

__all__ = ["register"]

log = logging.getLogger(__name__)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``reference train`` and ``map`` for reading an .h5ad."""
    p.add_argument("--data", required=True, metavar="H5AD", help="input AnnData (.h5ad)")
    p.add_argument("--batch-key", required=True, metavar="K",
                   help="obs column with the study / batch of each cell")
    p.add_argument("--layer", default=None, metavar="NAME",
                   help="read counts from this layer instead of X (e.g. counts)")
    p.add_argument("--batches", default=None, metavar="A,B,C",
                   help="use only cells whose batch is one of these (comma-separated)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_memory_arguments(p)


def add_memory_arguments(p: argparse.ArgumentParser) -> None:
    """``--backed`` / ``--in-memory``: force how the .h5ad is read (default: streamed when it
    would not fit comfortably in memory, ``scarches_fl.query.choose_backed``)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--backed", dest="backed", action="store_const", const=True, default=None,
                   help="stream the counts from disk in row windows (default: chosen from the "
                        "file's size and the memory available)")
    g.add_argument("--in-memory", dest="backed", action="store_const", const=False,
                   help="read the whole file into memory")


@contextlib.contextmanager
def open_input(args: argparse.Namespace) -> Iterator[Any]:
    """The --data file through :func:`scarches_fl.query.open_h5ad` (the reader `site map` uses
    too: .h5ad or .h5ad.gz, streamed or read whole), with --batches applied."""
    from scarches_fl.data import filter_batches
    from scarches_fl.query import open_h5ad

    with open_h5ad(args.data, backed=args.backed, what="--data") as adata:
        if args.batches:
            wanted = [b.strip() for b in args.batches.split(",") if b.strip()]
            adata = filter_batches(adata, args.batch_key, wanted)
        yield adata


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "reference", help="train a reference model",
        description="Build the reference model a consortium publishes: a conditional VAE "
                    "trained on the reference studies, written as a model bundle.",
    )
    rs = p.add_subparsers(dest="reference_command", metavar="ACTION")
    t = rs.add_parser(
        "train",
        help="train a reference conditional VAE on an .h5ad and write a bundle",
        description="Train a reference conditional VAE (one condition per batch value) and "
        "write a model bundle (model.safetensors + manifest.json).",
    )
    add_data_arguments(t)
    t.add_argument("--label-key", default=None, metavar="L",
                   help="obs column with cell types: store label knowledge for label transfer")
    t.add_argument("--likelihood", choices=("nb", "trvae"), default="nb",
                   help="nb: negative binomial on raw counts (default); trvae: MSE on "
                        "log-normalized values + MMD")
    t.add_argument("--max-epochs", type=int, default=None, metavar="N",
                   help="epochs (default: from the number of cells, 100-400)")
    t.add_argument("--namespace", default="ref",
                   help="namespace of the reference's conditions (default ref)")
    t.add_argument("--n-latent", type=int, default=10, help="latent dimensions")
    t.add_argument("--n-hidden", type=int, default=128, help="units per hidden layer")
    t.add_argument("--n-layers", type=int, default=2, help="hidden layers of encoder and decoder")
    t.add_argument("--dispersion", choices=("gene", "gene-batch"), default="gene",
                   help="negative binomial dispersion per gene, or per gene and condition")
    t.add_argument("--classifier-weight", type=float, default=None, metavar="W",
                   help="with --label-key: weight of the latent cell-type classifier "
                        "(semi-supervised reference; default 10, 0 = unsupervised)")
    t.add_argument("--include-atlas", action="store_true",
                   help="store the reference cells' latent coordinates and labels in the bundle "
                        "(enables kNN label transfer; shares per-cell embeddings)")
    t.add_argument("--n-top-genes", type=int, default=None, metavar="N",
                   help="train on the N most variable genes (batch-aware, Seurat v3 flavour on "
                        "raw counts); the bundle records them and queries align to them "
                        "(default: every gene)")
    t.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="bundle directory to write")
    t.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    t.set_defaults(handler=_train)

    i = rs.add_parser(
        "import-scvi",
        help="read a saved scvi-tools SCVI / SCANVI model directory into a bundle",
        description="Read a scvi-tools 1.x model directory (model.pt) without running pickled "
        "code and write a bundle whose forward pass is that model's; its batch categories "
        "become the reference's conditions. The genesis flow takes the bundle as is "
        "(coordinator init --reference BUNDLE_DIR).",
    )
    i.add_argument("model_dir", metavar="MODEL_DIR", help="scvi-tools model directory")
    i.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="bundle directory to write")
    i.add_argument("--label-key", default=None, metavar="L",
                   help="obs column of --data with cell types (default: a SCANVI's labels_key)")
    i.add_argument("--data", default=None, metavar="H5AD",
                   help="the reference's cells (counts, the model's batch key and the label "
                        "key): build label prototypes from them; they stay on this machine")
    i.add_argument("--namespace", default="ref",
                   help="namespace of the imported conditions (default ref)")
    i.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    i.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    i.set_defaults(handler=_import_scvi)
    e = rs.add_parser(
        "export-scvi",
        help="write a bundle imported from scvi-tools back as a scvi-tools model directory",
        description="Write a bundle that came in through import-scvi, with every site's "
        "conditions, as a scvi-tools model directory that scvi.model.SCVI.load (or SCANVI) "
        "opens. It holds weights and names only, no site data (EXPORT.json says so).",
    )
    e.add_argument("bundle", metavar="BUNDLE_DIR", help="bundle directory")
    e.add_argument("--out", required=True, metavar="MODEL_DIR", help="directory to write")
    e.add_argument("--force", action="store_true", help="replace files in an existing --out")
    e.set_defaults(handler=_export_scvi)

    def _help(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(handler=_help)


def _train(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from scarches_fl.api import Reference
    from scarches_fl.query import check_output_path

    t0 = time.perf_counter()
    check_output_path(args.out, force=args.force)
    with open_input(args) as adata:
        reference = Reference.train(
            adata,
            batch_key=args.batch_key,
            label_key=args.label_key,
            layer=args.layer,
            likelihood=args.likelihood,
            namespace=args.namespace,
            n_hidden=args.n_hidden,
            n_layers=args.n_layers,
            n_latent=args.n_latent,
            max_epochs=args.max_epochs,
            seed=args.seed,
            device=args.device,
            progress=not args.no_progress,
            dispersion=args.dispersion,
            include_atlas=args.include_atlas,
            classifier_weight=args.classifier_weight,
            n_top_genes=args.n_top_genes,
        )
        model = reference.model
        bundle = model.save(args.out)
        size = sum(f.stat().st_size for f in Path(args.out).iterdir() if f.is_file())
        h = model.history
        selected = f" (of {adata.n_vars}, --n-top-genes)" if args.n_top_genes else ""
        print(
            f"reference: {adata.n_obs} cells x {len(model.genes)} genes{selected}, "
            f"{len(model.conditions)} conditions ({', '.join(model.conditions)}), "
            f"likelihood {args.likelihood}, {h.get('epochs')} epochs in "
            f"{time.perf_counter() - t0:.1f} s, {h.get('trainable_parameters')} parameters\n"
            f"bundle: {args.out} ({size} bytes), digest {bundle.digest}"
        )
        if model.labels:
            print(describe_label_types(model.labels))
        return 0


def _import_scvi(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scarches_fl.query import check_output_path
    from scarches_fl.scvi_interop import import_scvi

    check_output_path(args.out, force=args.force)
    model = import_scvi(args.model_dir, label_key=args.label_key, data=args.data,
                        namespace=args.namespace, seed=args.seed)
    bundle = model.save(args.out)
    size = sum(f.stat().st_size for f in Path(args.out).iterdir() if f.is_file())
    src = model.registration["scvi"]
    hp = model.hyperparameters
    print(
        f"imported {src['model_class']} (scvi-tools {src['scvi_version']}): "
        f"{len(model.genes)} genes, {len(model.conditions)} conditions "
        f"({', '.join(model.conditions)}), latent {hp['n_latent']}, likelihood "
        f"{hp['likelihood']}, dispersion {hp['dispersion']}\n"
        f"bundle: {args.out} ({size} bytes), digest {bundle.digest}"
    )
    classes = model.registration.get("classifier_classes")
    if classes:
        print(f"classifier: {len(classes)} cell types ({', '.join(classes)})")
    if model.labels:
        print(describe_label_types(model.labels))
    elif classes:
        print("no label prototypes: pass --data with the reference's cells to build them")
    return 0


def _export_scvi(args: argparse.Namespace) -> int:
    from scarches_fl.scvi_interop import export_scvi, export_summary

    out = export_scvi(args.bundle, args.out, force=args.force)
    info = export_summary(out)
    print(
        f"exported {info['model_class']} to {out}: {len(info['batch_categories'])} batch "
        f"categories ({len(info['site_conditions'])} from sites)\n"
        f"contains site data: no ({info['contents']})\n"
        f"load with {info['load']}"
    )
    return 0


def describe_label_types(labels_manifest: dict[str, Any]) -> str:
    """The cell types a bundle can name, with their reference cell counts, one line per label
    level; types below the prototype floor are marked (named with a wider uncertainty)."""
    lines = []
    for name, level in labels_manifest.get("levels", {}).items():
        proto = level.get("prototype", {})
        counts = proto.get("type_cell_counts", {})
        few = proto.get("few_cell_types", {})
        cells = ", ".join(
            f"{t} {n}" + (" (few cells)" if t in few else "") for t, n in counts.items()
        )
        lines.append(f"label {name!r}: {len(counts)} types (reference cells): {cells}")
        if few:
            lines.append(
                f"  {len(few)} types have fewer than {proto.get('min_cells')} cells: named "
                "from one prototype with a wider spread; expect higher uncertainty for them"
            )
    return "\n".join(lines)
