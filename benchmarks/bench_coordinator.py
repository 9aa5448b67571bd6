"""Coordinator accept throughput and latency, over gRPC with TLS, durable writes on.

    python benchmarks/bench_coordinator.py [--genes 2000] [--sites 1,8,32] [--updates 200]
                                           [--out benchmarks/results/coordinator_accept.json]
    python benchmarks/bench_coordinator.py --sites 32 --duration 300 [--window 60]
                                           [--out benchmarks/results/coordinator_sustained.json]

For each concurrency level it makes a fresh state directory from a synthetic reference of the
default architecture (2 x 128 hidden, latent 10, NB with per-condition dispersion, ``--genes``
genes, 8 reference studies), enrols the sites, starts ``python -m scarches_fl_cli coordinator serve`` as its own
process (TLS on, ``durable: true``), builds and signs every update beforehand (signing is the
sites' cost), then lets the sites submit concurrently, each on the same base, one condition per
update, with the per-site rate limit lifted. It reports accepted updates per second (wall clock
from the first submission to the last answer) and the p50 / p99 of the per-submission latency
seen by the client. With N sites each waiting for its answer before sending the next update,
latency ~= N / throughput (Little's law): the latency target is about one site.

With ``--duration`` each level runs for that many seconds instead: the sites sign their updates
as they go (on the same machine, from a pool of 16 precomputed diffs per site: signing is part
of the measured load) and the accepted updates are counted per ``--window`` seconds, so that an
accept cost growing with the ledger shows as a falling rate (last window / first window). The
condition caps are lifted for this run (the ledger grows by one condition per update).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _setup(workdir: Path, n_sites: int, n_genes: int):
    from coordinator.admin import init_state
    from coordinator.config import load_config
    from coordinator.service import Registry
    from protocols.bundle import write_bundle
    from protocols.keys import generate_private_key, load_private_key
    from protocols.ledger import enrol_entry
    from tests.coordinator.synth import synthetic_reference

    ref = synthetic_reference(
        n_genes=n_genes,
        conditions=[f"ref/study{i}" for i in range(8)],
        n_hidden=128,
        n_latent=10,
        n_layers=2,
    )
    write_bundle(workdir / "reference", ref)
    origin = "bench.scarches-fl.local/ledger"
    state = workdir / "state"
    init_state(state, reference=workdir / "reference", origin=origin)
    # The per-site rate limit (default 30/s, burst 60) would reject a single site sending 200
    # updates back to back: this measures the accept pipeline, so it is lifted here.
    import yaml

    cfg_path = state / "coordinator.yaml"
    doc = yaml.safe_load(cfg_path.read_text())
    doc["rate_limit"] = {"enabled": False, "burst": 1, "per_second": 1.0}
    doc["limits"]["max_conditions_per_reference"] = 10_000_000
    doc["limits"]["max_conditions_per_site"] = 10_000_000
    if SNAPSHOT_EVERY is not None:
        doc["snapshot_every"] = SNAPSHOT_EVERY
    cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    cfg = load_config(state)
    op = load_private_key(cfg.path(cfg.paths.operator_key))
    keys = {f"site-{i:02d}": generate_private_key() for i in range(n_sites)}
    with Registry(cfg) as reg:
        for sid, key in keys.items():
            reg.append_operator_entry(
                lambda _state, _size, sid=sid, key=key: (
                    enrol_entry(
                        origin=origin,
                        site_id=sid,
                        public_key=key.public_key(),
                        operator_keys=[op],
                    ),
                    "policy",
                    [],
                )
            )
        size = reg.store.size
        root = reg.store.root(size)
    return state, origin, ref, keys, size, root


def _start_server(state: Path) -> tuple[subprocess.Popen, str]:
    (state / "serve.json").unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scarches_fl_cli",
            "-q",
            "coordinator",
            "serve",
            "--dir",
            str(state),
            "--listen",
            "127.0.0.1:0",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            rec = json.loads((state / "serve.json").read_text())
            if rec.get("pid") == proc.pid:
                return proc, rec["address"]
        except (FileNotFoundError, ValueError):
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the coordinator exited with {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the coordinator did not start")


def run_level(n_sites: int, total: int, n_genes: int) -> dict:
    from protocols.registry_client import RegistryClient
    from protocols.update import make_update
    from tests.coordinator.synth import synthetic_diff

    per_site = max(1, total // n_sites)
    with tempfile.TemporaryDirectory(prefix="bench-coord-") as tmp:
        state, origin, ref, keys, size, root = _setup(Path(tmp), n_sites, n_genes)
        updates = {
            sid: [
                make_update(
                    origin=origin,
                    site_id=sid,
                    site_key=key,
                    sequence=k + 1,
                    base_size=size,
                    base_root=root,
                    base_digest=ref.digest,
                    new_conditions=[f"{sid}/b{k}"],
                    diff=synthetic_diff(ref, 1, seed=k),
                )
                for k in range(per_site)
            ]
            for sid, key in keys.items()
        }
        trust = json.loads((state / "trust.json").read_bytes())
        proc, addr = _start_server(state)
        latencies: list[float] = []
        rejected: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(n_sites + 1)

        def site(sid: str) -> None:
            with RegistryClient(addr, trust=trust, timeout=120) as client:
                client.health()  # connect (TLS handshake) before the clock starts
                barrier.wait()
                for u in updates[sid]:
                    t0 = time.perf_counter()
                    res = client.submit_update(u.envelope, u.diff_bytes)
                    dt = time.perf_counter() - t0
                    with lock:
                        latencies.append(dt)
                        if res.rejection is not None:
                            rejected.append(res.rejection.reason_code)

        try:
            threads = [threading.Thread(target=site, args=(sid,)) for sid in updates]
            for t in threads:
                t.start()
            barrier.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(30)
        accepted = len(latencies) - len(rejected)
        return {
            "concurrent_sites": n_sites,
            "submissions": len(latencies),
            "accepted": accepted,
            "rejected": sorted(set(rejected)),
            "wall_s": round(wall, 3),
            "accepted_per_s": round(accepted / wall, 1),
            "latency_ms_p50": round(1000 * statistics.median(latencies), 2),
            "latency_ms_p99": round(1000 * _percentile(latencies, 0.99), 2),
            "latency_ms_mean": round(1000 * statistics.fmean(latencies), 2),
        }


def run_sustained(n_sites: int, duration: float, window: float, n_genes: int) -> dict:
    from protocols.registry_client import RegistryClient
    from protocols.update import make_update
    from tests.coordinator.synth import synthetic_diff

    with tempfile.TemporaryDirectory(prefix="bench-coord-") as tmp:
        state, origin, ref, keys, size, root = _setup(Path(tmp), n_sites, n_genes)
        pools = {
            sid: [synthetic_diff(ref, 1, seed=1000 * i + k) for k in range(16)]
            for i, sid in enumerate(keys)
        }
        trust = json.loads((state / "trust.json").read_bytes())
        proc, addr = _start_server(state)
        accepted_at: list[float] = []
        latencies: list[float] = []
        rejected: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(n_sites + 1)
        start: list[float] = []

        def site(sid: str) -> None:
            with RegistryClient(addr, trust=trust, timeout=120) as client:
                client.health()
                barrier.wait()
                end = start[0] + duration
                k = 0
                while time.perf_counter() < end:
                    k += 1
                    u = make_update(
                        origin=origin,
                        site_id=sid,
                        site_key=keys[sid],
                        sequence=k,
                        base_size=size,
                        base_root=root,
                        base_digest=ref.digest,
                        new_conditions=[f"{sid}/b{k}"],
                        diff=pools[sid][k % 16],
                    )
                    t0 = time.perf_counter()
                    res = client.submit_update(u.envelope, u.diff_bytes)
                    t1 = time.perf_counter()
                    with lock:
                        latencies.append(t1 - t0)
                        if res.rejection is None:
                            accepted_at.append(t1 - start[0])
                        else:
                            rejected.append(res.rejection.reason_code)
                            k -= 1

        try:
            threads = [threading.Thread(target=site, args=(sid,)) for sid in keys]
            for t in threads:
                t.start()
            start.append(time.perf_counter())
            barrier.wait()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start[0]
        finally:
            proc.terminate()
            proc.wait(60)
        n_windows = max(1, int(duration // window))
        counts = [0] * n_windows
        for t in accepted_at:
            counts[min(int(t // window), n_windows - 1)] += 1
        rates = [round(c / window, 1) for c in counts]
        return {
            "concurrent_sites": n_sites,
            "duration_s": duration,
            "window_s": window,
            "accepted": len(accepted_at),
            "rejected": sorted(set(rejected)),
            "wall_s": round(wall, 3),
            "accepted_per_s": round(len(accepted_at) / wall, 1),
            "accepted_per_s_by_window": rates,
            "last_over_first_window": round(rates[-1] / rates[0], 3) if rates[0] else None,
            "latency_ms_p50": round(1000 * statistics.median(latencies), 2),
            "latency_ms_p99": round(1000 * _percentile(latencies, 0.99), 2),
        }


#: ``--snapshot-every``: the coordinator's ``snapshot_every`` for the run (None: its default)
SNAPSHOT_EVERY: int | None = None


def main(argv: list[str] | None = None) -> int:
    from benchmarks._results import machine, save

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--sites", default="1,8,32")
    ap.add_argument("--updates", type=int, default=200, help="updates per level (split over sites)")
    ap.add_argument("--duration", type=float, default=0.0, help="seconds per level (sustained run)")
    ap.add_argument("--window", type=float, default=60.0, help="seconds per rate window")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--snapshot-every", type=int, default=None,
        help="the coordinator's snapshot_every (default: its own; a huge value: no snapshot "
        "during the run, to see what snapshots cost)",
    )
    args = ap.parse_args(argv)
    global SNAPSHOT_EVERY
    SNAPSHOT_EVERY = args.snapshot_every
    name = "coordinator_sustained.json" if args.duration else "coordinator_accept.json"
    args.out = args.out or ROOT / "benchmarks" / "results" / name
    levels = [int(x) for x in args.sites.split(",")]
    load_before = os.getloadavg()[0]
    results = []
    for n in levels:
        if args.duration:
            r = run_sustained(n, args.duration, args.window, args.genes)
            print(
                f"{n:>3} sites for {args.duration:.0f} s: {r['accepted']} accepted = "
                f"{r['accepted_per_s']:.1f}/s; per {args.window:.0f} s: "
                f"{r['accepted_per_s_by_window']} (last / first {r['last_over_first_window']}); "
                f"latency p50 {r['latency_ms_p50']:.1f} ms, p99 {r['latency_ms_p99']:.1f} ms"
            )
        else:
            r = run_level(n, args.updates, args.genes)
            print(
                f"{n:>3} sites: {r['accepted']:>4} accepted in {r['wall_s']:.2f} s = "
                f"{r['accepted_per_s']:.1f}/s, latency p50 {r['latency_ms_p50']:.1f} ms, "
                f"p99 {r['latency_ms_p99']:.1f} ms"
            )
        results.append(r)
    doc = {
        "benchmark": "coordinator accept (gRPC + TLS, durable writes)",
        "model": {
            "genes": args.genes,
            "hidden": [128, 128],
            "latent": 10,
            "reference_studies": 8,
            "conditions_per_update": 1,
        },
        "machine": machine(load_before),
        "targets": (
            {"accepted_per_s": 300.0, "last_over_first_window": 0.9}
            if args.duration
            else {"latency_ms_p50": 5.0, "accepted_per_s": 300.0}
        ),
        "results": results,
    }
    save(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
