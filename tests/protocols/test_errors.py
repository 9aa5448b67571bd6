"""The reason code registry, and that every library exception our parsers can meet comes out
as a typed error raised ``from`` it."""

from __future__ import annotations

import binascii
import json
import re

import pytest
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from protocols import errors
from protocols.errors import REASON_CODES, ScarchesFLError, UpdateRejectedError, VerificationError

# Frozen: codes and numbers may be added, never changed. A failure here means a code was
# renumbered or removed -- retire it instead (retired=True) and add a new one.
_FROZEN = {
    "E_INTERNAL": 1, "E_OVERSIZE": 2, "E_JSON_MALFORMED": 3, "E_JSON_DUPLICATE_KEY": 4,
    "E_JSON_NONFINITE": 5, "E_JSON_TOO_DEEP": 6, "E_JSON_NOT_UTF8": 7, "E_JSON_NOT_CANONICAL": 8,
    "E_SAFETENSORS_MALFORMED": 9, "E_SAFETENSORS_HEADER_OVERSIZE": 10, "E_DTYPE_NOT_ALLOWED": 11,
    "E_BUNDLE_INVALID": 12, "E_DIGEST_MISMATCH": 13, "E_KEY_MALFORMED": 14,
    "E_ENVELOPE_MALFORMED": 15, "E_PAYLOAD_TYPE": 16, "E_SIG_INVALID": 17, "E_SIG_THRESHOLD": 18,
    "E_KEY_UNKNOWN": 19, "E_KEY_REVOKED": 20, "E_KEY_ROTATED": 21, "E_PAYLOAD_MALFORMED": 22,
    "E_ORIGIN_MISMATCH": 23, "E_SITE_MISMATCH": 24, "E_SEQUENCE_REPLAY": 25, "E_BASE_UNKNOWN": 26,
    "E_BASE_DIGEST_MISMATCH": 27, "E_CONDITION_NAME": 28, "E_CONDITION_NAMESPACE": 29,
    "E_CONDITION_EXISTS": 30, "E_DIFF_SHA256_MISMATCH": 31, "E_DIFF_SIZE_MISMATCH": 32,
    "E_TENSOR_SET": 33, "E_TENSOR_FROZEN": 34, "E_TENSOR_SHAPE": 35, "E_TENSOR_DTYPE": 36,
    "E_NONFINITE": 37, "E_NORM_LIMIT": 38, "E_STATS_MISMATCH": 39, "E_POLICY_INVALID": 40,
    "E_POLICY_CHANGE": 41, "E_SITE_NOT_ENROLLED": 42, "E_ROTATION_SIGNATURES": 43,
    "E_LEDGER_ENTRY_KIND": 44, "E_LEDGER_ORDER": 45, "E_BLOB_MISSING": 46, "E_BLOB_MISMATCH": 47,
    "E_RECEIPT_INVALID": 48, "E_PROOF_INVALID": 49, "E_CHECKPOINT_INVALID": 50,
    "E_CHECKPOINT_ROLLBACK": 51, "E_FEDERATED_ROUND": 52, "E_BASE_STALE": 53,
    "E_TOO_MANY_CONDITIONS": 54, "E_LABEL_BELOW_K": 57, "E_LABEL_LATENT_DIM": 58,
    "E_LABEL_VOCABULARY": 59, "E_LABEL_DP_WEAK": 60, "E_LABEL_LEVEL": 61, "E_LABEL_POLICY": 62,
    "E_LABEL_EXPRESSION": 63, "E_LABEL_SHARE_MINIMUM": 64, "E_LABEL_POLICY_SITE_UNKNOWN": 68,
    "E_LABEL_POLICY_NOT_CONTRIBUTED": 69, "E_FEDERATED_LABELS": 65,
}


def test_registry_is_append_only():
    for code, number in _FROZEN.items():
        assert REASON_CODES[code].number == number
    numbers = [rc.number for rc in REASON_CODES.values()]
    assert len(numbers) == len(set(numbers))
    for code, rc in REASON_CODES.items():
        assert re.fullmatch(r"E_[A-Z0-9_]+", code) and rc.code == code
        assert rc.help.endswith(".") and len(rc.help) > 15


def test_every_error_class_has_a_registered_default():
    seen = []
    stack = [VerificationError]
    while stack:
        cls = stack.pop()
        seen.append(cls)
        assert cls.default_reason_code in REASON_CODES, cls
        stack.extend(cls.__subclasses__())
    assert errors.UpdateRejectedError in seen and errors.SafetensorsFormatError in seen


def test_unregistered_code_is_a_bug():
    with pytest.raises(ValueError):
        VerificationError("x", reason_code="E_NOT_A_CODE")


def test_update_rejected_str_carries_code():
    e = UpdateRejectedError("E_SIG_INVALID", "bad signature")
    assert str(e) == "bad signature [E_SIG_INVALID]" and e.user_message


def _cause_chain(exc: BaseException) -> list[type]:
    out = []
    while exc is not None:
        out.append(type(exc))
        exc = exc.__cause__
    return out


def _raises_typed_from(fn, library_exc: type[BaseException]):
    with pytest.raises(ScarchesFLError) as ei:
        fn()
    chain = _cause_chain(ei.value)
    assert any(issubclass(t, library_exc) for t in chain), chain
    return ei.value


def test_json_errors_are_mapped():
    from protocols.canonical import parse_json_strict

    _raises_typed_from(lambda: parse_json_strict(b"{", max_bytes=10), json.JSONDecodeError)
    _raises_typed_from(lambda: parse_json_strict(b"\xff", max_bytes=10), UnicodeDecodeError)


def test_binascii_errors_are_mapped():
    from protocols.canonical import canonical_json
    from protocols.dsse import parse_envelope
    from protocols.keys import public_key_from_text

    _raises_typed_from(lambda: public_key_from_text("ed25519:@@@@"), binascii.Error)
    env = canonical_json({"payload": "A", "payloadType": "t", "signatures": [{"keyid": "0" * 64, "sig": "A"}]})
    _raises_typed_from(lambda: parse_envelope(env), binascii.Error)


def test_cryptography_errors_are_mapped(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import x25519

    from protocols.dsse import sign_envelope, verify_envelope
    from protocols.keys import load_private_key, private_key_from_pem
    from tests.protocols._factories import det_key

    env = sign_envelope("t", b"x", [det_key(1)])
    tampered = env.replace(b'"payload":"eA=="', b'"payload":"eQ=="')
    _raises_typed_from(
        lambda: verify_envelope(tampered, trusted_keys=[det_key(1).public_key()], threshold=1, payload_type=None),
        VerificationError,
    )
    # InvalidSignature is caught per signature; the typed error names the failed key
    with pytest.raises(VerificationError) as ei:
        verify_envelope(tampered, trusted_keys=[det_key(1).public_key()], threshold=1, payload_type=None)
    assert ei.value.reason_code == "E_SIG_INVALID"
    assert InvalidSignature  # the class verify_envelope catches
    _raises_typed_from(lambda: private_key_from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), ValueError)
    x = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "x.key").write_bytes(x)
    with pytest.raises(errors.KeyFormatError):
        load_private_key(tmp_path / "x.key")
    assert UnsupportedAlgorithm  # mapped in keys.py alongside ValueError/TypeError


def test_reading_safetensors_never_calls_the_library(monkeypatch):
    """Reading is the strict header check plus read-only views of the checked bytes: no
    library error can surface (writing still uses the library, its errors typed as
    BundleError)."""
    import numpy as np
    import safetensors.numpy

    from protocols.diff import diff_from_bytes, diff_to_bytes
    from tests.protocols._factories import tiny_bundle, tiny_diff

    diff = tiny_diff(tiny_bundle())
    data = diff_to_bytes(diff)

    def load(_data):
        raise AssertionError("the library's reader was called")

    monkeypatch.setattr(safetensors.numpy, "load", load)
    back = diff_from_bytes(data, max_bytes=1 << 20)
    assert sorted(back) == sorted(diff)
    for name, arr in diff.items():
        assert np.array_equal(back[name], arr) and not back[name].flags.writeable
