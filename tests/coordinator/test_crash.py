"""kill -9 the coordinator (a real subprocess) at random points while sites submit, restart,
repeat: every acknowledged update is present, nothing is half there, and the log verifies."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from protocols.registry_client import RegistryClient, RegistryError
from tests.coordinator.conftest import (
    fetch_base,
    make_consortium,
    make_site_update,
    verify_ledger,
    verify_receipt,
)

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 10
SITES = ("site-a", "site-b", "site-c", "site-d")


def _start(state: Path, log: Path) -> tuple[subprocess.Popen, str]:
    (state / "serve.json").unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scarches_fl_cli",
            "coordinator",
            "serve",
            "--dir",
            str(state),
            "--listen",
            "127.0.0.1:0",
        ],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rec_path = state / "serve.json"
        if rec_path.exists():
            try:
                rec = json.loads(rec_path.read_text())
            except ValueError:
                rec = {}
            if rec.get("pid") == proc.pid:
                return proc, rec["address"]
        if proc.poll() is not None:
            raise AssertionError(
                f"coordinator exited with {proc.returncode}: {log.read_text()[-2000:]}"
            )
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("coordinator did not start in 60 s")


def test_kill_9_during_submissions(tmp_path: Path) -> None:
    rng = random.Random(1234)
    cons = make_consortium(tmp_path, sites=SITES)
    log = tmp_path / "serve.log"
    acked: dict[bytes, tuple[object, object]] = {}  # envelope -> (update, receipt)
    in_doubt: dict[str, object] = {}  # site -> update sent but not answered
    base = None
    proc = None
    try:
        for round_no in range(ROUNDS):
            proc, addr = _start(cons.state, log)
            with RegistryClient(addr, trust=cons.trust, timeout=20, retries=0) as c:
                if base is None:
                    base = fetch_base(c, cons)
                # After a restart: every acknowledged update is there, at its index.
                entries = c.get_entries()
                for env, (_u, receipt) in acked.items():
                    assert entries[receipt.leaf_index].envelope == env
                # An update in doubt is either fully there or absent; resubmitting it gives the
                # receipt (original if it was committed) -- never a second entry.
                logged = {e.envelope for e in entries}
                for sid, u in list(in_doubt.items()):
                    res = c.submit_update(u.envelope, u.diff_bytes)
                    receipt = res.raise_for_rejection()
                    assert receipt.duplicate == (u.envelope in logged)
                    acked[u.envelope] = (u, receipt)
                    del in_doubt[sid]
                verify_ledger(c, cons)

            stop_at = time.monotonic() + rng.uniform(0.1, 0.5)
            lock = threading.Lock()

            def submitter(sid: str, addr: str, base, round_no: int, lock: threading.Lock) -> None:
                site = cons.sites[sid]
                with RegistryClient(addr, trust=cons.trust, timeout=10, retries=0) as client:
                    while True:
                        u = make_site_update(site, base, seed=round_no)
                        with lock:
                            in_doubt[sid] = u
                        try:
                            res = client.submit_update(u.envelope, u.diff_bytes)
                        except RegistryError:
                            return  # the server died under us: stays in doubt
                        receipt = res.raise_for_rejection()
                        with lock:
                            acked[u.envelope] = (u, receipt)
                            del in_doubt[sid]

            threads = [
                threading.Thread(
                    target=submitter, args=(sid, addr, base, round_no, lock), daemon=True
                )
                for sid in SITES
            ]
            for th in threads:
                th.start()
            time.sleep(max(0.0, stop_at - time.monotonic()))
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            for th in threads:
                th.join(30)

        proc, addr = _start(cons.state, log)
        with RegistryClient(addr, trust=cons.trust, timeout=20, retries=0) as c:
            entries = c.get_entries()
            for env, (_u, receipt) in acked.items():
                assert entries[receipt.leaf_index].envelope == env
                verify_receipt(receipt, env, cons)
            for u in in_doubt.values():
                res = c.submit_update(u.envelope, u.diff_bytes)
                acked[u.envelope] = (u, res.raise_for_rejection())
            size = verify_ledger(c, cons)
            entries = c.get_entries()
            envs = [e.envelope for e in entries]
            assert len(envs) == len(set(envs))  # nothing twice
            for e in entries:
                for b in e.blobs:  # every blob an entry names is whole
                    assert len(c.get_blob(b.sha256)) == b.size
            site_updates = [e for e in entries if e.kind == "site_update"]
            assert len(site_updates) == len(
                acked
            )  # everything logged was (eventually) acknowledged
            assert size == 1 + len(SITES) + len(acked)
            assert len(acked) >= ROUNDS  # the test did submit under fire
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)
