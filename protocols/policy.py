"""The trust policy: who may sign what, and the ``trust.json`` that pins it.

A :class:`TrustPolicy` holds

* ``origin`` -- the log's name (the first line of its checkpoints);
* ``log_public_key`` -- the coordinator's log key as a C2SP note verifier key
  (``<name>+<8 hex key hash>+<base64(0x01 || 32-byte Ed25519 key)>``);
* ``operator_keys`` + ``operator_threshold`` -- Ed25519 keys (``ed25519:<base64>``) of which at
  least ``threshold`` distinct ones must sign a genesis, policy or federated-round entry;
* ``sites`` -- enrolled site ids, each with its keys and their status ``active`` / ``revoked`` /
  ``rotated`` (at most one active key per site);
* ``witness_keys`` + ``witnesses_required`` -- C2SP ``cosignature/v1`` verifier keys of witnesses
  and how many cosignatures a checkpoint needs (``"witnesses": {"keys", "threshold"}``);
* ``tls_root_pem`` -- the coordinator's TLS root certificate (PEM) or ``None``;
* ``update_limits`` -- caps a site update must respect (:class:`UpdateLimits`);
* ``as_of_size`` -- the log size whose policy this snapshot is (0 for the initial roots).

``trust.json`` is the canonical JSON of :meth:`TrustPolicy.to_json_obj` (format
``scarches-fl.trust``, version 1). It is handed to sites and auditors out of band and is pinned.
Sites enrolled later come from ``policy`` ledger entries: a ledger replay starts from
:meth:`TrustPolicy.roots` (the snapshot with no sites) and applies every policy entry in order.

Rules of :func:`apply_policy_change` (pure; the operator threshold is checked by the ledger):

* ``enrol`` -- the site id matches the namespace pattern and is new, or all its keys are revoked;
  the key id was never used by any site. The key becomes ``active``.
* ``revoke`` -- the site's active key becomes ``revoked``. Entries it signed earlier stay valid
  (they are checked under the policy in force at their position); later ones are refused.
* ``rotate`` -- the site's active key (``previous_key_id``) becomes ``rotated`` and the new key
  ``active``; the entry must also be signed by the old and the new site key (checked by
  :func:`required_rotation_signers` in the ledger).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocols.bundle import NAMESPACE_RE, atomic_write
from protocols.canonical import canonical_json, parse_json_strict
from protocols.errors import FormatError, KeyFormatError, PolicyError, VerificationError
from protocols.keys import key_id, public_key_from_text
from protocols.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "TRUST_FORMAT",
    "TRUST_FORMAT_VERSION",
    "KEY_STATUSES",
    "UpdateLimits",
    "SiteKey",
    "SiteRecord",
    "TrustPolicy",
    "PolicyChange",
    "build_trust",
    "parse_trust",
    "read_trust",
    "write_trust",
    "parse_policy_change",
    "apply_policy_change",
    "check_vkey",
]

TRUST_FORMAT = "scarches-fl.trust"
TRUST_FORMAT_VERSION = 1
KEY_STATUSES = ("active", "revoked", "rotated")
_ORIGIN_RE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,254}")
_KEYID_RE = re.compile(r"[0-9a-f]{64}")


def check_vkey(vkey: object, what: str = "verifier key", *, key_type: int = 0x01) -> str:
    """Check a C2SP signed-note verifier key with :func:`protocols.checkpoint.parse_verifier_key`
    (``key_type`` 0x01 Ed25519 for the log key, 0x04 ``cosignature/v1`` for witnesses); returns
    it unchanged."""
    from protocols.checkpoint import parse_verifier_key

    if not isinstance(vkey, str) or len(vkey) > 512:
        raise PolicyError(f"{what} must be a string '<name>+<hash>+<base64 key>'")
    try:
        verifier = parse_verifier_key(vkey)
    except VerificationError as exc:
        raise PolicyError(f"{what}: {exc}") from exc
    if verifier.key_type != key_type:
        raise PolicyError(f"{what} has key type {verifier.key_type:#04x}, expected {key_type:#04x}")
    return vkey


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_pos_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass(frozen=True)
class UpdateLimits:
    """What a single site update may carry (checked by :func:`protocols.update.validate_update`)."""

    #: largest |value| of any diff element
    max_abs_value: float = 1.0e4
    #: largest L2 norm of one new condition's slice of one tensor
    max_condition_l2: float = 1.0e4
    #: most new conditions in one update
    max_new_conditions: int = 64
    #: largest diff.safetensors
    max_diff_bytes: int = 16 * 1024 * 1024

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "max_abs_value": self.max_abs_value,
            "max_condition_l2": self.max_condition_l2,
            "max_new_conditions": self.max_new_conditions,
            "max_diff_bytes": self.max_diff_bytes,
        }

    @classmethod
    def from_json_obj(cls, obj: Any) -> UpdateLimits:
        if not isinstance(obj, dict) or set(obj) != set(cls().to_json_obj()):
            raise PolicyError(f"update_limits must have exactly {sorted(cls().to_json_obj())}")
        if not (_is_pos_number(obj["max_abs_value"]) and _is_pos_number(obj["max_condition_l2"])):
            raise PolicyError("update_limits max_abs_value / max_condition_l2 must be > 0")
        for f in ("max_new_conditions", "max_diff_bytes"):
            if not _is_int(obj[f]) or obj[f] < 1:
                raise PolicyError(f"update_limits {f} must be an integer >= 1")
        return cls(
            float(obj["max_abs_value"]), float(obj["max_condition_l2"]),
            obj["max_new_conditions"], obj["max_diff_bytes"],
        )


@dataclass(frozen=True)
class SiteKey:
    key_id: str
    public_key: str  # "ed25519:<base64>"
    status: str

    def to_json_obj(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "public_key": self.public_key, "status": self.status}


@dataclass(frozen=True)
class SiteRecord:
    site_id: str
    keys: tuple[SiteKey, ...]

    @property
    def active_key(self) -> SiteKey | None:
        for k in self.keys:
            if k.status == "active":
                return k
        return None


@dataclass(frozen=True)
class TrustPolicy:
    origin: str
    log_public_key: str
    operator_keys: tuple[str, ...]
    operator_threshold: int
    sites: Mapping[str, SiteRecord] = field(default_factory=dict)
    witness_keys: tuple[str, ...] = ()
    witnesses_required: int = 0
    tls_root_pem: str | None = None
    update_limits: UpdateLimits = UpdateLimits()
    as_of_size: int = 0

    # -- derived views ---------------------------------------------------------------------
    def operator_public_keys(self) -> list[Ed25519PublicKey]:
        return [public_key_from_text(k) for k in self.operator_keys]

    def operator_key_ids(self) -> frozenset[str]:
        return frozenset(key_id(k) for k in self.operator_public_keys())

    def find_key(self, kid: str) -> tuple[str, SiteKey] | None:
        """``(site_id, SiteKey)`` of a site key id, or None."""
        for site in self.sites.values():
            for k in site.keys:
                if k.key_id == kid:
                    return site.site_id, k
        return None

    def roots(self) -> TrustPolicy:
        """The pinned roots only: no sites, ``as_of_size`` 0 (where a ledger replay starts)."""
        return replace(self, sites={}, as_of_size=0)

    # -- serialization ---------------------------------------------------------------------
    def to_json_obj(self) -> dict[str, Any]:
        return {
            "format": TRUST_FORMAT,
            "format_version": TRUST_FORMAT_VERSION,
            "origin": self.origin,
            "log_public_key": self.log_public_key,
            "operators": {"keys": list(self.operator_keys), "threshold": self.operator_threshold},
            "sites": {
                sid: {"keys": [k.to_json_obj() for k in rec.keys]}
                for sid, rec in sorted(self.sites.items())
            },
            "witnesses": {"keys": list(self.witness_keys), "threshold": self.witnesses_required},
            "tls_root_pem": self.tls_root_pem,
            "update_limits": self.update_limits.to_json_obj(),
            "as_of_size": self.as_of_size,
        }

    def to_json(self) -> bytes:
        """Canonical JSON bytes (the content of ``trust.json``)."""
        return canonical_json(self.to_json_obj())

    def validate(self) -> TrustPolicy:
        """Check every invariant (module docstring); returns self."""
        parse_trust(self.to_json())
        return self


def _check_certificate(pem: Any) -> None:
    from cryptography import x509

    if not isinstance(pem, str) or "-----BEGIN CERTIFICATE-----" not in pem:
        raise PolicyError("tls_root_pem must be a PEM certificate or null")
    try:
        x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise PolicyError(f"tls_root_pem is not a readable PEM certificate ({exc})") from exc


def _site_from_obj(sid: Any, obj: Any) -> SiteRecord:
    if not isinstance(sid, str) or not NAMESPACE_RE.fullmatch(sid):
        raise PolicyError(f"site id {str(sid)[:80]!r} must match {NAMESPACE_RE.pattern}")
    if not isinstance(obj, dict) or set(obj) != {"keys"} or not isinstance(obj["keys"], list):
        raise PolicyError(f"site {sid!r} must be an object with a 'keys' list")
    keys = []
    for k in obj["keys"]:
        if not isinstance(k, dict) or set(k) != {"key_id", "public_key", "status"}:
            raise PolicyError(f"site {sid!r}: each key has exactly key_id, public_key, status")
        try:
            pub = public_key_from_text(k["public_key"])
        except KeyFormatError as exc:
            raise PolicyError(f"site {sid!r}: {exc.message}") from exc
        if k["key_id"] != key_id(pub):
            raise PolicyError(f"site {sid!r}: key_id does not match the public key")
        if k["status"] not in KEY_STATUSES:
            raise PolicyError(f"site {sid!r}: key status must be one of {KEY_STATUSES}")
        keys.append(SiteKey(k["key_id"], k["public_key"], k["status"]))
    if sum(k.status == "active" for k in keys) > 1:
        raise PolicyError(f"site {sid!r} has more than one active key")
    if not keys:
        raise PolicyError(f"site {sid!r} has no keys")
    return SiteRecord(sid, tuple(keys))


def _policy_from_obj(obj: Any) -> TrustPolicy:
    fields = {
        "format", "format_version", "origin", "log_public_key", "operators", "sites",
        "witnesses", "tls_root_pem", "update_limits", "as_of_size",
    }
    if not isinstance(obj, dict) or set(obj) != fields:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise PolicyError(f"trust.json must have exactly the fields {sorted(fields)}; got {got}")
    if obj["format"] != TRUST_FORMAT or type(obj["format_version"]) is not int or obj["format_version"] != TRUST_FORMAT_VERSION:
        raise PolicyError(
            f"trust.json format {obj['format']!r} v{obj['format_version']!r} is not "
            f"{TRUST_FORMAT!r} v{TRUST_FORMAT_VERSION}; get a current trust.json from the operator"
        )
    origin = obj["origin"]
    if not isinstance(origin, str) or not _ORIGIN_RE.fullmatch(origin):
        raise PolicyError("origin must be 1..255 printable ASCII characters")
    log_key = check_vkey(obj["log_public_key"], "log_public_key")
    ops = obj["operators"]
    if not isinstance(ops, dict) or set(ops) != {"keys", "threshold"} or not isinstance(ops["keys"], list):
        raise PolicyError("operators must be {'keys': [...], 'threshold': n}")
    op_keys = tuple(ops["keys"])
    try:
        op_ids = {key_id(public_key_from_text(k)) for k in op_keys}
    except KeyFormatError as exc:
        raise PolicyError(f"operators: {exc.message}") from exc
    if len(op_ids) != len(op_keys):
        raise PolicyError("operators: a key is listed twice")
    thr = ops["threshold"]
    if not _is_int(thr) or not 1 <= thr <= len(op_keys):
        raise PolicyError(
            f"operators threshold {thr!r} must be between 1 and the number of operator keys "
            f"({len(op_keys)}); an empty policy is refused"
        )
    sites_obj = obj["sites"]
    if not isinstance(sites_obj, dict):
        raise PolicyError("sites must be an object {site_id: {...}}")
    sites = {sid: _site_from_obj(sid, rec) for sid, rec in sites_obj.items()}
    seen: set[str] = set(op_ids)
    for rec in sites.values():
        for k in rec.keys:
            if k.key_id in seen:
                raise PolicyError(f"key {k.key_id[:16]}... is used twice (sites/operators)")
            seen.add(k.key_id)
    wit = obj["witnesses"]
    if not isinstance(wit, dict) or set(wit) != {"keys", "threshold"} or not isinstance(wit["keys"], list):
        raise PolicyError("witnesses must be {'keys': [...], 'threshold': n}")
    wkeys = tuple(check_vkey(k, "witness key", key_type=0x04) for k in wit["keys"])
    if len(set(wkeys)) != len(wkeys):
        raise PolicyError("witnesses: a key is listed twice")
    req = wit["threshold"]
    if not _is_int(req) or not 0 <= req <= len(wkeys):
        raise PolicyError("witnesses threshold must be between 0 and the number of witness keys")
    tls = obj["tls_root_pem"]
    if tls is not None:
        _check_certificate(tls)
    as_of = obj["as_of_size"]
    if not _is_int(as_of) or as_of < 0:
        raise PolicyError("as_of_size must be an integer >= 0")
    return TrustPolicy(
        origin=origin, log_public_key=log_key, operator_keys=op_keys, operator_threshold=thr,
        sites=sites, witness_keys=wkeys, witnesses_required=req, tls_root_pem=tls,
        update_limits=UpdateLimits.from_json_obj(obj["update_limits"]), as_of_size=as_of,
    )


def parse_trust(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> TrustPolicy:
    """Parse ``trust.json`` bytes strictly (size cap, strict JSON, every field checked)."""
    try:
        obj = parse_json_strict(data, max_bytes=limits.max_trust_bytes, what="trust.json")
    except FormatError as exc:
        raise PolicyError(exc.message, reason_code=exc.reason_code) from exc
    return _policy_from_obj(obj)


def read_trust(path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS) -> TrustPolicy:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(limits.max_trust_bytes + 1)
    except OSError as exc:
        raise PolicyError(
            f"cannot read {path}: {exc.strerror}; get trust.json from the operator "
            "(`scarches-fl coordinator init` writes it into the state directory)"
        ) from exc
    try:
        return parse_trust(data, limits=limits)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc.message}", reason_code=exc.reason_code) from exc


def write_trust(path: str | os.PathLike[str], policy: TrustPolicy) -> None:
    """Write ``trust.json`` atomically (canonical JSON)."""
    atomic_write(Path(path), policy.validate().to_json())


def build_trust(
    *,
    origin: str,
    log_public_key: str,
    operator_keys: Iterable[Ed25519PublicKey | str],
    operator_threshold: int = 1,
    witness_keys: Iterable[str] = (),
    witnesses_required: int = 0,
    tls_root_pem: str | None = None,
    update_limits: UpdateLimits | None = None,
) -> TrustPolicy:
    """The initial policy (no sites) a coordinator writes to ``trust.json`` at init."""
    from protocols.keys import public_key_text

    texts = tuple(k if isinstance(k, str) else public_key_text(k) for k in operator_keys)
    return TrustPolicy(
        origin=origin, log_public_key=log_public_key, operator_keys=texts,
        operator_threshold=operator_threshold, sites={}, witness_keys=tuple(witness_keys),
        witnesses_required=witnesses_required, tls_root_pem=tls_root_pem,
        update_limits=update_limits or UpdateLimits(), as_of_size=0,
    ).validate()


# --------------------------------------------------------------------------------------------
# Policy changes


@dataclass(frozen=True)
class PolicyChange:
    """The payload of a ``policy`` ledger entry (see :mod:`protocols.ledger`)."""

    action: str  # enrol | revoke | rotate
    origin: str
    site_id: str
    public_key: str | None = None  # enrol, rotate: the new key
    previous_key_id: str | None = None  # rotate: the key being replaced
    note: str = ""

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "kind": "policy",
            "action": self.action,
            "origin": self.origin,
            "site_id": self.site_id,
            "public_key": self.public_key,
            "previous_key_id": self.previous_key_id,
            "note": self.note,
        }


def parse_policy_change(obj: Any) -> PolicyChange:
    fields = {"kind", "action", "origin", "site_id", "public_key", "previous_key_id", "note"}
    if not isinstance(obj, dict) or set(obj) != fields or obj["kind"] != "policy":
        raise PolicyError(f"a policy change has exactly the fields {sorted(fields)}")
    action = obj["action"]
    if action not in ("enrol", "revoke", "rotate"):
        raise PolicyError(f"policy action {str(action)[:40]!r} must be enrol, revoke or rotate")
    for f in ("origin", "site_id", "note"):
        if not isinstance(obj[f], str):
            raise PolicyError(f"policy change {f} must be a string")
    if len(obj["note"]) > 1024:
        raise PolicyError("policy change note is longer than 1024 characters")
    if not NAMESPACE_RE.fullmatch(obj["site_id"]):
        raise PolicyError(f"site id {obj['site_id'][:80]!r} must match {NAMESPACE_RE.pattern}")
    pk, prev = obj["public_key"], obj["previous_key_id"]
    if action in ("enrol", "rotate"):
        try:
            public_key_from_text(pk)
        except KeyFormatError as exc:
            raise PolicyError(f"policy change public_key: {exc.message}") from exc
    elif pk is not None:
        raise PolicyError("a revoke names no public_key (null)")
    if action == "rotate":
        if not isinstance(prev, str) or not _KEYID_RE.fullmatch(prev):
            raise PolicyError("a rotate names previous_key_id (64 hex)")
    elif prev is not None:
        raise PolicyError(f"{action} names no previous_key_id (null)")
    return PolicyChange(action, obj["origin"], obj["site_id"], pk, prev, obj["note"])


def apply_policy_change(policy: TrustPolicy, change: PolicyChange, *, at_size: int) -> TrustPolicy:
    """The policy after ``change`` (rules in the module docstring). ``at_size`` is the log size
    after the change's entry. Pure; raises :class:`PolicyError` (``E_POLICY_CHANGE``)."""
    if change.origin != policy.origin:
        raise PolicyError(
            f"policy change for origin {change.origin!r}, this log is {policy.origin!r}",
            reason_code="E_ORIGIN_MISMATCH",
        )
    sites = dict(policy.sites)
    rec = sites.get(change.site_id)
    used = set(policy.operator_key_ids())
    for r in sites.values():
        used.update(k.key_id for k in r.keys)
    if change.action == "enrol":
        assert change.public_key is not None
        kid = key_id(public_key_from_text(change.public_key))
        if rec is not None and rec.active_key is not None:
            raise PolicyError(
                f"site {change.site_id!r} is already enrolled with an active key; use rotate",
                reason_code="E_POLICY_CHANGE",
            )
        if kid in used:
            raise PolicyError(
                f"key {kid[:16]}... was used before; every enrolment needs a fresh key",
                reason_code="E_POLICY_CHANGE",
            )
        keys = (rec.keys if rec else ()) + (SiteKey(kid, change.public_key, "active"),)
        sites[change.site_id] = SiteRecord(change.site_id, keys)
    elif change.action == "revoke":
        if rec is None or rec.active_key is None:
            raise PolicyError(
                f"site {change.site_id!r} has no active key to revoke",
                reason_code="E_SITE_NOT_ENROLLED",
            )
        sites[change.site_id] = SiteRecord(
            rec.site_id,
            tuple(replace(k, status="revoked") if k.status == "active" else k for k in rec.keys),
        )
    else:  # rotate
        assert change.public_key is not None
        if rec is None or rec.active_key is None:
            raise PolicyError(
                f"site {change.site_id!r} has no active key to rotate",
                reason_code="E_SITE_NOT_ENROLLED",
            )
        if rec.active_key.key_id != change.previous_key_id:
            raise PolicyError(
                f"rotate names previous key {str(change.previous_key_id)[:16]}..., the site's "
                f"active key is {rec.active_key.key_id[:16]}...",
                reason_code="E_POLICY_CHANGE",
            )
        kid = key_id(public_key_from_text(change.public_key))
        if kid in used:
            raise PolicyError(
                f"key {kid[:16]}... was used before; rotate to a fresh key",
                reason_code="E_POLICY_CHANGE",
            )
        keys = tuple(replace(k, status="rotated") if k.status == "active" else k for k in rec.keys)
        sites[change.site_id] = SiteRecord(rec.site_id, keys + (SiteKey(kid, change.public_key, "active"),))
    return replace(policy, sites=sites, as_of_size=at_size)


def required_rotation_signers(policy: TrustPolicy, change: PolicyChange) -> list[str]:
    """Site key ids that must sign a rotation besides the operators: old and new key."""
    if change.action != "rotate":
        return []
    assert change.public_key is not None and change.previous_key_id is not None
    return [change.previous_key_id, key_id(public_key_from_text(change.public_key))]


__all__ += ["required_rotation_signers"]
