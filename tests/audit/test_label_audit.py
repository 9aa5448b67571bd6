"""The auditor replays label knowledge: contributions verify, a flipped prototype byte and a
contribution replayed onto another reference's ledger are caught."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from benchmarks.gen_ledger import GeneratedLedger
from tests.audit.conftest import small_ledger
from tests.audit.test_tamper import audit, db


def _contribution_indices(led: GeneratedLedger) -> list[int]:
    rows = db(led).execute("SELECT idx FROM entries WHERE kind = 'label_contribution' ORDER BY idx")
    return [r[0] for r in rows]


def _flip_first_digit_after(led: GeneratedLedger, k: int, marker: bytes) -> None:
    """Rewrite entry ``k``'s stored envelope with one digit of the first number after ``marker``
    in its payload changed (the signature no longer covers the payload)."""
    conn = db(led)
    (env_bytes,) = conn.execute("SELECT envelope FROM entries WHERE idx = ?", (k,)).fetchone()
    env = json.loads(env_bytes)
    payload = base64.b64decode(env["payload"])
    head, sep, rest = payload.partition(marker)
    assert sep, payload[:200]
    # one byte of the first value: the digit after the sign / the first digit
    pos = len(head) + len(sep) + (1 if rest[:1] == b"-" else 0)
    digit = payload[pos : pos + 1]
    flipped = payload[:pos] + (b"8" if digit != b"8" else b"7") + payload[pos + 1 :]
    env["payload"] = base64.b64encode(flipped).decode()
    conn.execute(
        "UPDATE entries SET envelope = ? WHERE idx = ?",
        (json.dumps(env, separators=(",", ":")).encode(), k),
    )
    conn.close()


def test_label_contributions_replay_and_verify(tmp_path: Path, pristine: GeneratedLedger) -> None:
    led = small_ledger(tmp_path / "lab", keys=pristine.keys, label_contributions=3)
    res = audit(led, tmp_path / "aud")
    assert res.ok, res.findings
    assert res.kind_counts["label_contribution"] == 3
    rows = [e for e in res.entries if e.kind == "label_contribution"]
    assert rows[0].detail["types"] == "gamma (40)" and rows[0].site_id == "site000"


def test_flipped_prototype_byte_is_caught(tmp_path: Path, pristine: GeneratedLedger) -> None:
    led = small_ledger(tmp_path / "lab", keys=pristine.keys, label_contributions=3)
    k = _contribution_indices(led)[1]
    _flip_first_digit_after(led, k, b'"mean":[')
    res = audit(led, tmp_path / "aud")
    first = res.first_failure
    assert first is not None and first.entry_index == k, res.findings
    assert not res.ok and res.exit_code != 0


def test_contribution_replayed_onto_another_base(tmp_path: Path, pristine: GeneratedLedger) -> None:
    a = small_ledger(tmp_path / "a", keys=pristine.keys, label_contributions=1)
    (k,) = _contribution_indices(a)
    (env,) = db(a).execute("SELECT envelope FROM entries WHERE idx = ?", (k,)).fetchone()
    # another reference (another genesis) under the same consortium keys logs A's contribution
    b = small_ledger(
        tmp_path / "b",
        keys=pristine.keys,
        genesis_seed=7,
        n_updates=0,
        extra_entries=[("label_contribution", bytes(env))],
    )
    res = audit(b, tmp_path / "aud")
    first = res.first_failure
    assert first is not None and first.entry_index == b.size - 1, res.findings
    assert first.reason_code == "E_BASE_UNKNOWN"


def test_flipped_expression_prototype_byte_is_caught(
    tmp_path: Path, pristine: GeneratedLedger
) -> None:
    led = small_ledger(
        tmp_path / "lab", keys=pristine.keys, label_contributions=2, expression_contributions=True
    )
    clean = audit(led, tmp_path / "clean")
    assert clean.ok, clean.findings
    k = _contribution_indices(led)[1]
    _flip_first_digit_after(led, k, b'"expression":{"mean":[')
    res = audit(led, tmp_path / "aud")
    first = res.first_failure
    assert first is not None and first.entry_index == k, res.findings
    assert not res.ok and res.exit_code != 0
