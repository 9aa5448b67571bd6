"""CPU time per accepted update as the coordinator runs it, with and without reusing the request
thread's authentication on the ledger writer (ADR 0027).

    python benchmarks/bench_accept_cpu.py [--genes 2000] [--updates 300] [--repeat 3]
        [--out benchmarks/results/accept_cpu.json]

In process, no gRPC and no disk: ``authenticate_submission`` (request thread: strict parse,
signature) then ``check_and_apply_site_update`` (writer: every other rule and the append), on a
reference of the default architecture with 6 conditions. "reused" passes the authentication on
(one parse, one signature check per submission); "again" does not (the writer parses and
verifies the same bytes again, as before ADR 0027). The two take turns in blocks of 25 updates so
that other load on the shared machine falls on both alike; CPU time (``time.process_time``), not
wall time, is reported: mean [min-max] over ``--repeat`` runs, with the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_run(n_genes: int, n_updates: int) -> dict[str, float]:
    from benchmarks.bench_ledger_accept import _ledger, _updates
    from coordinator import ledger as cl
    from protocols.limits import DEFAULT_LIMITS

    _trust, state, _entries, _blobs, ref, site = _ledger(6, n_genes)
    updates = _updates(state, ref, site, n_updates + 20)
    for u in updates[:20]:  # warm-up
        cl.check_and_apply_site_update(state, u.envelope, u.diff_bytes, DEFAULT_LIMITS)
    cpu = {"reused": 0.0, "again": 0.0}
    count = {"reused": 0, "again": 0}
    block = 25
    for k, start in enumerate(range(20, len(updates), block)):
        mode = ("reused", "again")[k % 2]
        t0 = time.process_time()
        for u in updates[start : start + block]:
            auth = cl.authenticate_submission(state, u.envelope, DEFAULT_LIMITS)
            cl.check_and_apply_site_update(
                state,
                u.envelope,
                u.diff_bytes,
                DEFAULT_LIMITS,
                authenticated=auth if mode == "reused" else None,
            )
            count[mode] += 1
        cpu[mode] += time.process_time() - t0
    return {m: 1000.0 * cpu[m] / count[m] for m in cpu}


def main(argv: list[str] | None = None) -> int:
    from benchmarks._results import machine, save

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--updates", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accept_cpu.json")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    runs = []
    for _ in range(args.repeat):
        r = one_run(args.genes, args.updates)
        r["load_avg_1m"] = os.getloadavg()[0]
        runs.append(r)
        print(
            f"CPU per accept: reused {r['reused']:.3f} ms, again {r['again']:.3f} ms "
            f"(load {r['load_avg_1m']:.1f})"
        )
    summary = {}
    for m in ("reused", "again"):
        vals = [r[m] for r in runs]
        summary[m] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
        print(f"{m}: {summary[m]['mean']:.3f} [{summary[m]['min']:.3f}-{summary[m]['max']:.3f}] ms")
    doc = {
        "benchmark": "CPU per accept on the coordinator's path, authentication reused or not",
        "model": {"genes": args.genes, "hidden": [128, 128], "latent": 10, "conditions": 6},
        "machine": machine(load_before),
        "runs": runs,
        "summary_ms": summary,
    }
    save(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
