"""Every tamper fixture is detected with the right failure class and names the right entry."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from benchmarks.gen_ledger import GeneratedLedger
from protocols._audit_sources import StateDirSource
from protocols.audit import AUDIT_EXIT_CODES, AuditResult, load_trust_file, run_audit
from tests.audit.conftest import N_SITES, small_ledger


def audit(led: GeneratedLedger, state: Path, **kw: object) -> AuditResult:
    src = StateDirSource(led.state_dir)
    try:
        return run_audit(src, load_trust_file(led.trust_path), state_dir=state, **kw)  # type: ignore[arg-type]
    finally:
        src.close()


def assert_failure(res: AuditResult, cls: str, entry: int | None) -> None:
    first = res.first_failure
    assert first is not None, "the audit verified a tampered ledger"
    assert (first.failure_class, first.entry_index) == (cls, entry), res.findings
    assert res.exit_code == AUDIT_EXIT_CODES[cls].code


def db(led: GeneratedLedger) -> sqlite3.Connection:
    return sqlite3.connect(led.state_dir / "ledger.sqlite", isolation_level=None)


def test_untouched_ledger_verifies(ledger: GeneratedLedger, tmp_path: Path) -> None:
    res = audit(ledger, tmp_path / "aud")
    assert res.ok, res.findings
    assert res.exit_code == 0
    assert res.tree_size == ledger.size
    assert res.served_digest == res.replay_digest == ledger.served_digest
    assert {s.site_id for s in res.sites} == {f"site{i:03d}" for i in range(N_SITES)}
    assert sum(s.updates for s in res.sites) == len(ledger.update_indices)
    assert (tmp_path / "aud" / "checkpoint.note").is_file()
    assert len((tmp_path / "aud" / "leaves.bin").read_bytes()) == 32 * ledger.size
    # a second audit is consistent with the stored checkpoint
    again = audit(ledger, tmp_path / "aud")
    assert again.ok and again.previous_checkpoint_size == ledger.size


def test_federated_round_replaces_the_model(tmp_path: Path, pristine: GeneratedLedger) -> None:
    led = small_ledger(tmp_path / "fed", keys=pristine.keys, federated_round_at=5)
    res = audit(led, tmp_path / "aud")
    assert res.ok, res.findings
    assert res.kind_counts["federated_round"] == 1
    assert res.served_digest == led.served_digest


def test_update_on_a_base_digest_that_is_not_the_replay(
    tmp_path: Path, pristine: GeneratedLedger
) -> None:
    led = small_ledger(tmp_path / "digest", keys=pristine.keys, wrong_base_digest_at=7)
    res = audit(led, tmp_path / "aud")
    assert_failure(res, "REPLAY_MISMATCH", led.update_indices[7])
    assert res.findings[0].reason_code == "E_BASE_DIGEST_MISMATCH"


def test_replayed_sequence_number(tmp_path: Path, pristine: GeneratedLedger) -> None:
    led = small_ledger(tmp_path / "seq", keys=pristine.keys, replayed_sequence_at=6)
    res = audit(led, tmp_path / "aud")
    assert_failure(res, "LEDGER_RULES", led.update_indices[6])
    assert res.findings[0].reason_code == "E_SEQUENCE_REPLAY"


def test_flipped_byte_in_diff_blob(ledger: GeneratedLedger, tmp_path: Path) -> None:
    k = ledger.update_indices[5]
    (sha,) = db(ledger).execute(
        "SELECT sha256 FROM entry_blobs WHERE idx = ? AND role = 'diff'", (k,)
    ).fetchone()
    path = ledger.state_dir / "blobs" / sha[7:9] / sha[7:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    res = audit(ledger, tmp_path / "aud")
    assert_failure(res, "BLOB", k)
    assert res.findings[0].reason_code == "E_BLOB_MISMATCH"


def _renumber(conn: sqlite3.Connection, old: int, new: int) -> None:
    conn.execute("UPDATE entries SET idx = ? WHERE idx = ?", (new, old))
    conn.execute("UPDATE entry_blobs SET idx = ? WHERE idx = ?", (new, old))


def test_entry_deleted_from_the_middle(ledger: GeneratedLedger, tmp_path: Path) -> None:
    k = ledger.update_indices[6]
    conn = db(ledger)
    conn.execute("DELETE FROM entry_blobs WHERE idx = ?", (k,))
    conn.execute("DELETE FROM entries WHERE idx = ?", (k,))
    for i in range(k + 1, ledger.size):  # close the gap, as a careful attacker would
        _renumber(conn, i, i - 1)
    conn.close()
    res = audit(ledger, tmp_path / "aud")
    assert_failure(res, "LOG_MISMATCH", k)


def test_entry_deleted_leaving_a_gap(ledger: GeneratedLedger, tmp_path: Path) -> None:
    k = ledger.update_indices[2]
    conn = db(ledger)
    conn.execute("DELETE FROM entry_blobs WHERE idx = ?", (k,))
    conn.execute("DELETE FROM entries WHERE idx = ?", (k,))
    conn.close()
    assert_failure(audit(ledger, tmp_path / "aud"), "LOG_MISMATCH", k)


def test_two_entries_reordered(ledger: GeneratedLedger, tmp_path: Path) -> None:
    i, j = ledger.update_indices[3], ledger.update_indices[8]
    conn = db(ledger)
    _renumber(conn, i, -1)
    _renumber(conn, j, i)
    _renumber(conn, -1, j)
    conn.close()
    assert_failure(audit(ledger, tmp_path / "aud"), "LOG_MISMATCH", i)


def test_checkpoint_resigned_over_rewritten_history_is_a_fork(
    ledger: GeneratedLedger, tmp_path: Path
) -> None:
    state = tmp_path / "aud"
    assert audit(ledger, state).ok
    # the operator (holding the log key) rewrites the history and re-signs every checkpoint
    forged = small_ledger(tmp_path / "forged", keys=ledger.keys, seed=1)
    assert forged.size == ledger.size
    res = audit(forged, state)
    first_update = 1 + N_SITES  # genesis and enrolments are identical; the first update differs
    assert_failure(res, "LOG_FORK", first_update)
    # the forged checkpoint is not adopted: the stored view is still the original one
    again = audit(ledger, state)
    assert again.ok


def test_fork_detected_from_history_when_the_last_note_is_lost(
    ledger: GeneratedLedger, tmp_path: Path
) -> None:
    state = tmp_path / "aud"
    assert audit(ledger, state).ok
    (state / "checkpoint.note").unlink()
    (state / "leaves.bin").unlink()
    forged = small_ledger(tmp_path / "forged", keys=ledger.keys, seed=2)
    assert_failure(audit(forged, state), "LOG_FORK", None)


def test_rollback_to_a_shorter_history(ledger: GeneratedLedger, tmp_path: Path) -> None:
    state = tmp_path / "aud"
    assert audit(ledger, state).ok
    shorter = small_ledger(tmp_path / "short", keys=ledger.keys, n_updates=5)
    res = audit(shorter, state)
    assert res.first_failure is not None and res.first_failure.failure_class == "LOG_FORK"


def test_update_signed_by_a_key_revoked_before_it(tmp_path: Path, pristine: GeneratedLedger) -> None:
    # update number 4 belongs to site001 (round robin over 3 sites); it is revoked just before
    led = small_ledger(tmp_path / "revoked", keys=pristine.keys, revoke=("site001", 4))
    res = audit(led, tmp_path / "aud")
    assert_failure(res, "SIGNATURE", led.update_indices[4])
    assert res.first_failure is not None and res.first_failure.reason_code == "E_KEY_REVOKED"
    # entries after the failure are listed, marked as not verified
    assert res.entries[-1].status == "not verified"


def test_served_model_differs_in_one_tensor(ledger: GeneratedLedger, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    (cache,) = list((ledger.state_dir / "cache").iterdir())
    tensors = load_file(str(cache / "model.safetensors"))
    w = tensors["decoder.W_s"].copy()
    w[0, -1] = np.float32(w[0, -1] + 1e-3)
    tensors["decoder.W_s"] = w
    save_file(tensors, str(cache / "model.safetensors"))
    res = audit(ledger, tmp_path / "aud")
    assert_failure(res, "SERVED_MODEL", None)
    assert "decoder.W_s" in res.findings[0].message
    assert "encoder.W_s" not in res.findings[0].message


def test_forged_checkpoint_signature(ledger: GeneratedLedger, tmp_path: Path) -> None:
    conn = db(ledger)
    size, note = conn.execute("SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
    text = bytes(note).replace(b"\n\n", b"\n\n", 1)
    body, _, sigs = text.partition(b"\n\n")
    lines = body.split(b"\n")
    lines[1] = str(size + 1).encode()  # claim a bigger tree under the old signature
    conn.execute("UPDATE checkpoints SET note = ? WHERE size = ?", (b"\n".join(lines) + b"\n\n" + sigs, size))
    conn.close()
    assert_failure(audit(ledger, tmp_path / "aud"), "CHECKPOINT_INVALID", None)


@pytest.mark.parametrize("cls", sorted(AUDIT_EXIT_CODES))
def test_exit_code_registry_is_documented(cls: str) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "auditor.md").read_text()
    code = AUDIT_EXIT_CODES[cls]
    assert f"`{code.code}`" in doc and cls in doc
