"""Label transfer from a federated reference against a central one (issue 18, item 6).

panc8: reference studies indrop1-4, celseq, fluidigmc1; query studies celseq2, smartseq2. For each
seed, a central reference trained on the pooled studies (``label_key`` given, rounds x local
epochs = 50 epochs by default, KL warm-up half of them) and a federated one (3 virtual sites on
Flower's Simulation Engine, 10 rounds x 5 local epochs by default, the same epoch budget,
patience = rounds; latent prototypes from the sites' signed
per-type statistics, k = 5 pooled and site floor 5, the defaults of ADR 0039 (``--label-min-cells
20``: the earlier k); expression prototypes from the sites' signed
sums, ADR 0037). The query is mapped onto each bundle with ``scarches-fl map --label-key
cell_type --label-method M`` for each M of ``--label-methods``: ``auto`` (map's default: the
expression prototypes with the per-batch offset, ADR 0070) and ``prototype`` (the latent
prototypes); accuracy counts "Unknown" as wrong.

    PYTHONPATH=. python benchmarks/bench_federated_labels.py [--seeds 0 1 2 3 4]
        [--label-methods auto prototype] [--out benchmarks/results/federated_labels.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, save  # noqa: E402

REFERENCE = ["celseq", "fluidigmc1", "indrop1", "indrop2", "indrop3", "indrop4"]
QUERY = ["celseq2", "smartseq2"]
ROUNDS, LOCAL_EPOCHS = 10, 5


def _map_accuracy(
    bundle: Path, query: Path, out: Path, seed: int, method: str, types: set[str]
) -> tuple[float, float, float]:
    """Accuracy, the fraction called Unknown, and the accuracy on the query cells whose type is
    one of ``types``."""
    import anndata as ad

    from scarches_fl_cli.main import main

    rc = main(
        [
            "-q",
            "map",
            "--reference",
            str(bundle),
            "--data",
            str(query),
            "--batch-key",
            "batch",
            "--label-key",
            "cell_type",
            "--out",
            str(out),
            "--seed",
            str(seed),
            "--no-progress",
            "--label-method",
            method,
        ]
    )
    if rc != 0:
        raise SystemExit(f"map failed on {bundle} (exit {rc})")
    mapped = ad.read_h5ad(out)
    truth = mapped.obs["cell_type"].astype(str).to_numpy()
    pred = mapped.obs["cell_type_pred"].astype(str).to_numpy()
    known = np.isin(truth, sorted(types))
    return (
        float(np.mean(pred == truth)),
        float(np.mean(pred == "Unknown")),
        float(np.mean(pred[known] == truth[known])),
    )


def _bundle_types(bundle: Path) -> set[str]:
    from protocols.bundle import read_bundle

    level = read_bundle(bundle).manifest["labels"]["levels"]["cell_type"]
    return set(level["prototype"]["classes"])


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": float(np.mean(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data",
        default=str(
            Path(__file__).resolve().parents[2] / "shared" / "data" / "panc8_sub_nebula.h5ad"
        ),
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--local-epochs", type=int, default=LOCAL_EPOCHS)
    ap.add_argument("--prox-mu", type=float, default=0.0)
    ap.add_argument(
        "--label-methods",
        nargs="+",
        default=["auto", "prototype"],
        choices=("auto", "prototype"),
        help="how map reads labels on both bundles: map's default (expression prototypes where "
        "the bundle has them) and/or the latent prototypes; each is reported",
    )
    ap.add_argument("--label-min-cells", type=int, default=5)
    ap.add_argument("--label-site-floor", type=int, default=5)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "federated_labels.json")
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import anndata as ad

    from protocols.bundle import write_bundle
    from scarches_fl.model import ReferenceModel
    from scarches_fl_cli.federated_simulation import simulate

    load0 = os.getloadavg()[0]
    full = ad.read_h5ad(args.data)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-fed-labels-") as tmp:
        tmp_path = Path(tmp)
        query = tmp_path / "query.h5ad"
        full[full.obs["batch"].isin(QUERY)].copy().write_h5ad(query)
        ref = full[full.obs["batch"].isin(REFERENCE)].copy()
        budget = args.rounds * args.local_epochs
        for seed in args.seeds:
            t0 = time.perf_counter()
            central = ReferenceModel.train_reference(
                ref,
                batch_key="batch",
                label_key="cell_type",
                max_epochs=budget,
                kl_warmup_epochs=budget // 2,
                early_stopping=False,
                progress=False,
                seed=seed,
            )
            write_bundle(tmp_path / f"central-{seed}", central.to_bundle())
            t_central = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = simulate(
                args.data,
                batch_key="batch",
                label_key="cell_type",
                n_sites=args.sites,
                rounds=args.rounds,
                out=tmp_path / f"fed-{seed}",
                batches=REFERENCE,
                local_epochs=args.local_epochs,
                prox_mu=args.prox_mu,
                patience=args.rounds,
                seed=seed,
                label_min_cells=args.label_min_cells,
                label_site_floor=args.label_site_floor,
            )
            t_fed = time.perf_counter() - t0
            run: dict = {
                "seed": seed,
                "federated_final_round": result.final_round,
                "central_seconds": round(t_central, 1),
                "federated_seconds": round(t_fed, 1),
            }
            # the types both bundles name (a federated bundle keeps those with k cells pooled
            # from shares over at least the site floor each)
            shared = _bundle_types(tmp_path / f"central-{seed}") & _bundle_types(
                tmp_path / f"fed-{seed}"
            )
            run["shared_types"] = sorted(shared)
            for method in args.label_methods:
                acc_c, unk_c, shared_c = _map_accuracy(
                    tmp_path / f"central-{seed}",
                    query,
                    tmp_path / f"central-{seed}-{method}.h5ad",
                    seed,
                    method,
                    shared,
                )
                acc_f, unk_f, shared_f = _map_accuracy(
                    tmp_path / f"fed-{seed}",
                    query,
                    tmp_path / f"fed-{seed}-{method}.h5ad",
                    seed,
                    method,
                    shared,
                )
                run[method] = {
                    "central_accuracy": acc_c,
                    "federated_accuracy": acc_f,
                    "central_unknown": unk_c,
                    "federated_unknown": unk_f,
                    "central_accuracy_shared_types": shared_c,
                    "federated_accuracy_shared_types": shared_f,
                }
                print(
                    f"seed {seed} {method}: central {acc_c:.3f} (Unknown {unk_c:.3f}), "
                    f"federated {acc_f:.3f} (Unknown {unk_f:.3f}); on the types both name: "
                    f"central {shared_c:.3f}, federated {shared_f:.3f}",
                    flush=True,
                )
            run["loadavg_1m"] = round(os.getloadavg()[0], 2)
            runs.append(run)
    doc: dict = {
        "benchmark": "federated_labels",
        "dataset": "panc8_sub_nebula",
        "reference": REFERENCE,
        "query": QUERY,
        "sites": args.sites,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "prox_mu": args.prox_mu,
        "label_methods": args.label_methods,
        "label_min_cells": args.label_min_cells,
        "label_site_floor": args.label_site_floor,
        "runs": runs,
        "machine": machine(load0),
    }
    for method in args.label_methods:
        rows = [r[method] for r in runs]
        deltas = [r["federated_accuracy"] - r["central_accuracy"] for r in rows]
        c = doc[f"{method}_central_accuracy"] = _summary([r["central_accuracy"] for r in rows])
        f = doc[f"{method}_federated_accuracy"] = _summary([r["federated_accuracy"] for r in rows])
        d = doc[f"{method}_federated_minus_central"] = _summary(deltas)
        for side in ("central", "federated"):
            doc[f"{method}_{side}_accuracy_shared_types"] = _summary(
                [r[f"{side}_accuracy_shared_types"] for r in rows]
            )
        print(
            f"{method}: central {c['mean']:.3f} [{c['min']:.3f}-{c['max']:.3f}], federated "
            f"{f['mean']:.3f} [{f['min']:.3f}-{f['max']:.3f}], federated - central "
            f"{d['mean']:+.3f} [{d['min']:+.3f}-{d['max']:+.3f}] over seeds {args.seeds}"
        )
    save(doc, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
