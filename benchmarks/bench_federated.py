"""Federated reference training on Flower's Simulation Engine: wall time per round and bytes
moved per round for 3, 10 and 50 virtual sites (panc8 reference studies, split over the sites).

    /work/venv/bin/python benchmarks/bench_federated.py [--sites 3 10 50] [--rounds 3]
        [--local-epochs 1] [--out benchmarks/results/federated_simulation.json]

Round 1 includes starting the Ray actors and each site's first data load, so the summary reports
the median of rounds 2..R as the steady-state figure alongside every round's time. Bytes are the
array payloads (float32 tensors as Flower serializes them) coordinator -> sites plus sites ->
coordinator in one round; signatures and configs add a few kB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = ["celseq", "fluidigmc1", "indrop1", "indrop2", "indrop3", "indrop4"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"
                                          / "panc8_sub_nebula.h5ad"))
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 10, 50])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                         "federated_simulation.json"))
    args = ap.parse_args(argv)
    from scarches_fl_cli.federated_simulation import simulate

    runs = []
    for n in args.sites:
        with tempfile.TemporaryDirectory(prefix=f"bench-fed-{n}-") as tmp:
            t0 = time.perf_counter()
            result = simulate(args.data, batch_key="batch", n_sites=n, rounds=args.rounds,
                              out=Path(tmp) / "ref", batches=REFERENCE,
                              local_epochs=args.local_epochs, patience=args.rounds)
            wall = time.perf_counter() - t0
        secs = [r.seconds for r in result.rounds]
        moved = [r.bytes_sent + r.bytes_received for r in result.rounds]
        steady = statistics.median(secs[1:]) if len(secs) > 1 else secs[0]
        runs.append({
            "sites": n, "rounds": len(secs), "local_epochs": args.local_epochs,
            "seconds_per_round": secs, "steady_seconds_per_round": steady,
            "bytes_per_round": moved, "bytes_down_per_round": result.rounds[-1].bytes_sent,
            "bytes_up_per_round": result.rounds[-1].bytes_received, "total_wall_seconds": wall,
            "contributors_last_round": len(result.rounds[-1].contributors),
        })
        print(f"{n:3d} sites: {steady:6.2f} s/round (round 1 {secs[0]:.1f} s), "
              f"{moved[-1] / 1e6:7.1f} MB/round, {wall:.1f} s total", flush=True)
    doc = {
        "benchmark": "federated reference training, Flower Simulation Engine (Ray backend)",
        "data": "panc8_sub_nebula.h5ad reference studies (720 cells, 1000 genes)",
        "model": "CVAE nb, 2x128 hidden, 10 latent",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": sys.version.split()[0]},
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
