"""Hardening figures: crafted envelopes, a forger draining another site, and a gRPC fuzzer.

    python benchmarks/bench_attacks.py [--forger-rate 1000] [--forger-seconds 60]
                                       [--fuzz-per-handler 300] [--genes 200] [--versions 40]
                                       [--out benchmarks/results/attacks.json]

Against ``python -m scarches_fl_cli coordinator serve`` in its own process (TLS on, durable writes, default rate
limit: burst 60, 30/s), on loopback, with a fresh state of a synthetic reference and two enrolled
sites (site-00, site-01):

1. crafted ``SubmitUpdate`` envelopes (``b'{{{{{"' + b'\\\\"' * n``, 64 KiB and 1 MiB, the issue's
   stall) while a second client calls ``Health`` every 10 ms: the slowest answer of each;
2. a forger at ``--forger-rate`` requests/s for ``--forger-seconds`` claiming site-01 (an
   unenrolled key; site-01's own key id with a broken signature; 5,000 junk site ids; every diff
   mismatched), while site-01 submits a real update every 10 s: its answers and latencies, the
   forger's status counts, and the server's resident memory every 5 s;
3. reference versions: the current one fetched every 50 ms while another client asks for random
   old versions (``--versions`` of them, more than the disk cache holds);
4. the seeded structured fuzzer of ``tests/coordinator/_grpc_fuzz.py`` over every handler:
   the count of each status code and the slowest request (the issue's full run is
   ``--fuzz-per-handler 100000``).
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KiB = 1024


def _crafted(size: int) -> bytes:
    from tests.protocols._crafted import crafted_envelope

    return crafted_envelope("escaped_quotes", size)


def _health_probe(stub, pb, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        stub.Health(pb.HealthRequest(), timeout=10)
        out.append(time.perf_counter() - t0)
        stop.wait(0.01)


def crafted_envelopes(stub, pb, repeat: int) -> list[dict]:
    rows = []
    for size in (64 * KiB, 1024 * KiB):
        env = _crafted(size)
        health: list[float] = []
        stop = threading.Event()
        probe = threading.Thread(target=_health_probe, args=(stub, pb, stop, health))
        probe.start()
        submit: list[float] = []
        codes = Counter()
        try:
            time.sleep(0.1)
            for _ in range(repeat):
                t0 = time.perf_counter()
                res = stub.SubmitUpdate(pb.SubmitUpdateRequest(envelope=env, diff=b""), timeout=30)
                submit.append(time.perf_counter() - t0)
                codes[res.rejection.reason_code] += 1
            time.sleep(0.1)
        finally:
            stop.set()
            probe.join(30)
        row = {
            "envelope_bytes": len(env),
            "submissions": repeat,
            "answers": dict(codes),
            "submit_ms_max": round(1000 * max(submit), 2),
            "submit_ms_median": round(1000 * statistics.median(submit), 2),
            "health_calls": len(health),
            "health_ms_max": round(1000 * max(health), 2),
        }
        print(
            f"crafted envelope {len(env):>8} B: answered {dict(codes)} in max "
            f"{row['submit_ms_max']} ms (median {row['submit_ms_median']} ms); "
            f"Health meanwhile max {row['health_ms_max']} ms over {len(health)} calls"
        )
        rows.append(row)
    return rows


def _forgeries(victim: str, victim_update, base, ref, origin: str, n_junk: int) -> list[bytes]:
    from protocols.canonical import canonical_json
    from protocols.keys import generate_private_key
    from protocols.update import make_update
    from tests.coordinator.synth import synthetic_diff

    mallory = generate_private_key()
    size, root = base
    out = []
    for i in range(20):  # an unenrolled key claiming the victim
        out.append(
            make_update(
                origin=origin,
                site_id=victim,
                site_key=mallory,
                sequence=1000 + i,
                base_size=size,
                base_root=root,
                base_digest=ref.digest,
                new_conditions=[f"{victim}/forged{i}"],
                diff=synthetic_diff(ref, 1, seed=i),
            ).envelope
        )
    env = json.loads(victim_update.envelope)  # the victim's key id, a broken signature
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[0] ^= 1
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    out.append(canonical_json(env))
    env = json.loads(out[0])  # junk site ids
    payload = json.loads(base64.b64decode(env["payload"]))
    for i in range(n_junk):
        payload["site_id"] = f"junk-{i}"
        env["payload"] = base64.b64encode(canonical_json(payload)).decode()
        out.append(canonical_json(env))
    return out


def forger(
    stub,
    pb,
    server_pid: int,
    victim: str,
    victim_key,
    base,
    ref,
    origin: str,
    rate: float,
    seconds: float,
) -> dict:
    import grpc
    import psutil

    from protocols.update import make_update
    from tests.coordinator.synth import synthetic_diff

    size, root = base
    seq = [0]

    def victim_update():
        seq[0] += 1
        return make_update(
            origin=origin,
            site_id=victim,
            site_key=victim_key,
            sequence=seq[0],
            base_size=size,
            base_root=root,
            base_digest=ref.digest,
            new_conditions=[f"{victim}/real{seq[0]}"],
            diff=synthetic_diff(ref, 1, seed=seq[0]),
        )

    template = victim_update()
    seq[0] = 0
    pool = _forgeries(victim, template, base, ref, origin, n_junk=5000)
    bad_diff = template.diff_bytes[:-1] + b"\x00"
    # interleaved: the victim's key id with a broken signature, an unenrolled key claiming the
    # victim, and junk site ids, one after the other
    mallory, flipped, junk = pool[:20], pool[20], pool[21:]
    order = [
        (flipped, mallory[k % len(mallory)], junk[k % len(junk)], junk[(k + 1) % len(junk)])[k % 4]
        for k in range(2 * len(junk))
    ]
    requests = [pb.SubmitUpdateRequest(envelope=e, diff=bad_diff) for e in order]
    proc = psutil.Process(server_pid)
    codes: Counter = Counter()
    lock = threading.Lock()
    inflight = threading.Semaphore(256)
    stop = threading.Event()
    victim_rows: list[dict] = []
    memory: list[dict] = []

    def done(fut) -> None:
        try:
            res = fut.result()
            code = res.rejection.reason_code if res.HasField("rejection") else "accepted"
        except grpc.RpcError as exc:  # a transport status, counted by name
            code = exc.code().name
        with lock:
            codes[code] += 1
        inflight.release()

    def victim_loop() -> None:
        while not stop.wait(10.0):
            u = victim_update()
            t0 = time.perf_counter()
            res = stub.SubmitUpdate(
                pb.SubmitUpdateRequest(envelope=u.envelope, diff=u.diff_bytes), timeout=30
            )
            dt = time.perf_counter() - t0
            ok = not res.HasField("rejection")
            victim_rows.append(
                {
                    "t_s": round(time.perf_counter() - t_start, 1),
                    "accepted": ok,
                    "code": None if ok else res.rejection.reason_code,
                    "ms": round(1000 * dt, 2),
                }
            )
            print(
                f"  t={victim_rows[-1]['t_s']:5.1f} s {victim}'s own update: "
                f"{'accepted' if ok else res.rejection.reason_code} in {1000 * dt:.1f} ms"
            )

    def memory_loop() -> None:
        while True:
            memory.append(
                {
                    "t_s": round(time.perf_counter() - t_start, 1),
                    "rss_mib": round(proc.memory_info().rss / 2**20, 1),
                }
            )
            if stop.wait(5.0):
                return

    t_start = time.perf_counter()
    threads = [threading.Thread(target=victim_loop), threading.Thread(target=memory_loop)]
    for t in threads:
        t.start()
    sent = 0
    try:
        while (now := time.perf_counter() - t_start) < seconds:
            due = int(now * rate)
            while sent < due:
                if not inflight.acquire(timeout=5):
                    break
                fut = stub.SubmitUpdate.future(requests[sent % len(requests)], timeout=10)
                fut.add_done_callback(done)
                sent += 1
            time.sleep(0.001)
    finally:
        wall = time.perf_counter() - t_start
        for _ in range(256):
            inflight.acquire(timeout=30)
        stop.set()
        for t in threads:
            t.join(60)
    # after the attack: at once
    u = victim_update()
    t0 = time.perf_counter()
    res = stub.SubmitUpdate(
        pb.SubmitUpdateRequest(envelope=u.envelope, diff=u.diff_bytes), timeout=30
    )
    after_ok = not res.HasField("rejection")
    after_ms = round(1000 * (time.perf_counter() - t0), 2)
    rss = [m["rss_mib"] for m in memory]
    out = {
        "victim": victim,
        "target_rate_per_s": rate,
        "seconds": round(wall, 1),
        "forged_sent": sent,
        "forged_answered_per_s": round(sum(codes.values()) / wall, 1),
        "forged_answers": dict(codes),
        "victim_during": victim_rows,
        "victim_after": {
            "accepted": after_ok,
            "ms": after_ms,
            "code": None if after_ok else res.rejection.reason_code,
        },
        "server_rss_mib": memory,
        "server_rss_mib_first_last_max": [rss[0], rss[-1], max(rss)] if rss else [],
    }
    print(
        f"forger: {sent} sent in {wall:.1f} s ({out['forged_answered_per_s']}/s answered), "
        f"answers {dict(codes)}; {victim} accepted during: "
        f"{sum(r['accepted'] for r in victim_rows)}/{len(victim_rows)}, after: "
        f"{'accepted' if after_ok else out['victim_after']['code']} in {after_ms} ms; "
        f"server RSS MiB first/last/max {out['server_rss_mib_first_last_max']}"
    )
    return out


def fuzz_all(stub, client_for_ctx, per_handler: int, seed: int) -> dict:
    from tests.coordinator._grpc_fuzz import fuzz

    t0 = time.perf_counter()
    results = fuzz(stub, client_for_ctx, per_handler=per_handler, seed=seed)
    wall = time.perf_counter() - t0
    out = {}
    for name, res in results.items():
        out[name] = {
            "requests": res.requests,
            "statuses": dict(res.statuses),
            "max_ms": round(1000 * res.max_s, 2),
            "bad": res.bad,
        }
        print(
            f"fuzz {name:<20} {res.requests:>7} requests  max {1000 * res.max_s:8.1f} ms  "
            f"{dict(sorted(res.statuses.items()))}"
        )
    total = sum(r["requests"] for r in out.values())
    internal = sum(r["statuses"].get(s, 0) for r in out.values() for s in ("INTERNAL", "UNKNOWN"))
    print(
        f"fuzz total: {total} requests in {wall:.0f} s, INTERNAL/UNKNOWN: {internal}, "
        f"slowest {max(r['max_ms'] for r in out.values())} ms"
    )
    return {
        "per_handler": per_handler,
        "seed": seed,
        "wall_s": round(wall, 1),
        "internal_or_unknown": internal,
        "handlers": out,
    }


def reference_fetch(client, stub, pb, make, n_updates: int, seconds: float) -> dict:
    """Grow the log by ``n_updates`` versions, then fetch the current version every 50 ms while
    another client asks for random old versions (each a rebuild once the disk cache of 16 is
    full): the current fetch's latency."""
    import random

    for k in range(n_updates):
        u = make(k)
        client.submit_update(u.envelope, u.diff_bytes).raise_for_rejection()
    size = client.get_checkpoint().size
    stop = threading.Event()
    old_fetches: list[float] = []

    def old_versions() -> None:
        rng = random.Random(0)
        while not stop.is_set():
            t0 = time.perf_counter()
            for _chunk in stub.GetReference(
                pb.GetReferenceRequest(tree_size=rng.randint(1, size - 1)), timeout=60
            ):
                pass
            old_fetches.append(time.perf_counter() - t0)

    def fetch_current() -> float:
        t0 = time.perf_counter()
        for _chunk in stub.GetReference(pb.GetReferenceRequest(tree_size=0), timeout=60):
            pass
        return time.perf_counter() - t0

    fetch_current()  # built once
    quiet = [fetch_current() for _ in range(20)]
    t = threading.Thread(target=old_versions)
    t.start()
    current: list[float] = []
    t_end = time.perf_counter() + seconds
    try:
        while time.perf_counter() < t_end:
            current.append(fetch_current())
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(120)
    out = {
        "versions": size,
        "current_ms_median_quiet": round(1000 * statistics.median(quiet), 2),
        "current_ms_median_under_old": round(1000 * statistics.median(current), 2),
        "current_ms_max_under_old": round(1000 * max(current), 2),
        "current_fetches": len(current),
        "old_fetches": len(old_fetches),
        "old_ms_median": round(1000 * statistics.median(old_fetches), 2) if old_fetches else None,
        "old_ms_max": round(1000 * max(old_fetches), 2) if old_fetches else None,
    }
    print(
        f"reference: current version {out['current_ms_median_quiet']} ms median alone; "
        f"{out['current_ms_median_under_old']} ms median, {out['current_ms_max_under_old']} ms "
        f"max over {len(current)} fetches while {len(old_fetches)} old versions were served "
        f"(median {out['old_ms_median']} ms, max {out['old_ms_max']} ms)"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forger-rate", type=float, default=1000.0)
    ap.add_argument("--forger-seconds", type=float, default=60.0)
    ap.add_argument("--fuzz-per-handler", type=int, default=300)
    ap.add_argument("--crafted-repeat", type=int, default=5)
    ap.add_argument("--genes", type=int, default=200)
    ap.add_argument("--versions", type=int, default=40, help="reference versions to add")
    ap.add_argument("--reference-seconds", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/attacks.json"))
    args = ap.parse_args(argv)

    import yaml

    from benchmarks.bench_coordinator import _setup, _start_server
    from protocols.merkle import leaf_hash
    from protocols.proto import registry_pb2 as pb
    from protocols.registry_client import RegistryClient
    from protocols.update import make_update
    from tests.coordinator._grpc_fuzz import FuzzContext
    from tests.coordinator.synth import synthetic_diff

    with tempfile.TemporaryDirectory(prefix="bench-attacks-") as tmp:
        state, origin, ref, keys, size, root = _setup(Path(tmp), 2, args.genes)
        cfg_path = state / "coordinator.yaml"
        doc = yaml.safe_load(cfg_path.read_text())
        doc.pop("rate_limit", None)  # the default per-site limit (burst 60, 30/s)
        cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        trust = json.loads((state / "trust.json").read_bytes())
        proc, addr = _start_server(state)
        result: dict = {
            "benchmark": "attacks",
            "python": platform.python_version(),
            "machine": platform.machine(),
            "genes": args.genes,
        }
        try:
            with RegistryClient(addr, trust=trust, timeout=60) as client:
                stub = client._stub
                client.health()
                result["crafted_envelopes"] = crafted_envelopes(stub, pb, args.crafted_repeat)
                victim = "site-01"
                result["forger"] = forger(
                    stub,
                    pb,
                    proc.pid,
                    victim,
                    keys[victim],
                    (size, root),
                    ref,
                    origin,
                    args.forger_rate,
                    args.forger_seconds,
                )
                # fuzz context: a logged site-00 update and a valid unsent one
                site = "site-00"
                mk = lambda seq: make_update(  # noqa: E731
                    origin=origin,
                    site_id=site,
                    site_key=keys[site],
                    sequence=seq,
                    base_size=size,
                    base_root=root,
                    base_digest=ref.digest,
                    new_conditions=[f"{site}/f{seq}"],
                    diff=synthetic_diff(ref, 1, seed=seq),
                )
                logged, unsent = mk(1), mk(2)
                client.submit_update(logged.envelope, logged.diff_bytes).raise_for_rejection()
                cp = client.get_checkpoint()
                entries = client.get_entries(0, cp.size)
                ctx = FuzzContext(
                    size=cp.size,
                    envelope=unsent.envelope,
                    diff=unsent.diff_bytes,
                    note=cp.signed_note,
                    leaf_hash=leaf_hash(logged.envelope),
                    blob_name=next(b.sha256 for e in entries for b in e.blobs),
                    site_id=site,
                )
                result["reference_fetch"] = reference_fetch(
                    client, stub, pb, lambda k: mk(3 + k), args.versions, args.reference_seconds
                )
                result["fuzz"] = fuzz_all(stub, ctx, args.fuzz_per_handler, args.seed)
        finally:
            proc.terminate()
            proc.wait(30)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
