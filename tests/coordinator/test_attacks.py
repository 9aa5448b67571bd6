"""Hostile submissions over the wire: each is rejected with its stable reason code, in the
response body, and the ledger does not change."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from coordinator.admin import revoke_site
from protocols.canonical import canonical_json
from protocols.diff import diff_to_bytes
from protocols.keys import generate_private_key
from protocols.update import build_update_payload, sign_update
from tests.coordinator.conftest import (
    Site,
    accept_log_lines,
    fetch_base,
    make_site_update,
    verify_ledger,
)
from tests.coordinator.synth import synthetic_diff

pytestmark = pytest.mark.network


def _forged_signature(consortium, base):
    u = make_site_update(consortium.sites["site-a"], base)
    env = json.loads(u.envelope)
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[0] ^= 0x01
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    return canonical_json(env), u.diff_bytes


def _unknown_key(consortium, base):
    mallory = Site("site-a", generate_private_key())
    u = make_site_update(mallory, base)
    return u.envelope, u.diff_bytes


def _payload_with(site: Site, base, diff_for_stats, diff_bytes, names):
    from protocols.keys import key_id

    size, root, bundle = base
    payload = build_update_payload(
        origin=base_origin(),
        site_id=site.site_id,
        site_key_id=key_id(site.key),
        sequence=site.next_seq(),
        base_size=size,
        base_root=root,
        base_digest=bundle.digest,
        new_conditions=names,
        diff=diff_for_stats,
        diff_bytes=diff_bytes,
    )
    return sign_update(payload, site.key), diff_bytes


def base_origin() -> str:
    from tests.coordinator.conftest import ORIGIN

    return ORIGIN


def _frozen_tensor(consortium, base):
    site = consortium.sites["site-a"]
    diff = synthetic_diff(base[2], 1)
    diff["encoder.0.W_x"] = np.zeros((16, 1), dtype=np.float32)
    return _pair(make_site_update(site, base, diff=diff))


def _nan(consortium, base):
    site = consortium.sites["site-a"]
    clean = synthetic_diff(base[2], 1)
    bad = {k: v.copy() for k, v in clean.items()}
    bad["px_r"][3, 0] = np.nan
    return _payload_with(site, base, clean, diff_to_bytes(bad), [f"{site.site_id}/nan"])


def _oversize(consortium, base):
    site = consortium.sites["site-a"]
    clean = synthetic_diff(base[2], 1)
    big = diff_to_bytes(clean) + b"\0" * (16 * 1024 * 1024)
    return _payload_with(site, base, clean, big, [f"{site.site_id}/big"])


def _wrong_shape(consortium, base):
    site = consortium.sites["site-a"]
    diff = synthetic_diff(base[2], 1)
    diff["px_r"] = np.zeros((diff["px_r"].shape[0] + 1, 1), dtype=np.float32)
    return _pair(make_site_update(site, base, diff=diff))


def _namespace(consortium, base):
    site = consortium.sites["site-a"]
    diff = synthetic_diff(base[2], 1)
    return _payload_with(site, base, diff, diff_to_bytes(diff), ["site-b/stolen"])


def _stale_base_root(consortium, base):
    size, root, bundle = base
    return _pair(make_site_update(consortium.sites["site-a"], (size, b"\x11" * 32, bundle)))


def _not_a_site_update(consortium, base):
    from protocols.keys import load_private_key
    from protocols.ledger import revoke_entry

    op = load_private_key(consortium.state / "keys" / "operator.key")
    env = revoke_entry(origin=base_origin(), site_id="site-a", operator_keys=[op])
    return env, b""


def _path_trick(consortium, base):
    site = consortium.sites["site-a"]
    diff = synthetic_diff(base[2], 1)
    return _payload_with(site, base, diff, diff_to_bytes(diff), ["site-a/../site-b/x"])


def _wrong_dtype(consortium, base):
    site = consortium.sites["site-a"]
    diff = synthetic_diff(base[2], 1)
    diff["px_r"] = diff["px_r"].astype(np.float64)
    return _pair(make_site_update(site, base, diff=diff))


def _duplicate_json_key(consortium, base):
    from protocols.dsse import sign_envelope
    from protocols.update import SITE_UPDATE_TYPE

    site = consortium.sites["site-a"]
    u = make_site_update(site, base)
    raw = u.payload.to_bytes()
    dup = raw.replace(b'"kind":"site_update"', b'"kind":"site_update","kind":"genesis"', 1)
    assert dup != raw
    return sign_envelope(SITE_UPDATE_TYPE, dup, [site.key]), u.diff_bytes


def _garbage(consortium, base):
    return b'{"payload": "not base64!"}', b""


ATTACKS = {
    "forged_signature": (_forged_signature, "E_SIG_INVALID"),
    "unknown_key": (_unknown_key, "E_KEY_UNKNOWN"),
    "frozen_tensor": (_frozen_tensor, "E_TENSOR_FROZEN"),
    "nan": (_nan, "E_NONFINITE"),
    "oversize": (_oversize, "E_OVERSIZE"),
    "wrong_shape": (_wrong_shape, "E_TENSOR_SHAPE"),
    "namespace": (_namespace, "E_CONDITION_NAMESPACE"),
    "unknown_base": (_stale_base_root, "E_BASE_UNKNOWN"),
    "operator_entry_via_submit": (_not_a_site_update, "E_PAYLOAD_TYPE"),
    "garbage": (_garbage, "E_ENVELOPE_MALFORMED"),
    "condition_path_trick": (_path_trick, "E_CONDITION_NAME"),
    "wrong_dtype": (_wrong_dtype, "E_TENSOR_DTYPE"),
    "duplicate_json_key": (_duplicate_json_key, "E_PAYLOAD_MALFORMED"),
}


def test_attacks_are_rejected_with_their_reason_code(consortium, server) -> None:
    with server.client(consortium) as c:
        base = fetch_base(c, consortium)
        before = c.get_checkpoint()
        for name, (build, code) in ATTACKS.items():
            envelope, diff = build(consortium, base)
            res = c.submit_update(envelope, diff)
            assert res.rejection is not None, f"{name} was accepted"
            assert res.rejection.reason_code == code, (name, res.rejection)
            assert res.rejection.message, name
            assert c.get_checkpoint().signed_note == before.signed_note, name
        verify_ledger(c, consortium)


def test_replay_and_revoked_key(consortium, server) -> None:
    with server.client(consortium) as c:
        base = fetch_base(c, consortium)
        a = consortium.sites["site-a"]
        first = make_site_update(a, base)
        c.submit_update(first.envelope, first.diff_bytes).raise_for_rejection()
        size = c.get_checkpoint().size
        # Same sequence number, new envelope (other conditions): a replay.
        replay = make_site_update(a, base, sequence=1, batch="again")
        res = c.submit_update(replay.envelope, replay.diff_bytes)
        assert res.rejection.reason_code == "E_SEQUENCE_REPLAY"
        # A lower sequence number too.
        a.sequence = 5
        c.submit_update(*_pair(make_site_update(a, base))).raise_for_rejection()
        res = c.submit_update(*_pair(make_site_update(a, base, sequence=3)))
        assert res.rejection.reason_code == "E_SEQUENCE_REPLAY"
        size = c.get_checkpoint().size
        revoke_site(consortium.state, site_id="site-a")
        res = c.submit_update(*_pair(make_site_update(a, base)))
        assert res.rejection.reason_code == "E_KEY_REVOKED"
        assert c.get_checkpoint().size == size + 1  # only the revocation entry
        verify_ledger(c, consortium)


def test_message_over_the_transport_limit_is_a_transport_error(consortium, server) -> None:
    from protocols.registry_client import MessageTooLargeError

    with server.client(consortium) as c:
        size = c.get_checkpoint().size
        with pytest.raises(MessageTooLargeError):
            c.submit_update(b"{}", b"\0" * (21 * 1024 * 1024))
        assert c.get_checkpoint().size == size


def _pair(u):
    return u.envelope, u.diff_bytes


def test_one_structured_log_line_per_decision(consortium, server) -> None:
    with accept_log_lines() as lines, server.client(consortium) as c:
        base = fetch_base(c, consortium)
        good = make_site_update(consortium.sites["site-a"], base)
        c.submit_update(good.envelope, good.diff_bytes).raise_for_rejection()
        bad = _namespace(consortium, base)
        c.submit_update(*bad)
    assert len(lines) == 2, lines
    kind, fields = lines[0].split(" ", 1)
    accept = json.loads(fields)
    assert kind == "accept" and accept["site"] == "site-a" and accept["seq"] == 1
    assert accept["latency_ms"] >= 0 and "index" in accept
    kind, fields = lines[1].split(" ", 1)
    reject = json.loads(fields)
    assert kind == "reject" and reject["reason"] == "E_CONDITION_NAMESPACE"
    assert reject["site"] == "site-a" and reject["seq"] == 2
