"""Time to a converged query mapping (issue 21): ``scarches-fl map`` with default settings, whole
process, against scvi-tools' ``SCVI.load_query_data`` + ``train()`` with its own default epochs,
on the same reference cells, the same machine, one run; plus the label splits.

Sizes (``--sizes``, default 30,000, 100,000 and 1,000,000 query cells): a simulated file
(:func:`scarches_fl.simulate.write_simulated_h5ad`, 2,000 genes, 6 batches, 8 types, seed 0,
chunks of 16,384 cells) mapped whole, its 6 batches becoming new conditions. The reference:
batches 0-3 of a 20,000-cell simulation with the same design (seed 0) but another cell stream
(chunks of 4,099 cells), trained ``--ref-epochs`` epochs with label knowledge; scvi-tools' SCVI
on the same cells with the same architecture (its query timing needs a reference, not a good one).

Per size:

* **ours, default**: ``python -m scarches_fl_cli map --reference REF --data Q --batch-key batch
  --label-key cell_type --update-out U --out O`` in a fresh process: wall time, peak RSS
  (``wait4``), the epochs / passes / stop reason it prints. No memory flag: a 1M-cell file is
  streamed because it would not fit comfortably (ADR 0017).
* **ours, yardstick** (``--yardstick-epochs``, sizes up to ``--yardstick-max-cells``): the same
  surgery in this process with the convergence rule off and that many Adam epochs.
* **quality** of each fine-tuned model, one code path: the negative ELBO per cell on a fixed
  evaluation set of ``--eval-cells`` query cells (seed 0, fixed noise), label accuracy of
  ``obs["cell_type_pred"]`` against the simulated types ("Unknown" counted wrong) and of the top
  label, and kNN purity (k = 15) of the query latent on at most 10,000 cells.
* **scvi-tools**: ``SCVI.load_query_data(freeze_dropout=True)`` then ``train()`` for
  ``--scvi-epochs`` epochs, timed per epoch; its default ``max_epochs`` is scvi-tools' heuristic
  ``min(round(20000 / n * 400), 400)``, so its default time is setup + that many epochs x the
  measured seconds per epoch (extrapolated: running 267 epochs at 30k takes an hour on this
  machine). Above ``--scvi-max-cells`` it is not run (it reads the whole file into memory);
  its per-epoch time is then extrapolated linearly from the largest size run.

``--labels`` instead runs the label splits of ``bench_labels.py`` (panc8, CellBench, the
simulated shift): per seed one reference, then surgery with the default and with the
convergence rule off, scored by the same code; it reports whether the two embeddings are
identical and both accuracies.

Writes ``benchmarks/results/mapping_time.json`` (``mapping_time_labels.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

N_GENES, N_BATCHES, SEED = 2000, 6, 0
REF_CELLS, REF_BATCHES = 20_000, ["batch0", "batch1", "batch2", "batch3"]
ARCH_SCVI = dict(
    n_hidden=128,
    n_latent=10,
    n_layers=2,
    dropout_rate=0.1,
    gene_likelihood="nb",
    dispersion="gene",
    use_layer_norm="both",
    use_batch_norm="none",
    encode_covariates=True,
    deeply_inject_covariates=False,
)


def scvi_default_epochs(n_cells: int) -> int:
    """scvi-tools' ``get_max_epochs_heuristic``: 400 epochs for 20,000 cells, scaled down."""
    return int(min(round((20000 / max(n_cells, 1)) * 400), 400))


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _reference_cells():
    from scarches_fl.simulate import simulate_counts

    a = simulate_counts(REF_CELLS, N_GENES, n_batches=N_BATCHES, seed=SEED, chunk_size=4099)
    keep = a.obs["batch"].astype(str).isin(REF_BATCHES).to_numpy()
    ref = a[keep].copy()
    ref.obs["batch"] = ref.obs["batch"].astype(str)
    return ref


def prepare(data_dir: Path, sizes: list[int], ref_epochs: int, scvi: bool) -> dict[str, Any]:
    from scarches_fl.model import ReferenceModel
    from scarches_fl.simulate import write_simulated_h5ad

    data_dir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    for n in sizes:
        path = data_dir / f"query_{n}.h5ad"
        if not path.exists():
            t = time.perf_counter()
            write_simulated_h5ad(path, n, N_GENES, n_batches=N_BATCHES, seed=SEED, chunk_size=16384)
            print(f"[prepare] simulated {n} cells in {time.perf_counter() - t:.0f} s", flush=True)
    ref_dir = data_dir / f"ref_ours_{ref_epochs}"
    ref = None
    if not (ref_dir / "manifest.json").exists():
        ref = _reference_cells()
        t = time.perf_counter()
        model = ReferenceModel.train_reference(
            ref,
            batch_key="batch",
            label_key="cell_type",
            max_epochs=ref_epochs,
            seed=SEED,
            progress=False,
        )
        model.save(ref_dir)
        info["reference_train_s"] = time.perf_counter() - t
        print(
            f"[prepare] our reference ({ref.n_obs} cells, {ref_epochs} epochs) in "
            f"{info['reference_train_s']:.0f} s",
            flush=True,
        )
    scvi_dir = data_dir / "ref_scvi"
    if scvi and not (scvi_dir / "model.pt").exists():
        import scvi as scvi_tools
        import torch

        torch.set_num_threads(1)
        scvi_tools.settings.seed = SEED
        ref = ref if ref is not None else _reference_cells()
        scvi_tools.model.SCVI.setup_anndata(ref, batch_key="batch")
        m = scvi_tools.model.SCVI(ref, **ARCH_SCVI)
        m.train(max_epochs=2, batch_size=128, accelerator="cpu", enable_progress_bar=False)
        m.save(str(scvi_dir), overwrite=True, save_anndata=False)
    info["reference_cells"] = int(ref.n_obs) if ref is not None else None
    return info


def _peak_child(cmd: list[str], env: dict[str, str]) -> tuple[int, str, float, float]:
    """Run ``cmd``; (return code, stdout + stderr, wall seconds, peak RSS GB of the child)."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    out = proc.stdout.read() if proc.stdout else ""
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, out, wall, usage.ru_maxrss / 1024.0 / 1024.0


_CLI_WITH_PEAK = (
    "import sys\n"
    "from scarches_fl_cli.main import main\n"
    "try:\n"
    "    rc = main(sys.argv[1:])\n"
    "finally:\n"
    "    hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM:')]\n"
    "    print('VmHWM_KB', hwm[0].split()[1] if hwm else 'nan', flush=True)\n"
    "sys.exit(rc)\n"
)


def run_ours_cli(data_dir: Path, n: int, ref_dir: Path, threads: int) -> dict[str, Any]:
    out, upd = data_dir / f"mapped_{n}.h5ad", data_dir / f"update_{n}"
    # the CLI's main() in a process that prints its own VmHWM at exit (ru_maxrss of a child
    # would carry this process's RSS across fork + exec)
    cmd = [
        sys.executable,
        "-c",
        _CLI_WITH_PEAK,
        "map",
        "--reference",
        str(ref_dir),
        "--data",
        str(data_dir / f"query_{n}.h5ad"),
        "--batch-key",
        "batch",
        "--label-key",
        "cell_type",
        "--update-out",
        str(upd),
        "--out",
        str(out),
        "--force",
        "--no-progress",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    load = _load()
    rc, text, wall, _ = _peak_child(cmd, env)
    if rc != 0:
        raise SystemExit(f"map failed ({rc}):\n{text[-3000:]}")
    hwm = re.search(r"VmHWM_KB (\d+)", text)
    rss = int(hwm.group(1)) / 1024.0 / 1024.0 if hwm else float("nan")
    m = re.search(r"(\d+) epochs, ([\d.]+) passes over the cells, stopped: ([a-z ]+)", text)
    return {
        "command": "scarches-fl " + " ".join(cmd[3:]),
        "wall_s": wall,
        "peak_rss_gb": rss,
        "load_at_start": load,
        "epochs": int(m.group(1)) if m else None,
        "passes": float(m.group(2)) if m else None,
        "stop_reason": m.group(3).strip() if m else None,
        "printed": text.strip()[-2000:],
        "out": str(out),
        "update": str(upd),
    }


def _eval_set(data_dir: Path, n: int, eval_cells: int):
    import anndata as ad

    a = ad.read_h5ad(data_dir / f"query_{n}.h5ad", backed="r")
    rng = np.random.default_rng(SEED)
    idx = np.sort(rng.choice(a.n_obs, size=min(eval_cells, a.n_obs), replace=False))
    sub = a[idx].to_memory()
    a.file.close()
    sub.obs["batch"] = sub.obs["batch"].astype(str)
    return sub


def negative_elbo(model: Any, sub: Any) -> float:
    """Negative ELBO per cell of ``model`` (a mapped ReferenceModel) on ``sub`` (fixed noise)."""
    import torch

    from scarches_fl.data import register
    from scarches_fl.train import CellData, TrainingConfig, _validation_elbo

    reg = register(
        sub,
        batch_key="batch",
        namespace="query",
        likelihood=str(model.hyperparameters["likelihood"]),
        reference_genes=model.genes,
    )
    index = {c: i for i, c in enumerate(model.conditions)}
    cond = np.asarray([index[c] for c in reg.conditions], dtype=np.int64)
    data = CellData(reg.x, cond)
    cfg = TrainingConfig(seed=SEED, progress=False)
    return _validation_elbo(
        model.module, data, np.arange(data.n_cells), torch.device("cpu"), None, None, cfg
    )


def quality(
    model: Any, latent: np.ndarray, truth: np.ndarray, pred: np.ndarray | None, sub: Any
) -> dict[str, Any]:
    from scarches_fl import metrics as M
    from scarches_fl.labels import predict_labels

    rng = np.random.default_rng(SEED)
    idx = np.sort(rng.choice(len(latent), size=min(10_000, len(latent)), replace=False))
    p = predict_labels(
        model.labels, model.extra_tensors, latent[idx], label_key="cell_type", threshold=0.5
    )
    out = {
        "negative_elbo_per_cell": negative_elbo(model, sub),
        "knn_purity": M.knn_purity(latent[idx], truth[idx], k=15),
        "accuracy_top_label": M.label_accuracy(truth[idx], np.asarray(p.top_label).astype(str)),
        "accuracy_with_unknown": M.label_accuracy(truth[idx], np.asarray(p.pred).astype(str)),
    }
    if pred is not None:
        out["accuracy_with_unknown_all_cells"] = M.label_accuracy(truth, pred)
    return out


def quality_of_cli_run(run: dict[str, Any], ref_dir: Path, sub: Any) -> dict[str, Any]:
    import anndata as ad

    from protocols.bundle import read_bundle
    from protocols.diff import apply_condition_diff, diff_from_bytes
    from scarches_fl.model import ReferenceModel

    upd = Path(run["update"])
    meta = json.loads((upd / "update.json").read_text())
    diff = diff_from_bytes((upd / "diff.safetensors").read_bytes())
    model = ReferenceModel.from_bundle(
        apply_condition_diff(read_bundle(ref_dir), diff, meta["new_conditions"])
    )
    a = ad.read_h5ad(run["out"], backed="r")
    latent = np.asarray(a.obsm["X_scarches"])
    truth = a.obs["cell_type"].astype(str).to_numpy()
    pred = a.obs["cell_type_pred"].astype(str).to_numpy()
    a.file.close()
    return quality(model, latent, truth, pred, sub)


def run_yardstick(data_dir: Path, n: int, ref_dir: Path, epochs: int, sub: Any) -> dict:
    import anndata as ad
    import torch

    from scarches_fl.model import ReferenceModel

    torch.set_num_threads(1)
    ref = ReferenceModel.from_bundle(ref_dir)
    q = ad.read_h5ad(data_dir / f"query_{n}.h5ad")
    q.obs["batch"] = q.obs["batch"].astype(str)
    t = time.perf_counter()
    res = ref.surgery(
        q,
        batch_key="batch",
        namespace="query",
        max_epochs=epochs,
        seed=SEED,
        progress=False,
        convergence_rtol=None,
    )
    wall = time.perf_counter() - t
    truth = q.obs["cell_type"].astype(str).to_numpy()
    h = res.history
    return {
        "epochs": epochs,
        "surgery_s": wall,
        "seconds_per_epoch": h["seconds_per_epoch"],
        "min_seconds_per_epoch": min(h["epoch_seconds"]),
        "validation_elbo_per_epoch": h["validation_elbo"],
        "quality": quality(res.model, np.asarray(res.latent), truth, None, sub),
    }


def _scvi_worker(args: argparse.Namespace) -> dict[str, Any]:
    import anndata as ad
    import torch

    from benchmarks._results import import_scvi_quietly, scvi_epoch_timer

    scvi = import_scvi_quietly()

    torch.set_num_threads(args.threads)
    scvi.settings.seed = SEED
    scvi.settings.dl_num_workers = 0
    t0 = time.perf_counter()
    q = ad.read_h5ad(Path(args.data_dir) / f"query_{args.worker_n}.h5ad")
    q.obs["batch"] = q.obs["batch"].astype(str).astype("category")
    qm = scvi.model.SCVI.load_query_data(
        q, str(Path(args.data_dir) / "ref_scvi"), freeze_dropout=True, accelerator="cpu"
    )
    setup = time.perf_counter() - t0
    timer = scvi_epoch_timer()
    qm.train(
        max_epochs=args.scvi_epochs,
        accelerator="cpu",
        enable_progress_bar=False,
        callbacks=[timer],
        plan_kwargs={"weight_decay": 0.0},
    )
    return {
        "setup_s": setup,
        "epochs_run": args.scvi_epochs,
        "epoch_seconds": timer.times,
        "seconds_per_epoch": float(np.mean(timer.times)),
        "min_seconds_per_epoch": float(min(timer.times)),
        "default_epochs": scvi_default_epochs(q.n_obs),
        "scvi_version": scvi.__version__,
    }


def run_scvi(args: argparse.Namespace, n: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--scvi-worker",
        str(n),
        "--data-dir",
        str(args.data_dir),
        "--scvi-epochs",
        str(args.scvi_epochs),
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    load = _load()
    rc, text, wall, rss = _peak_child(cmd, env)
    if rc != 0:
        raise SystemExit(f"scvi worker failed ({rc}):\n{text[-3000:]}")
    res = json.loads(text.strip().splitlines()[-1])
    res.update(
        {
            "process_wall_s": wall,
            "peak_rss_gb": rss,
            "load_at_start": load,
            "default_time_s_extrapolated": res["setup_s"]
            + res["default_epochs"] * res["seconds_per_epoch"],
        }
    )
    return res


def run_sizes(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    data_dir = Path(args.data_dir)
    have_scvi = False
    if not args.skip_scvi:
        try:
            import scvi  # noqa: F401

            have_scvi = True
        except ImportError:
            print("scvi-tools not installed: ours only", file=sys.stderr)
    result: dict[str, Any] = {
        "benchmark": "bench_mapping_time",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "gpu": "none (CPU only)",
        },
        "threads": args.threads,
        "ref_epochs": args.ref_epochs,
        "sizes": {},
    }
    result["prepare"] = prepare(data_dir, sizes, args.ref_epochs, have_scvi)
    ref_dir = data_dir / f"ref_ours_{args.ref_epochs}"
    out_path = Path(args.out) if args.out else HERE / "results" / "mapping_time.json"
    last_scvi: tuple[int, float] | None = None
    for n in sizes:
        entry: dict[str, Any] = {}
        sub = _eval_set(data_dir, n, args.eval_cells)
        run = run_ours_cli(data_dir, n, ref_dir, args.threads)
        run["quality"] = quality_of_cli_run(run, ref_dir, sub)
        entry["ours_default"] = run
        print(
            f"[{n}] ours default: {run['wall_s']:.1f} s whole process, "
            f"{run['peak_rss_gb']:.2f} GB, {run['epochs']} epochs / {run['passes']} passes "
            f"({run['stop_reason']}), load {run['load_at_start']}; quality "
            f"{json.dumps(run['quality'])}",
            flush=True,
        )
        if n <= args.yardstick_max_cells and args.yardstick_epochs > 0:
            y = run_yardstick(data_dir, n, ref_dir, args.yardstick_epochs, sub)
            entry["ours_yardstick"] = y
            qd, qy = run["quality"], y["quality"]
            entry["default_vs_yardstick"] = {
                "elbo_relative_gap": (qd["negative_elbo_per_cell"] - qy["negative_elbo_per_cell"])
                / abs(qy["negative_elbo_per_cell"]),
                **{
                    k: qd[k] - qy[k]
                    for k in ("knn_purity", "accuracy_top_label", "accuracy_with_unknown")
                },
            }
            print(
                f"[{n}] yardstick {args.yardstick_epochs} epochs: {y['surgery_s']:.0f} s, "
                f"{y['seconds_per_epoch']:.2f} s/epoch; default - yardstick "
                f"{json.dumps(entry['default_vs_yardstick'])}",
                flush=True,
            )
        if have_scvi and n <= args.scvi_max_cells:
            s = run_scvi(args, n)
            last_scvi = (n, s["seconds_per_epoch"])
            entry["scvi"] = s
        elif have_scvi and last_scvi is not None:
            per = last_scvi[1] * n / last_scvi[0]
            entry["scvi"] = {
                "not_run": f"above --scvi-max-cells {args.scvi_max_cells}",
                "seconds_per_epoch_extrapolated_linearly": per,
                "default_epochs": scvi_default_epochs(n),
                "default_time_s_extrapolated": per * scvi_default_epochs(n),
            }
        if "scvi" in entry:
            s = entry["scvi"]
            entry["speedup_default_vs_scvi_default"] = (
                s["default_time_s_extrapolated"] / run["wall_s"]
            )
            print(
                f"[{n}] scvi-tools: default {s['default_epochs']} epochs, "
                f"{s.get('seconds_per_epoch', s.get('seconds_per_epoch_extrapolated_linearly')):.2f}"
                f" s/epoch, default time {s['default_time_s_extrapolated']:.0f} s "
                f"(extrapolated) -> ours {entry['speedup_default_vs_scvi_default']:.1f}x faster",
                flush=True,
            )
            if "ours_yardstick" in entry and "min_seconds_per_epoch" in s:
                entry["per_epoch_ratio_scvi_over_ours"] = (
                    s["min_seconds_per_epoch"] / entry["ours_yardstick"]["min_seconds_per_epoch"]
                )
        result["sizes"][str(n)] = entry
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
    result["load_at_end"] = _load()
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")
    return result


def run_labels(args: argparse.Namespace) -> dict[str, Any]:
    """Per scenario and seed: one reference, surgery with the default and with the rule off."""
    import warnings

    import bench_labels as BL

    from scarches_fl.model import ReferenceModel

    warnings.simplefilter("ignore")
    seeds = [int(s) for s in args.seeds.split(",")]
    result: dict[str, Any] = {
        "benchmark": "bench_mapping_time --labels",
        "seeds": seeds,
        "load_at_start": _load(),
        "scenarios": {},
    }
    out_path = Path(args.out) if args.out else HERE / "results" / "mapping_time_labels.json"
    for scenario in args.scenarios.split(","):
        ref, query = BL.split(scenario)
        rows = []
        for seed in seeds:
            model = ReferenceModel.train_reference(
                ref, batch_key=BL.BATCH, label_key=BL.LABEL, seed=seed, progress=False
            )
            ref_latent = np.asarray(model.get_latent(ref, batch_key=BL.BATCH, namespace="ref"))
            row: dict[str, Any] = {"seed": seed}
            latents = {}
            for name, kw in (("default", {}), ("fixed_epochs", {"convergence_rtol": None})):
                res = model.surgery(
                    query, batch_key=BL.BATCH, namespace="site1", seed=seed, progress=False, **kw
                )
                latents[name] = np.asarray(res.latent)
                sc = BL.score(ref_latent, latents[name], ref, query, holdout=None, seed=seed)
                row[name] = {
                    "stop_reason": res.history["stop_reason"],
                    "epochs": res.history["epochs"],
                    "accuracy_top_label": sc["prototype"]["accuracy_top_label"],
                    "accuracy_with_unknown": sc["prototype"]["accuracy_with_unknown"],
                    "knn_accuracy_top_label": sc["knn"]["accuracy_top_label"],
                }
            row["identical_embedding"] = bool(
                np.array_equal(latents["default"], latents["fixed_epochs"])
            )
            print(f"[{scenario} seed {seed}] {json.dumps(row)}", flush=True)
            rows.append(row)
        result["scenarios"][scenario] = {"query_cells": int(query.n_obs), "per_seed": rows}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
    result["load_at_end"] = _load()
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="30000,100000,1000000")
    ap.add_argument("--data-dir", default="/tmp/bench_mapping_time")
    ap.add_argument("--ref-epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-cells", type=int, default=8192)
    ap.add_argument("--yardstick-epochs", type=int, default=50)
    ap.add_argument("--yardstick-max-cells", type=int, default=100_000)
    ap.add_argument("--scvi-epochs", type=int, default=2)
    ap.add_argument("--scvi-max-cells", type=int, default=100_000)
    ap.add_argument("--skip-scvi", action="store_true")
    ap.add_argument("--labels", action="store_true", help="the label splits instead")
    ap.add_argument("--scenarios", default="panc8,cellbench,shift_moderate")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", default=None)
    ap.add_argument("--scvi-worker", dest="worker_n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_n is not None:
        print(json.dumps(_scvi_worker(args)))
        return 0
    if args.labels:
        sys.path.insert(0, str(HERE))
        run_labels(args)
        return 0
    run_sizes(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
