"""Site update payloads: building, signing, pure validation (module docstring rules)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from protocols.canonical import canonical_json
from protocols.errors import UpdateRejectedError
from protocols.update import (
    SITE_UPDATE_TYPE,
    parse_update_payload,
    tensor_summary,
    validate_update,
)
from tests.protocols._factories import ORIGIN, consortium, det_key


def _ready():
    c = consortium()
    c.enrol("site-a", det_key(10))
    return c


def test_accept_and_payload_fields():
    c = _ready()
    u = c.update("site-a", m=2, seed=3)
    acc = c.state.validate_site_update(u.envelope, u.diff_bytes)
    p = json.loads(u.payload.to_bytes())
    assert sorted(p) == ["base", "diff", "format_version", "key_id", "kind", "new_conditions",
                         "origin", "sequence", "site_id"]
    assert p["base"]["size"] == c.state.size and p["base"]["digest"] == c.state.digest
    assert p["diff"]["size"] == len(u.diff_bytes)
    assert acc.new_conditions == ["site-a/b3_0", "site-a/b3_1"] and acc.sequence == 1
    assert sorted(acc.diff) == sorted(p["diff"]["tensors"])
    assert parse_update_payload(u.payload.to_bytes()) == u.payload


def test_pure_validation_does_not_mutate():
    c = _ready()
    u = c.update("site-a")
    ctx = c.state.update_context()
    validate_update(u.envelope, u.diff_bytes, ctx)
    validate_update(u.envelope, u.diff_bytes, ctx)  # same answer twice: nothing recorded
    assert c.state.sequences == {}


def test_tensor_summary():
    s = tensor_summary(np.array([[3.0, -4.0]], dtype=np.float32))
    assert (s.l2, s.min, s.max, s.shape, s.dtype) == (5.0, -4.0, 3.0, (1, 2), "float32")
    assert tensor_summary(np.zeros((0, 3), np.float32)).l2 == 0.0


def _code(c, u):
    with pytest.raises(UpdateRejectedError) as ei:
        c.state.validate_site_update(u.envelope, u.diff_bytes)
    return ei.value.reason_code


def test_sequence_must_increase_across_submissions():
    c = _ready()
    c.submit(c.update("site-a", sequence=5, seed=1))
    assert _code(c, c.update("site-a", sequence=5, seed=2)) == "E_SEQUENCE_REPLAY"
    assert _code(c, c.update("site-a", sequence=4, seed=2)) == "E_SEQUENCE_REPLAY"
    c.submit(c.update("site-a", sequence=6, seed=2))


def test_two_sites_on_the_same_base_do_not_conflict():
    c = _ready()
    c.enrol("site-b", det_key(11))
    size = c.state.size
    ua = c.update("site-a", base_size=size, seed=1)
    ub = c.update("site-b", base_size=size, seed=2)
    c.submit(ua)
    c.submit(ub)  # its base is one entry older; still fine
    assert c.state.conditions[-2:] == ["site-a/b1_0", "site-b/b2_0"]


def test_base_must_be_a_checkpoint_of_this_log():
    from protocols.update import make_update

    c = _ready()
    st = c.state
    bad_root = make_update(
        origin=c.trust.origin, site_id="site-a", site_key=c.site_keys["site-a"], sequence=1,
        base_size=st.size, base_root=b"\x00" * 32, base_digest=st.digest,
        new_conditions=["site-a/x"], diff=_diff(c),
    )
    assert _code(c, bad_root) == "E_BASE_UNKNOWN"
    future = make_update(
        origin=c.trust.origin, site_id="site-a", site_key=c.site_keys["site-a"], sequence=1,
        base_size=st.size + 5, base_root=st.root(), base_digest=st.digest,
        new_conditions=["site-a/x"], diff=_diff(c),
    )
    assert _code(c, future) == "E_BASE_UNKNOWN"
    wrong_digest = make_update(
        origin=c.trust.origin, site_id="site-a", site_key=c.site_keys["site-a"], sequence=1,
        base_size=st.size, base_root=st.root(), base_digest="sha256:" + "0" * 64,
        new_conditions=["site-a/x"], diff=_diff(c),
    )
    assert _code(c, wrong_digest) == "E_BASE_DIGEST_MISMATCH"


def _diff(c, m=1):
    from tests.protocols._factories import tiny_diff

    return tiny_diff(c.state.bundle(), m=m)


def test_origin_and_site_mismatch():
    from protocols.update import make_update

    c = _ready()
    c.enrol("site-b", det_key(11))
    st = c.state
    common = dict(sequence=1, base_size=st.size, base_root=st.root(), base_digest=st.digest, diff=_diff(c))
    u = make_update(origin="other/log", site_id="site-a", site_key=c.site_keys["site-a"],
                    new_conditions=["site-a/x"], **common)
    assert _code(c, u) == "E_ORIGIN_MISMATCH"
    u = make_update(origin=c.trust.origin, site_id="site-b", site_key=c.site_keys["site-a"],
                    new_conditions=["site-b/x"], **common)
    assert _code(c, u) == "E_SITE_MISMATCH"


def test_statistics_must_match():
    from protocols.dsse import sign_envelope

    c = _ready()
    u = c.update("site-a")
    p = json.loads(u.payload.to_bytes())
    name = sorted(p["diff"]["tensors"])[0]
    p["diff"]["tensors"][name]["l2"] *= 1.01
    env = sign_envelope(SITE_UPDATE_TYPE, canonical_json(p), [c.site_keys["site-a"]])
    with pytest.raises(UpdateRejectedError) as ei:
        c.state.validate_site_update(env, u.diff_bytes)
    assert ei.value.reason_code == "E_STATS_MISMATCH"


def test_norm_limits():
    from dataclasses import replace

    from protocols.policy import UpdateLimits

    c = _ready()
    big = {k: v * 0 + 50.0 for k, v in _diff(c).items()}
    u = c.update("site-a", diff=big)
    ctx = c.state.update_context()
    tight = replace(ctx, policy=replace(ctx.policy, update_limits=UpdateLimits(max_abs_value=10.0)))
    with pytest.raises(UpdateRejectedError) as ei:
        validate_update(u.envelope, u.diff_bytes, tight)
    assert ei.value.reason_code == "E_NORM_LIMIT"
    tight = replace(ctx, policy=replace(ctx.policy, update_limits=UpdateLimits(max_condition_l2=60.0)))
    with pytest.raises(UpdateRejectedError) as ei:
        validate_update(u.envelope, u.diff_bytes, tight)
    assert ei.value.reason_code == "E_NORM_LIMIT"
    tight = replace(ctx, policy=replace(ctx.policy, update_limits=UpdateLimits(max_new_conditions=1)))
    u2 = c.update("site-a", m=2)
    with pytest.raises(UpdateRejectedError) as ei:
        validate_update(u2.envelope, u2.diff_bytes, tight)
    assert ei.value.reason_code == "E_TOO_MANY_CONDITIONS"
    validate_update(u.envelope, u.diff_bytes, ctx)


def test_diff_bytes_must_be_the_signed_ones():
    c = _ready()
    u = c.update("site-a", seed=1)
    other = c.update("site-a", seed=2)
    with pytest.raises(UpdateRejectedError) as ei:
        c.state.validate_site_update(u.envelope, other.diff_bytes)
    assert ei.value.reason_code == "E_DIFF_SHA256_MISMATCH"
    with pytest.raises(UpdateRejectedError) as ei:
        c.state.validate_site_update(u.envelope, u.diff_bytes + b" ")
    assert ei.value.reason_code == "E_DIFF_SIZE_MISMATCH"


def test_unenrolled_key_and_wrong_payload_type():
    from protocols.dsse import sign_envelope

    c = _ready()
    u = c.update("site-a", key=det_key(99))
    assert _code(c, u) == "E_KEY_UNKNOWN"
    env = sign_envelope("application/json", c.update("site-a").payload.to_bytes(), [c.site_keys["site-a"]])
    with pytest.raises(UpdateRejectedError) as ei:
        c.state.validate_site_update(env, u.diff_bytes)
    assert ei.value.reason_code == "E_PAYLOAD_TYPE"


def test_boolean_is_not_an_integer():
    """`true == 1` in Python; a payload with `"format_version":true` or `"sequence":true` is
    refused (one value, one encoding)."""
    for field, value in (("format_version", True), ("sequence", True)):
        c = _ready()
        u = c.update("site-a")
        p = json.loads(u.payload.to_bytes())
        p[field] = value
        from protocols.dsse import sign_envelope

        env = sign_envelope(SITE_UPDATE_TYPE, canonical_json(p), [c.site_keys["site-a"]])
        with pytest.raises(UpdateRejectedError) as ei:
            c.state.validate_site_update(env, u.diff_bytes)
        assert ei.value.reason_code == "E_PAYLOAD_MALFORMED"


def _count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, counting)
    return calls


def test_an_authenticated_update_is_parsed_and_verified_once(monkeypatch):
    import hashlib

    import protocols.ledger
    import protocols.update
    from protocols.update import authenticate_update

    c = _ready()
    u = c.update("site-a")
    verifies = _count_calls(monkeypatch, protocols.update, "verify_envelope")
    parses = _count_calls(monkeypatch, protocols.update, "parse_envelope")
    ledger_parses = _count_calls(monkeypatch, protocols.ledger, "parse_envelope")
    payloads = _count_calls(monkeypatch, protocols.update, "parse_update_payload")
    auth = authenticate_update(u.envelope, c.state.policy)
    applied = c.state.apply(u.envelope, {}.get, diff_bytes=u.diff_bytes, authenticated=auth)
    assert applied.accepted_update.sequence == 1 and c.state.sequences == {"site-a": 1}
    assert (len(verifies), len(parses), len(ledger_parses), len(payloads)) == (1, 1, 0, 1)
    # the same state as without the shortcut
    other = consortium()
    other.enrol("site-a", det_key(10))
    other.append(u.envelope, {hashlib.sha256(u.diff_bytes).hexdigest(): u.diff_bytes})
    assert (other.state.root(), other.state.digest) == (c.state.root(), c.state.digest)


def test_an_authentication_is_not_reused_for_other_bytes_or_a_changed_key():
    from protocols.ledger import revoke_entry
    from protocols.update import authenticate_update

    c = _ready()
    u = c.update("site-a")
    auth = authenticate_update(u.envelope, c.state.policy)
    # another envelope (a forged signature over the same payload) is verified on its own
    env = json.loads(u.envelope)
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[0] ^= 0x01
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(UpdateRejectedError) as ei:
        c.state.apply(canonical_json(env), {}.get, diff_bytes=u.diff_bytes, authenticated=auth)
    assert ei.value.reason_code == "E_SIG_INVALID"
    # the key was revoked between the request thread's check and the writer's
    c.append(revoke_entry(origin=ORIGIN, site_id="site-a", operator_keys=[c.operator]))
    assert not auth.still_valid_under(c.state.policy)
    with pytest.raises(UpdateRejectedError) as ei:
        c.state.apply(u.envelope, {}.get, diff_bytes=u.diff_bytes, authenticated=auth)
    assert ei.value.reason_code == "E_KEY_REVOKED"
    assert c.state.sequences == {}
