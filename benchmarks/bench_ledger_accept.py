"""Accept cost against the size of the ledger, and restart from a snapshot.

    python benchmarks/bench_ledger_accept.py [--genes 2000] [--conditions 6,20000]
        [--updates 200] [--restart-entries 10000]
        [--out benchmarks/results/ledger_accept.json]

Accepts run in process, no gRPC and no disk (the accept rule itself: ``LedgerState.apply`` of a signed site
update, what the coordinator's writer runs per submission). For each genesis size it builds a
synthetic reference of the default architecture (2 x 128 hidden, latent 10, NB with
per-condition dispersion) holding that many conditions, signs ``--updates`` one-condition updates
beforehand and reports the median and p99 time of ``apply``. Then it grows a ledger to
``--restart-entries`` entries and times a restart both ways: the full replay of every entry, and
reading the snapshot's two files back and ``restore_state`` (checks included: checksums, pinned
roots, root against the log's leaf hashes); the snapshot's time is encoding it and writing both
files atomically with fsync.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ORIGIN = "bench.scarches-fl.local/ledger"


def _ledger(n_conditions: int, n_genes: int):
    from protocols.checkpoint import NoteSigner
    from protocols.keys import generate_private_key
    from protocols.ledger import LedgerState, enrol_entry, make_genesis
    from protocols.policy import build_trust
    from tests.coordinator.synth import synthetic_reference

    op, site = generate_private_key(), generate_private_key()
    signer = NoteSigner(ORIGIN, os.urandom(32))
    trust = build_trust(
        origin=ORIGIN, log_public_key=signer.verifier.vkey, operator_keys=[op.public_key()]
    )
    ref = synthetic_reference(
        n_genes=n_genes,
        conditions=[f"ref/study{i}" for i in range(n_conditions)],
        n_hidden=128,
        n_latent=10,
        n_layers=2,
    )
    state, entries, blobs = LedgerState(trust), [], {}
    g = make_genesis(ref, origin=ORIGIN, operator_keys=[op])
    blobs.update(g.blobs)
    for env in (
        g.envelope,
        enrol_entry(
            origin=ORIGIN, site_id="site-a", public_key=site.public_key(), operator_keys=[op]
        ),
    ):
        state.apply(env, blobs.get)
        entries.append(env)
    return trust, state, entries, blobs, ref, site


def _updates(state, ref, site, n: int, start: int = 0):
    from protocols.update import make_update
    from tests.coordinator.synth import synthetic_diff

    size = state.size
    return [
        make_update(
            origin=ORIGIN,
            site_id="site-a",
            site_key=site,
            sequence=start + k + 1,
            base_size=size,
            base_root=state.root_at(size),
            base_digest=state.digest_at(size),
            new_conditions=[f"site-a/b{start + k}"],
            diff=synthetic_diff(ref, 1, seed=start + k),
        )
        for k in range(n)
    ]


def _apply_all(state, updates, blobs, entries) -> list[float]:
    times = []
    for u in updates:
        blobs[hashlib.sha256(u.diff_bytes).hexdigest()] = u.diff_bytes
        t0 = time.perf_counter()
        state.apply(u.envelope, blobs.get)
        times.append(time.perf_counter() - t0)
        entries.append(u.envelope)
    return times


def accept_cost(sizes: list[int], n_genes: int, n_updates: int) -> list[dict]:
    """Median / p99 accept time per genesis size; the ledgers take turns, 10 updates at a time,
    so that other load on the machine falls on all of them alike."""
    ledgers = []
    for n in sizes:
        _trust, state, entries, blobs, ref, site = _ledger(n, n_genes)
        ledgers.append((n, state, entries, blobs, _updates(state, ref, site, n_updates), []))
    for k in range(0, n_updates, 10):
        for _n, state, entries, blobs, updates, times in ledgers:
            times += _apply_all(state, updates[k : k + 10], blobs, entries)
    out = []
    for n, *_rest, times in ledgers:
        s = sorted(times)
        out.append(
            {
                "genesis_conditions": n,
                "updates": n_updates,
                "accept_ms_p50": round(1000 * statistics.median(s), 3),
                "accept_ms_p99": round(1000 * s[int(0.99 * (len(s) - 1))], 3),
            }
        )
    return out


def restart(n_entries: int, n_genes: int) -> dict:
    from protocols import merkle
    from protocols.bundle import atomic_write
    from protocols.ledger import replay, restore_state, snapshot_state

    trust, state, entries, blobs, ref, site = _ledger(6, n_genes)
    done = 0
    while state.size < n_entries:
        batch = _updates(state, ref, site, min(500, n_entries - state.size), start=done)
        _apply_all(state, batch, blobs, entries)
        done += len(batch)
    leaves = [merkle.leaf_hash(e) for e in entries]
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as tmp:
        # as the coordinator does: encode, write both files atomically (fsynced), read back
        t0 = time.perf_counter()
        meta, tensors = snapshot_state(state)
        atomic_write(Path(tmp) / "t.safetensors", tensors, durable=True)
        atomic_write(Path(tmp) / "m.json", meta, durable=True)
        t_snap = time.perf_counter() - t0
        t0 = time.perf_counter()
        meta_r = (Path(tmp) / "m.json").read_bytes()
        tensors_r = (Path(tmp) / "t.safetensors").read_bytes()
        restored = restore_state(trust, meta_r, tensors_r, leaves)
        t_restore = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = replay(trust, entries, blobs.get)
    t_replay = time.perf_counter() - t0
    assert restored.root() == full.root() and restored.digest == full.digest
    return {
        "entries": state.size,
        "conditions": len(state.conditions),
        "snapshot_bytes": len(meta) + len(tensors),
        "snapshot_write_s": round(t_snap, 3),
        "restart_from_snapshot_s": round(t_restore, 3),
        "restart_full_replay_s": round(t_replay, 3),
    }


def main(argv: list[str] | None = None) -> int:
    from benchmarks._results import machine, save

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--conditions", default="6,20000")
    ap.add_argument("--updates", type=int, default=200)
    ap.add_argument("--restart-entries", type=int, default=10000)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "ledger_accept.json"
    )
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    accepts = accept_cost([int(x) for x in args.conditions.split(",")], args.genes, args.updates)
    for r in accepts:
        print(
            f"{r['genesis_conditions']:>6} conditions: accept p50 {r['accept_ms_p50']:.2f} ms, "
            f"p99 {r['accept_ms_p99']:.2f} ms"
        )
    ratio = accepts[-1]["accept_ms_p50"] / accepts[0]["accept_ms_p50"]
    print(f"accept p50, largest / smallest ledger: {ratio:.2f} (target <= 1.20)")
    rs = restart(args.restart_entries, args.genes) if args.restart_entries else None
    if rs:
        print(
            f"restart at {rs['entries']} entries ({rs['conditions']} conditions): from snapshot "
            f"{rs['restart_from_snapshot_s']:.2f} s, full replay {rs['restart_full_replay_s']:.2f} s "
            f"(snapshot {rs['snapshot_bytes'] / 2**20:.0f} MiB written in {rs['snapshot_write_s']:.2f} s)"
        )
    doc = {
        "benchmark": "ledger accept cost vs ledger size; restart from snapshot vs full replay",
        "model": {
            "genes": args.genes,
            "hidden": [128, 128],
            "latent": 10,
            "conditions_per_update": 1,
        },
        "machine": machine(load_before),
        "targets": {"accept_ratio_max": 1.2, "restart_from_snapshot_s": 2.0},
        "accept": accepts,
        "accept_p50_ratio": round(ratio, 3),
        "restart": rs,
    }
    save(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
