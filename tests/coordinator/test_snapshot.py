"""The coordinator's snapshot of the replayed state: a restart from it equals the full replay,
and a corrupt, stale or forked snapshot is noticed and replaced by the full replay."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from coordinator import ledger
from coordinator.config import load_config
from coordinator.service import Registry
from protocols.ledger import LedgerState
from tests.coordinator.conftest import fetch_base, make_consortium, make_site_update, running_server
from tests.protocols._factories import assert_same_state

pytestmark = pytest.mark.network


def _grown(tmp_path: Path, n: int = 4):
    cons = make_consortium(tmp_path, sites=("site-a", "site-b"))
    with running_server(cons.state) as server, server.client(cons) as c:
        base = fetch_base(c, cons)
        for i in range(n):
            site = cons.sites[("site-a", "site-b")[i % 2]]
            u = make_site_update(site, base, m=1 + i % 2)
            assert c.submit_update(u.envelope, u.diff_bytes).rejection is None
    return cons  # the server's close wrote the snapshot


def _full_replay(cfg) -> LedgerState:
    snap = cfg.path(cfg.paths.snapshot) / ledger.SNAPSHOT_META
    saved = snap.read_bytes()
    snap.unlink()
    try:
        with Registry(cfg) as reg:
            return reg.state
    finally:
        snap.write_bytes(saved)


def test_restart_from_the_snapshot_equals_the_full_replay(tmp_path: Path, caplog) -> None:
    cons = _grown(tmp_path)
    cfg = load_config(cons.state)
    meta = json.loads((cfg.path(cfg.paths.snapshot) / ledger.SNAPSHOT_META).read_bytes())
    with caplog.at_level(logging.WARNING), Registry(cfg) as reg:
        assert meta["body"]["tree_size"] == reg.state.size  # written at shutdown, nothing after
        assert_same_state(reg.state, _full_replay(cfg))
    assert "not used" not in caplog.text


@pytest.mark.parametrize(
    "attack", ["corrupt_tensors", "edited_json", "stale_fork", "missing_tensors"]
)
def test_bad_snapshot_falls_back_to_the_full_replay(tmp_path: Path, caplog, attack: str) -> None:
    cons = _grown(tmp_path)
    cfg = load_config(cons.state)
    d = cfg.path(cfg.paths.snapshot)
    meta_path = d / ledger.SNAPSHOT_META
    (tensors_path,) = d.glob("ledger-state-*.safetensors")
    if attack == "corrupt_tensors":
        data = bytearray(tensors_path.read_bytes())
        data[-5] ^= 0x40
        tensors_path.write_bytes(bytes(data))
    elif attack == "edited_json":
        meta_path.write_bytes(
            meta_path.read_bytes().replace(b'"min_base_size":1', b'"min_base_size":2')
        )
    elif attack == "stale_fork":  # a snapshot whose recorded root is not this log's
        doc = json.loads(meta_path.read_bytes())
        doc["body"]["root"] = "00" * 32
        import hashlib

        from protocols.canonical import canonical_json

        doc["sha256"] = hashlib.sha256(canonical_json(doc["body"])).hexdigest()
        meta_path.write_bytes(canonical_json(doc))
    else:
        tensors_path.unlink()
    with caplog.at_level(logging.WARNING), Registry(cfg) as reg:
        assert "replaying the whole log" in caplog.text
        restored = reg.state
    meta_path.unlink(missing_ok=True)
    with Registry(cfg) as reg:
        assert_same_state(restored, reg.state)
