"""16 sites x 20 updates, all at once, over TLS: all accepted, no duplicates, exact tree size."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from coordinator.admin import serve
from protocols.registry_client import RegistryClient
from tests.coordinator.conftest import fetch_base, make_consortium, make_site_update, verify_ledger

pytestmark = pytest.mark.network

N_SITES = 16
PER_SITE = 20


def test_concurrent_submitters(tmp_path: Path) -> None:
    cons = make_consortium(tmp_path, sites=tuple(f"site-{i:02d}" for i in range(N_SITES)))
    ready, stop = threading.Event(), threading.Event()
    t = threading.Thread(
        target=serve,
        args=(cons.state,),
        kwargs={"listen": "127.0.0.1:0", "ready": ready, "stop": stop},
        daemon=True,
    )
    t.start()
    try:
        assert ready.wait(30)
        import json

        addr = json.loads((cons.state / "serve.json").read_text())["address"]
        with RegistryClient(addr, trust=cons.trust, timeout=60) as c:
            base = fetch_base(c, cons)
        size0 = base[0]
        # Build every update first (signing is the sites' cost, not the coordinator's).
        updates = {
            sid: [make_site_update(site, base, seed=k) for k in range(PER_SITE)]
            for sid, site in cons.sites.items()
        }
        receipts: dict[str, list] = {sid: [] for sid in updates}
        errors: list[str] = []
        start = threading.Barrier(N_SITES)

        def run(sid: str) -> None:
            with RegistryClient(addr, trust=cons.trust, timeout=60) as client:
                start.wait(30)
                for u in updates[sid]:
                    res = client.submit_update(u.envelope, u.diff_bytes)
                    if res.rejection is not None:
                        errors.append(f"{sid}: {res.rejection}")
                        return
                    receipts[sid].append(res.receipt)

        threads = [threading.Thread(target=run, args=(sid,)) for sid in updates]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        elapsed = time.monotonic() - t0
        assert not errors, errors[:3]
        indices = [r.leaf_index for rs in receipts.values() for r in rs]
        assert len(indices) == N_SITES * PER_SITE
        assert sorted(indices) == list(range(size0, size0 + N_SITES * PER_SITE))  # no duplicates
        assert not any(r.duplicate for rs in receipts.values() for r in rs)
        # Per site, the log order is the submission order (sequence numbers increase).
        for rs in receipts.values():
            assert [r.leaf_index for r in rs] == sorted(r.leaf_index for r in rs)
        with RegistryClient(addr, trust=cons.trust, timeout=60) as c:
            assert verify_ledger(c, cons) == size0 + N_SITES * PER_SITE
            ref = c.get_reference()
            assert ref.header.tree_size == size0 + N_SITES * PER_SITE
        print(f"{N_SITES * PER_SITE} updates in {elapsed:.1f} s")
    finally:
        stop.set()
        t.join(30)
