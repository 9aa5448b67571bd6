"""Reference training speed with and without gene selection (issue 22: ``--n-top-genes``).

Trains our reference on the CellBench 5-line reference studies (27,660 genes) on every gene and on
the 2,000 and 4,000 batch-aware highly variable genes, one torch thread, and reports the cost of
an epoch in **process CPU time** beside wall time (``history["epoch_cpu_seconds"]`` and
``history["epoch_seconds"]``: training epochs only, validation included; gene selection and label
knowledge are timed apart).

The machine this is measured on is shared, so the method is built to survive load:

* the sizes are interleaved (``--sizes 2000,all,4000`` repeated ``--rounds`` times: 2000, all,
  4000, 2000, all, ...), so a burst of load falls on every size alike rather than on one;
* each run drops its first ``--warmup`` epochs (allocator and cache warm-up) and keeps the next
  ``--epochs``;
* CPU time counts only the cycles this process got, not the time it waited for a core, so it is
  the figure to compare; wall time is reported beside it, as is the load average (``uptime``)
  before and after;
* every figure is the median over a run's kept epochs; per size the median and [min-max] over the
  runs; the ratio all / N is taken within each round (runs minutes apart under the same load) and
  reported as mean [min-max] over rounds.

Accuracy and held-out AUROC at each size come from ``bench_labels.py --scenario
cellbench5_holdout_a549 --model-kwargs '{"n_top_genes": N}'`` (docs/benchmarks.md).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_gene_selection.py`` writes
``benchmarks/results/issue22/gene_selection_speed_interleaved.json`` (about 3 minutes on a quiet
2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench_labels as B  # noqa: E402

RESULT_NAME = "gene_selection_speed_interleaved.json"


def parse_sizes(text: str) -> list[int | None]:
    """``"2000,all,4000"`` -> ``[2000, None, 4000]`` (``None``: every gene)."""
    sizes: list[int | None] = []
    for part in (v.strip() for v in text.split(",")):
        if not part:
            continue
        if part == "all":
            sizes.append(None)
            continue
        try:
            n = int(part)
        except ValueError:
            raise SystemExit(f"--sizes: {part!r} is neither 'all' nor a number of genes") from None
        if n < 1:
            raise SystemExit(f"--sizes: {n} genes is not a size; give a positive number or 'all'")
        sizes.append(n)
    if not sizes or len(set(sizes)) != len(sizes):
        raise SystemExit(f"--sizes needs at least one size and no repeats, got {text!r}")
    return sizes


def schedule(sizes: list[int | None], rounds: int) -> list[tuple[int, int | None]]:
    """The interleaved order of runs: ``(round, size)`` for every size in every round."""
    return [(r, size) for r in range(rounds) for size in sizes]


def _label(size: int | None) -> str:
    return "all" if size is None else str(size)


def _stats(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {
        "median": float(np.median(arr)),
        "mean": float(np.mean(arr)),
        "min": float(np.min(arr)),
        "max": float(np.max(arr)),
        "values": [float(v) for v in arr],
    }


def summarize(runs: list[dict], *, warmup: int) -> dict:
    """Per size: median and [min-max] over the runs of each run's median kept-epoch CPU and wall
    seconds; per size N beside every gene: the ratio all / N of those medians within each round,
    mean [min-max] over the rounds. ``runs`` carry ``round``, ``size`` (``"all"`` or N),
    ``epoch_cpu_seconds`` and ``epoch_seconds`` (every epoch, warm-up included)."""
    per_run: dict[tuple[int, str], dict[str, float]] = {}
    for run in runs:
        cpu, wall = run["epoch_cpu_seconds"][warmup:], run["epoch_seconds"][warmup:]
        if not cpu:
            raise ValueError(f"run {run['size']} of round {run['round']} kept no epoch")
        per_run[(run["round"], run["size"])] = {
            "cpu": float(np.median(cpu)),
            "wall": float(np.median(wall)),
        }
    sizes = list(dict.fromkeys(run["size"] for run in runs))
    out: dict = {"sizes": {}, "ratio_all_over": {}}
    for size in sizes:
        keys = sorted(k for k in per_run if k[1] == size)
        out["sizes"][size] = {
            "runs": len(keys),
            "cpu_seconds_per_epoch": _stats([per_run[k]["cpu"] for k in keys]),
            "wall_seconds_per_epoch": _stats([per_run[k]["wall"] for k in keys]),
        }
    if "all" in sizes:
        rounds = sorted({k[0] for k in per_run})
        for size in sizes:
            if size == "all":
                continue
            paired = [r for r in rounds if (r, "all") in per_run and (r, size) in per_run]
            if not paired:
                continue
            out["ratio_all_over"][size] = {
                what: _stats([per_run[(r, "all")][what] / per_run[(r, size)][what] for r in paired])
                for what in ("cpu", "wall")
            }
    return out


def _uptime() -> str:
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def _fmt(s: dict, digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def table(summary: dict) -> str:
    lines = [
        f"{'genes':>6s}  {'runs':>4s}  {'CPU s/epoch, median [min-max]':>30s}  "
        f"{'wall s/epoch, median [min-max]':>30s}"
    ]
    for size, s in summary["sizes"].items():
        lines.append(
            f"{size:>6s}  {s['runs']:>4d}  {_fmt(s['cpu_seconds_per_epoch']):>30s}  "
            f"{_fmt(s['wall_seconds_per_epoch']):>30s}"
        )
    for size, r in summary["ratio_all_over"].items():
        c, w = r["cpu"], r["wall"]
        lines.append(
            f"all / {size}: CPU {c['mean']:.1f}x [{c['min']:.1f}-{c['max']:.1f}x], "
            f"wall {w['mean']:.1f}x [{w['min']:.1f}-{w['max']:.1f}x] (mean [min-max] over "
            f"{len(c['values'])} rounds)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2000,all,4000", help="one round's order: all or N genes")
    ap.add_argument("--rounds", type=int, default=5, help="how many times the sizes repeat")
    ap.add_argument("--epochs", type=int, default=5, help="epochs kept per run")
    ap.add_argument("--warmup", type=int, default=1, help="epochs dropped at the start of a run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "issue22"))
    args = ap.parse_args(argv)
    sizes = parse_sizes(args.sizes)
    if args.rounds < 1 or args.epochs < 1 or args.warmup < 0:
        raise SystemExit("--rounds and --epochs must be at least 1, --warmup at least 0")
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: OMP_NUM_THREADS is not 1; torch still runs on one thread here", flush=True)
    import torch

    from scarches_fl.genes import select_highly_variable_genes
    from scarches_fl.model import ReferenceModel

    torch.set_num_threads(1)
    uptime_before = _uptime()
    print(f"before: {uptime_before}", flush=True)
    ref, _query = B.split("cellbench5")
    # the genes once per size (the selection is not part of an epoch; its time is reported)
    inputs, selection_s = {}, {}
    for size in sizes:
        if size is None:
            inputs[_label(size)] = ref
            continue
        t0 = time.process_time()
        chosen = select_highly_variable_genes(ref, n_top_genes=size, batch_key=B.BATCH)
        selection_s[_label(size)] = time.process_time() - t0
        inputs[_label(size)] = ref[:, chosen].copy()
    runs = []
    for rnd, size in schedule(sizes, args.rounds):
        label = _label(size)
        model = ReferenceModel.train_reference(
            inputs[label],
            batch_key=B.BATCH,
            label_key=B.LABEL,
            max_epochs=args.warmup + args.epochs,
            seed=args.seed,
            progress=False,
            expression_prototypes=False,
        )
        h = model.history
        runs.append(
            {
                "round": rnd,
                "size": label,
                "genes": len(model.genes),
                "epoch_seconds": [float(v) for v in h["epoch_seconds"]],
                "epoch_cpu_seconds": [float(v) for v in h["epoch_cpu_seconds"]],
                "load_average_after": list(os.getloadavg()),
            }
        )
        kept = h["epoch_cpu_seconds"][args.warmup :]
        print(
            f"round {rnd} {len(model.genes):6d} genes: CPU {np.median(kept):.3f} s/epoch, "
            f"wall {np.median(h['epoch_seconds'][args.warmup :]):.3f} s/epoch "
            f"(median of {len(kept)}; load {os.getloadavg()[0]:.2f})",
            flush=True,
        )
    uptime_after = _uptime()
    print(f"after: {uptime_after}", flush=True)
    summary = summarize(runs, warmup=args.warmup)
    print(table(summary), flush=True)
    result = {
        "dataset": "cellbench_celllines.h5ad, reference studies of cellbench5",
        "n_reference_cells": int(ref.n_obs),
        "n_genes": {label: int(a.n_vars) for label, a in inputs.items()},
        "gene_selection_cpu_s": selection_s,
        "method": (
            "sizes interleaved over rounds; per run the median over the kept epochs (after "
            f"{args.warmup} warm-up epochs) of process CPU time (time.process_time) and wall "
            "time per epoch; one torch thread; label key given (latent classifier trained), "
            "expression prototypes off (outside the epochs either way)"
        ),
        "torch_threads": 1,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "rounds": args.rounds,
        "epochs_kept": args.epochs,
        "warmup_epochs": args.warmup,
        "summary": summary,
        "runs": runs,
        "uptime_before": uptime_before,
        "uptime_after": uptime_after,
        "environment": B._environment(),
        "command": "python benchmarks/bench_gene_selection.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_NAME).write_text(json.dumps(result, indent=2))
    print(f"wrote {out / RESULT_NAME}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
