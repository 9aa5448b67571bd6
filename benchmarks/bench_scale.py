"""Scale benchmark (issue 10): reference training and query mapping on simulated data at
100k / 300k / 1M cells x 2,000 genes, backed (streaming from disk) and in-memory input.

Each case runs in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own:

* ``ref``: train an unsupervised reference on the whole file (``--ref-epochs`` epochs), then
  embed the reference cells and build the label knowledge (``build_label_knowledge``,
  prototypes) from ``obs["cell_type"]``; save the bundle.
* ``map``: surgery in ``conditions`` mode with the whole file as the query (its batches become
  new conditions ``query/<batch>``; same simulation design, so the same batch effects),
  ``--query-epochs`` epochs; then ``get_latent`` again (time to embed), chunked label transfer
  (time to label) and, for backed input, writing the output .h5ad window by window.

Files are written once to ``--data-dir`` (default /tmp/scarches_fl_scale, never the repo) and
reused. Results: ``benchmarks/results/scale_sim.json``, ``scale_sim.png``, ``scale.md``.

    nice /work/venv/bin/python benchmarks/bench_scale.py --sizes 100000,300000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
N_GENES = 2000


def _rss_gb() -> float:
    """Peak RSS of this process in GB: ``VmHWM`` (reset by exec, unlike ``ru_maxrss``, which
    Linux carries over from the parent that forked the child)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _open(path: str, input_kind: str):
    import anndata as ad

    return ad.read_h5ad(path, backed="r" if input_kind == "backed" else None)


def case_ref(args: argparse.Namespace) -> dict:
    import numpy as np

    from scarches_fl.labels import build_label_knowledge
    from scarches_fl.model import ReferenceModel
    from scarches_fl.train import posterior_mean

    t = time.perf_counter()
    adata = _open(args.data, args.input)
    t_open = time.perf_counter() - t
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ReferenceModel.train_reference(
            adata, batch_key="batch", max_epochs=args.ref_epochs, seed=0, progress=False,
            validation_fraction=0.1,
        )
    t_train = time.perf_counter() - t
    h = model.history
    rss_train = _rss_gb()
    if args.ref_train_only:
        return {
            "n_cells": int(adata.n_obs), "open_seconds": t_open, "train_seconds": t_train,
            "seconds_per_epoch": h["seconds_per_epoch"], "epoch_seconds": h["epoch_seconds"],
            "epochs": h["epochs"], "streaming": h.get("streaming"),
            "peak_rss_gb_after_training": rss_train, "peak_rss_gb": _rss_gb(),
        }
    t = time.perf_counter()
    from scarches_fl.data import register

    reg = register(adata, batch_key="batch", namespace="ref",
                   reference_genes=model.genes)
    data = model._cell_data(reg)
    latent = posterior_mean(model.module, data)
    t_embed = time.perf_counter() - t
    t = time.perf_counter()
    labels = np.asarray(adata.obs["cell_type"].astype(str))
    manifest_labels, atlas = build_label_knowledge(latent, {"cell_type": labels}, seed=0)
    t_knowledge = time.perf_counter() - t
    model.labels = manifest_labels
    model.extra_tensors = {k: np.asarray(v) for k, v in atlas.items()}
    model.save(args.bundle)
    return {
        "n_cells": int(adata.n_obs), "open_seconds": t_open, "train_seconds": t_train,
        "seconds_per_epoch": h["seconds_per_epoch"], "epoch_seconds": h["epoch_seconds"],
        "epochs": h["epochs"], "streaming": h.get("streaming"),
        "embed_seconds": t_embed, "label_knowledge_seconds": t_knowledge,
        "peak_rss_gb_after_training": rss_train, "peak_rss_gb": _rss_gb(),
    }


def case_map(args: argparse.Namespace) -> dict:
    from scarches_fl.model import ReferenceModel
    from scarches_fl_cli.map import predict_obs_labels, write_mapped_h5ad

    model = ReferenceModel.from_bundle(args.bundle)
    adata = _open(args.data, args.input)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = model.surgery(adata, batch_key="batch", namespace="query", mode="conditions",
                            max_epochs=args.query_epochs, seed=0, progress=False)
    t_map = time.perf_counter() - t
    h = res.history
    rss_map = _rss_gb()
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = res.model.get_latent(adata, batch_key="batch", namespace="query")
    t_embed = time.perf_counter() - t
    rss_embed = _rss_gb()
    t = time.perf_counter()
    pred, unc, _method = predict_obs_labels(res.model.labels, res.model.extra_tensors, z,
                                       label_key="cell_type", threshold=0.5)
    t_label = time.perf_counter() - t
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    acc = float((pred == truth).mean())
    rss_label = _rss_gb()
    t_write = None
    if args.write_output:
        import numpy as np

        out = Path(args.bundle).with_suffix(".mapped.h5ad")
        obs = adata.obs.copy()
        obs["cell_type_pred"] = pred
        obs["cell_type_uncertainty"] = unc
        t = time.perf_counter()
        write_mapped_h5ad(out, adata, obs, {"X_scarches": np.asarray(z)},
                          {"scarches_fl": {"bench": True}})
        t_write = time.perf_counter() - t
        out.unlink()
    return {
        "n_cells": int(adata.n_obs), "map_seconds": t_map,
        "seconds_per_epoch": h["seconds_per_epoch"], "epoch_seconds": h["epoch_seconds"],
        "precompute_seconds": h.get("precompute_seconds"), "epochs": h["epochs"],
        "streaming": h.get("streaming"), "peak_rss_gb_after_mapping": rss_map,
        "embed_seconds": t_embed, "peak_rss_gb_after_embed": rss_embed,
        "label_seconds": t_label, "label_accuracy_vs_truth": acc,
        "peak_rss_gb_after_label": rss_label, "write_seconds": t_write,
        "peak_rss_gb": _rss_gb(),
    }


def case_cli(args: argparse.Namespace) -> dict:
    """``scarches-fl map`` as a user runs it: no memory flag (the CLI chooses), labels, the
    output file written; peak RSS of this process."""
    import contextlib
    import io
    import logging

    from scarches_fl.query import choose_backed
    from scarches_fl_cli.main import main as cli_main

    out = Path(args.bundle).with_name(f"cli_map_{Path(args.data).stem}.h5ad")
    plan = choose_backed(args.data)
    argv = ["map", "--reference", args.bundle, "--data", args.data, "--batch-key", "batch",
            "--label-key", "cell_type", "--max-epochs", str(args.query_epochs), "--out", str(out),
            "--force", "--no-progress"]
    printed = io.StringIO()
    t = time.perf_counter()
    logging.disable(logging.WARNING)
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.simplefilter("ignore")
        rc = cli_main(argv)
    seconds = time.perf_counter() - t
    out_bytes = out.stat().st_size if out.exists() else None
    out.unlink(missing_ok=True)
    return {"command": "scarches-fl " + " ".join(argv), "exit_code": rc, "seconds": seconds,
            "streamed": plan.backed, "why": plan.reason, "output_bytes": out_bytes,
            "printed": printed.getvalue().strip().splitlines(), "peak_rss_gb": _rss_gb()}


def run_cli_map(args: argparse.Namespace) -> dict:
    """``--cli-map N``: one reference (``--cli-ref-cells`` cells, ``--map-ref-epochs`` epochs,
    label knowledge), then ``scarches-fl map`` of the N-cell file without a memory flag, in a
    fresh process. Saved to ``scale_cli_map.json``."""
    from scarches_fl.simulate import write_simulated_h5ad

    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for n in (args.cli_ref_cells, args.cli_map):
        paths[n] = data_dir / f"sim_{n}.h5ad"
        if not paths[n].exists():
            t = time.perf_counter()
            write_simulated_h5ad(paths[n], n, N_GENES, seed=0, chunk_size=16384)
            print(json.dumps({"generated": str(paths[n]),
                              "seconds": time.perf_counter() - t}), flush=True)
    epochs = args.map_ref_epochs or 5
    bundle = data_dir / f"mapref_{args.cli_ref_cells}_e{epochs}"
    ref = {"bundle": str(bundle), "n_cells": args.cli_ref_cells, "epochs": epochs}
    if not (bundle / "manifest.json").exists():
        ref.update(_child("ref", paths[args.cli_ref_cells], "backed", bundle, args,
                          ref_epochs=epochs, train_only=False))
    result = {
        "benchmark": "scale_cli_map", "n_cells": args.cli_map, "n_genes": N_GENES,
        "file_bytes": paths[args.cli_map].stat().st_size, "query_epochs": args.query_epochs,
        "reference": ref,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "memory_available_gb": _available_gb(),
                    "load_average_start": os.getloadavg()},
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                     text=True, cwd=Path(__file__).parent).stdout.strip(),
        "command": "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]),
        "map": _child("cli", paths[args.cli_map], "auto", bundle, args),
    }
    result["machine"]["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale_cli_map.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["map"]
    print(f"scarches-fl map, {args.cli_map:,} cells x {N_GENES:,} genes, no memory flag: "
          + (f"peak RSS {m['peak_rss_gb']:.2f} GB, {m['seconds']:.0f} s, "
             f"{'streamed' if m['streamed'] else 'read whole'} ({m['why']})"
             if "error" not in m else f"failed: {m['error']}"))
    return result


def _available_gb() -> float | None:
    from scarches_fl.query import available_memory_bytes

    avail = available_memory_bytes()
    return None if avail is None else avail / 1e9


def _warm_page_cache(path: Path) -> float:
    """Read ``path`` once (64 MB at a time) so that every backed case starts with the file in the
    OS page cache, as every epoch after the first of a real run does; otherwise whether a file is
    cached depends on what ran before (a 17 GB in-memory case evicts it). Returns seconds."""
    t = time.perf_counter()
    with open(path, "rb") as fh:
        while fh.read(64 << 20):
            pass
    return time.perf_counter() - t


def _child(case: str, data: Path, input_kind: str, bundle: Path, args, *,
           ref_epochs: int | None = None, train_only: bool | None = None) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--data", str(data), "--input", input_kind,
           "--bundle", str(bundle),
           "--ref-epochs", str(args.ref_epochs if ref_epochs is None else ref_epochs),
           "--query-epochs", str(args.query_epochs)]
    if args.write_output:
        cmd.append("--write-output")
    if args.ref_train_only if train_only is None else train_only:
        cmd.append("--ref-train-only")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "wall_seconds": time.perf_counter() - t}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = time.perf_counter() - t
    return out


def run(args: argparse.Namespace) -> dict:
    from scarches_fl.simulate import write_simulated_h5ad

    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    memory_max = int(args.memory_max)
    results: dict = {
        "benchmark": "scale_sim", "n_genes": N_GENES, "ref_epochs": args.ref_epochs,
        "query_epochs": args.query_epochs, "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_start": os.getloadavg()},
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                     text=True, cwd=Path(__file__).parent).stdout.strip(),
        "cases": [],
    }
    out_json = Path(args.out) / "scale_sim.json"
    previous_map_ref: dict = {}
    previous_command = None
    if args.resume and out_json.exists():
        previous = json.loads(out_json.read_text())
        previous_map_ref = previous.get("map_reference", {})
        previous_command = previous.get("command")
        results["cases"] = previous.get("cases", [])
        results["machine"]["previous_runs"] = (previous["machine"].get("previous_runs", [])
                                               + [previous["machine"]])
    command = "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:])
    if args.resume and previous_command:
        results["command"] = previous_command
        results["resumed_with"] = command
    else:
        results["command"] = command
    if args.map_ref_epochs:
        # one well-trained reference (smallest size, label knowledge) that every query case maps
        # onto: a 1-epoch reference is too rough to label a query (its cells come out Unknown)
        n0 = min(int(s) for s in args.sizes.split(","))
        src = data_dir / f"sim_{n0}.h5ad"
        if not src.exists():
            write_simulated_h5ad(src, n0, N_GENES, seed=0, chunk_size=16384)
        args.ref_bundle = str(data_dir / f"mapref_{n0}_e{args.map_ref_epochs}")
        kept = previous_map_ref if previous_map_ref.get("bundle") == args.ref_bundle else {}
        results["map_reference"] = {**kept, "n_cells": n0, "epochs": args.map_ref_epochs,
                                    "bundle": args.ref_bundle}
        if not Path(args.ref_bundle, "manifest.json").exists():
            results["map_reference"].update(
                _child("ref", src, "backed", Path(args.ref_bundle), args,
                       ref_epochs=args.map_ref_epochs, train_only=False))
            print(json.dumps({"map_reference": results["map_reference"]}), flush=True)
    done = {(c["n_cells"], c["input"]) for c in results["cases"] if "error" not in c["query"]}
    results["cases"] = [c for c in results["cases"] if (c["n_cells"], c["input"]) in done]
    for n in sizes:
        path = data_dir / f"sim_{n}.h5ad"
        gen = None
        if not path.exists():
            t = time.perf_counter()
            write_simulated_h5ad(path, n, N_GENES, seed=0, chunk_size=16384)
            gen = time.perf_counter() - t
        kinds = ["backed"] + (["memory"] if n <= memory_max else [])
        for kind in kinds:
            if (n, kind) in done:
                continue
            bundle = data_dir / f"ref_{n}_{kind}"
            entry = {"n_cells": n, "input": kind, "file_bytes": path.stat().st_size,
                     "generate_seconds": gen}
            if kind == "backed":
                entry["page_cache_warm_seconds"] = _warm_page_cache(path)
            entry["reference"] = _child("ref", path, kind, bundle, args)
            if args.ref_bundle:
                # time-boxed runs: every size maps onto the same reference bundle (same genes,
                # same simulation design, label knowledge built once)
                bundle = Path(args.ref_bundle)
                entry["reference"]["map_bundle"] = str(bundle)
            entry["query"] = (_child("map", path, kind, bundle, args)
                              if "error" not in entry["reference"] else {"error": "no ref"})
            results["cases"].append(entry)
            print(json.dumps({"n": n, "input": kind,
                              "ref_s_per_epoch": entry["reference"].get("seconds_per_epoch"),
                              "ref_rss": entry["reference"].get("peak_rss_gb"),
                              "query_s_per_epoch": entry["query"].get("seconds_per_epoch"),
                              "query_rss": entry["query"].get("peak_rss_gb"),
                              "errors": [k for k in ("reference", "query")
                                         if "error" in entry[k]]}), flush=True)
            _save(results, args)
    results["machine"]["load_average_end"] = os.getloadavg()
    _linearity(results)
    _save(results, args)
    return results


def _linearity(results: dict) -> None:
    lin: dict = {}
    for kind in ("backed", "memory"):
        cases = {c["n_cells"]: c for c in results["cases"] if c["input"] == kind}
        if not cases:
            continue
        lo, hi = min(cases), max(cases)
        if lo == hi:
            continue
        for part in ("reference", "query"):
            a = cases[lo][part].get("seconds_per_epoch")
            b = cases[hi][part].get("seconds_per_epoch")
            if a and b:
                lin[f"{kind}_{part}"] = {"from": lo, "to": hi,
                                         "ratio_over_linear": (b / a) / (hi / lo)}
    results["linearity"] = lin


def _save(results: dict, args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale_sim.json").write_text(json.dumps(results, indent=2) + "\n")


def _knowledge_seconds(r: dict):
    if r.get("embed_seconds") is None:
        return None
    return r["embed_seconds"] + r.get("label_knowledge_seconds", 0.0)


def _map_ref_text(results: dict) -> str:
    m = results.get("map_reference")
    if m:
        return (f"one reference bundle ({m['n_cells']:,} cells, {m['epochs']} epochs, with "
                "label knowledge; `--map-ref-epochs`)")
    return "each size's own reference bundle"


def _fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def report(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, style in (("backed", "-"), ("memory", "--")):
        cases = sorted((c for c in results["cases"] if c["input"] == kind
                        and "error" not in c["query"]), key=lambda c: c["n_cells"])
        if not cases:
            continue
        n = [c["n_cells"] for c in cases]
        for part, key, marker in (("reference", "seconds_per_epoch", "o"),
                                  ("query", "seconds_per_epoch", "s"),
                                  ("query", "embed_seconds", "^"),
                                  ("query", "label_seconds", "v")):
            label = {"reference": "reference s/epoch", "query": "query s/epoch"}[part] \
                if key == "seconds_per_epoch" else key.replace("_seconds", " s")
            pts = [(c["n_cells"], c[part][key]) for c in cases if c[part].get(key)]
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker,
                         label=f"{label} ({kind})")
        rc = [c for c in cases if "peak_rss_gb" in c["reference"]]
        axes[1].plot([c["n_cells"] for c in rc], [c["reference"]["peak_rss_gb"] for c in rc],
                     style, marker="o", label=f"reference training ({kind})")
        axes[1].plot(n, [c["query"]["peak_rss_gb"] for c in cases], style, marker="s",
                     label=f"query mapping+embed+label ({kind})")
    for ax, title, ylabel in ((axes[0], "time", "seconds"), (axes[1], "peak RSS", "GB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cells (2,000 genes)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=6)
    axes[1].axhline(3.0, color="grey", lw=0.8, ls=":")
    fig.tight_layout()
    fig.savefig(out / "scale_sim.png", dpi=120)

    lines = [
        "## Scale: million-cell references and queries",
        "",
        "Simulated counts (`scarches_fl.simulate`, 4 batches, 8 cell types, 2,000 genes), "
        f"reference {results['ref_epochs']} epoch(s), query mapping in `conditions` mode "
        f"{results['query_epochs']} epoch(s); each case in a fresh process (peak RSS = "
        "`VmHWM`). Reference: trained on the whole file (s/epoch and RSS; with "
        "`--ref-train-only` no embedding / label knowledge). Query: the whole file again (its "
        "batches become new conditions `query/<batch>`), mapped onto "
        f"{_map_ref_text(results)}, then `get_latent` "
        "(embed s, includes the pass that checks every stored value) and chunked label transfer "
        "(label s; label acc. = predicted label equals the simulated type, Unknown counted "
        "wrong). Reference knowledge s = embedding the reference plus `build_label_knowledge`. "
        "Backed = `read_h5ad(backed=\"r\")`, streamed in "
        "windows of 4 x 4,096 rows (ADR 0015), the file read once beforehand so that it starts "
        "in the OS page cache (as after a real run's first epoch); memory = sparse CSR in RAM, "
        "shuffled block then window above 16,384 cells. Machine: "
        f"{results['machine']['cpus']} cores (load average "
        f"{results['machine']['load_average_start'][0]:.1f} at start), torch 1 thread.",
        "",
        "| cells | input | file GB | ref s/epoch | ref knowledge s | ref peak RSS GB | "
        "query s/epoch | query precompute s | embed s | label s | label acc. | "
        "query peak RSS GB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted(results["cases"], key=lambda c: (c["input"], c["n_cells"])):
        r, q = c["reference"], c["query"]
        lines.append(
            f"| {c['n_cells']:,} | {c['input']} | {c['file_bytes'] / 1e9:.2f} | "
            f"{_fmt(r.get('seconds_per_epoch'), 1)} | {_fmt(_knowledge_seconds(r), 1)} | "
            f"{_fmt(r.get('peak_rss_gb'))} | "
            f"{_fmt(q.get('seconds_per_epoch'), 1)} | {_fmt(q.get('precompute_seconds'), 1)} | "
            f"{_fmt(q.get('embed_seconds'), 1)} | {_fmt(q.get('label_seconds'), 2)} | "
            f"{_fmt(q.get('label_accuracy_vs_truth'), 3)} | {_fmt(q.get('peak_rss_gb'))} |")
    lines += ["", "Linearity (s/epoch at the largest size / s/epoch at the smallest) / "
              "(cell ratio); 1.00 = exactly linear, the target is within 10%:", ""]
    for k, v in results.get("linearity", {}).items():
        lines.append(f"- {k.replace('_', ' ')}: {v['ratio_over_linear']:.3f} "
                     f"({v['from']:,} -> {v['to']:,} cells)")
    lines += ["", "![time and memory against cells](results/scale_sim.png)", "",
              "Raw figures: `benchmarks/results/scale_sim.json`; rerun with "
              f"`{results.get('command', 'python benchmarks/bench_scale.py')}`.", ""]
    (out / "scale.md").write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,300000,1000000")
    p.add_argument("--data-dir", default="/tmp/scarches_fl_scale")
    p.add_argument("--memory-max", default="300000",
                   help="largest size also run with in-memory input")
    p.add_argument("--ref-epochs", type=int, default=1)
    p.add_argument("--query-epochs", type=int, default=2)
    p.add_argument("--write-output", action="store_true",
                   help="also write the mapped .h5ad (then delete it)")
    p.add_argument("--case-timeout", type=int, default=3600)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--ref-bundle", default=None,
                   help="skip reference training; map onto this bundle (time-boxed runs)")
    p.add_argument("--map-ref-epochs", type=int, default=None,
                   help="train one reference on the smallest size for this many epochs (with "
                        "label knowledge) and map every query onto it")
    p.add_argument("--ref-train-only", action="store_true",
                   help="reference case: train only (no embedding / label knowledge)")
    p.add_argument("--resume", action="store_true",
                   help="keep the cases already in scale_sim.json and run only the missing ones")
    p.add_argument("--cli-map", type=int, default=None, metavar="N",
                   help="only run `scarches-fl map` (no memory flag) on the N-cell file and "
                        "print its peak RSS (scale_cli_map.json)")
    p.add_argument("--cli-ref-cells", type=int, default=20000, metavar="N",
                   help="with --cli-map: cells of the reference it maps onto (default 20000)")
    # child mode
    p.add_argument("--case", choices=("ref", "map", "cli"))
    p.add_argument("--data")
    p.add_argument("--input", choices=("backed", "memory", "auto"))
    p.add_argument("--bundle")
    args = p.parse_args()
    if args.case:
        fn = {"ref": case_ref, "map": case_map, "cli": case_cli}[args.case]
        print(json.dumps(fn(args)))
        return 0
    if args.cli_map:
        run_cli_map(args)
        return 0
    if args.report_only:
        results = json.loads((Path(args.out) / "scale_sim.json").read_text())
    else:
        results = run(args)
    report(results, Path(args.out))
    print((Path(args.out) / "scale.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
