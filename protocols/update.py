"""Site updates: the signed payload, how a site builds it, and how a verifier accepts it.

A site update is a DSSE envelope (:mod:`protocols.dsse`, payloadType :data:`SITE_UPDATE_TYPE`)
signed by the site's active key, plus the ``diff.safetensors`` bytes it names. The payload is
canonical JSON with exactly these fields::

    {"kind": "site_update", "format_version": 1,
     "origin": <log origin>, "site_id": <site id>, "key_id": <hex sha256 of the site's key>,
     "sequence": <int >= 1, per site, strictly increasing>,
     "base": {"size": <log size >= 1>, "root": <hex RFC 6962 root at that size>,
              "digest": <"sha256:<hex>" content digest of reference version `size`>},
     "new_conditions": ["<site_id>/<batch>", ...],
     "diff": {"sha256": <hex of the diff bytes>, "size": <byte length>,
              "tensors": {<name>: {"dtype": "float32", "shape": [...],
                                   "l2": <float>, "min": <float>, "max": <float>}}}}

:func:`validate_update` is pure (bytes and an :class:`UpdateContext` in, no I/O, no clock) and
checks, in this order -- the first failure raises
:class:`~protocols.errors.UpdateRejectedError` with the reason code in brackets:

1. envelope <= ``limits.max_envelope_bytes`` and diff <= min(``limits.max_diff_bytes``,
   policy ``max_diff_bytes``) before any parsing [E_OVERSIZE];
2. the envelope parses strictly [E_ENVELOPE_MALFORMED], payloadType [E_PAYLOAD_TYPE], exactly one
   signature [E_ENVELOPE_MALFORMED];
3. its key id is a site key of the policy in force [E_KEY_UNKNOWN], ``active`` [E_KEY_REVOKED,
   E_KEY_ROTATED], and the signature verifies [E_SIG_INVALID];
4. the payload is canonical JSON with exactly the fields above [E_PAYLOAD_MALFORMED]; its origin is
   the policy's [E_ORIGIN_MISMATCH]; site id and key id are the signer's [E_SITE_MISMATCH];
5. sequence > the last accepted for the site [E_SEQUENCE_REPLAY];
6. base: ``1 <= size <= tree size`` and ``root`` is the log's root at ``size`` [E_BASE_UNKNOWN];
   ``digest`` is reference version ``size`` [E_BASE_DIGEST_MISMATCH]; ``size`` is not before the
   last genesis / federated round [E_BASE_STALE];
7. new conditions: at most min(policy ``max_new_conditions``, ``limits.max_new_conditions``)
   [E_TOO_MANY_CONDITIONS]; each ASCII
   ``<namespace>/<batch>`` [E_CONDITION_NAME] in the signer's namespace (= site id)
   [E_CONDITION_NAMESPACE], new and unique [E_CONDITION_EXISTS];
8. diff size and sha256 equal the signed ones [E_DIFF_SIZE_MISMATCH, E_DIFF_SHA256_MISMATCH];
9. the diff parses with the strict safetensors reader [E_SAFETENSORS_*, E_DTYPE_NOT_ALLOWED];
10. its tensors are exactly the condition tensors of the current reference, no frozen tensor
    [E_TENSOR_FROZEN, E_TENSOR_SET], dtypes and shapes as implied by the reference and the number of
    new conditions [E_TENSOR_DTYPE, E_TENSOR_SHAPE], all values finite [E_NONFINITE];
11. the signed tensor list equals the diff's (names, dtypes, shapes) and the signed statistics
    match (min/max exactly, l2 within relative 1e-5) [E_STATS_MISMATCH];
12. every |value| <= ``max_abs_value`` and every new condition's slice of every tensor has L2 norm
    <= ``max_condition_l2`` [E_NORM_LIMIT].

Rules 1 (envelope size) to 4 are :func:`authenticate_update`: bounded work that reads no
per-site state. Every failure there means "not authenticated as the site it claims", and nothing
may be charged to or attributed to a site before it passes (a coordinator runs it first on every
submission, then its per-site rate limit, then the rest). In particular the diff bytes are only
compared with the signed sha256 and size (rule 8) after the signature verified: a forged envelope
with any diff is answered E_SIG_INVALID / E_KEY_UNKNOWN, never a diff or blob code.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocols.bundle import NAMESPACE_RE
from protocols.canonical import canonical_json, parse_json_strict
from protocols.diff import (
    check_diff_against_base,
    check_new_conditions,
    diff_from_bytes,
    diff_to_bytes,
)
from protocols.dsse import Envelope, parse_envelope, sign_envelope, verify_envelope
from protocols.errors import UpdateRejectedError, VerificationError
from protocols.keys import key_id, public_key_from_text
from protocols.limits import DEFAULT_LIMITS, Limits
from protocols.policy import TrustPolicy

__all__ = [
    "SITE_UPDATE_TYPE",
    "UPDATE_FORMAT_VERSION",
    "PAYLOAD_SCHEMA",
    "TENSOR_SUMMARY_FIELDS",
    "payload_field_paths",
    "STATS_RTOL",
    "TensorSummary",
    "UpdatePayload",
    "SignedUpdate",
    "UpdateContext",
    "AuthenticatedUpdate",
    "AcceptedUpdate",
    "tensor_summary",
    "build_update_payload",
    "sign_update",
    "make_update",
    "parse_update_payload",
    "authenticate_update",
    "validate_update",
]

SITE_UPDATE_TYPE = "application/vnd.scarches-fl.site-update.v1+json"
UPDATE_FORMAT_VERSION = 1
STATS_RTOL = 1e-5
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

#: The site update payload's fields (the schema in the module docstring): a field whose value is
#: an object maps to that object's fields, any other field to None. ``diff.tensors`` maps each
#: tensor name to an object with exactly :data:`TENSOR_SUMMARY_FIELDS`. The parser below and the
#: site's privacy guard both read this one definition.
PAYLOAD_SCHEMA: Mapping[str, tuple[str, ...] | None] = {
    "kind": None,
    "format_version": None,
    "origin": None,
    "site_id": None,
    "key_id": None,
    "sequence": None,
    "base": ("size", "root", "digest"),
    "new_conditions": None,
    "diff": ("sha256", "size", "tensors"),
}
TENSOR_SUMMARY_FIELDS: tuple[str, ...] = ("dtype", "shape", "l2", "min", "max")


def payload_field_paths() -> tuple[str, ...]:
    """Every field path a site update payload carries, dotted, in schema order; the per-tensor
    fields appear as ``diff.tensors.<name>.<field>`` with ``<name>`` literally."""
    paths: list[str] = []
    for name, sub in PAYLOAD_SCHEMA.items():
        paths.append(name)
        for child in sub or ():
            paths.append(f"{name}.{child}")
    paths += [f"diff.tensors.<name>.{f}" for f in TENSOR_SUMMARY_FIELDS]
    return tuple(paths)



@dataclass(frozen=True)
class TensorSummary:
    dtype: str
    shape: tuple[int, ...]
    l2: float
    min: float
    max: float

    def to_json_obj(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "l2": self.l2, "min": self.min, "max": self.max}


def tensor_summary(arr: np.ndarray) -> TensorSummary:
    """L2 norm (float64 accumulation), min and max of a tensor; 0 for an empty one."""
    a = np.asarray(arr)
    if a.size == 0:
        return TensorSummary(a.dtype.name, tuple(a.shape), 0.0, 0.0, 0.0)
    a64 = a.astype(np.float64, copy=False)
    return TensorSummary(
        a.dtype.name, tuple(int(d) for d in a.shape),
        float(np.sqrt(np.sum(a64 * a64))), float(a64.min()), float(a64.max()),
    )


@dataclass(frozen=True)
class UpdatePayload:
    origin: str
    site_id: str
    key_id: str
    sequence: int
    base_size: int
    base_root: str  # hex
    base_digest: str
    new_conditions: tuple[str, ...]
    diff_sha256: str
    diff_size: int
    tensors: Mapping[str, TensorSummary]

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "kind": "site_update",
            "format_version": UPDATE_FORMAT_VERSION,
            "origin": self.origin,
            "site_id": self.site_id,
            "key_id": self.key_id,
            "sequence": self.sequence,
            "base": {"size": self.base_size, "root": self.base_root, "digest": self.base_digest},
            "new_conditions": list(self.new_conditions),
            "diff": {
                "sha256": self.diff_sha256,
                "size": self.diff_size,
                "tensors": {n: s.to_json_obj() for n, s in sorted(self.tensors.items())},
            },
        }

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json_obj())


@dataclass(frozen=True)
class SignedUpdate:
    """What a site submits: the envelope bytes (the future ledger leaf) and the diff bytes."""

    envelope: bytes
    diff_bytes: bytes
    payload: UpdatePayload


def build_update_payload(
    *,
    origin: str,
    site_id: str,
    site_key_id: str,
    sequence: int,
    base_size: int,
    base_root: bytes | str,
    base_digest: str,
    new_conditions: Sequence[str],
    diff: Mapping[str, np.ndarray],
    diff_bytes: bytes,
) -> UpdatePayload:
    """The payload for ``diff`` (statistics computed here from the arrays)."""
    root_hex = base_root.hex() if isinstance(base_root, bytes | bytearray) else str(base_root)
    for name, arr in diff.items():
        a = np.asarray(arr)
        if a.dtype.kind == "f" and not bool(np.isfinite(a).all()):
            raise UpdateRejectedError(
                "E_NONFINITE", f"diff tensor {name!r} holds NaN or Inf; the fine-tuning diverged"
            )
    return UpdatePayload(
        origin=origin, site_id=site_id, key_id=site_key_id, sequence=int(sequence),
        base_size=int(base_size), base_root=root_hex, base_digest=base_digest,
        new_conditions=tuple(new_conditions),
        diff_sha256=hashlib.sha256(diff_bytes).hexdigest(), diff_size=len(diff_bytes),
        tensors={name: tensor_summary(arr) for name, arr in diff.items()},
    )


def sign_update(payload: UpdatePayload, site_key: Ed25519PrivateKey) -> bytes:
    """The DSSE envelope bytes of ``payload`` signed by ``site_key`` (key id must match)."""
    if key_id(site_key) != payload.key_id:
        raise UpdateRejectedError(
            "E_SITE_MISMATCH", "the payload names another key id than the signing key"
        )
    return sign_envelope(SITE_UPDATE_TYPE, payload.to_bytes(), [site_key])


def make_update(
    *,
    origin: str,
    site_id: str,
    site_key: Ed25519PrivateKey,
    sequence: int,
    base_size: int,
    base_root: bytes | str,
    base_digest: str,
    new_conditions: Sequence[str],
    diff: Mapping[str, np.ndarray],
) -> SignedUpdate:
    """Serialize ``diff``, build the payload and sign it: everything a site submits."""
    diff_bytes = diff_to_bytes(diff)
    back = diff_from_bytes(diff_bytes, max_bytes=len(diff_bytes))  # stats from the exact bytes
    payload = build_update_payload(
        origin=origin, site_id=site_id, site_key_id=key_id(site_key), sequence=sequence,
        base_size=base_size, base_root=base_root, base_digest=base_digest,
        new_conditions=new_conditions, diff=back, diff_bytes=diff_bytes,
    )
    return SignedUpdate(sign_update(payload, site_key), diff_bytes, payload)


# --------------------------------------------------------------------------------------------
# Parsing


def _bad(msg: str) -> UpdateRejectedError:
    return UpdateRejectedError("E_PAYLOAD_MALFORMED", msg)


def _int(x: Any, what: str, lo: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise _bad(f"{what} must be an integer >= {lo}")
    return x


def _num(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        raise _bad(f"{what} must be a finite number")
    return float(x)


def parse_update_payload(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> UpdatePayload:
    """Parse payload bytes strictly (canonical JSON, exact fields and types)."""
    try:
        obj = parse_json_strict(
            data, max_bytes=limits.max_payload_bytes, max_depth=6, require_canonical=True,
            what="site update payload",
        )
    except VerificationError as exc:
        raise UpdateRejectedError("E_PAYLOAD_MALFORMED", exc.message) from exc
    fields = set(PAYLOAD_SCHEMA)
    if not isinstance(obj, dict) or set(obj) != fields:
        raise _bad(f"a site update payload has exactly the fields {sorted(fields)}")
    if obj["kind"] != "site_update" or type(obj["format_version"]) is not int or obj["format_version"] != UPDATE_FORMAT_VERSION:
        raise _bad("kind must be 'site_update' with format_version 1")
    for f in ("origin", "site_id", "key_id"):
        if not isinstance(obj[f], str):
            raise _bad(f"{f} must be a string")
    if not NAMESPACE_RE.fullmatch(obj["site_id"]):
        raise _bad("site_id is not a valid site id")
    if not _HEX64.fullmatch(obj["key_id"]):
        raise _bad("key_id must be 64 lowercase hex characters")
    seq = _int(obj["sequence"], "sequence", 1)
    base = obj["base"]
    if not isinstance(base, dict) or set(base) != set(PAYLOAD_SCHEMA["base"] or ()):
        raise _bad("base has exactly size, root, digest")
    size = _int(base["size"], "base.size", 1)
    if not isinstance(base["root"], str) or not _HEX64.fullmatch(base["root"]):
        raise _bad("base.root must be 64 lowercase hex characters")
    if not isinstance(base["digest"], str) or not _DIGEST.fullmatch(base["digest"]):
        raise _bad("base.digest must be 'sha256:<64 hex>'")
    conds = obj["new_conditions"]
    if not isinstance(conds, list) or not all(isinstance(c, str) for c in conds):
        raise _bad("new_conditions must be a list of strings")
    d = obj["diff"]
    if not isinstance(d, dict) or set(d) != set(PAYLOAD_SCHEMA["diff"] or ()):
        raise _bad("diff has exactly sha256, size, tensors")
    if not isinstance(d["sha256"], str) or not _HEX64.fullmatch(d["sha256"]):
        raise _bad("diff.sha256 must be 64 lowercase hex characters")
    dsize = _int(d["size"], "diff.size", 0)
    if not isinstance(d["tensors"], dict):
        raise _bad("diff.tensors must be an object")
    tensors: dict[str, TensorSummary] = {}
    for name, t in d["tensors"].items():
        if not isinstance(t, dict) or set(t) != set(TENSOR_SUMMARY_FIELDS):
            raise _bad(f"diff.tensors[{name[:60]!r}] has exactly dtype, shape, l2, min, max")
        if not isinstance(t["dtype"], str) or not isinstance(t["shape"], list):
            raise _bad(f"diff.tensors[{name[:60]!r}] dtype/shape malformed")
        shape = tuple(_int(s, "shape entry", 0) for s in t["shape"])
        tensors[name] = TensorSummary(
            t["dtype"], shape, _num(t["l2"], "l2"), _num(t["min"], "min"), _num(t["max"], "max")
        )
    return UpdatePayload(
        origin=obj["origin"], site_id=obj["site_id"], key_id=obj["key_id"], sequence=seq,
        base_size=size, base_root=base["root"], base_digest=base["digest"],
        new_conditions=tuple(conds), diff_sha256=d["sha256"], diff_size=dsize, tensors=tensors,
    )


# --------------------------------------------------------------------------------------------
# Validation


@dataclass(frozen=True)
class UpdateContext:
    """The trusted state an update is checked against (see :meth:`protocols.ledger.LedgerState.update_context`).

    ``root_at(size)`` and ``digest_at(size)`` return the log's root (32 bytes) and the reference
    version digest at a size in ``[1, tree_size]``, or None."""

    policy: TrustPolicy
    manifest: Mapping[str, Any]
    tree_size: int
    root_at: Callable[[int], bytes | None]
    digest_at: Callable[[int], str | None]
    last_sequence: Mapping[str, int]
    min_base_size: int
    #: the current condition names for membership tests; None reads ``manifest["conditions"]``
    #: (then ``manifest`` must be the current one; otherwise only its tensor roles, axes, dtypes
    #: and the dimensions other than the condition axis are read)
    conditions: AbstractSet[str] | None = None


@dataclass(frozen=True)
class AcceptedUpdate:
    """An update that passed every rule; ``diff`` holds read-only arrays."""

    payload: UpdatePayload
    diff: dict[str, np.ndarray] = field(repr=False)
    envelope: bytes = field(repr=False)
    diff_bytes: bytes = field(repr=False)

    @property
    def site_id(self) -> str:
        return self.payload.site_id

    @property
    def sequence(self) -> int:
        return self.payload.sequence

    @property
    def new_conditions(self) -> list[str]:
        return list(self.payload.new_conditions)


def _reject_from(exc: VerificationError, default: str | None = None) -> UpdateRejectedError:
    return UpdateRejectedError(default or exc.reason_code, exc.message)


@dataclass(frozen=True)
class _Measured:
    """One pass over a diff tensor (float64): its summary and each new condition's L2 norm."""

    summary: TensorSummary
    abs_max: float
    condition_norms: np.ndarray


def _measure(arr: np.ndarray, axis: int) -> _Measured:
    a64 = np.asarray(arr).astype(np.float64, copy=False)
    shape = tuple(int(d) for d in a64.shape)
    if a64.size == 0:
        empty = TensorSummary(arr.dtype.name, shape, 0.0, 0.0, 0.0)
        return _Measured(empty, 0.0, np.zeros(shape[axis] if a64.ndim else 0))
    sq = a64 * a64
    lo, hi = float(a64.min()), float(a64.max())
    summary = TensorSummary(arr.dtype.name, shape, float(np.sqrt(np.sum(sq))), lo, hi)
    cols = np.moveaxis(sq, axis, 0).reshape(shape[axis], -1)
    return _Measured(summary, max(-lo, hi), np.sqrt(np.sum(cols, axis=1)))


def _check_stats(payload: UpdatePayload, measured: Mapping[str, _Measured]) -> None:
    for name, m in measured.items():
        claimed = payload.tensors[name]
        actual = m.summary
        if claimed.dtype != actual.dtype or claimed.shape != actual.shape:
            raise UpdateRejectedError(
                "E_STATS_MISMATCH", f"tensor {name!r}: the signed dtype/shape differ from the diff's"
            )
        if claimed.min != actual.min or claimed.max != actual.max or not math.isclose(
            claimed.l2, actual.l2, rel_tol=STATS_RTOL, abs_tol=1e-30
        ):
            raise UpdateRejectedError(
                "E_STATS_MISMATCH",
                f"tensor {name!r}: the signed statistics (l2 {claimed.l2}, min {claimed.min}, "
                f"max {claimed.max}) do not match the diff (l2 {actual.l2}, min {actual.min}, "
                f"max {actual.max})",
            )


def _check_norms(policy: TrustPolicy, measured: Mapping[str, _Measured]) -> None:
    lim = policy.update_limits
    for name in sorted(measured):
        m = measured[name]
        if m.abs_max > lim.max_abs_value:
            raise UpdateRejectedError(
                "E_NORM_LIMIT",
                f"tensor {name!r} holds a value of magnitude {m.abs_max:.4g}, over "
                f"the policy limit {lim.max_abs_value:g}",
            )
        norms = m.condition_norms
        if norms.size and float(norms.max()) > lim.max_condition_l2:
            raise UpdateRejectedError(
                "E_NORM_LIMIT",
                f"tensor {name!r}: a new condition's slice has L2 norm {float(norms.max()):.4g}, "
                f"over the policy limit {lim.max_condition_l2:g}",
            )


@dataclass(frozen=True)
class AuthenticatedUpdate:
    """A site update whose signature verified under the active key of an enrolled site (rules
    1-4 of the module docstring): only now may anything be charged to or attributed to
    ``site_id``. Nothing about sequence, base or diff has been checked yet."""

    envelope: bytes = field(repr=False)
    payload: UpdatePayload
    site_id: str
    key_id: str
    #: the site key's public key text the signature verified under
    public_key: str = field(repr=False)

    def still_valid_under(self, policy: TrustPolicy) -> bool:
        """True when ``policy`` still makes this the signer's authentication: the same origin,
        the key id still ``site_id``'s, active, with the same public key. Then the verified
        signature and the parsed payload stand, and :func:`validate_update` reuses them
        (``authenticated=``) instead of parsing and verifying the same bytes again."""
        if policy.origin != self.payload.origin:
            return False
        found = policy.find_key(self.key_id)
        return (
            found is not None
            and found[0] == self.site_id
            and found[1].status == "active"
            and found[1].public_key == self.public_key
        )


def authenticate_update(
    envelope: bytes,
    policy: TrustPolicy,
    *,
    limits: Limits = DEFAULT_LIMITS,
    parsed: Envelope | None = None,
) -> AuthenticatedUpdate:
    """Rules 1 (envelope size) to 4 of the module docstring: bounded, linear work (one strict
    parse, one Ed25519 verification) that touches no per-site state, so a coordinator runs it
    on anything unauthenticated before any per-site work (rate limit, sequence, diff). Pure.
    Every rejection here means "not authenticated as the site it claims".

    ``parsed``: ``parse_envelope(envelope)`` when the caller has already parsed these very bytes
    (``LedgerState.apply`` reads the payloadType first); the strict parse is then not repeated."""
    if not isinstance(envelope, bytes | bytearray):
        raise UpdateRejectedError("E_ENVELOPE_MALFORMED", "envelope and diff must be bytes")
    if len(envelope) > limits.max_envelope_bytes:
        raise UpdateRejectedError(
            "E_OVERSIZE", f"envelope is {len(envelope)} bytes, over {limits.max_envelope_bytes}"
        )
    envelope = bytes(envelope)
    # 2. envelope
    try:
        env = parse_envelope(envelope, limits=limits) if parsed is None else parsed
    except VerificationError as exc:
        raise _reject_from(exc, "E_OVERSIZE" if exc.reason_code == "E_OVERSIZE" else "E_ENVELOPE_MALFORMED") from exc
    if env.payload_type != SITE_UPDATE_TYPE:
        raise UpdateRejectedError(
            "E_PAYLOAD_TYPE", f"payloadType {env.payload_type[:80]!r} is not {SITE_UPDATE_TYPE!r}"
        )
    if len(env.signatures) != 1:
        raise UpdateRejectedError(
            "E_ENVELOPE_MALFORMED", "a site update carries exactly one signature (the site's)"
        )
    # 3. signer
    kid = env.signatures[0].keyid
    found = policy.find_key(kid)
    if found is None:
        raise UpdateRejectedError(
            "E_KEY_UNKNOWN",
            f"key {kid[:16]}... is not enrolled; ask the operator to run `scarches-fl coordinator "
            "enroll` with this site's public key",
        )
    signer_site, site_key = found
    if site_key.status == "revoked":
        raise UpdateRejectedError("E_KEY_REVOKED", f"key {kid[:16]}... of site {signer_site!r} was revoked")
    if site_key.status == "rotated":
        raise UpdateRejectedError(
            "E_KEY_ROTATED", f"key {kid[:16]}... of site {signer_site!r} was rotated out; sign with the new key"
        )
    try:
        verify_envelope(
            env, trusted_keys=[public_key_from_text(site_key.public_key)], threshold=1,
            payload_type=SITE_UPDATE_TYPE, limits=limits,
        )
    except VerificationError as exc:
        raise _reject_from(exc, "E_SIG_INVALID") from exc
    # 4. payload
    payload = parse_update_payload(env.payload, limits=limits)
    if payload.origin != policy.origin:
        raise UpdateRejectedError(
            "E_ORIGIN_MISMATCH", f"the update is for log {payload.origin[:80]!r}, this log is {policy.origin!r}"
        )
    if payload.site_id != signer_site or payload.key_id != kid:
        raise UpdateRejectedError(
            "E_SITE_MISMATCH",
            f"the payload names site {payload.site_id!r} / key {payload.key_id[:16]}..., but it is "
            f"signed by site {signer_site!r}'s key {kid[:16]}...",
        )
    return AuthenticatedUpdate(envelope, payload, signer_site, kid, site_key.public_key)


def validate_update(
    envelope: bytes,
    diff_bytes: bytes,
    ctx: UpdateContext,
    *,
    limits: Limits = DEFAULT_LIMITS,
    authenticated: AuthenticatedUpdate | None = None,
    parsed: Envelope | None = None,
) -> AcceptedUpdate:
    """Accept or reject a site update under the rules of the module docstring. Pure.

    ``authenticated``: what :func:`authenticate_update` returned for these same envelope bytes
    (a coordinator authenticates on the request thread, before its rate limit). Rules 1-4 are
    then not run again when it is :meth:`~AuthenticatedUpdate.still_valid_under` the policy in
    force (one strict parse and one signature check per submission); otherwise, or for other
    bytes, they run in full. Only ever pass the return value of :func:`authenticate_update`.
    ``parsed``: as for :func:`authenticate_update`."""
    policy = ctx.policy
    # 1. sizes first
    if not isinstance(envelope, bytes | bytearray) or not isinstance(diff_bytes, bytes | bytearray):
        raise UpdateRejectedError("E_ENVELOPE_MALFORMED", "envelope and diff must be bytes")
    max_diff = min(limits.max_diff_bytes, policy.update_limits.max_diff_bytes)
    if len(diff_bytes) > max_diff:
        raise UpdateRejectedError(
            "E_OVERSIZE", f"diff is {len(diff_bytes)} bytes, over the limit {max_diff}"
        )
    diff_bytes = bytes(diff_bytes)
    # 1 (envelope size) - 4: who signed it
    auth = authenticated
    if auth is None or auth.envelope != envelope or not auth.still_valid_under(policy):
        auth = authenticate_update(envelope, policy, limits=limits, parsed=parsed)
    envelope, payload, signer_site = auth.envelope, auth.payload, auth.site_id
    # 5. sequence
    last = int(ctx.last_sequence.get(signer_site, 0))
    if payload.sequence <= last:
        raise UpdateRejectedError(
            "E_SEQUENCE_REPLAY",
            f"sequence {payload.sequence} of site {signer_site!r} is not above the last accepted "
            f"({last}); a replayed or duplicate update",
        )
    # 6. base
    root = ctx.root_at(payload.base_size) if 1 <= payload.base_size <= ctx.tree_size else None
    if root is None or not hmac.compare_digest(root.hex(), payload.base_root):
        raise UpdateRejectedError(
            "E_BASE_UNKNOWN",
            f"base checkpoint (size {payload.base_size}, root {payload.base_root[:16]}...) is not a "
            "checkpoint of this log; fetch the current checkpoint and map again",
        )
    if ctx.digest_at(payload.base_size) != payload.base_digest:
        raise UpdateRejectedError(
            "E_BASE_DIGEST_MISMATCH",
            f"base digest {payload.base_digest} is not reference version {payload.base_size}",
        )
    if payload.base_size < ctx.min_base_size:
        raise UpdateRejectedError(
            "E_BASE_STALE",
            f"base size {payload.base_size} predates the last change of the shared weights (size "
            f"{ctx.min_base_size}); map again on the current reference",
        )
    # 7. conditions
    max_new = min(policy.update_limits.max_new_conditions, limits.max_new_conditions)
    if len(payload.new_conditions) > max_new:
        raise UpdateRejectedError(
            "E_TOO_MANY_CONDITIONS",
            f"{len(payload.new_conditions)} new conditions, the policy allows {max_new} per update",
        )
    existing = ctx.manifest["conditions"] if ctx.conditions is None else ctx.conditions
    check_new_conditions(existing, payload.new_conditions, namespace=signer_site)
    # 8. diff identity
    if len(diff_bytes) != payload.diff_size:
        raise UpdateRejectedError(
            "E_DIFF_SIZE_MISMATCH", f"diff is {len(diff_bytes)} bytes, the payload says {payload.diff_size}"
        )
    if not hmac.compare_digest(hashlib.sha256(diff_bytes).hexdigest(), payload.diff_sha256):
        raise UpdateRejectedError(
            "E_DIFF_SHA256_MISMATCH", "the diff bytes do not hash to the signed diff sha256"
        )
    # 9. strict diff parse
    try:
        diff = diff_from_bytes(diff_bytes, max_bytes=max_diff, limits=limits)
    except VerificationError as exc:
        raise _reject_from(exc) from exc
    # 10. tensors vs reference
    check_diff_against_base(ctx.manifest, diff, len(payload.new_conditions))
    # 11. signed description vs actual
    if set(payload.tensors) != set(diff):
        raise UpdateRejectedError(
            "E_STATS_MISMATCH", "the signed tensor list differs from the tensors in the diff"
        )
    measured = {n: _measure(a, int(ctx.manifest["tensors"][n]["axis"])) for n, a in diff.items()}
    _check_stats(payload, measured)
    # 12. norms
    _check_norms(policy, measured)
    return AcceptedUpdate(payload, diff, envelope, diff_bytes)
