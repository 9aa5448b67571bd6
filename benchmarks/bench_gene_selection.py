"""Reference training speed with and without gene selection (issue 22: ``--n-top-genes``).

Trains our reference on the CellBench 5-line reference studies (27,660 genes) for a few epochs on
every gene and on the 2,000 and 4,000 batch-aware highly variable genes, one after another in one
process (one torch thread), and reports seconds per epoch (``history["seconds_per_epoch"]``,
training epochs only: gene selection and label knowledge are timed apart). Accuracy and held-out
AUROC at each size come from ``bench_labels.py --scenario cellbench5_holdout_a549 --model-kwargs
'{"n_top_genes": N}'`` (docs/benchmarks.md).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_gene_selection.py --epochs 3`` writes
``benchmarks/results/gene_selection_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_labels as B  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--sizes", default="all,2000,4000", help="comma-separated: all or N genes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    import torch

    from scarches_fl.model import ReferenceModel

    torch.set_num_threads(1)
    ref, _query = B.split("cellbench5")
    rows = []
    for size in [v.strip() for v in args.sizes.split(",") if v.strip()]:
        n_top = None if size == "all" else int(size)
        t0 = time.perf_counter()
        model = ReferenceModel.train_reference(
            ref,
            batch_key=B.BATCH,
            label_key=B.LABEL,
            max_epochs=args.epochs,
            seed=args.seed,
            progress=False,
            n_top_genes=n_top,
        )
        h = model.history
        rows.append(
            {
                "genes": len(model.genes),
                "n_top_genes": n_top,
                "epochs": int(h["epochs"]),
                "seconds_per_epoch": float(h["seconds_per_epoch"]),
                "epoch_seconds": [float(v) for v in h["epoch_seconds"]],
                "total_s": time.perf_counter() - t0,
            }
        )
        print(
            f"{len(model.genes):6d} genes: {h['seconds_per_epoch']:.3f} s/epoch "
            f"({args.epochs} epochs, {rows[-1]['total_s']:.1f} s in all)",
            flush=True,
        )
    base = next((r for r in rows if r["n_top_genes"] is None), None)
    if base:
        for r in rows:
            r["speedup_vs_all_genes"] = base["seconds_per_epoch"] / r["seconds_per_epoch"]
    result = {
        "dataset": "cellbench_celllines.h5ad, reference studies of cellbench5",
        "n_reference_cells": int(ref.n_obs),
        "rows": rows,
        "load_average": list(os.getloadavg()),
        "command": "python benchmarks/bench_gene_selection.py " + " ".join(argv or sys.argv[1:]),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gene_selection_speed.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'gene_selection_speed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
