"""DSSE v1 envelopes (https://github.com/secure-systems-lab/dsse), Ed25519 signatures.

Signed bytes (PAE, pre-authentication encoding)::

    PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body
    LEN(s) = ASCII decimal byte length of s, no leading zeros; SP = one 0x20 byte

Envelope bytes are the canonical JSON (:mod:`protocols.canonical`) of::

    {"payload": base64(body), "payloadType": type, "signatures": [{"keyid": hex, "sig": base64(sig)}]}

with standard padded base64. Signatures are sorted by ``keyid`` and keyids are unique.

Verification rules of :func:`verify_envelope` (pure: bytes and trusted keys in, no I/O):

1. The envelope is at most ``limits.max_envelope_bytes`` and is *canonical* JSON with exactly the
   fields above; base64 is strict and canonical; the payload is at most
   ``limits.max_payload_bytes``; at most ``limits.max_signatures`` signatures.
2. ``payloadType`` must equal the expected type when one is given.
3. The trusted key set and the threshold come from the caller (the policy in force); key ids are
   computed from those keys, never taken from the envelope. ``threshold >= 1`` and at least
   ``threshold`` trusted keys are required: an empty policy fails.
4. A signature counts when its ``keyid`` names a trusted key and the Ed25519 signature over PAE
   verifies under that key. Each key counts once. Signatures by keys outside the set are ignored.
5. Fewer than ``threshold`` counted keys -> :class:`~protocols.errors.SignatureError`
   (``E_SIG_INVALID`` if a trusted key's signature failed, else ``E_SIG_THRESHOLD``).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols.canonical import canonical_json, parse_json_strict
from protocols.errors import CanonicalJSONError, EnvelopeFormatError, OversizeError, SignatureError
from protocols.keys import key_id
from protocols.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "Signature",
    "Envelope",
    "VerifiedEnvelope",
    "pae",
    "sign_envelope",
    "add_signatures",
    "parse_envelope",
    "verify_envelope",
]

_KEYID_RE = re.compile(r"[0-9a-f]{64}")
_PAYLOAD_TYPE_RE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,254}")


def pae(payload_type: str, payload: bytes) -> bytes:
    """The DSSE v1 pre-authentication encoding: the bytes that are signed."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A parsed, not yet verified, envelope."""

    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    @property
    def keyids(self) -> tuple[str, ...]:
        return tuple(s.keyid for s in self.signatures)

    def to_bytes(self) -> bytes:
        return canonical_json(
            {
                "payload": base64.b64encode(self.payload).decode("ascii"),
                "payloadType": self.payload_type,
                "signatures": [
                    {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")}
                    for s in sorted(self.signatures, key=lambda s: s.keyid)
                ],
            }
        )


@dataclass(frozen=True)
class VerifiedEnvelope:
    """What :func:`verify_envelope` vouches for: the payload and which trusted keys signed it."""

    payload_type: str
    payload: bytes
    signed_by: frozenset[str]
    envelope: Envelope


def _check_payload_type(payload_type: str) -> None:
    if not isinstance(payload_type, str) or not _PAYLOAD_TYPE_RE.fullmatch(payload_type):
        raise EnvelopeFormatError("payloadType must be 1..255 printable ASCII characters")


def sign_envelope(
    payload_type: str, payload: bytes, signers: Sequence[Ed25519PrivateKey]
) -> bytes:
    """Envelope bytes with one signature per distinct signer (at least one)."""
    _check_payload_type(payload_type)
    if not signers:
        raise SignatureError("an envelope needs at least one signer", reason_code="E_SIG_THRESHOLD")
    msg = pae(payload_type, bytes(payload))
    sigs: dict[str, Signature] = {}
    for key in signers:
        kid = key_id(key)
        sigs[kid] = Signature(kid, key.sign(msg))
    return Envelope(payload_type, bytes(payload), tuple(sigs.values())).to_bytes()


def add_signatures(envelope_bytes: bytes, signers: Sequence[Ed25519PrivateKey], *,
                   limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The same envelope with more signatures (e.g. a rotation signed by old and new key)."""
    env = parse_envelope(envelope_bytes, limits=limits)
    msg = pae(env.payload_type, env.payload)
    sigs = {s.keyid: s for s in env.signatures}
    for key in signers:
        kid = key_id(key)
        sigs[kid] = Signature(kid, key.sign(msg))
    return Envelope(env.payload_type, env.payload, tuple(sigs.values())).to_bytes()


def _b64(value: object, what: str, max_len: int) -> bytes:
    if not isinstance(value, str):
        raise EnvelopeFormatError(f"{what} must be a base64 string")
    if len(value) > (max_len * 4) // 3 + 4:
        raise OversizeError(f"{what} is longer than {max_len} bytes decoded")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise EnvelopeFormatError(f"{what} is not valid base64: {exc}") from exc
    if base64.b64encode(raw).decode("ascii") != value:
        raise EnvelopeFormatError(f"{what} is not canonical padded base64")
    return raw


def _envelope_keys(obj: Any) -> None:
    # checked before the canonical re-encoding: a large document of other keys costs one parse
    if not isinstance(obj, dict) or set(obj) != {"payload", "payloadType", "signatures"}:
        raise EnvelopeFormatError(
            "a DSSE envelope is an object with exactly payload, payloadType, signatures"
        )


def parse_envelope(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Parse envelope bytes under rule 1 (no signature checks). Raises
    :class:`EnvelopeFormatError` / :class:`OversizeError`."""
    try:
        obj = parse_json_strict(
            data, max_bytes=limits.max_envelope_bytes, max_depth=4, require_canonical=True,
            what="DSSE envelope", shape=_envelope_keys,
        )
    except OversizeError:
        raise
    except CanonicalJSONError as exc:
        raise EnvelopeFormatError(exc.message, reason_code="E_ENVELOPE_MALFORMED") from exc
    payload_type = obj["payloadType"]
    _check_payload_type(payload_type)
    payload = _b64(obj["payload"], "payload", limits.max_payload_bytes)
    if len(payload) > limits.max_payload_bytes:
        raise OversizeError(f"payload is {len(payload)} bytes, over {limits.max_payload_bytes}")
    sigs_obj = obj["signatures"]
    if not isinstance(sigs_obj, list) or not sigs_obj:
        raise EnvelopeFormatError("signatures must be a non-empty list")
    if len(sigs_obj) > limits.max_signatures:
        raise OversizeError(f"more than {limits.max_signatures} signatures")
    sigs: list[Signature] = []
    for item in sigs_obj:
        if not isinstance(item, dict) or set(item) != {"keyid", "sig"}:
            raise EnvelopeFormatError("each signature is an object with exactly keyid and sig")
        kid = item["keyid"]
        if not isinstance(kid, str) or not _KEYID_RE.fullmatch(kid):
            raise EnvelopeFormatError("keyid must be 64 lowercase hex characters (SHA-256)")
        sig = _b64(item["sig"], "sig", 64)
        if len(sig) != 64:
            raise EnvelopeFormatError("an Ed25519 signature is 64 bytes")
        sigs.append(Signature(kid, sig))
    kids = [s.keyid for s in sigs]
    if kids != sorted(set(kids)):
        raise EnvelopeFormatError("signatures must be sorted by keyid with no keyid repeated")
    return Envelope(payload_type, payload, tuple(sigs))


def verify_envelope(
    data: bytes | Envelope,
    *,
    trusted_keys: Iterable[Ed25519PublicKey],
    threshold: int,
    payload_type: str | None,
    limits: Limits = DEFAULT_LIMITS,
) -> VerifiedEnvelope:
    """Verify under the rules of the module docstring; returns the payload and signers."""
    env = data if isinstance(data, Envelope) else parse_envelope(data, limits=limits)
    if payload_type is not None and env.payload_type != payload_type:
        raise SignatureError(
            f"payloadType is {env.payload_type!r}, expected {payload_type!r}",
            reason_code="E_PAYLOAD_TYPE",
        )
    keys = {key_id(k): k for k in trusted_keys}
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise SignatureError(
            f"threshold must be an integer >= 1, got {threshold!r}; a policy that requires no "
            "signature is refused", reason_code="E_SIG_THRESHOLD",
        )
    if len(keys) < threshold:
        raise SignatureError(
            f"the policy names {len(keys)} key(s) but requires {threshold} signature(s); an "
            "empty or unsatisfiable policy is refused", reason_code="E_SIG_THRESHOLD",
        )
    msg = pae(env.payload_type, env.payload)
    good: set[str] = set()
    bad: list[str] = []
    for sig in env.signatures:
        pub = keys.get(sig.keyid)
        if pub is None or sig.keyid in good:
            continue
        try:
            pub.verify(sig.sig, msg)
        except InvalidSignature:
            bad.append(sig.keyid)
            continue
        good.add(sig.keyid)
    if len(good) < threshold:
        if bad:
            raise SignatureError(
                f"signature by key {bad[0][:16]}... does not verify; the envelope was altered "
                "or signed with another key", reason_code="E_SIG_INVALID",
            )
        raise SignatureError(
            f"{len(good)} of the required {threshold} trusted key(s) signed; signed by "
            f"{[k[:16] for k in env.keyids]}", reason_code="E_SIG_THRESHOLD",
        )
    return VerifiedEnvelope(env.payload_type, env.payload, frozenset(good), env)
