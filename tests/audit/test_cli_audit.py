"""The auditor's command line: audit, reports, JSON, ledger show, witness mode, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.gen_ledger import GeneratedLedger
from protocols.audit import AUDIT_EXIT_CODES
from scarches_fl_cli.main import main
from tests.audit.conftest import N_SITES, small_ledger


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_audit_verifies_and_writes_reports(
    ledger: GeneratedLedger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["audit", "--ledger", str(ledger.state_dir), "--trust", str(ledger.trust_path),
            "--state", str(tmp_path / "aud")]
    for ext in ("md", "html", "json"):
        rc, out, _ = run(base + ["--report", str(tmp_path / f"report.{ext}")], capsys)
        assert rc == 0, out
        assert out.strip().splitlines()[-1].startswith("VERIFIED")
    md = (tmp_path / "report.md").read_text()
    assert "## Sites" in md and "## History" in md and "site001" in md
    assert md.count("| site_update |") == len(ledger.update_indices)
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "site002" in html
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["verdict"] == "verified" and doc["tree_size"] == ledger.size
    rc, out, _ = run(base + ["--json"], capsys)
    assert rc == 0 and json.loads(out)["exit_code"] == 0
    # without the served model the verdict says so instead of printing "served model -"
    rc, out, _ = run(base + ["--no-served"], capsys)
    assert rc == 0 and "served model not checked" in out and "served model -" not in out
    rc, out, err = run(["-q", *base, "--json", "--report", str(tmp_path / "q.json")], capsys)
    assert rc == 0 and json.loads(out)["exit_code"] == 0 and err == ""
    rc, _, err = run(base + ["--report", str(tmp_path / "report.pdf")], capsys)
    assert rc == 2 and "html" in err


def test_audit_failure_exit_code_and_first_entry(
    ledger: GeneratedLedger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    k = ledger.update_indices[1]
    import sqlite3

    conn = sqlite3.connect(ledger.state_dir / "ledger.sqlite", isolation_level=None)
    (sha,) = conn.execute("SELECT sha256 FROM entry_blobs WHERE idx = ?", (k,)).fetchone()
    conn.close()
    (ledger.state_dir / "blobs" / sha[7:9] / sha[7:]).unlink()
    rc, out, _ = run(["audit", "--ledger", str(ledger.state_dir), "--trust",
                      str(ledger.trust_path), "--state", str(tmp_path / "aud"), "--json"], capsys)
    doc = json.loads(out)
    assert rc == AUDIT_EXIT_CODES["BLOB"].code == doc["exit_code"]
    assert doc["first_failing_entry"] == k and doc["failure_class"] == "BLOB"
    assert doc["findings"][0]["reason_code"] == "E_BLOB_MISSING"


def test_ledger_show_filters(
    ledger: GeneratedLedger, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["ledger", "show", "--ledger", str(ledger.state_dir), "--trust", str(ledger.trust_path)]
    rc, out, _ = run(base + ["--json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and len(rows) == ledger.size
    assert rows[0]["kind"] == "genesis"
    rc, out, _ = run(base + ["--json", "--site", "site002", "--kind", "site_update"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == len(ledger.update_indices) // N_SITES
    assert all(r["site_id"] == "site002" and r["diff_sha256"].startswith("sha256:") for r in rows)
    assert all(r["diff_size"] > 0 and r["tensors"]["decoder.W_s"] == [8, 1] for r in rows)
    rc, out, _ = run(base + ["--since", "2000-01-01", "--until", "2999-01-01T00:00Z"], capsys)
    assert rc == 0 and f"{ledger.size} of {ledger.size} entries shown" in out
    assert "conditions: site000/batch000000" in out
    rc, out, _ = run(base + ["--until", "2000-01-01"], capsys)
    assert f"0 of {ledger.size} entries shown" in out
    # JSON lines: nothing matched means no line on stdout, and the count on stderr
    rc, out, err = run(base + ["--json", "--until", "2000-01-01"], capsys)
    assert rc == 0 and out == "" and f"0 of {ledger.size} entries shown" in err
    rc, _, err = run(base + ["--since", "yesterday"], capsys)
    assert rc == 2 and "ISO 8601" in err


def test_exit_codes_command(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["audit", "exit-codes", "--json"], capsys)
    doc = json.loads(out)
    assert rc == 0 and doc["LOG_FORK"]["code"] == 12
    codes = [c.code for c in AUDIT_EXIT_CODES.values()]
    assert len(codes) == len(set(codes))


def test_witness_mode(tmp_path: Path, pristine: GeneratedLedger, capsys: pytest.CaptureFixture[str]) -> None:
    from protocols.checkpoint import verify_cosigned_checkpoint

    rc, out, _ = run(["audit", "witness-keygen", "--out", str(tmp_path / "w"), "--name",
                      "auditor.example"], capsys)
    assert rc == 0
    key = tmp_path / "w" / "witness.key"
    assert key.stat().st_mode & 0o777 == 0o600
    vkey = (tmp_path / "w" / "witness.vkey").read_text().strip()
    led = small_ledger(tmp_path / "led", keys=pristine.keys, witness_keys=[vkey],
                       witnesses_required=1)
    base = ["audit", "--ledger", str(led.state_dir), "--trust", str(led.trust_path),
            "--state", str(tmp_path / "aud")]
    # the trust policy requires one witness: nobody cosigned yet
    rc, out, _ = run(base, capsys)
    assert rc == AUDIT_EXIT_CODES["WITNESS_QUORUM"].code, out
    # the auditor verifies and cosigns (offline: the cosigned note is kept in its state)
    rc, out, _ = run(base + ["--witness-key", str(key)], capsys)
    assert "cosigned by this auditor as auditor.example" in out
    note = (tmp_path / "aud" / "cosigned.note").read_bytes()
    trust = json.loads(led.trust_path.read_text())
    cp = verify_cosigned_checkpoint(note, origin=trust["origin"],
                                    log_verifier=trust["log_public_key"], witnesses=[vkey],
                                    threshold=1).checkpoint
    assert cp.size == led.size
    # the coordinator stores the cosignature (what AddCosignature does), and the quorum is met
    import sqlite3

    from protocols.checkpoint import parse_note

    lines = [s.line for s in parse_note(note).signatures if s.name == "auditor.example"]
    conn = sqlite3.connect(led.state_dir / "ledger.sqlite", isolation_level=None)
    conn.executemany("INSERT INTO cosignatures(size, line, created_at) VALUES (?, ?, 0)",
                     [(led.size, ln.rstrip("\n")) for ln in lines])
    conn.close()
    rc, out, _ = run(base, capsys)
    assert rc == 0, out
    assert "witness cosignatures: 1 (auditor.example); required 1" in out
