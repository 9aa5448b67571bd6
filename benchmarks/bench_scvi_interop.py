"""Query mapping onto an imported scvi-tools reference: scarches-fl's conditions fast path
against scvi-tools' own ``SCANVI.load_query_data`` on the same imported model, same data, same
run.

Data: panc8 (shared; reference = inDrop 1-4 + CEL-seq + Fluidigm C1, query = CEL-seq2 +
Smart-seq2, 1,000 genes). Per seed, scvi-tools trains the reference with the scArches recipe
(SCVI, 2 hidden layers of 128, latent 10, ``encode_covariates=True``, layer norm, no batch norm,
NB, covariates into every layer) then a SCANVI from it, and saves it. Then, on that directory:

* ours: ``import_scvi(dir, data=reference cells)`` (prototypes from the reference cells), then
  ``surgery(mode="conditions")`` (the default convergence stop, ``--max-epochs`` the ceiling);
  labels by the bundle's prototypes (what ``site map`` does) and by the imported SCANVI
  classifier on our embedding;
* scvi-tools: ``SCANVI.load_query_data(query, dir, freeze_dropout=True)``, ``train(max_epochs,
  plan_kwargs={"weight_decay": 0.0})``, labels by ``predict()``.

Figures per seed: seconds per epoch (ours: the epoch loop's mean and wall time / epochs incl.
the first-layer precompute; scvi-tools: wall time of ``train`` / epochs), known-type label
accuracy on the query, trainable parameters (ours: the new condition columns; scvi-tools:
parameters with ``requires_grad``, which its gradient hooks then mask), and the bytes that would
leave the site (ours: the diff; scvi-tools: the whole query model's ``model.pt``, since it has no
diff). Printed as mean [min-max] over seeds with the load average.

Usage::

    python benchmarks/bench_scvi_interop.py --seeds 0,1,2 --query-epochs 100

Writes ``benchmarks/results/scvi_interop.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _results import machine, save  # noqa: E402

REFERENCE = ("indrop1", "indrop2", "indrop3", "indrop4", "celseq", "fluidigmc1")
QUERY = ("celseq2", "smartseq2")
RECIPE = {
    "n_hidden": 128,
    "n_latent": 10,
    "n_layers": 2,
    "encode_covariates": True,
    "use_layer_norm": "both",
    "use_batch_norm": "none",
    "gene_likelihood": "nb",
    "dropout_rate": 0.1,
}


def _shared() -> Path:
    env = os.environ.get("SCARCHES_FL_SHARED")
    for cand in (Path(env) if env else None, ROOT.parent / "shared", ROOT / "shared"):
        if cand is not None and (cand / "data").is_dir():
            return cand / "data"
    raise SystemExit("shared/data not found; set SCARCHES_FL_SHARED")


def _train_kw(epochs: int) -> dict[str, Any]:
    return {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
    }


def run_seed(seed: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import anndata as ad
    import scvi
    import torch

    from protocols.diff import diff_to_bytes
    from scarches_fl.labels import predict_labels
    from scarches_fl.scvi_interop import classifier_labels, import_scvi

    torch.set_num_threads(args.threads)
    scvi.settings.seed = seed
    scvi.settings.verbosity = 40
    full = ad.read_h5ad(_shared() / "panc8_sub_nebula.h5ad")
    full.obs["batch"] = full.obs["batch"].astype(str)
    full.obs["cell_type"] = full.obs["cell_type"].astype(str)
    ref = full[full.obs["batch"].isin(REFERENCE)].copy()
    query = full[full.obs["batch"].isin(QUERY)].copy()
    truth = query.obs["cell_type"].to_numpy()

    t0 = time.perf_counter()
    a = ref.copy()
    scvi.model.SCVI.setup_anndata(a, batch_key="batch", labels_key="cell_type")
    base = scvi.model.SCVI(a, **RECIPE)
    base.train(**_train_kw(args.reference_epochs))
    scanvi = scvi.model.SCANVI.from_scvi_model(base, unlabeled_category="Unknown")
    scanvi.train(**_train_kw(args.scanvi_epochs))
    model_dir = workdir / f"reference-{seed}"
    scanvi.save(str(model_dir), overwrite=True)
    reference_seconds = time.perf_counter() - t0

    # ours: import, then conditions-mode surgery on the query
    imported = import_scvi(model_dir, data=ref, label_key="cell_type", seed=seed)
    t0 = time.perf_counter()
    res = imported.surgery(
        query,
        batch_key="batch",
        namespace="site",
        max_epochs=args.query_epochs,
        seed=seed,
        progress=False,
    )
    ours_wall = time.perf_counter() - t0
    pred = predict_labels(
        res.model.labels, res.model.extra_tensors, res.latent, label_key="cell_type"
    )
    ours_cls = classifier_labels(res.model, query, batch_key="batch", namespace="site")
    ours = {
        "epochs": int(res.history["epochs"]),
        "stop_reason": res.history.get("stop_reason"),
        "seconds_per_epoch": float(res.history.get("seconds_per_epoch") or 0.0),
        "wall_seconds_per_epoch": ours_wall / max(int(res.history["epochs"]), 1),
        "accuracy_prototypes": float(np.mean(pred.top_label.astype(str) == truth)),
        "accuracy_classifier": float(np.mean(ours_cls.astype(str) == truth)),
        "trainable_parameters": int(res.trainable_parameters),
        "bytes_leaving": len(diff_to_bytes(res.diff)),
    }

    # scvi-tools: load_query_data on the same directory
    q = query.copy()
    q.obs["cell_type"] = "Unknown"
    qm = scvi.model.SCANVI.load_query_data(q, str(model_dir), freeze_dropout=True)
    trainable = sum(p.numel() for p in qm.module.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    qm.train(**_train_kw(args.query_epochs), plan_kwargs={"weight_decay": 0.0})
    scvi_wall = time.perf_counter() - t0
    qdir = workdir / f"query-{seed}"
    qm.save(str(qdir), overwrite=True)
    theirs = {
        "epochs": int(args.query_epochs),
        "wall_seconds_per_epoch": scvi_wall / args.query_epochs,
        "accuracy_classifier": float(np.mean(np.asarray(qm.predict()).astype(str) == truth)),
        "trainable_parameters": int(trainable),
        "bytes_leaving": int((qdir / "model.pt").stat().st_size),
    }
    return {
        "seed": seed,
        "reference_seconds": reference_seconds,
        "ours": ours,
        "scvi_tools": theirs,
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": float(np.mean(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tool in ("ours", "scvi_tools"):
        keys = [k for k, v in runs[0][tool].items() if isinstance(v, (int, float))]
        out[tool] = {k: _spread([r[tool][k] for r in runs]) for k in keys}
    return out


def _fmt(s: dict[str, float], scale: float = 1.0, digits: int = 3) -> str:
    return (
        f"{s['mean'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}-"
        f"{s['max'] * scale:.{digits}f}]"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--reference-epochs", type=int, default=200)
    p.add_argument("--scanvi-epochs", type=int, default=20)
    p.add_argument("--query-epochs", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results" / "scvi_interop.json")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    load = os.getloadavg()[0]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            runs.append(run_seed(seed, args, Path(tmp)))
            print(f"seed {seed}: {runs[-1]}", flush=True)
    summary = summarize(runs)
    o, t = summary["ours"], summary["scvi_tools"]
    print(
        f"\npanc8 query (CEL-seq2 + Smart-seq2) onto an imported SCANVI, {len(seeds)} seeds, "
        f"mean [min-max], load {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(f"{'':32} {'scarches-fl':>26} {'scvi-tools load_query_data':>28}")
    print(
        f"{'ms per epoch (loop)':32} {_fmt(o['seconds_per_epoch'], 1e3, 1):>26} "
        f"{_fmt(t['wall_seconds_per_epoch'], 1e3, 1):>28}"
    )
    print(
        f"{'ms per epoch (wall / epochs)':32} {_fmt(o['wall_seconds_per_epoch'], 1e3, 1):>26} "
        f"{_fmt(t['wall_seconds_per_epoch'], 1e3, 1):>28}"
    )
    print(f"{'epochs':32} {_fmt(o['epochs'], 1, 0):>26} {_fmt(t['epochs'], 1, 0):>28}")
    print(
        f"{'accuracy (SCANVI classifier)':32} {_fmt(o['accuracy_classifier']):>26} "
        f"{_fmt(t['accuracy_classifier']):>28}"
    )
    print(f"{'accuracy (prototypes)':32} {_fmt(o['accuracy_prototypes']):>26} {'-':>28}")
    print(
        f"{'trainable parameters':32} {_fmt(o['trainable_parameters'], 1, 0):>26} "
        f"{_fmt(t['trainable_parameters'], 1, 0):>28}"
    )
    print(
        f"{'bytes that would leave the site':32} {_fmt(o['bytes_leaving'], 1, 0):>26} "
        f"{_fmt(t['bytes_leaving'], 1, 0):>28}"
    )
    doc = {
        "benchmark": "scvi_interop",
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": runs,
        "summary": summary,
        "machine": machine(load),
    }
    save(doc, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
