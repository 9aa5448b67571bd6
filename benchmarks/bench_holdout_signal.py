"""How much signal for a held-out type does the data itself carry? Baselines for the novelty AUROC.

The label benchmark (``bench_labels.py``) scores how well the uncertainty of a mapped query flags
the query cells of a type removed from the reference (AUROC). This script puts that figure in
context, on the same splits, without any VAE:

* ``query_supervised``: a logistic regression on the query's own log1p-CP10k expression, told
  which cells are the held-out type (5-fold cross-validated). An upper bound: the type is this
  separable from the other query cells in the genes the file has.
* ``reference_expression_lr``: a logistic regression fitted on the reference's expression (every
  reference type with at least 20 cells), uncertainty = 1 - its top class probability on the
  query. What a method gets that may read the reference's expression matrix -- which a site in
  scarches-fl never can.
* ``reference_expression_knn``: distance from each query cell to its 10th nearest reference cell
  in a 30-component PCA of the reference's expression (the same privileged access).
* ``markers_in_panel``: which textbook markers of the held-out type are among the file's genes.

Run: ``python benchmarks/bench_holdout_signal.py`` (under a minute on 2 CPU cores). Writes
``benchmarks/results/holdout_signal.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_labels import BATCH, LABEL, SCENARIOS, split  # noqa: E402
from scarches_fl import metrics as M  # noqa: E402

# textbook markers (facts, for the record of what the gene panel holds)
MARKERS = {
    "alpha": ["GCG", "ARX", "IRX2", "TTR", "LOXL4", "DPP4"],
    "ductal": ["KRT19", "SOX9", "CFTR", "MMP7", "SPP1", "ANXA4"],
    "acinar": ["PRSS1", "CPA1", "CELA3A", "CTRB1", "PNLIP", "AMY2A"],
}
MIN_CELLS = 20


def log_normalize(x) -> np.ndarray:
    """log1p of counts per 10,000 (dense float64)."""
    import scipy.sparse as sp

    dense = x.toarray() if sp.issparse(x) else np.asarray(x)
    dense = dense.astype(np.float64)
    lib = dense.sum(axis=1, keepdims=True)
    return np.log1p(dense / np.maximum(lib, 1.0) * 1e4)


def query_supervised_auroc(xq: np.ndarray, novel: np.ndarray, *, seed: int = 0) -> float:
    """Cross-validated AUROC of a logistic regression told which query cells are novel."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    p = cross_val_predict(
        LogisticRegression(C=0.1, max_iter=3000), xq, novel.astype(int), cv=folds,
        method="predict_proba",
    )[:, 1]
    return M.unknown_detection_auroc(p, novel)


def reference_baselines(
    xr: np.ndarray, yr: np.ndarray, xq: np.ndarray, novel: np.ndarray, *, seed: int = 0
) -> dict:
    """Novelty AUROC of two methods with full access to the reference's expression."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import NearestNeighbors

    types, counts = np.unique(yr, return_counts=True)
    kept = set(types[counts >= MIN_CELLS].tolist())
    mask = np.isin(yr, list(kept))
    clf = LogisticRegression(C=0.1, max_iter=3000).fit(xr[mask], yr[mask])
    lr_unc = 1.0 - clf.predict_proba(xq).max(axis=1)
    n_comp = int(min(30, mask.sum() - 1, xr.shape[1]))
    pca = PCA(n_comp, random_state=seed).fit(xr[mask])
    k = int(min(10, mask.sum()))
    dist, _ = NearestNeighbors(n_neighbors=k).fit(pca.transform(xr[mask])).kneighbors(
        pca.transform(xq)
    )
    return {
        "reference_expression_lr": M.unknown_detection_auroc(lr_unc, novel),
        "reference_expression_knn": M.unknown_detection_auroc(dist[:, -1], novel),
    }


def run(scenario: str, *, seed: int = 0) -> dict:
    ref, query = split(scenario)
    held_out = SCENARIOS[scenario]["holdout"]
    xr, xq = log_normalize(ref.X), log_normalize(query.X)
    yr = ref.obs[LABEL].to_numpy().astype(str)
    novel = query.obs[LABEL].to_numpy().astype(str) == held_out
    genes = set(map(str, ref.var_names))
    markers = MARKERS.get(held_out, [])
    return {
        "scenario": scenario,
        "held_out_type": held_out,
        "n_genes": int(ref.n_vars),
        "n_query_cells": int(query.n_obs),
        "n_novel_query_cells": int(novel.sum()),
        "query_batches": sorted(set(query.obs[BATCH].astype(str))),
        "markers_checked": markers,
        "markers_in_panel": [g for g in markers if g in genes],
        "query_supervised": query_supervised_auroc(xq, novel, seed=seed),
        **reference_baselines(xr, yr, xq, novel, seed=seed),
    }


def main(argv: list[str] | None = None) -> int:
    held_out = [name for name, spec in SCENARIOS.items() if spec["holdout"]]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", default="all", choices=["all", *held_out])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "holdout_signal.json"))
    args = ap.parse_args(argv)
    scenarios = held_out if args.scenario == "all" else [args.scenario]
    t0 = time.perf_counter()
    rows = [run(sc, seed=args.seed) for sc in scenarios]
    print(
        f"{'scenario':28s} {'novel/query':>11s} {'query sup.':>10s} {'ref-expr LR':>11s} "
        f"{'ref-expr kNN':>12s}  markers in panel"
    )
    for r in rows:
        listed = ", ".join(r["markers_in_panel"]) or "-"
        checked = len(r["markers_checked"])
        print(
            f"{r['scenario']:28s} {r['n_novel_query_cells']:>5d}/{r['n_query_cells']:<5d} "
            f"{r['query_supervised']:>10.3f} {r['reference_expression_lr']:>11.3f} "
            f"{r['reference_expression_knn']:>12.3f}  "
            + (f"{listed} (of {checked})" if checked else "n/a")
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/bench_holdout_signal.py "
                + " ".join(sys.argv[1:] if argv is None else argv),
                "seed": args.seed,
                "wall_s": time.perf_counter() - t0,
                "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "scenarios": rows,
            },
            indent=2,
            sort_keys=True,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
