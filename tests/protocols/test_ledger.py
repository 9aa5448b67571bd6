"""Ledger replay: entry kinds, order, policy in force per position, versions, receipts."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from protocols import merkle
from protocols.diff import apply_condition_diff, diff_from_bytes
from protocols.errors import LedgerError, ReceiptError, UpdateRejectedError, VerificationError
from protocols.keys import key_id
from protocols.ledger import (
    LedgerState,
    entry_blobs,
    entry_kind,
    make_federated_round,
    make_genesis,
    make_receipt,
    parse_receipt,
    replay,
    revoke_entry,
    rotate_entry,
    verify_receipt,
)
from tests.protocols._factories import ORIGIN, consortium, det_key, tiny_bundle


def test_versions_follow_entries_and_replay_matches():
    c = consortium()
    c.enrol("site-a", det_key(10))
    c.enrol("site-b", det_key(11))
    digests = [c.state.digest]
    expected = c.base
    for i, site in enumerate(["site-a", "site-b", "site-a"]):
        seq = {"site-a": 1 + i // 2, "site-b": 1}[site]
        u = c.update(site, sequence=seq, seed=i + 5)
        expected = apply_condition_diff(expected, diff_from_bytes(u.diff_bytes), list(u.payload.new_conditions))
        applied = c.submit(u)
        assert applied.digest is None  # an accept hashes nothing but the diff
        assert c.state.digest_at(applied.index + 1) == expected.digest
        digests.append(c.state.digest_at(applied.index + 1))
    st = c.state
    assert st.size == 6 and st.kinds == ["genesis", "policy", "policy", "site_update", "site_update", "site_update"]
    assert st.digest_at(0) is None and st.digest_at(1) == st.digest_at(3) == c.base.digest
    assert st.bundle().digest == expected.digest
    again = replay(c.trust, c.entries, c.lookup)
    assert again.root() == st.root() == merkle.root([merkle.leaf_hash(e) for e in c.entries])
    assert [again.digest_at(n) for n in range(7)] == [st.digest_at(n) for n in range(7)]
    assert again.sequences == {"site-a": 2, "site-b": 1}


def test_genesis_must_be_first_and_only():
    c = consortium()
    g = make_genesis(tiny_bundle(seed=3), origin=ORIGIN, operator_keys=[c.operator])
    with pytest.raises(LedgerError) as ei:
        c.append(g.envelope, g.blobs)
    assert ei.value.reason_code == "E_LEDGER_ORDER"
    fresh = LedgerState(c.trust)
    with pytest.raises(LedgerError) as ei:
        fresh.apply(_enrol_bytes(c), c.lookup)
    assert ei.value.reason_code == "E_LEDGER_ORDER"


def _enrol_bytes(c):
    from protocols.ledger import enrol_entry

    return enrol_entry(origin=ORIGIN, site_id="x", public_key=det_key(40).public_key(), operator_keys=[c.operator])


def test_genesis_needs_operator_signature_and_matching_blobs():
    c = consortium()
    st = LedgerState(c.trust)
    g = make_genesis(c.base, origin=ORIGIN, operator_keys=[det_key(50)])
    with pytest.raises(LedgerError) as ei:
        st.apply(g.envelope, g.blobs.get)
    assert ei.value.reason_code == "E_SIG_THRESHOLD"
    g = make_genesis(c.base, origin=ORIGIN, operator_keys=[c.operator])
    with pytest.raises(LedgerError) as ei:
        st.apply(g.envelope, {}.get)
    assert ei.value.reason_code == "E_BLOB_MISSING"
    swapped = {k: (v + b" " if k == entry_blobs(g.envelope)[0].sha256 else v) for k, v in g.blobs.items()}
    with pytest.raises(LedgerError) as ei:
        st.apply(g.envelope, swapped.get)
    assert ei.value.reason_code == "E_BLOB_MISMATCH"
    assert st.size == 0
    st.apply(g.envelope, g.blobs.get)
    assert st.size == 1 and entry_kind(g.envelope) == "genesis"


def test_failed_apply_leaves_state_unchanged():
    c = consortium()
    c.enrol("site-a", det_key(10))
    before = (c.state.size, c.state.root(), c.state.digest, c.state.sequences)
    bad = c.update("site-a", names=["site-b/x"])
    with pytest.raises(UpdateRejectedError):
        c.submit(bad)
    assert (c.state.size, c.state.root(), c.state.digest, c.state.sequences) == before


def test_revocation_applies_from_its_position_only():
    c = consortium()
    c.enrol("site-a", det_key(10))
    c.submit(c.update("site-a", sequence=1))
    c.append(revoke_entry(origin=ORIGIN, site_id="site-a", operator_keys=[c.operator]))
    with pytest.raises(UpdateRejectedError) as ei:
        c.submit(c.update("site-a", sequence=2, seed=2))
    assert ei.value.reason_code == "E_KEY_REVOKED"
    replay(c.trust, c.entries, c.lookup)  # the earlier update still replays


def test_rotation_needs_old_and_new_key():
    c = consortium()
    old, new = det_key(10), det_key(11)
    c.enrol("site-a", old)
    import json

    from protocols.canonical import canonical_json

    env = rotate_entry(origin=ORIGIN, site_id="site-a", old_key=old, new_key=new, operator_keys=[c.operator])
    obj = json.loads(env)
    obj["signatures"] = [s for s in obj["signatures"] if s["keyid"] != key_id(old)]
    with pytest.raises(LedgerError) as ei:
        c.append(canonical_json(obj))
    assert ei.value.reason_code == "E_ROTATION_SIGNATURES"
    c.append(env)
    c.site_keys["site-a"] = new
    c.submit(c.update("site-a", sequence=1))
    with pytest.raises(UpdateRejectedError) as ei:
        c.submit(c.update("site-a", sequence=2, key=old, seed=3))
    assert ei.value.reason_code == "E_KEY_ROTATED"


def test_federated_round_replaces_model_and_makes_older_bases_stale():
    c = consortium()
    c.enrol("site-a", det_key(10))
    old_size = c.state.size
    stale = c.update("site-a", sequence=1, base_size=old_size)
    cur = c.state.bundle()
    tensors = {k: (v + 1 if c.base.manifest["tensors"][k]["role"] == "frozen" else v) for k, v in cur.tensors.items()}
    from protocols.bundle import make_bundle

    agg = make_bundle(cur.manifest, tensors)
    fr = make_federated_round(
        agg, origin=ORIGIN, round_number=1, base_size=old_size, base_digest=c.state.digest,
        contributors=[("site-a", "sha256:" + "1" * 64)], operator_keys=[c.operator],
    )
    applied = c.append(fr.envelope, fr.blobs)
    assert applied.kind == "federated_round" and applied.digest == agg.digest
    with pytest.raises(UpdateRejectedError) as ei:
        c.submit(stale)
    assert ei.value.reason_code == "E_BASE_STALE"
    c.submit(c.update("site-a", sequence=1))
    fr2 = make_federated_round(
        agg, origin=ORIGIN, round_number=1, base_size=1, base_digest=c.base.digest,
        contributors=[], operator_keys=[c.operator],
    )
    with pytest.raises(LedgerError) as ei:
        c.append(fr2.envelope, fr2.blobs)
    assert ei.value.reason_code == "E_FEDERATED_ROUND"
    replay(c.trust, c.entries, c.lookup)


def test_receipts():
    from protocols.checkpoint import Checkpoint, sign_checkpoint

    c = consortium()
    c.enrol("site-a", det_key(10))
    u = c.update("site-a")
    applied = c.submit(u)
    st = c.state
    note = sign_checkpoint(Checkpoint(ORIGIN, st.size, st.root()), c.log_signer)
    r = make_receipt(st.tree, applied.index, note, st.size)
    r2 = parse_receipt(r.to_json())
    assert r2 == r
    cp = verify_receipt(r2, u.envelope, policy=c.trust)
    assert cp.size == st.size
    with pytest.raises(ReceiptError):
        verify_receipt(r2, c.entries[0], policy=c.trust)
    bad = type(r)(r.leaf_index, r.leaf_hash, r.signed_note, tuple(reversed(r.inclusion_proof)) + (b"\x00" * 32,))
    with pytest.raises(ReceiptError):
        verify_receipt(bad, u.envelope, policy=c.trust)
    forged = sign_checkpoint(Checkpoint(ORIGIN, st.size, st.root()), type(c.log_signer)(ORIGIN, b"\x09" * 32))
    with pytest.raises(ReceiptError):
        verify_receipt(type(r)(r.leaf_index, r.leaf_hash, forged, r.inclusion_proof), u.envelope, policy=c.trust)


def test_blob_lookup_errors_are_typed():
    c = consortium()
    c.enrol("site-a", det_key(10))
    u = c.update("site-a")

    def broken(_sha):
        raise OSError("disk on fire")

    with pytest.raises(VerificationError) as ei:
        c.state.apply(u.envelope, broken)
    assert ei.value.reason_code == "E_BLOB_MISSING"
    assert hashlib.sha256(u.diff_bytes).hexdigest() == entry_blobs(u.envelope)[0].sha256
    assert np.isfinite(diff_from_bytes(u.diff_bytes)["px_r"]).all()
