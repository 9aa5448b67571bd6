"""The online audit against C's real registry server on loopback (TLS on), with updates accepted
by the coordinator's own pipeline, and witness cosignatures stored through AddCosignature."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocols.audit import AUDIT_EXIT_CODES
from scarches_fl_cli.main import main
from tests.coordinator.conftest import (  # noqa: F401 - pytest fixtures
    Consortium,
    RunningServer,
    consortium,
    fetch_base,
    make_site_update,
    server,
)

pytestmark = pytest.mark.network


def _submit_updates(consortium: Consortium, server: RunningServer) -> None:  # noqa: F811
    with server.client(consortium) as client:
        for round_ in range(2):
            base = fetch_base(client, consortium)
            for site in consortium.sites.values():
                up = make_site_update(site, base, seed=round_)
                result = client.submit_update(up.envelope, up.diff_bytes)
                assert result.receipt is not None, result.rejection


def test_online_audit_and_witness(
    consortium: Consortium, server: RunningServer, tmp_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    from protocols.checkpoint import verify_cosigned_checkpoint

    _submit_updates(consortium, server)
    base = ["audit", "--coordinator", server.address, "--trust", str(consortium.trust_path),
            "--state", str(tmp_path / "aud")]
    rc = main(base + ["--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0, doc["findings"]
    assert doc["kinds"] == {"genesis": 1, "policy": 2, "site_update": 4}
    assert doc["served_digest"] == doc["replay_digest"]

    assert main(["audit", "witness-keygen", "--out", str(tmp_path / "w"), "--name",
                 "auditor.test"]) == 0
    capsys.readouterr()
    rc = main(base + ["--witness-key", str(tmp_path / "w" / "witness.key")])
    out = capsys.readouterr().out
    assert rc == 0 and "cosigned by this auditor as auditor.test" in out
    vkey = (tmp_path / "w" / "witness.vkey").read_text().strip()
    with server.client(consortium) as client:
        size, note = client.get_cosignatures(0)
    trust = consortium.trust
    cp = verify_cosigned_checkpoint(note, origin=trust["origin"],
                                    log_verifier=trust["log_public_key"], witnesses=[vkey],
                                    threshold=1).checkpoint
    assert cp.size == size == doc["tree_size"]

    rc = main(["ledger", "show", "--coordinator", server.address, "--trust",
               str(consortium.trust_path), "--kind", "site_update", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and len(rows) == 4
    assert {r["site_id"] for r in rows} == set(consortium.sites)


def test_online_then_rollback_detected(
    consortium: Consortium, server: RunningServer, tmp_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An auditor that verified the live log, then audits a coordinator restored from an older
    backup (one entry short, its checkpoints validly signed), reports a rollback."""
    state = tmp_path / "aud"
    _submit_updates(consortium, server)
    assert main(["audit", "--coordinator", server.address, "--trust",
                 str(consortium.trust_path), "--state", str(state)]) == 0
    capsys.readouterr()
    rc = main(["audit", "--ledger", str(_lagging_copy(consortium, tmp_path)), "--trust",
               str(consortium.trust_path), "--state", str(state), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == AUDIT_EXIT_CODES["LOG_FORK"].code, doc["findings"]
    assert "rollback" in doc["findings"][0]["message"]


def _lagging_copy(consortium: Consortium, tmp_path: Path) -> Path:  # noqa: F811
    """A copy of the state directory with the newest entry and checkpoint removed (what a
    coordinator restored from an old backup would serve)."""
    import shutil
    import sqlite3

    dst = tmp_path / "lagging"
    shutil.copytree(consortium.state, dst)
    conn = sqlite3.connect(dst / "ledger.sqlite", isolation_level=None)
    (last,) = conn.execute("SELECT MAX(idx) FROM entries").fetchone()
    conn.execute("DELETE FROM entry_blobs WHERE idx = ?", (last,))
    conn.execute("DELETE FROM entries WHERE idx = ?", (last,))
    conn.execute("DELETE FROM cosignatures WHERE size = ?", (last + 1,))
    conn.execute("DELETE FROM checkpoints WHERE size = ?", (last + 1,))
    conn.close()
    return dst
