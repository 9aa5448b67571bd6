"""Benchmark reference training and query mapping: scarches_fl versus scvi-tools' SCVI +
``SCVI.load_query_data`` (scArches surgery) at the same architecture, on the same data, in the
same run.

Cases: ``panc8`` (shared real data; reference = inDrop 1-4 + CEL-seq + Fluidigm C1, query =
CEL-seq2 + Smart-seq2) and the simulator at 20k and 100k cells (2,000 genes, 6 batches: 4
reference, 2 query). Each (case, tool) runs in its own subprocess so that peak RSS is that run's.

Architecture for both tools: 2 hidden layers of 128, latent 10, layer norm, no batch norm,
dropout 0.1, NB likelihood, gene dispersion, the batch one-hot injected into the first layer of
encoder and decoder only (scvi: ``encode_covariates=True, deeply_inject_covariates=False``),
minibatch 128, Adam, 10% validation cells, no early stopping. Query mapping in scvi-tools:
``load_query_data(freeze_dropout=True)`` (defaults otherwise: only the new batch columns train),
``plan_kwargs={"weight_decay": 0.0}``; scarches_fl: ``surgery(mode="conditions")``. Both with
``torch.set_num_threads(THREADS)`` (default 1, scarches_fl's training default).

Usage::

    python benchmarks/bench_model.py --cases panc8,sim20k,sim100k --epochs 3
    python benchmarks/bench_model.py --cases panc8 --no-scvi

Writes ``benchmarks/results/model_<cases>.json`` and prints a table with ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PANC8_REF = ["indrop1", "indrop2", "indrop3", "indrop4", "celseq", "fluidigmc1"]
PANC8_QUERY = ["celseq2", "smartseq2"]
SIM_CASES = {"sim20k": 20_000, "sim100k": 100_000}


def _shared_data() -> Path:
    for cand in (os.environ.get("SCARCHES_FL_SHARED"), ROOT.parent / "shared", ROOT / "shared"):
        if cand and (Path(cand) / "data").is_dir():
            return Path(cand) / "data"
    raise SystemExit("shared/data not found beside the checkout; set SCARCHES_FL_SHARED")


def _load_case(case: str, workdir: Path) -> tuple[Any, Any]:
    import anndata as ad

    if case == "panc8":
        a = ad.read_h5ad(_shared_data() / "panc8_sub_nebula.h5ad")
        ref_b, q_b = PANC8_REF, PANC8_QUERY
    else:
        a = ad.read_h5ad(workdir / f"{case}.h5ad")
        ref_b, q_b = ["batch0", "batch1", "batch2", "batch3"], ["batch4", "batch5"]
    batch = a.obs["batch"].astype(str)
    ref = a[batch.isin(ref_b).to_numpy()].copy()
    query = a[batch.isin(q_b).to_numpy()].copy()
    for x in (ref, query):
        x.obs["batch"] = x.obs["batch"].astype(str).astype("category")
    return ref, query


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM belongs to the process image (ru_maxrss would carry the
    parent's peak across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker_ours(case: str, epochs: int, workdir: Path, threads: int) -> dict[str, Any]:
    import warnings

    from scarches_fl.model import ReferenceModel

    warnings.simplefilter("ignore")
    ref, query = _load_case(case, workdir)
    t = time.perf_counter()
    model = ReferenceModel.train_reference(
        ref, batch_key="batch", max_epochs=epochs, seed=0, progress=False,
        early_stopping=False, num_threads=threads)
    ref_total = time.perf_counter() - t
    h = model.history
    t = time.perf_counter()
    res = model.surgery(query, batch_key="batch", namespace="query", max_epochs=epochs, seed=0,
                        progress=False, early_stopping=False, num_threads=threads)
    q_total = time.perf_counter() - t
    qh = res.history
    return {
        "reference": {"seconds_per_epoch": min(h["epoch_seconds"]),
                      "seconds_per_epoch_mean": h["seconds_per_epoch"],
                      "train_cells": h["n_train_cells"], "wall_seconds": ref_total,
                      "trainable_parameters": h["trainable_parameters"]},
        "query": {"seconds_per_epoch": min(qh["epoch_seconds"]),
                  "seconds_per_epoch_mean": qh["seconds_per_epoch"],
                  "precompute_seconds": qh.get("precompute_seconds"),
                  "train_cells": qh["n_train_cells"], "wall_seconds": q_total,
                  "trainable_parameters": res.trainable_parameters},
        "peak_rss_mb": _peak_rss_mb(),
    }


def _worker_scvi(case: str, epochs: int, workdir: Path, threads: int) -> dict[str, Any]:
    import torch

    from benchmarks._results import import_scvi_quietly, scvi_epoch_timer

    scvi = import_scvi_quietly()

    torch.set_num_threads(threads)
    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    ref, query = _load_case(case, workdir)
    scvi.model.SCVI.setup_anndata(ref, batch_key="batch")
    arch = dict(n_hidden=128, n_latent=10, n_layers=2, dropout_rate=0.1, gene_likelihood="nb",
                dispersion="gene", use_layer_norm="both", use_batch_norm="none",
                encode_covariates=True, deeply_inject_covariates=False)
    model = scvi.model.SCVI(ref, **arch)
    n_params_ref = sum(p.numel() for p in model.module.parameters() if p.requires_grad)
    timer = scvi_epoch_timer()
    t = time.perf_counter()
    model.train(max_epochs=epochs, batch_size=128, train_size=0.9, early_stopping=False,
                accelerator="cpu", enable_progress_bar=False, callbacks=[timer])
    ref_total = time.perf_counter() - t
    ref_times = timer.times
    qmodel = scvi.model.SCVI.load_query_data(query, model, freeze_dropout=True,
                                             accelerator="cpu")
    # Parameters that receive gradient (scvi-tools freezes with requires_grad and zeroes the
    # old batch columns' gradient with a hook; the whole first-layer weight stays a parameter).
    n_params_q = sum(p.numel() for p in qmodel.module.parameters() if p.requires_grad)
    timer = scvi_epoch_timer()
    t = time.perf_counter()
    qmodel.train(max_epochs=epochs, batch_size=128, train_size=0.9, early_stopping=False,
                 accelerator="cpu", enable_progress_bar=False, callbacks=[timer],
                 plan_kwargs={"weight_decay": 0.0})
    q_total = time.perf_counter() - t
    return {
        "reference": {"seconds_per_epoch": min(ref_times),
                      "seconds_per_epoch_mean": sum(ref_times) / len(ref_times),
                      "train_cells": int(round(ref.n_obs * 0.9)), "wall_seconds": ref_total,
                      "trainable_parameters": n_params_ref},
        "query": {"seconds_per_epoch": min(timer.times),
                  "seconds_per_epoch_mean": sum(timer.times) / len(timer.times),
                  "train_cells": int(round(query.n_obs * 0.9)), "wall_seconds": q_total,
                  "trainable_parameters_requires_grad": n_params_q},
        "peak_rss_mb": _peak_rss_mb(),
        "scvi_version": scvi.__version__,
    }


def _run_worker(tool: str, case: str, epochs: int, workdir: Path, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--cases", case,
           "--epochs", str(epochs), "--workdir", str(workdir), "--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"worker {tool}/{case} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="panc8,sim20k,sim100k")
    ap.add_argument("--epochs", type=int, default=3, help="epochs timed per phase (default 3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-scvi", action="store_true", help="skip scvi-tools")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", choices=("ours", "scvi"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]

    if args.worker:
        fn = _worker_ours if args.worker == "ours" else _worker_scvi
        print(json.dumps(fn(cases[0], args.epochs, Path(args.workdir), args.threads)))
        return 0

    have_scvi = False
    if not args.no_scvi:
        try:
            import scvi  # noqa: F401

            have_scvi = True
        except ImportError:
            print("scvi-tools not installed: benchmarking scarches_fl only", file=sys.stderr)
    tmp = tempfile.TemporaryDirectory(prefix="bench_model_")
    workdir = Path(args.workdir or tmp.name)
    results: dict[str, Any] = {
        "benchmark": "bench_model", "epochs": args.epochs, "threads": args.threads,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": {},
    }
    from scarches_fl.simulate import write_simulated_h5ad

    for case in cases:
        if case in SIM_CASES and not (workdir / f"{case}.h5ad").exists():
            t = time.perf_counter()
            write_simulated_h5ad(workdir / f"{case}.h5ad", SIM_CASES[case], n_genes=2000,
                                 n_batches=6, n_cell_types=10, seed=0)
            print(f"[{case}] simulated in {time.perf_counter() - t:.1f} s", flush=True)
        entry: dict[str, Any] = {"scarches_fl": _run_worker("ours", case, args.epochs, workdir,
                                                            args.threads)}
        print(f"[{case}] scarches_fl: {json.dumps(entry['scarches_fl'])}", flush=True)
        if have_scvi:
            entry["scvi_tools"] = _run_worker("scvi", case, args.epochs, workdir, args.threads)
            print(f"[{case}] scvi-tools: {json.dumps(entry['scvi_tools'])}", flush=True)
            entry["ratio_scvi_over_ours"] = {
                phase: entry["scvi_tools"][phase]["seconds_per_epoch"]
                / entry["scarches_fl"][phase]["seconds_per_epoch"]
                for phase in ("reference", "query")
            }
        results["cases"][case] = entry

    print(f"\n{'case':8} {'phase':9} {'ours s/ep':>10} {'cells/s':>9} {'scvi s/ep':>10} "
          f"{'speedup':>8} {'ours params':>11} {'RSS MB':>8}")
    for case, e in results["cases"].items():
        for phase in ("reference", "query"):
            o = e["scarches_fl"][phase]
            s = e.get("scvi_tools", {}).get(phase, {})
            spe = o["seconds_per_epoch"]
            row = (f"{case:8} {phase:9} {spe:10.3f} {o['train_cells'] / spe:9.0f} "
                   f"{s.get('seconds_per_epoch', float('nan')):10.3f} "
                   f"{e.get('ratio_scvi_over_ours', {}).get(phase, float('nan')):7.2f}x "
                   f"{o['trainable_parameters']:11d} {e['scarches_fl']['peak_rss_mb']:8.0f}"
                   f" (scvi {e.get('scvi_tools', {}).get('peak_rss_mb', float('nan')):.0f})")
            print(row)
    out = Path(args.out) if args.out else HERE / "results" / f"model_{'_'.join(cases)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
