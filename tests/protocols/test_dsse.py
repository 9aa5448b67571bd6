"""DSSE v1: PAE, envelope encoding, threshold verification."""

from __future__ import annotations

import base64
import json

import pytest

from protocols.canonical import canonical_json
from protocols.dsse import add_signatures, pae, parse_envelope, sign_envelope, verify_envelope
from protocols.errors import EnvelopeFormatError, OversizeError, SignatureError
from protocols.keys import key_id
from protocols.limits import Limits
from tests.protocols._factories import det_key

T = "application/vnd.test+json"


def test_pae_matches_dsse_spec_example():
    # DSSE protocol.md: PAE("http://example.com/HelloWorld", "hello world")
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert pae("", b"") == b"DSSEv1 0  0 "


def test_sign_verify_roundtrip_and_encoding():
    k1, k2 = det_key(1), det_key(2)
    env = sign_envelope(T, b'{"a":1}', [k2, k1])
    obj = json.loads(env)
    assert canonical_json(obj) == env
    assert base64.b64decode(obj["payload"]) == b'{"a":1}'
    assert [s["keyid"] for s in obj["signatures"]] == sorted([key_id(k1), key_id(k2)])
    v = verify_envelope(env, trusted_keys=[k1.public_key(), k2.public_key()], threshold=2, payload_type=T)
    assert v.payload == b'{"a":1}' and v.signed_by == {key_id(k1), key_id(k2)}


def test_threshold_counts_each_key_once_and_ignores_untrusted():
    k1, k2, k3 = det_key(1), det_key(2), det_key(3)
    env = sign_envelope(T, b"x", [k1, k1, k3])
    assert len(parse_envelope(env).signatures) == 2
    with pytest.raises(SignatureError) as ei:
        verify_envelope(env, trusted_keys=[k1.public_key(), k2.public_key()], threshold=2, payload_type=T)
    assert ei.value.reason_code == "E_SIG_THRESHOLD"
    verify_envelope(env, trusted_keys=[k1.public_key(), k2.public_key()], threshold=1, payload_type=T)


def test_duplicate_keyid_signatures_are_malformed():
    k1 = det_key(1)
    env = json.loads(sign_envelope(T, b"x", [k1]))
    env["signatures"] = env["signatures"] * 2
    with pytest.raises(EnvelopeFormatError):
        parse_envelope(canonical_json(env))


def test_empty_policy_fails():
    env = sign_envelope(T, b"x", [det_key(1)])
    for keys, thr in [([], 1), ([det_key(1).public_key()], 0), ([det_key(1).public_key()], 2)]:
        with pytest.raises(SignatureError) as ei:
            verify_envelope(env, trusted_keys=keys, threshold=thr, payload_type=T)
        assert ei.value.reason_code == "E_SIG_THRESHOLD"


def test_payload_type_is_signed():
    k = det_key(1)
    env = json.loads(sign_envelope(T, b"x", [k]))
    env["payloadType"] = "application/other"
    with pytest.raises(SignatureError) as ei:
        verify_envelope(canonical_json(env), trusted_keys=[k.public_key()], threshold=1, payload_type=None)
    assert ei.value.reason_code == "E_SIG_INVALID"
    with pytest.raises(SignatureError) as ei:
        verify_envelope(canonical_json(env), trusted_keys=[k.public_key()], threshold=1, payload_type=T)
    assert ei.value.reason_code == "E_PAYLOAD_TYPE"


def test_add_signatures():
    k1, k2 = det_key(1), det_key(2)
    env = add_signatures(sign_envelope(T, b"x", [k1]), [k2])
    v = verify_envelope(env, trusted_keys=[k1.public_key(), k2.public_key()], threshold=2, payload_type=T)
    assert len(v.signed_by) == 2


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.update(extra=1),
        lambda e: e.pop("signatures"),
        lambda e: e.update(signatures=[]),
        lambda e: e.update(payload="not base64!"),
        lambda e: e.update(payload=e["payload"].rstrip("=")),
        lambda e: e["signatures"][0].update(keyid="ABC"),
        lambda e: e["signatures"][0].update(sig=base64.b64encode(b"short").decode()),
        lambda e: e.update(payloadType=""),
        lambda e: e.update(payloadType="a\nb"),
    ],
)
def test_malformed_envelopes(mutate):
    env = json.loads(sign_envelope(T, b"xy", [det_key(1)]))
    mutate(env)
    with pytest.raises(EnvelopeFormatError):
        parse_envelope(canonical_json(env))


def test_non_canonical_envelope_is_refused():
    env = sign_envelope(T, b"x", [det_key(1)])
    with pytest.raises(EnvelopeFormatError):
        parse_envelope(json.dumps(json.loads(env), indent=1).encode())


def test_limits():
    env = sign_envelope(T, b"x" * 100, [det_key(1)])
    with pytest.raises(OversizeError):
        parse_envelope(env, limits=Limits(max_envelope_bytes=50))
    with pytest.raises(OversizeError):
        parse_envelope(env, limits=Limits(max_payload_bytes=50))
