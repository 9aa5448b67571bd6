"""The ledger's lazy, chunked versions: every version's digest equals the from-scratch digest of
the same model, and a snapshot of the state restores exactly the replayed state or is refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import merkle
from protocols.bundle import make_bundle
from protocols.diff import apply_condition_diff, diff_from_bytes
from protocols.errors import LedgerError, UpdateRejectedError
from protocols.ledger import ConditionCap, replay, restore_state, snapshot_state
from tests.protocols._factories import assert_same_state, consortium, det_key, tiny_diff


def _grown(sizes: list[int], bases: list[int], seed: int):
    """A consortium after one update per entry of ``sizes`` (that many new conditions each),
    each on the base version ``bases[i] % (current size) + 1``; and the expected bundles."""
    c = consortium()
    c.enrol("site-a", det_key(10))
    c.enrol("site-b", det_key(11))
    expected = {c.state.size: c.base}
    model = c.base
    for i, m in enumerate(sizes):
        site = ("site-a", "site-b")[i % 2]
        base_size = max(3, 1 + bases[i % len(bases)] % c.state.size) if bases else c.state.size
        diff = tiny_diff(model, m=m, seed=seed + i)
        u = c.update(site, sequence=i // 2 + 1, m=m, seed=seed + i, diff=diff, base_size=base_size)
        model = apply_condition_diff(
            model, diff_from_bytes(u.diff_bytes), list(u.payload.new_conditions)
        )
        c.submit(u)
        expected[c.state.size] = model
    return c, expected


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=8),
    bases=st.lists(st.integers(min_value=0, max_value=50), max_size=8),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_lazy_digest_equals_the_from_scratch_digest(sizes, bases, seed) -> None:
    c, expected = _grown(sizes, bases, seed)
    for size, bundle in expected.items():
        assert c.state.digest_at(size) == make_bundle(bundle.manifest, bundle.tensors).digest
    head = c.state.bundle()
    assert head.digest == expected[c.state.size].digest
    for name, arr in expected[c.state.size].tensors.items():
        assert np.array_equal(head.tensors[name], arr)


def test_an_accept_copies_no_tensor_and_hashes_nothing_of_the_model() -> None:
    c, _ = _grown([1, 2], [], 0)
    lineage = c.state._model.lineage
    name = lineage.condition_tensors[0]
    u = c.update("site-a", sequence=9, m=1, seed=99)  # reads the current version (joins)
    before = [id(a) for a in lineage.pending(name)]
    applied = c.submit(u)
    after = [id(a) for a in lineage.pending(name)]
    assert after[:-1] == before and len(after) == len(before) + 1  # appended, nothing re-made
    assert applied.digest is None and c.state._digests[-1] is None  # not hashed on accept


def test_buffered_slices_serve_every_earlier_version_read_only() -> None:
    """Reading a version moves the appended slices into the tensor's buffer once; every
    version is a prefix of it, and its streamed leaf hash is the leaf hash of the prefix."""
    from protocols.bundle import tensor_leaf_hash

    c, expected = _grown([1, 2, 1, 3, 1, 1, 2], [], 5)
    lineage = c.state._model.lineage
    c.state.bundle()  # the head: every pending slice moved into the buffers
    assert all(not lineage.pending(n) for n in lineage.condition_tensors)
    for size, bundle in sorted(expected.items(), reverse=True):
        assert c.state.digest_at(size) == bundle.digest
        version = c.state._versions[size]
        for name, arr in version.tensors.items():
            assert np.array_equal(arr, bundle.tensors[name]) and not arr.flags.writeable
        for name in lineage.condition_tensors:
            n = version.n_conditions
            assert lineage.leaf_hash(name, n) == tensor_leaf_hash(name, bundle.tensors[name])


def test_streamed_tensor_leaf_hash_is_the_leaf_hash() -> None:
    from protocols.bundle import tensor_leaf, tensor_leaf_hash

    arrays = [
        np.zeros((0, 3), np.float32),
        np.array(3.5, np.float32),
        np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not C-contiguous
        np.arange(6, dtype=np.int64).reshape(2, 3)[:, ::2],
    ]
    for arr in arrays:
        assert tensor_leaf_hash("t", arr) == merkle.leaf_hash(tensor_leaf("t", arr))


def _leaves(c) -> list[bytes]:
    return [merkle.leaf_hash(e) for e in c.entries]


def test_snapshot_restore_equals_full_replay_and_keeps_accepting() -> None:
    c, _ = _grown([2, 1, 3], [0, 1], 7)
    meta, tensors = snapshot_state(c.state)
    restored = restore_state(c.trust, meta, tensors, _leaves(c))
    assert_same_state(restored, replay(c.trust, c.entries, c.lookup))
    # the restored state accepts the next update exactly as the original does
    u = c.update("site-b", sequence=5, m=2, seed=31)
    c.submit(u)
    import hashlib

    restored.apply(u.envelope, {hashlib.sha256(u.diff_bytes).hexdigest(): u.diff_bytes}.get)
    assert_same_state(restored, c.state)


def test_snapshot_older_than_the_log_catches_up_by_applying_the_rest() -> None:
    c, _ = _grown([1, 1], [], 3)
    meta, tensors = snapshot_state(c.state)
    taken_at = c.state.size
    c.submit(c.update("site-a", sequence=7, m=1, seed=40))
    restored = restore_state(c.trust, meta, tensors, _leaves(c))
    assert restored.size == taken_at
    for env in c.entries[taken_at:]:
        restored.apply(env, c.lookup)
    assert_same_state(restored, c.state)


@pytest.mark.parametrize(
    "attack", ["flipped_tensor_byte", "edited_meta", "forked_log", "truncated_log"]
)
def test_tampered_or_stale_snapshot_is_refused(attack: str) -> None:
    c, _ = _grown([1, 2], [], 5)
    meta, tensors = snapshot_state(c.state)
    leaves = _leaves(c)
    if attack == "flipped_tensor_byte":
        t = bytearray(tensors)
        t[-1] ^= 1
        tensors = bytes(t)
    elif attack == "edited_meta":
        meta = meta.replace(b'"last_round":0', b'"last_round":9')
    elif attack == "forked_log":
        leaves = [*leaves[:-1], merkle.leaf_hash(b"another entry")]
    else:
        leaves = leaves[:-1]
    with pytest.raises(LedgerError) as ei:
        restore_state(c.trust, meta, tensors, leaves)
    assert ei.value.reason_code == "E_INTERNAL" and "snapshot" in ei.value.message


def test_condition_cap_per_site_and_per_reference() -> None:
    c, _ = _grown([1], [], 1)
    n = len(c.state.conditions)
    c.state.condition_cap = ConditionCap(per_site=2, per_reference=n + 2)
    with pytest.raises(UpdateRejectedError) as ei:
        c.submit(c.update("site-a", sequence=2, m=2, seed=50))  # site-a holds 1: 3 > 2
    assert ei.value.reason_code == "E_CONDITION_CAP" and "per site" in ei.value.message
    c.submit(c.update("site-b", sequence=1, m=2, seed=51))  # n + 2: at the cap
    with pytest.raises(UpdateRejectedError) as ei:
        c.submit(c.update("site-a", sequence=2, m=1, seed=52))
    assert (
        ei.value.reason_code == "E_CONDITION_CAP"
        and "max_conditions_per_reference" in ei.value.message
    )
    with pytest.raises(ValueError, match="positive integer"):
        ConditionCap(per_site=0, per_reference=1)


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"diff": {"sha256": "../../etc/passwd", "size": 1}}',
        b"\xff",
    ],
    ids=["deeply_nested_payload", "diff_name_path_traversal", "not_json"],
)
def test_forged_update_naming_no_valid_diff_gets_a_typed_rejection(payload: bytes) -> None:
    from protocols.dsse import sign_envelope
    from protocols.update import SITE_UPDATE_TYPE

    c, _ = _grown([1], [], 2)
    looked_up: list[str] = []
    env = sign_envelope(SITE_UPDATE_TYPE, payload, [det_key(99)])  # a key nobody enrolled
    with pytest.raises((LedgerError, UpdateRejectedError)) as ei:
        c.state.apply(env, lambda h: looked_up.append(h))
    assert ei.value.reason_code in {"E_KEY_UNKNOWN", "E_OVERSIZE", "E_ENVELOPE_MALFORMED"}
    assert looked_up == []  # no blob was looked up under an unverified, malformed name


def test_manifest_leaf_is_spliced_or_encoded_in_full_with_the_same_bytes() -> None:
    from protocols.bundle import manifest_leaf

    c, expected = _grown([2, 1, 3], [], 11)
    lineage = c.state._model.lineage
    assert lineage._skeleton is not None
    for size, bundle in expected.items():
        version = c.state._versions[size]
        leaf = lineage.manifest_leaf(version.manifest, version.n_conditions)
        assert leaf == manifest_leaf(bundle.manifest)
    # a manifest that already holds a placeholder's bytes is encoded in full, never spliced
    lineage.manifest = {**lineage.manifest, "note": ["\u0001scarches-fl.version:conditions\u0001"]}
    lineage._skeleton = lineage._manifest_skeleton()
    assert lineage._skeleton is None
    version = c.state._versions[c.state.size]
    manifest = version.manifest
    assert lineage.manifest_leaf(manifest, version.n_conditions) == manifest_leaf(manifest)
