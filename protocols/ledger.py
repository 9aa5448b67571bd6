"""The model-update ledger: entry kinds, the replayed state, and receipts.

The ledger is an append-only RFC 6962 Merkle log (:mod:`protocols.merkle`) whose leaves are DSSE
envelope bytes (:mod:`protocols.dsse`), exactly as signed: leaf hash = SHA-256(0x00 || envelope).
The payloadType says the kind:

=================== ============================================================ ==================
kind                payloadType                                                  signed by
=================== ============================================================ ==================
``genesis``         ``application/vnd.scarches-fl.genesis.v1+json``              operator threshold
``site_update``     ``application/vnd.scarches-fl.site-update.v1+json``          the site's key
``federated_round`` ``application/vnd.scarches-fl.federated-round.v1+json``      operator threshold
``policy``          ``application/vnd.scarches-fl.policy.v1+json``               operator threshold
                                                                                 (+ old and new site
                                                                                 key for ``rotate``)
``label_contribution`` ``application/vnd.scarches-fl.label-contribution.v1+json`` the site's key
``label_policy``    ``application/vnd.scarches-fl.label-policy.v1+json``         operator threshold
``federated_labels`` ``application/vnd.scarches-fl.federated-labels.v1+json``    operator threshold
=================== ============================================================ ==================

Payloads are canonical JSON (see ``docs/protocol.md`` for every field). Blobs (bundle files, diffs)
are stored beside the log, named by the lowercase hex SHA-256 of their bytes.

Replay rules of :class:`LedgerState` (pure: entry bytes and a blob lookup in, no I/O, no clock).
Reference **version N** is the model after entries ``[0, N)``; the policy in force for entry ``i``
is ``trust.roots()`` with every policy entry before ``i`` applied.

1. Entry 0 is a ``genesis`` and no other entry is [E_LEDGER_ORDER]. Every entry's payload names
   this log's origin [E_ORIGIN_MISMATCH] and is canonical JSON with exactly its fields.
2. ``genesis`` / ``federated_round`` / ``federated_labels`` / ``policy`` envelopes verify under the operator keys with the
   operator threshold of the policy in force [E_SIG_INVALID, E_SIG_THRESHOLD]; a ``rotate`` is also
   signed by the site's old and new key [E_ROTATION_SIGNATURES].
3. Every blob an entry names is available [E_BLOB_MISSING] and hashes to its name
   [E_BLOB_MISMATCH]; a genesis / round bundle's content digest is the one signed
   [E_DIGEST_MISMATCH]. A *submitted* site update's diff is given as bytes instead
   (``apply(..., diff_bytes=)``): never looked up under the name its unverified payload claims,
   it is compared with the signed size and sha256 by ``validate_update`` after the signature
   [E_DIFF_SIZE_MISMATCH, E_DIFF_SHA256_MISMATCH].
4. ``site_update`` entries pass :func:`protocols.update.validate_update` against the state before
   them (policy, sequences, base checkpoint and digest, current conditions and shapes) and apply
   with :func:`protocols.diff.apply_condition_diff`'s rule.
5. ``federated_round``: ``round`` strictly increases; its base is a version of this log with the
   stated digest; every contributor is a site with an active key; the aggregate keeps every
   current condition, in order, as a prefix [E_FEDERATED_ROUND]. It replaces the model; updates
   whose base predates it are refused afterwards [E_BASE_STALE].
6. ``policy`` entries apply with :func:`protocols.policy.apply_policy_change`.
7. ``label_contribution`` entries pass :func:`protocols.labels.validate_label_contribution`
   against the state before them (the site's sequence space is shared with its updates) and add
   to the label knowledge of the current lineage; ``label_policy`` entries (operator-signed)
   apply with :func:`protocols.labels.apply_label_policy`. Neither changes the model or its
   digest; a genesis, a federated round or a ``federated_labels`` entry starts a new lineage
   without contributions. The label
   knowledge of version N is :meth:`LedgerState.label_knowledge` ``(size=N)``.
8. ``federated_labels`` (ADR 0049) publishes a federated run's label knowledge: two blobs, a
   canonical JSON ``{"labels": <the bundle's manifest labels>, "tensors": {name: spec}}`` (at
   most ``limits.max_manifest_bytes``) and a safetensors file of exactly those tensors (the
   expression prototypes' arrays, at most ``limits.max_model_bytes``) [E_OVERSIZE, then rule 3].
   Its base is the ledger's current federated head: the entry directly follows a
   ``federated_round`` (so at most one per round), ``round`` is that round's, and ``base`` is
   the version after it (size = this entry's index, that aggregate's digest); the aggregate
   carries no label knowledge of its own; the labels name a level and their tensors add to
   the aggregate's without replacing one [E_FEDERATED_LABELS]; the result hashes to the signed
   ``digest`` [E_DIGEST_MISMATCH]. It binds the
   signed ``labels_record`` (sha256 of the run's signed ``rounds/labels.json`` envelope), which
   ``federate verify`` checks against the shares (recomputing the prototypes is its job, not
   the replay's). The labelled bundle (:func:`apply_federated_labels`) replaces the model as a
   round does: label contributions after it add to its label knowledge as to a genesis's, and
   updates whose base predates it are refused [E_BASE_STALE].

A failed :meth:`LedgerState.apply` leaves the state unchanged (it raises a typed
:class:`~protocols.errors.VerificationError`), so the coordinator uses the same object to decide
whether to append.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols import merkle
from protocols.bundle import (
    NAMESPACE_RE,
    ReferenceBundle,
    bundle_from_bytes,
    bundle_to_bytes,
    make_bundle,
    manifest_leaf,
    safetensors_from_bytes,
    safetensors_to_bytes,
    tensor_leaf_hash,
    tensor_leaf_header,
)
from protocols.canonical import canonical_json, parse_json_strict
from protocols.dsse import Envelope, add_signatures, parse_envelope, sign_envelope, verify_envelope
from protocols.errors import (
    BundleError,
    LedgerError,
    PolicyError,
    ReceiptError,
    SignatureError,
    UpdateRejectedError,
    VerificationError,
)
from protocols.keys import key_id, public_key_from_text, public_key_text
from protocols.labels import (
    LABEL_CONTRIBUTION_TYPE,
    LABEL_POLICY_TYPE,
    AcceptedContribution,
    LabelContext,
    LabelLedger,
    merge_label_knowledge,
    parse_label_policy,
    reference_expression_levels,
    reference_levels,
    validate_label_contribution,
)
from protocols.limits import DEFAULT_LIMITS, Limits
from protocols.policy import (
    PolicyChange,
    TrustPolicy,
    apply_policy_change,
    parse_policy_change,
    parse_trust,
    required_rotation_signers,
)
from protocols.update import (
    SITE_UPDATE_TYPE,
    AcceptedUpdate,
    AuthenticatedUpdate,
    UpdateContext,
    validate_update,
)

__all__ = [
    "GENESIS_TYPE",
    "POLICY_TYPE",
    "FEDERATED_ROUND_TYPE",
    "FEDERATED_LABELS_TYPE",
    "SITE_UPDATE_TYPE",
    "PAYLOAD_TYPES",
    "BlobLookup",
    "BlobRef",
    "GenesisEntry",
    "AppliedEntry",
    "LedgerState",
    "ConditionCap",
    "snapshot_state",
    "capture_snapshot",
    "StateSnapshot",
    "restore_state",
    "entry_kind",
    "entry_blobs",
    "entry_payload",
    "make_genesis",
    "make_policy_entry",
    "enrol_entry",
    "revoke_entry",
    "rotate_entry",
    "rotation_request",
    "make_federated_round",
    "make_federated_labels",
    "apply_federated_labels",
    "replay",
    "Receipt",
    "make_receipt",
    "parse_receipt",
    "verify_receipt",
    "RECEIPT_FORMAT",
]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

GENESIS_TYPE = "application/vnd.scarches-fl.genesis.v1+json"
POLICY_TYPE = "application/vnd.scarches-fl.policy.v1+json"
FEDERATED_ROUND_TYPE = "application/vnd.scarches-fl.federated-round.v1+json"
FEDERATED_LABELS_TYPE = "application/vnd.scarches-fl.federated-labels.v1+json"
PAYLOAD_TYPES = {
    GENESIS_TYPE: "genesis",
    SITE_UPDATE_TYPE: "site_update",
    FEDERATED_ROUND_TYPE: "federated_round",
    POLICY_TYPE: "policy",
    LABEL_CONTRIBUTION_TYPE: "label_contribution",
    LABEL_POLICY_TYPE: "label_policy",
    FEDERATED_LABELS_TYPE: "federated_labels",
}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

#: ``lookup(sha256_hex) -> bytes or None``
BlobLookup = Callable[[str], "bytes | None"]


@dataclass(frozen=True)
class BlobRef:
    """A content-addressed blob an entry names: ``role`` is "manifest", "safetensors", "diff",
    or, of a ``federated_labels`` entry, "labels" and "label_tensors"."""

    role: str
    sha256: str
    size: int


# --------------------------------------------------------------------------------------------
# Payload parsing helpers


def _payload_obj(env: Envelope, *, limits: Limits, max_depth: int = 8) -> dict[str, Any]:
    try:
        obj = parse_json_strict(
            env.payload, max_bytes=limits.max_payload_bytes, max_depth=max_depth,
            require_canonical=True, what=f"{PAYLOAD_TYPES.get(env.payload_type, 'entry')} payload",
        )
    except VerificationError as exc:
        raise LedgerError(exc.message, reason_code="E_PAYLOAD_MALFORMED") from exc
    if not isinstance(obj, dict):
        raise LedgerError("an entry payload is a JSON object", reason_code="E_PAYLOAD_MALFORMED")
    return obj


def _fields(obj: dict[str, Any], fields: set[str], what: str) -> None:
    if set(obj) != fields:
        raise LedgerError(
            f"a {what} payload has exactly the fields {sorted(fields)}; got {sorted(obj)[:12]}",
            reason_code="E_PAYLOAD_MALFORMED",
        )


def _blob_ref_obj(obj: Any, role: str) -> BlobRef:
    if (
        not isinstance(obj, dict)
        or set(obj) != {"sha256", "size"}
        or not isinstance(obj["sha256"], str)
        or not _HEX64.fullmatch(obj["sha256"])
        or isinstance(obj["size"], bool)
        or not isinstance(obj["size"], int)
        or obj["size"] < 0
    ):
        raise LedgerError(f"{role} must be {{sha256: <64 hex>, size: int}}", reason_code="E_PAYLOAD_MALFORMED")
    return BlobRef(role, obj["sha256"], obj["size"])


def _bundle_ref_obj(obj: Any, what: str) -> tuple[BlobRef, BlobRef, str]:
    if not isinstance(obj, dict) or set(obj) != {"manifest", "safetensors", "digest"}:
        raise LedgerError(f"{what} has exactly manifest, safetensors, digest", reason_code="E_PAYLOAD_MALFORMED")
    if not isinstance(obj["digest"], str) or not _DIGEST.fullmatch(obj["digest"]):
        raise LedgerError(f"{what}.digest must be 'sha256:<64 hex>'", reason_code="E_PAYLOAD_MALFORMED")
    return _blob_ref_obj(obj["manifest"], "manifest"), _blob_ref_obj(obj["safetensors"], "safetensors"), obj["digest"]


def _int(x: Any, what: str, lo: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise LedgerError(f"{what} must be an integer >= {lo}", reason_code="E_PAYLOAD_MALFORMED")
    return x


def entry_kind(envelope: bytes, *, limits: Limits = DEFAULT_LIMITS) -> str:
    """The kind of an entry from its payloadType (no signature check)."""
    env = parse_envelope(envelope, limits=limits)
    kind = PAYLOAD_TYPES.get(env.payload_type)
    if kind is None:
        raise LedgerError(f"unknown payloadType {env.payload_type[:80]!r}", reason_code="E_LEDGER_ENTRY_KIND")
    return kind


def entry_payload(envelope: bytes, *, limits: Limits = DEFAULT_LIMITS) -> tuple[str, dict[str, Any]]:
    """``(kind, payload object)`` of an entry, parsed strictly but NOT verified (for display)."""
    env = parse_envelope(envelope, limits=limits)
    kind = PAYLOAD_TYPES.get(env.payload_type)
    if kind is None:
        raise LedgerError(f"unknown payloadType {env.payload_type[:80]!r}", reason_code="E_LEDGER_ENTRY_KIND")
    obj = _payload_obj(env, limits=limits)
    if obj.get("kind") != kind:
        raise LedgerError("payload kind does not match payloadType", reason_code="E_LEDGER_ENTRY_KIND")
    return kind, obj


def _claimed_diff(payload: bytes) -> BlobRef | None:
    """The diff blob a site update's payload names, read leniently (the C ``json`` parser, no
    second strict parse per accept): it only picks the blob to look up. ``validate_update``
    then parses the payload strictly and checks the diff's bytes against it; None (a payload
    that names no well-formed diff) leaves the precise rejection to it."""
    try:
        d = json.loads(payload)["diff"]
        return _blob_ref_obj({"sha256": d["sha256"], "size": d["size"]}, "diff")
    except (ValueError, KeyError, TypeError, RecursionError, LedgerError):
        return None


def entry_blobs(envelope: bytes, *, limits: Limits = DEFAULT_LIMITS) -> list[BlobRef]:
    """The blobs an entry names (to fetch or store beside it); not verified."""
    kind, obj = entry_payload(envelope, limits=limits)
    if kind == "site_update":
        d = obj.get("diff")
        if not isinstance(d, dict):
            raise LedgerError("site update has no diff object", reason_code="E_PAYLOAD_MALFORMED")
        return [_blob_ref_obj({"sha256": d.get("sha256"), "size": d.get("size")}, "diff")]
    if kind == "genesis":
        m, s, _ = _bundle_ref_obj(obj.get("bundle"), "bundle")
        return [m, s]
    if kind == "federated_round":
        m, s, _ = _bundle_ref_obj(obj.get("aggregate"), "aggregate")
        return [m, s]
    if kind == "federated_labels":
        return list(_labels_ref_obj(obj.get("labels")))
    return []


def _labels_ref_obj(obj: Any) -> tuple[BlobRef, BlobRef]:
    if not isinstance(obj, dict) or set(obj) != {"json", "safetensors"}:
        raise LedgerError("federated_labels.labels has exactly json, safetensors", reason_code="E_PAYLOAD_MALFORMED")
    return _blob_ref_obj(obj["json"], "labels"), _blob_ref_obj(obj["safetensors"], "label_tensors")


def _label_blobs(labelled: ReferenceBundle, names: Sequence[str]) -> tuple[bytes, bytes]:
    """The two blobs of a ``federated_labels`` entry: the labelled bundle's label knowledge
    (``manifest["labels"]`` and the specs of the tensors ``names``) and those tensors."""
    specs = labelled.manifest["tensors"]
    missing = [n for n in names if n not in specs]
    if missing:
        raise LedgerError(f"the labelled bundle has no tensor {missing[0]!r}", reason_code="E_FEDERATED_LABELS")
    obj = {"labels": labelled.manifest.get("labels") or {}, "tensors": {n: specs[n] for n in names}}
    return canonical_json(obj), safetensors_to_bytes({n: labelled.tensors[n] for n in names})


def apply_federated_labels(
    aggregate: ReferenceBundle, labels_json: bytes, label_tensors: bytes, *, limits: Limits = DEFAULT_LIMITS
) -> ReferenceBundle:
    """The bundle a ``federated_labels`` entry serves: ``aggregate`` (a round's, without label
    knowledge) with the blob's ``labels`` as ``manifest["labels"]`` and its tensors added.
    Raises :class:`LedgerError` [E_FEDERATED_LABELS] when they do not fit it."""

    def bad(why: str) -> LedgerError:
        return LedgerError(f"federated_labels: {why}", reason_code="E_FEDERATED_LABELS")

    try:
        obj = parse_json_strict(
            labels_json, max_bytes=limits.max_manifest_bytes, max_depth=limits.max_json_depth,
            require_canonical=True, what="federated label knowledge",
        )
        tensors = safetensors_from_bytes(
            label_tensors, max_bytes=limits.max_model_bytes, limits=limits, what="federated label tensors"
        )
    except VerificationError as exc:
        raise bad(exc.message) from exc
    if not isinstance(obj, dict) or set(obj) != {"labels", "tensors"}:
        raise bad("the label knowledge blob is {labels, tensors}")
    labels, specs = obj["labels"], obj["tensors"]
    if not isinstance(labels, dict) or not isinstance(labels.get("levels"), dict) or not labels["levels"]:
        raise bad("its labels name no label level (nothing to publish)")
    if not isinstance(specs, dict) or set(specs) != set(tensors):
        raise bad("its tensor specs and its safetensors file name different tensors")
    if aggregate.manifest.get("labels"):
        raise bad("the round's aggregate carries label knowledge of its own; publish onto a bare aggregate")
    clash = sorted(set(tensors) & set(aggregate.tensors))
    if clash:
        raise bad(f"its tensor {clash[0]!r} would replace one of the aggregate's")
    manifest = {k: v for k, v in aggregate.manifest.items() if k != "digest"}
    manifest["labels"] = labels
    manifest["tensors"] = {**manifest["tensors"], **specs}
    try:
        return make_bundle(manifest, {**aggregate.tensors, **tensors})
    except VerificationError as exc:
        raise bad(f"the labelled bundle does not verify: {exc.message}") from exc


# --------------------------------------------------------------------------------------------
# Builders (operator and site side)


@dataclass(frozen=True)
class GenesisEntry:
    """An entry that publishes a bundle, with the blobs to store beside it."""

    envelope: bytes
    blobs: dict[str, bytes]  # sha256 hex -> bytes

    @property
    def manifest_bytes(self) -> bytes:
        return self._role(0)

    @property
    def safetensors_bytes(self) -> bytes:
        return self._role(1)

    def _role(self, i: int) -> bytes:
        refs = entry_blobs(self.envelope)
        return self.blobs[refs[i].sha256]


def _bundle_ref(bundle: ReferenceBundle) -> tuple[dict[str, Any], dict[str, bytes]]:
    mbytes, sbytes = bundle_to_bytes(bundle)
    mh, sh = hashlib.sha256(mbytes).hexdigest(), hashlib.sha256(sbytes).hexdigest()
    ref = {
        "manifest": {"sha256": mh, "size": len(mbytes)},
        "safetensors": {"sha256": sh, "size": len(sbytes)},
        "digest": bundle.digest,
    }
    return ref, {mh: mbytes, sh: sbytes}


def make_genesis(
    bundle: ReferenceBundle,
    *,
    origin: str,
    operator_keys: Sequence[Ed25519PrivateKey],
    note: str = "",
) -> GenesisEntry:
    """The genesis entry publishing ``bundle`` (signed by every given operator key)."""
    ref, blobs = _bundle_ref(bundle)
    payload = {"kind": "genesis", "format_version": 1, "origin": origin, "bundle": ref, "note": note}
    return GenesisEntry(sign_envelope(GENESIS_TYPE, canonical_json(payload), operator_keys), blobs)


def make_federated_round(
    aggregate: ReferenceBundle,
    *,
    origin: str,
    round_number: int,
    base_size: int,
    base_digest: str,
    contributors: Sequence[tuple[str, str]],
    operator_keys: Sequence[Ed25519PrivateKey],
) -> GenesisEntry:
    """A ``federated_round`` entry: ``contributors`` is ``[(site_id, "sha256:<hex>" digest of its
    contribution), ...]``; ``aggregate`` becomes the new reference."""
    ref, blobs = _bundle_ref(aggregate)
    payload = {
        "kind": "federated_round",
        "format_version": 1,
        "origin": origin,
        "round": int(round_number),
        "base": {"size": int(base_size), "digest": base_digest},
        "contributors": [{"site_id": s, "digest": d} for s, d in sorted(contributors)],
        "aggregate": ref,
    }
    return GenesisEntry(sign_envelope(FEDERATED_ROUND_TYPE, canonical_json(payload), operator_keys), blobs)


def make_federated_labels(
    labelled: ReferenceBundle,
    *,
    tensor_names: Sequence[str],
    origin: str,
    round_number: int,
    base_size: int,
    base_digest: str,
    labels_record: str,
    operator_keys: Sequence[Ed25519PrivateKey],
) -> GenesisEntry:
    """A ``federated_labels`` entry: ``labelled`` is the federated bundle (the round's aggregate
    at ``base_size`` / ``base_digest`` plus label knowledge and the tensors ``tensor_names``);
    ``labels_record`` is ``"sha256:<hex>"`` of the run's signed ``rounds/labels.json``."""
    jbytes, tbytes = _label_blobs(labelled, tensor_names)
    jh, th = hashlib.sha256(jbytes).hexdigest(), hashlib.sha256(tbytes).hexdigest()
    payload = {
        "kind": "federated_labels",
        "format_version": 1,
        "origin": origin,
        "round": int(round_number),
        "base": {"size": int(base_size), "digest": base_digest},
        "labels_record": labels_record,
        "labels": {"json": {"sha256": jh, "size": len(jbytes)}, "safetensors": {"sha256": th, "size": len(tbytes)}},
        "digest": labelled.digest,
    }
    envelope = sign_envelope(FEDERATED_LABELS_TYPE, canonical_json(payload), operator_keys)
    return GenesisEntry(envelope, {jh: jbytes, th: tbytes})


def make_policy_entry(
    change: PolicyChange,
    operator_keys: Sequence[Ed25519PrivateKey],
    extra_signers: Sequence[Ed25519PrivateKey] = (),
) -> bytes:
    """A ``policy`` entry signed by the operator keys (and ``extra_signers``: the old and new
    site key of a rotation)."""
    env = sign_envelope(POLICY_TYPE, canonical_json(change.to_json_obj()), operator_keys)
    return add_signatures(env, extra_signers) if extra_signers else env


def enrol_entry(
    *, origin: str, site_id: str, public_key: Ed25519PublicKey | str,
    operator_keys: Sequence[Ed25519PrivateKey], note: str = "",
) -> bytes:
    pk = public_key if isinstance(public_key, str) else public_key_text(public_key)
    return make_policy_entry(PolicyChange("enrol", origin, site_id, pk, None, note), operator_keys)


def revoke_entry(
    *, origin: str, site_id: str, operator_keys: Sequence[Ed25519PrivateKey], note: str = ""
) -> bytes:
    return make_policy_entry(PolicyChange("revoke", origin, site_id, None, None, note), operator_keys)


def rotate_entry(
    *, origin: str, site_id: str, old_key: Ed25519PrivateKey, new_key: Ed25519PrivateKey,
    operator_keys: Sequence[Ed25519PrivateKey], note: str = "",
) -> bytes:
    change = PolicyChange("rotate", origin, site_id, public_key_text(new_key), key_id(old_key), note)
    return make_policy_entry(change, operator_keys, [old_key, new_key])


def rotation_request(
    *, origin: str, site_id: str, old_key: Ed25519PrivateKey, new_key: Ed25519PrivateKey,
    note: str = "",
) -> bytes:
    """A site's half of a ``rotate`` entry: the policy envelope signed by its old and its new
    key only. The operator adds its signature (``coordinator rotate``) before it is appended;
    the bytes of the payload do not change."""
    change = PolicyChange("rotate", origin, site_id, public_key_text(new_key), key_id(old_key), note)
    return sign_envelope(POLICY_TYPE, canonical_json(change.to_json_obj()), [old_key, new_key])


# --------------------------------------------------------------------------------------------
# The replayed state


@dataclass(frozen=True)
class ConditionCap:
    """An operator's cap on how many conditions the reference may hold: in all
    (``per_reference``) and per site namespace (``per_site``), counting the genesis's and every
    round's conditions. An admission rule of the coordinator that sets it, not a ledger rule: an
    auditor replays without it."""

    per_site: int
    per_reference: int

    def __post_init__(self) -> None:
        for what in ("per_site", "per_reference"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"condition cap {what} must be a positive integer, got {value!r}")

    def check(self, lineage: _Lineage, site_id: str, m: int) -> None:
        """Raise ``E_CONDITION_CAP`` if ``m`` more conditions of ``site_id`` break the cap."""
        total, own = len(lineage.conditions), lineage.site_counts.get(site_id, 0)
        if total + m > self.per_reference:
            raise UpdateRejectedError(
                "E_CONDITION_CAP",
                f"the reference holds {total} conditions and the cap is {self.per_reference}; "
                f"this update adds {m}. The operator raises limits.max_conditions_per_reference "
                "or starts a new reference",
            )
        if own + m > self.per_site:
            raise UpdateRejectedError(
                "E_CONDITION_CAP",
                f"site {site_id!r} holds {own} conditions and the cap is {self.per_site} per site; "
                f"this update adds {m}. Ask the operator to raise limits.max_conditions_per_site",
            )


def _little_endian(arr: np.ndarray) -> np.ndarray:
    dt = arr.dtype
    if dt.byteorder in ("|", "<") or (dt.byteorder == "=" and np.little_endian):
        return arr
    return np.ascontiguousarray(arr, dtype=dt.newbyteorder("<"))


class _Lineage:
    """A genesis or federated-round bundle and every condition slice appended to it since.

    Append-only: an accept adds its diff's arrays to each condition tensor's list of parts (it
    copies nothing), so every version since the bundle is a prefix (its first ``n`` conditions)
    and is built only when it is asked for. The first time a version's tensor is needed the
    parts are joined into one read-only array that replaces them (later versions join the
    joined array with the parts appended since; earlier ones are a prefix of it), so a tensor
    is never rebuilt from thousands of slices twice, and memory holds each value once."""

    def __init__(
        self,
        manifest: Mapping[str, Any],
        frozen: Mapping[str, np.ndarray],
        parts: Mapping[str, list[np.ndarray]],
        conditions: Sequence[str],
        chunk_ends: Sequence[int] | None = None,
    ) -> None:
        """``manifest``: the bundle's, without digest; ``parts``: per condition tensor, arrays
        whose concatenation along its axis holds every condition so far; ``conditions``: every
        condition so far; ``chunk_ends``: the number of conditions after the bundle and after
        each appended update (default: the bundle alone)."""
        self.manifest = dict(manifest)
        self.frozen = dict(frozen)
        self.frozen_leaves = {n: tensor_leaf_hash(n, a) for n, a in self.frozen.items()}
        specs = self.manifest["tensors"]
        self.axes = {n: int(specs[n]["axis"]) for n in parts}
        # per condition tensor: a buffer holding its first ``_filled`` conditions (the first part
        # until more are read), and the slices appended since (moved in when a version is read)
        self._buffer = {n: _little_endian(p[0]) for n, p in parts.items()}
        self._filled = {n: int(self._buffer[n].shape[self.axes[n]]) for n in parts}
        self._pending = {n: list(p[1:]) for n, p in parts.items()}
        self._lock = threading.Lock()
        self.conditions: list[str] = []
        self.condition_set: set[str] = set()
        self.site_counts: dict[str, int] = {}
        self._condition_json: list[bytes] = []  # each name's canonical JSON, encoded once
        self._add_conditions(conditions)
        self.chunk_ends = [len(self.conditions)] if chunk_ends is None else [int(e) for e in chunk_ends]
        self._skeleton = self._manifest_skeleton()

    @classmethod
    def from_bundle(cls, bundle: ReferenceBundle) -> _Lineage:
        manifest = {k: v for k, v in bundle.manifest.items() if k != "digest"}
        specs = manifest["tensors"]
        cond = {n for n, spec in specs.items() if spec["role"] == "condition"}
        return cls(
            manifest,
            {n: a for n, a in bundle.tensors.items() if n not in cond},
            {n: [bundle.tensors[n]] for n in cond},
            manifest["conditions"],
        )

    @property
    def n_chunks(self) -> int:
        """The bundle plus the number of updates appended."""
        return len(self.chunk_ends)

    @property
    def condition_tensors(self) -> list[str]:
        return list(self.axes)

    def _add_conditions(self, names: Sequence[str]) -> None:
        self._condition_json.extend(canonical_json(c) for c in names)
        self.conditions.extend(names)
        self.condition_set.update(names)
        for c in names:
            ns = c.split("/", 1)[0]
            self.site_counts[ns] = self.site_counts.get(ns, 0) + 1

    def _manifest_skeleton(self) -> tuple[bytes, bytes, dict[str, bytes]] | None:
        """The manifest leaf with a placeholder string for the condition list and for each
        condition tensor's condition-axis dimension, the encoded condition-list placeholder and
        the encoded dimension placeholders; None when a placeholder would be ambiguous (its
        bytes occur elsewhere in the manifest): then every leaf is encoded in full."""
        mark = "\u0001scarches-fl.version:{}\u0001"
        skel = dict(self.manifest)
        skel["conditions"] = [mark.format("conditions")]
        specs, dims = {}, {}
        for name, spec in self.manifest["tensors"].items():
            spec = dict(spec)
            if name in self.axes:
                shape = list(spec["shape"])
                shape[self.axes[name]] = mark.format("dim:" + name)
                spec["shape"] = shape
                dims[name] = canonical_json(mark.format("dim:" + name))
            specs[name] = spec
        skel["tensors"] = specs
        leaf = manifest_leaf(skel)
        conditions = b"[" + canonical_json(mark.format("conditions")) + b"]"
        if any(leaf.count(m) != 1 for m in (conditions, *dims.values())):
            return None
        return leaf, conditions, dims

    def manifest_leaf(self, manifest: Mapping[str, Any], n_conditions: int) -> bytes:
        """:func:`protocols.bundle.manifest_leaf` of ``manifest``, the manifest of this
        lineage's version with ``n_conditions`` conditions, built from the skeleton and the
        names encoded once (canonical JSON is compositional: the bytes are the same)."""
        if self._skeleton is None:
            return manifest_leaf(manifest)
        leaf, conditions, dims = self._skeleton
        for name, dim in dims.items():  # before the names, which are not checked for marks
            size = manifest["tensors"][name]["shape"][self.axes[name]]
            leaf = leaf.replace(dim, str(int(size)).encode("ascii"))
        names = b",".join(self._condition_json[:n_conditions])
        return leaf.replace(conditions, b"[" + names + b"]")

    def append(self, diff: Mapping[str, np.ndarray], new_conditions: Sequence[str]) -> None:
        with self._lock:
            for name, pending in self._pending.items():
                pending.append(diff[name])
            self._add_conditions(new_conditions)
            self.chunk_ends.append(len(self.conditions))

    def pending(self, name: str) -> list[np.ndarray]:
        """The slices of a condition tensor appended since it was last read (a copy of the
        list)."""
        with self._lock:
            return list(self._pending[name])

    def _filled_view(self, name: str, n_conditions: int) -> tuple[np.ndarray, np.ndarray]:
        """The buffer of ``name`` after moving its pending slices in (growing it by doubling
        when full), and a read-only view of its first ``n_conditions`` conditions. The region
        a view covers is never written again (later slices go past it; a grown buffer is a new
        array), so views stay valid while the lineage grows."""
        axis = self.axes[name]
        with self._lock:
            pending, buf, filled = self._pending[name], self._buffer[name], self._filled[name]
            if pending:
                need = filled + sum(int(p.shape[axis]) for p in pending)
                if need > buf.shape[axis] or not buf.flags.writeable:
                    shape = list(buf.shape)
                    shape[axis] = max(need, 2 * filled, 16)
                    grown = np.empty(shape, dtype=buf.dtype)
                    lead = (slice(None),) * axis
                    grown[(*lead, slice(0, filled))] = buf[(*lead, slice(0, filled))]
                    buf = self._buffer[name] = grown
                lead = (slice(None),) * axis
                for p in pending:
                    m = int(p.shape[axis])
                    buf[(*lead, slice(filled, filled + m))] = p
                    filled += m
                self._pending[name] = []
                self._filled[name] = filled
        view = buf[(slice(None),) * axis + (slice(0, n_conditions),)]
        view.flags.writeable = False
        return buf, view

    def prefix(self, name: str, n_conditions: int) -> np.ndarray:
        """Condition tensor ``name`` holding the first ``n_conditions`` conditions, in its
        declared layout, C-contiguous and read-only (a copy unless the buffer is exactly it)."""
        _buf, view = self._filled_view(name, n_conditions)
        out = np.ascontiguousarray(view)
        out.flags.writeable = False
        return out

    def leaf_hash(self, name: str, n_conditions: int) -> bytes:
        """``tensor_leaf_hash(name, self.prefix(name, n_conditions))`` without building the
        prefix: the buffer is C-contiguous, so the prefix's C-order bytes are one contiguous
        run per index of the dimensions before the condition axis, streamed into the hash."""
        axis = self.axes[name]
        buf, view = self._filled_view(name, n_conditions)
        if not buf.flags.c_contiguous or view.size == 0:
            return tensor_leaf_hash(name, np.ascontiguousarray(view))
        header = canonical_json({"dtype": view.dtype.name, "name": name, "shape": list(view.shape)})
        h = hashlib.sha256(b"\x00" + tensor_leaf_header(header))
        lead = int(np.prod(buf.shape[:axis], dtype=np.int64))
        rows = buf.reshape(lead, -1).view(np.uint8)
        run = rows.shape[1] * n_conditions // buf.shape[axis]
        for r in range(lead):
            h.update(rows[r, :run].data)
        return h.digest()


class _Model:
    """One reference version: the first ``n_chunks`` chunks (``n_conditions`` conditions) of a
    :class:`_Lineage`. Its tensors and content digest are computed on first use and kept."""

    def __init__(
        self,
        lineage: _Lineage,
        n_chunks: int,
        n_conditions: int,
        *,
        digest: str | None = None,
        pending: tuple[Mapping[str, np.ndarray], list[str]] | None = None,
    ) -> None:
        self.lineage = lineage
        self.n_chunks = n_chunks
        self.n_conditions = n_conditions
        self._digest = digest
        self._pending = pending

    @classmethod
    def from_bundle(cls, bundle: ReferenceBundle) -> _Model:
        lineage = _Lineage.from_bundle(bundle)
        return cls(lineage, 1, len(lineage.conditions), digest=bundle.digest)

    @property
    def spec_manifest(self) -> dict[str, Any]:
        """The lineage's first manifest: the tensor roles, axes and the dimensions other than the
        condition axis are those of every version (what an update's shapes are checked against)."""
        return self.lineage.manifest

    @property
    def condition_set(self) -> AbstractSet[str]:
        """The condition names of this version (the head of its lineage only)."""
        if self.n_chunks != self.lineage.n_chunks:
            raise LedgerError("only the newest version is extended", reason_code="E_INTERNAL")
        return self.lineage.condition_set

    @property
    def manifest(self) -> dict[str, Any]:
        """This version's manifest, without ``digest``."""
        lin = self.lineage
        base_n = len(lin.manifest["conditions"])
        specs = {}
        for name, spec in lin.manifest["tensors"].items():
            s = dict(spec)
            if name in lin.axes:
                shape = list(s["shape"])
                shape[int(s["axis"])] += self.n_conditions - base_n
                s["shape"] = shape
            specs[name] = s
        return {**lin.manifest, "conditions": lin.conditions[: self.n_conditions], "tensors": specs}

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        lin = self.lineage
        out = dict(lin.frozen)
        for name in lin.axes:
            out[name] = lin.prefix(name, self.n_conditions)
        return out

    @property
    def digest(self) -> str:
        """The content digest (ADR 0002), from the frozen leaves hashed once per lineage."""
        if self._digest is None:
            lin = self.lineage
            manifest = self.manifest
            leaves = dict(lin.frozen_leaves)
            for name in lin.axes:
                leaves[name] = lin.leaf_hash(name, self.n_conditions)
            ordered = [leaves[n] for n in sorted(leaves, key=lambda n: n.encode("utf-8"))]
            ordered.append(merkle.leaf_hash(lin.manifest_leaf(manifest, self.n_conditions)))
            self._digest = "sha256:" + merkle.root(ordered).hex()
        return self._digest

    @property
    def known_digest(self) -> str | None:
        """The digest if it is already known (a bundle's, or computed), else None."""
        return self._digest

    def extended(self, diff: Mapping[str, np.ndarray], new_conditions: Sequence[str]) -> _Model:
        """The next version (nothing is appended until :meth:`commit`)."""
        self.condition_set  # noqa: B018 - raises unless this is the newest version
        names = list(new_conditions)
        return _Model(
            self.lineage, self.n_chunks + 1, self.n_conditions + len(names), pending=(diff, names)
        )

    def commit(self) -> None:
        """Append this version's slices to the lineage (once, when its entry is applied)."""
        if self._pending is None:
            return
        if self.lineage.n_chunks != self.n_chunks - 1:
            raise LedgerError("a version was extended twice", reason_code="E_INTERNAL")
        self.lineage.append(*self._pending)
        self._pending = None

    def bundle(self) -> ReferenceBundle:
        b = make_bundle(self.manifest, self.tensors)
        if b.digest != self.digest:  # pragma: no cover - would be a bug in the lazy digest
            raise LedgerError("the version's digest disagrees with make_bundle", reason_code="E_INTERNAL")
        return b


@dataclass(frozen=True)
class AppliedEntry:
    """What one entry did: its index, kind, parsed payload and the reference version after it.

    ``digest`` is that version's digest when it is known without hashing (a genesis, a round, a
    version already hashed), else None: :meth:`LedgerState.digest_at` ``(index + 1)`` computes
    it on demand, so that an accept never hashes the whole model."""

    index: int
    kind: str
    payload: dict[str, Any] = field(repr=False)
    leaf_hash: bytes = field(repr=False)
    digest: str | None
    site_id: str | None = None
    accepted_update: AcceptedUpdate | AcceptedContribution | None = field(default=None, repr=False)


@dataclass
class _Pending:
    kind: str
    payload: dict[str, Any]
    policy: TrustPolicy
    model: _Model | None
    sequences: dict[str, int]
    min_base_size: int
    last_round: int
    site_id: str | None = None
    accepted: AcceptedUpdate | AcceptedContribution | None = None
    labels: LabelLedger | None = None


def _reference_labels(model: Any) -> Any:
    """The ``labels`` of a version's bundle (the same for every version of a lineage)."""
    if model is None:
        return None
    manifest = getattr(model, "spec_manifest", None)
    if manifest is None:  # the auditor's replay model
        manifest = model.replay.base_manifest
    return manifest.get("labels")


class LedgerState:
    """The state after replaying entries ``[0, size)`` (rules in the module docstring).

    ``trust`` is the pinned ``trust.json`` policy; only its roots are used (sites come from the
    ledger's policy entries)."""

    def __init__(
        self,
        trust: TrustPolicy,
        *,
        limits: Limits = DEFAULT_LIMITS,
        condition_cap: ConditionCap | None = None,
    ) -> None:
        self.limits = limits
        self.condition_cap = condition_cap
        self.trust = trust
        self._policy = trust.roots()
        self._policy_history: list[tuple[int, TrustPolicy]] = [(0, self._policy)]
        self._tree = merkle.MerkleTree()
        self._digests: list[str | None] = [None]  # None: not computed (yet)
        self._versions: list[_Model | None] = [None]
        self._sequences: dict[str, int] = {}
        self._min_base_size = 1
        self._last_round = 0
        self._model: _Model | None = None
        self._kinds: list[str] = []
        self._labels = LabelLedger()
        self._label_history: list[tuple[int, LabelLedger]] = [(0, self._labels)]

    # -- views -----------------------------------------------------------------------------
    def _in_force(self, history: Sequence[tuple[int, _T]], size: int) -> _T:
        """The value of ``history`` (``(position, value)`` pairs in position order, the first at
        0) in force for entry ``size``: the last one set at or before it (binary search)."""
        if not 0 <= size <= self.size:
            raise ValueError(f"size {size} outside [0, {self.size}]")
        return history[bisect.bisect_right(history, size, key=lambda h: h[0]) - 1][1]

    @property
    def size(self) -> int:
        return self._tree.size

    @property
    def policy(self) -> TrustPolicy:
        """The policy in force for the next entry."""
        return self._policy

    def policy_at(self, size: int) -> TrustPolicy:
        """The policy in force for entry ``size`` (after entries ``[0, size)``)."""
        return self._in_force(self._policy_history, size)

    @property
    def sequences(self) -> dict[str, int]:
        """Last accepted sequence number per site."""
        return dict(self._sequences)

    @property
    def kinds(self) -> list[str]:
        return list(self._kinds)

    @property
    def last_round(self) -> int:
        """The last ``federated_round`` appended (0: none)."""
        return self._last_round

    @property
    def manifest(self) -> dict[str, Any]:
        """The current reference manifest (with its digest)."""
        if self._model is None:
            raise LedgerError("the ledger has no genesis yet", reason_code="E_LEDGER_ORDER")
        return {**self._model.manifest, "digest": self._model.digest}

    @property
    def conditions(self) -> list[str]:
        if self._model is None:
            raise LedgerError("the ledger has no genesis yet", reason_code="E_LEDGER_ORDER")
        return list(self._model.manifest["conditions"])

    @property
    def digest(self) -> str | None:
        """Digest of the current reference version (None before genesis)."""
        return self.digest_at(self.size)

    def digest_at(self, size: int) -> str | None:
        """Digest of reference version ``size`` (the model after entries ``[0, size)``),
        computed on first use (one hash of that version) and kept."""
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= self.size:
            return None
        digest = self._digests[size]
        if digest is None and size < len(self._versions):
            model = self._versions[size]
            if model is not None:
                digest = self._digests[size] = model.digest
        return digest

    def known_digest_at(self, size: int) -> str | None:
        """Digest of reference version ``size`` if it is known without hashing (a genesis, a
        round, a version already hashed), else None."""
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= self.size:
            return None
        digest = self._digests[size]
        if digest is None and size < len(self._versions):
            model = self._versions[size]
            if model is not None:
                digest = model.known_digest
        return digest

    def root_at(self, size: int) -> bytes | None:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= self.size:
            return None
        return self._tree.root(size)

    def root(self) -> bytes:
        return self._tree.root()

    # -- label knowledge (protocols.labels) ---------------------------------------------------
    @property
    def labels(self) -> LabelLedger:
        """The label policy, vocabulary and contributions in force for the next entry."""
        return self._labels

    def labels_at(self, size: int) -> LabelLedger:
        """The label state after entries ``[0, size)``."""
        return self._in_force(self._label_history, size)

    def label_knowledge(self, reference_labels: Any = None, *, size: int | None = None) -> Any:
        """The label knowledge of reference version ``size`` (default: the current one):
        ``reference_labels`` (default: the current bundle's ``manifest["labels"]``) with every
        accepted contribution of that version's lineage, named through its vocabulary
        (:func:`protocols.labels.merge_label_knowledge`)."""
        size = self.size if size is None else size
        if reference_labels is None:
            reference_labels = _reference_labels(self._model)
        return merge_label_knowledge(reference_labels, self.labels_at(size))

    def label_context(self) -> LabelContext:
        """What :func:`protocols.labels.validate_label_contribution` checks against."""
        if self._model is None:
            raise UpdateRejectedError("E_BASE_UNKNOWN", "the ledger has no genesis yet")
        return LabelContext(
            policy=self._policy,
            label_policy=self._labels.policy,
            tree_size=self.size,
            root_at=self.root_at,
            digest_at=self.digest_at,
            last_sequence=self._sequences,
            min_base_size=self._min_base_size,
            levels=reference_levels(_reference_labels(self._model)),
            expression_levels=reference_expression_levels(_reference_labels(self._model)),
        )

    @property
    def tree(self) -> merkle.MerkleTree:
        return self._tree

    def bundle(self) -> ReferenceBundle:
        """The current reference as a full bundle (digest re-checked)."""
        if self._model is None:
            raise LedgerError("the ledger has no genesis yet", reason_code="E_LEDGER_ORDER")
        return self._model.bundle()

    def update_context(self) -> UpdateContext:
        """What :func:`protocols.update.validate_update` checks an update against."""
        if self._model is None:
            raise LedgerError("the ledger has no genesis yet", reason_code="E_LEDGER_ORDER")
        return UpdateContext(
            policy=self._policy,
            manifest=self._model.spec_manifest,
            tree_size=self.size,
            root_at=self.root_at,
            digest_at=self.digest_at,
            last_sequence=self._sequences,
            min_base_size=self._min_base_size,
            conditions=self._model.condition_set,
        )

    def validate_site_update(self, envelope: bytes, diff_bytes: bytes) -> AcceptedUpdate:
        """Check a submitted update against the current state (no mutation)."""
        if self._model is None:
            raise UpdateRejectedError("E_BASE_UNKNOWN", "the ledger has no genesis yet")
        return validate_update(envelope, diff_bytes, self.update_context(), limits=self.limits)

    # -- applying ----------------------------------------------------------------------------
    def apply(
        self,
        envelope: bytes,
        blobs: BlobLookup,
        *,
        diff_bytes: bytes | None = None,
        authenticated: AuthenticatedUpdate | None = None,
    ) -> AppliedEntry:
        """Check ``envelope`` as the next entry and apply it; unchanged state on error.

        ``diff_bytes``: a site update's submitted diff, checked by the update rules (size and
        sha256 against the signed ones, after the signature) instead of being looked up under
        the name the not-yet-verified payload claims.

        ``authenticated``: :func:`protocols.update.authenticate_update`'s result for these
        envelope bytes, when the caller already has it (a coordinator, from its request
        thread): the envelope is then neither parsed nor its signature verified again, unless
        the policy in force no longer vouches for that key (see
        :func:`protocols.update.validate_update`). Every other rule runs as always."""
        pending = self._evaluate(bytes(envelope), blobs, diff_bytes, authenticated)
        index = self.size
        leaf = merkle.leaf_hash(envelope)
        self._tree.append(leaf)
        if pending.policy is not self._policy:
            self._policy_history.append((index + 1, pending.policy))
        self._policy = pending.policy
        if pending.model is not None:
            pending.model.commit()
        self._model = pending.model
        self._sequences = pending.sequences
        self._min_base_size = pending.min_base_size
        self._last_round = pending.last_round
        self._versions.append(self._model)
        self._digests.append(self._model.known_digest if self._model is not None else None)
        self._kinds.append(pending.kind)
        self._set_labels(index, pending)
        return AppliedEntry(
            index, pending.kind, pending.payload, leaf, self._digests[-1], pending.site_id,
            pending.accepted,
        )

    def _set_labels(self, index: int, pending: Any) -> None:
        labels = getattr(pending, "labels", None)
        if labels is not None and labels is not self._labels:
            self._labels = labels
            self._label_history.append((index + 1, labels))

    def check(self, envelope: bytes, blobs: BlobLookup) -> None:
        """Raise as :meth:`apply` would, without changing the state."""
        self._evaluate(bytes(envelope), blobs)

    def _evaluate(
        self,
        envelope: bytes,
        blobs: BlobLookup,
        diff_bytes: bytes | None = None,
        authenticated: AuthenticatedUpdate | None = None,
    ) -> _Pending:
        if authenticated is not None and (
            authenticated.envelope != envelope or not isinstance(authenticated, AuthenticatedUpdate)
        ):
            authenticated = None  # another envelope's (or kind's): parse and verify these bytes
        env: Envelope | None = None
        kind = "site_update"  # with ``authenticated``: authenticate_update checked the payloadType
        if authenticated is None:
            try:
                env = parse_envelope(envelope, limits=self.limits)
            except VerificationError as exc:
                raise LedgerError(exc.message, reason_code=exc.reason_code) from exc
            found = PAYLOAD_TYPES.get(env.payload_type)
            if found is None:
                raise LedgerError(
                    f"unknown entry payloadType {env.payload_type[:80]!r}",
                    reason_code="E_LEDGER_ENTRY_KIND",
                )
            kind = found
        index = self.size
        if (index == 0) != (kind == "genesis"):
            raise LedgerError(
                "entry 0 must be the genesis and only entry 0 may be" if index else
                f"entry 0 is a {kind}, it must be the genesis",
                reason_code="E_LEDGER_ORDER",
            )
        base = _Pending(
            kind, {}, self._policy, self._model, dict(self._sequences), self._min_base_size,
            self._last_round, labels=self._labels,
        )
        if kind == "site_update":
            return self._eval_site_update(env, envelope, blobs, base, diff_bytes, authenticated)
        if kind == "label_contribution":
            if diff_bytes:
                raise UpdateRejectedError(
                    "E_TENSOR_SET", "a label contribution carries no diff; send the envelope alone"
                )
            accepted = validate_label_contribution(envelope, self.label_context(), limits=self.limits)
            base.sequences[accepted.site_id] = accepted.sequence
            base.payload = accepted.payload.to_json_obj()
            base.site_id = accepted.site_id
            base.accepted = accepted
            base.labels = self._labels.with_contribution(
                index, accepted, _reference_labels(self._model)
            )
            return base
        # operator-signed kinds
        assert env is not None
        policy = self._policy
        extra: list[str] = []
        obj = _payload_obj(env, limits=self.limits)
        if obj.get("kind") != kind:
            raise LedgerError("payload kind does not match payloadType", reason_code="E_LEDGER_ENTRY_KIND")
        if obj.get("origin") != policy.origin:
            raise LedgerError(
                f"entry names origin {str(obj.get('origin'))[:80]!r}, this log is {policy.origin!r}",
                reason_code="E_ORIGIN_MISMATCH",
            )
        change: PolicyChange | None = None
        label_change = None
        if kind == "label_policy":
            try:
                label_change = parse_label_policy(obj)
            except UpdateRejectedError as exc:
                raise LedgerError(exc.message, reason_code=exc.reason_code) from exc
        if kind == "policy":
            try:
                change = parse_policy_change(obj)
                extra = required_rotation_signers(policy, change)
            except PolicyError as exc:
                raise LedgerError(exc.message, reason_code="E_PAYLOAD_MALFORMED") from exc
        try:
            verify_envelope(
                env, trusted_keys=policy.operator_public_keys(), threshold=policy.operator_threshold,
                payload_type=env.payload_type, limits=self.limits,
            )
        except SignatureError as exc:
            raise LedgerError(f"{kind} entry: {exc.message}", reason_code=exc.reason_code) from exc
        base.payload = obj
        if kind == "label_policy":
            assert label_change is not None
            try:
                base.labels = self._labels.with_policy_change(
                    label_change, _reference_labels(self._model), enrolled=set(policy.sites)
                )
            except UpdateRejectedError as exc:
                raise LedgerError(exc.message, reason_code=exc.reason_code) from exc
            return base
        if kind == "policy":
            assert change is not None
            if extra:
                self._check_rotation_signatures(env, change, extra)
            try:
                base.policy = apply_policy_change(policy, change, at_size=index + 1)
            except PolicyError as exc:
                raise LedgerError(exc.message, reason_code=exc.reason_code) from exc
            base.site_id = change.site_id
            return base
        if kind == "genesis":
            _fields(obj, {"kind", "format_version", "origin", "bundle", "note"}, "genesis")
            if type(obj["format_version"]) is not int or obj["format_version"] != 1 or not isinstance(obj["note"], str):
                raise LedgerError("genesis format_version must be 1, note a string", reason_code="E_PAYLOAD_MALFORMED")
            bundle = self._load_bundle(obj["bundle"], blobs, "genesis bundle")
            base.model = _Model.from_bundle(bundle)
            base.min_base_size = index + 1
            base.labels = self._labels.new_lineage()
            return base
        if kind == "federated_labels":
            return self._eval_federated_labels(obj, blobs, base, index)
        # federated_round
        _fields(
            obj, {"kind", "format_version", "origin", "round", "base", "contributors", "aggregate"},
            "federated_round",
        )
        if type(obj["format_version"]) is not int or obj["format_version"] != 1:
            raise LedgerError("federated_round format_version must be 1", reason_code="E_PAYLOAD_MALFORMED")
        rnd = _int(obj["round"], "round", 1)
        if rnd <= self._last_round:
            raise LedgerError(
                f"round {rnd} is not after the last round {self._last_round}", reason_code="E_FEDERATED_ROUND"
            )
        b = obj["base"]
        if not isinstance(b, dict) or set(b) != {"size", "digest"}:
            raise LedgerError("round base has exactly size, digest", reason_code="E_PAYLOAD_MALFORMED")
        bsize = _int(b["size"], "base.size", 1)
        if bsize > index or self.digest_at(bsize) != b["digest"]:
            raise LedgerError(
                f"round base (size {bsize}, {str(b['digest'])[:80]}) is not a version of this log",
                reason_code="E_FEDERATED_ROUND",
            )
        contributors = obj["contributors"]
        if not isinstance(contributors, list):
            raise LedgerError("contributors must be a list", reason_code="E_PAYLOAD_MALFORMED")
        seen: set[str] = set()
        for c in contributors:
            if (
                not isinstance(c, dict) or set(c) != {"site_id", "digest"}
                or not isinstance(c["site_id"], str) or not NAMESPACE_RE.fullmatch(c["site_id"])
                or not isinstance(c["digest"], str) or not _DIGEST.fullmatch(c["digest"])
            ):
                raise LedgerError(
                    "each contributor is {site_id, digest: 'sha256:<hex>'}", reason_code="E_PAYLOAD_MALFORMED"
                )
            rec = policy.sites.get(c["site_id"])
            if rec is None or rec.active_key is None or c["site_id"] in seen:
                raise LedgerError(
                    f"contributor {c['site_id']!r} is not an enrolled site with an active key (or is "
                    "listed twice)", reason_code="E_FEDERATED_ROUND",
                )
            seen.add(c["site_id"])
        bundle = self._load_bundle(obj["aggregate"], blobs, "round aggregate")
        assert self._model is not None
        cur = list(self._model.manifest["conditions"])
        if bundle.conditions[: len(cur)] != cur:
            raise LedgerError(
                "the round's aggregate drops or reorders existing conditions", reason_code="E_FEDERATED_ROUND"
            )
        base.model = _Model.from_bundle(bundle)
        base.min_base_size = index + 1
        base.last_round = rnd
        base.labels = self._labels.new_lineage()
        return base

    def _eval_federated_labels(
        self, obj: dict[str, Any], blobs: BlobLookup, base: _Pending, index: int
    ) -> _Pending:
        """Rule 8 (the signature was checked by the caller)."""

        def bad(why: str) -> LedgerError:
            return LedgerError(f"federated_labels: {why}", reason_code="E_FEDERATED_LABELS")

        _fields(
            obj, {"kind", "format_version", "origin", "round", "base", "labels_record", "labels", "digest"},
            "federated_labels",
        )
        if type(obj["format_version"]) is not int or obj["format_version"] != 1:
            raise LedgerError("federated_labels format_version must be 1", reason_code="E_PAYLOAD_MALFORMED")
        rnd = _int(obj["round"], "round", 1)
        b = obj["base"]
        if not isinstance(b, dict) or set(b) != {"size", "digest"}:
            raise LedgerError("federated_labels base has exactly size, digest", reason_code="E_PAYLOAD_MALFORMED")
        bsize = _int(b["size"], "base.size", 1)
        for name in ("labels_record", "digest"):
            if not isinstance(obj[name], str) or not _DIGEST.fullmatch(obj[name]):
                raise LedgerError(f"federated_labels.{name} must be 'sha256:<64 hex>'", reason_code="E_PAYLOAD_MALFORMED")
        jref, tref = _labels_ref_obj(obj["labels"])
        if jref.size > self.limits.max_manifest_bytes or tref.size > self.limits.max_model_bytes:
            raise LedgerError(
                f"federated_labels blobs of {jref.size} and {tref.size} bytes are over the limits "
                f"({self.limits.max_manifest_bytes}, {self.limits.max_model_bytes})",
                reason_code="E_OVERSIZE",
            )
        if not self._kinds or self._kinds[-1] != "federated_round":
            raise bad(
                "it must directly follow the federated_round whose aggregate it labels (the last "
                f"entry is a {self._kinds[-1] if self._kinds else 'nothing'}); at most one per round"
            )
        if rnd != self._last_round:
            raise bad(f"it names round {rnd}, the ledger's last federated round is {self._last_round}")
        if bsize != index or self.digest_at(bsize) != b["digest"]:
            raise bad(
                f"its base (size {bsize}, {str(b['digest'])[:80]}) is not the current federated head "
                f"(size {index}, {self.digest_at(index)})"
            )
        assert self._model is not None
        labelled = apply_federated_labels(
            self._model.bundle(), self._blob(jref, blobs), self._blob(tref, blobs), limits=self.limits
        )
        if labelled.digest != obj["digest"]:
            raise LedgerError(
                f"the labelled aggregate hashes to {labelled.digest}, the entry signed {obj['digest']}",
                reason_code="E_DIGEST_MISMATCH",
            )
        base.payload = obj
        base.model = _Model.from_bundle(labelled)
        base.min_base_size = index + 1
        base.labels = self._labels.new_lineage()
        return base

    def _check_rotation_signatures(self, env: Envelope, change: PolicyChange, kids: list[str]) -> None:
        old = self._policy.find_key(kids[0])
        assert change.public_key is not None
        new_pub = public_key_from_text(change.public_key)
        if old is None or old[0] != change.site_id:
            raise LedgerError(
                "rotate names a previous key that is not this site's", reason_code="E_POLICY_CHANGE"
            )
        old_pub = public_key_from_text(old[1].public_key)
        for pub in (old_pub, new_pub):
            try:
                verify_envelope(env, trusted_keys=[pub], threshold=1, payload_type=POLICY_TYPE, limits=self.limits)
            except SignatureError as exc:
                raise LedgerError(
                    f"a key rotation must be signed by the old and the new site key ({exc.message})",
                    reason_code="E_ROTATION_SIGNATURES",
                ) from exc

    def _eval_site_update(
        self, env: Envelope | None, envelope: bytes, blobs: BlobLookup, base: _Pending,
        diff_bytes: bytes | None = None, authenticated: AuthenticatedUpdate | None = None,
    ) -> _Pending:
        if diff_bytes is None:  # replay: the stored blob the entry names
            if authenticated is not None:
                p = authenticated.payload
                ref: BlobRef | None = BlobRef("diff", p.diff_sha256, p.diff_size)
            else:
                assert env is not None
                ref = _claimed_diff(env.payload)
            diff_bytes = b"" if ref is None else self._blob(ref, blobs)
        accepted = validate_update(
            envelope, diff_bytes, self.update_context(), limits=self.limits,
            authenticated=authenticated, parsed=env,
        )
        assert self._model is not None
        if self.condition_cap is not None:
            self.condition_cap.check(self._model.lineage, accepted.site_id, len(accepted.new_conditions))
        diff = {k: np.asarray(v) for k, v in accepted.diff.items()}
        base.model = self._model.extended(diff, accepted.new_conditions)
        base.sequences[accepted.site_id] = accepted.sequence
        base.payload = accepted.payload.to_json_obj()
        base.site_id = accepted.site_id
        base.accepted = accepted
        return base

    def _blob(self, ref: BlobRef, blobs: BlobLookup) -> bytes:
        try:
            data = blobs(ref.sha256)
        except VerificationError:
            raise
        except Exception as exc:  # a lookup that failed is a missing blob, typed
            raise LedgerError(f"{ref.role} blob {ref.sha256[:16]}... could not be read: {exc}",
                              reason_code="E_BLOB_MISSING") from exc
        if data is None:
            raise LedgerError(f"{ref.role} blob {ref.sha256[:16]}... is missing", reason_code="E_BLOB_MISSING")
        data = bytes(data)
        if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), ref.sha256):
            raise LedgerError(
                f"{ref.role} blob {ref.sha256[:16]}... does not hash to its name", reason_code="E_BLOB_MISMATCH"
            )
        if len(data) != ref.size:
            raise LedgerError(
                f"{ref.role} blob {ref.sha256[:16]}... is {len(data)} bytes, the entry says {ref.size}",
                reason_code="E_BLOB_MISMATCH",
            )
        return data

    def _load_bundle(self, ref_obj: Any, blobs: BlobLookup, what: str) -> ReferenceBundle:
        mref, sref, digest = _bundle_ref_obj(ref_obj, what)
        mbytes, sbytes = self._blob(mref, blobs), self._blob(sref, blobs)
        try:
            bundle = bundle_from_bytes(mbytes, sbytes, verify=True, limits=self.limits)
        except BundleError as exc:
            raise LedgerError(f"{what}: {exc.message}", reason_code=exc.reason_code) from exc
        if bundle.digest != digest:
            raise LedgerError(
                f"{what} hashes to {bundle.digest}, the entry signed {digest}", reason_code="E_DIGEST_MISMATCH"
            )
        return bundle


def replay(
    trust: TrustPolicy,
    entries: Sequence[bytes],
    blobs: BlobLookup,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> LedgerState:
    """Replay ``entries`` from the genesis; raises at the first entry that breaks a rule (the
    error message starts with its index)."""
    state = LedgerState(trust, limits=limits)
    for i, entry in enumerate(entries):
        try:
            state.apply(entry, blobs)
        except VerificationError as exc:
            raise LedgerError(f"entry {i}: {exc.message}", reason_code=exc.reason_code) from exc
    return state


# --------------------------------------------------------------------------------------------
# Receipts

# --------------------------------------------------------------------------------------------
# Snapshots of the replayed state (a coordinator's restart; an auditor never reads one)

SNAPSHOT_FORMAT = "scarches-fl.ledger-state"


@dataclass(frozen=True)
class StateSnapshot:
    """A consistent cut of a :class:`LedgerState`, cheap to take (list copies, no tensor):
    versions are immutable prefixes of append-only lineages, so :meth:`encode` can run in
    another thread while the state keeps accepting."""

    tree_size: int
    root: bytes
    policy_history: tuple[tuple[int, TrustPolicy], ...]
    sequences: dict[str, int]
    min_base_size: int
    last_round: int
    kinds: tuple[str, ...]
    digests: tuple[str | None, ...]
    versions: tuple[_Model | None, ...]
    label_history: tuple[tuple[int, LabelLedger], ...] = ()

    def encode(self) -> tuple[bytes, bytes]:
        """``(meta, tensors)``: canonical JSON and a safetensors file. The JSON records the tree
        size and root, the head version's digest, the SHA-256 of the tensors and of itself;
        :func:`restore_state` checks them all."""
        lineages: list[_Lineage] = []
        index: dict[int, int] = {}
        extent: list[tuple[int, int]] = []  # per lineage: (chunks, conditions) in this cut
        versions: list[list[int] | None] = []
        for v in self.versions:
            if v is None:
                versions.append(None)
                continue
            if id(v.lineage) not in index:
                index[id(v.lineage)] = len(lineages)
                lineages.append(v.lineage)
                extent.append((0, 0))
            i = index[id(v.lineage)]
            extent[i] = max(extent[i], (v.n_chunks, v.n_conditions))
            versions.append([i, v.n_chunks, v.n_conditions])
        head = self.versions[-1]
        if head is None:
            raise LedgerError("the ledger has no genesis yet", reason_code="E_LEDGER_ORDER")
        tensors: dict[str, np.ndarray] = {}
        lin_objs = []
        for i, lin in enumerate(lineages):
            k, n = extent[i]
            for name, arr in lin.frozen.items():
                tensors[f"l{i}/f/{name}"] = arr
            for name in lin.axes:
                tensors[f"l{i}/c/{name}"] = lin.prefix(name, n)
            ends = lin.chunk_ends[:k]
            chunk_sizes = [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]
            lin_objs.append(
                {"manifest": lin.manifest, "conditions": lin.conditions[:n], "chunk_sizes": chunk_sizes}
            )
        tensor_bytes = safetensors_to_bytes(tensors)
        body = {
            "format": SNAPSHOT_FORMAT,
            "format_version": 2,
            "tree_size": self.tree_size,
            "root": self.root.hex(),
            "head_digest": head.digest,
            "policy_history": [[at, pol.to_json_obj()] for at, pol in self.policy_history],
            "sequences": self.sequences,
            "min_base_size": self.min_base_size,
            "last_round": self.last_round,
            "kinds": list(self.kinds),
            "digests": {
                **{str(i): d for i, d in enumerate(self.digests) if d is not None},
                str(self.tree_size): head.digest,
            },
            "versions": versions,
            "lineages": lin_objs,
            "tensors_sha256": hashlib.sha256(tensor_bytes).hexdigest(),
            "label_history": [[at, st.to_json_obj()] for at, st in self.label_history],
        }
        encoded = canonical_json(body)
        meta = canonical_json({"body": body, "sha256": hashlib.sha256(encoded).hexdigest()})
        return meta, tensor_bytes


def capture_snapshot(state: LedgerState) -> StateSnapshot:
    """A :class:`StateSnapshot` of ``state`` now (call it where nothing applies meanwhile)."""
    if state._model is None:
        raise LedgerError("the ledger has no genesis yet", reason_code="E_LEDGER_ORDER")
    return StateSnapshot(
        tree_size=state.size,
        root=state.root(),
        policy_history=tuple(state._policy_history),
        sequences=dict(state._sequences),
        min_base_size=state._min_base_size,
        last_round=state._last_round,
        kinds=tuple(state._kinds),
        digests=tuple(state._digests),
        versions=tuple(state._versions),
        label_history=tuple(state._label_history),
    )


def snapshot_state(state: LedgerState) -> tuple[bytes, bytes]:
    """``capture_snapshot(state).encode()``."""
    return capture_snapshot(state).encode()


def restore_state(
    trust: TrustPolicy,
    meta: bytes,
    tensor_bytes: bytes,
    leaf_hashes: Sequence[bytes],
    *,
    limits: Limits = DEFAULT_LIMITS,
    condition_cap: ConditionCap | None = None,
) -> LedgerState:
    """The :class:`LedgerState` a snapshot recorded, after checking it: its own checksums (JSON
    body and tensors), its format, its first policy against the pinned roots, and its tree size
    and root against ``leaf_hashes`` (the log's, from storage). Cost: linear in the snapshot's
    bytes, no model hash (the recorded digests are kept; the coordinator compares a version it
    rebuilds for serving with them). Any mismatch raises :class:`LedgerError` (``E_INTERNAL``):
    replay the log instead."""

    def bad(why: str) -> LedgerError:
        return LedgerError(f"ledger snapshot: {why}", reason_code="E_INTERNAL")

    try:
        # canonical JSON sorts "body" before "sha256": the body's bytes are a slice of meta
        head_len, tail_len = len(b'{"body":'), len(b',"sha256":"') + 64 + len(b'"}')
        if not (meta.startswith(b'{"body":') and meta[-tail_len:-66] == b',"sha256":"'):
            raise bad("its JSON is not {body, sha256} (corrupt)")
        body_bytes = meta[head_len:-tail_len]
        if hashlib.sha256(body_bytes).hexdigest().encode() != meta[-66:-2]:
            raise bad("its JSON does not hash to the recorded sha256 (corrupt)")
        body = json.loads(body_bytes)
        if hashlib.sha256(tensor_bytes).hexdigest() != body["tensors_sha256"]:
            raise bad("its tensors do not hash to the recorded sha256 (corrupt)")
        if body["format"] != SNAPSHOT_FORMAT or body["format_version"] != 2:
            raise bad(f"unknown format {body['format']!r} v{body['format_version']!r}")
        size = int(body["tree_size"])
        if not 1 <= size <= len(leaf_hashes):
            raise bad(f"taken at tree size {size}, the log has {len(leaf_hashes)} entries")
        tree = merkle.MerkleTree(leaf_hashes[:size])
        if tree.root().hex() != body["root"]:
            raise bad(f"its root at tree size {size} is not the log's (stale or from another log)")
        history = [
            (int(at), parse_trust(canonical_json(obj), limits=limits))
            for at, obj in body["policy_history"]
        ]
        if history[0][1] != trust.roots():
            raise bad("its first policy is not the pinned trust.json roots")
        arrays = safetensors_from_bytes(tensor_bytes, max_bytes=len(tensor_bytes), limits=limits)
        lineages = []
        for i, lo in enumerate(body["lineages"]):
            specs = lo["manifest"]["tensors"]
            frozen, parts = {}, {}
            ends = np.cumsum([int(n) for n in lo["chunk_sizes"]]).tolist()
            if not ends or ends[-1] != len(lo["conditions"]):
                raise bad(f"the chunks of lineage {i} do not add up to its conditions")
            for name, spec in specs.items():
                if spec["role"] == "condition":
                    arr, axis = arrays[f"l{i}/c/{name}"], int(spec["axis"])
                    if ends[-1] != arr.shape[axis]:
                        raise bad(f"tensor {name!r} of lineage {i} does not hold its chunks")
                    parts[name] = [arr]
                else:
                    frozen[name] = arrays[f"l{i}/f/{name}"]
            lineages.append(_Lineage(lo["manifest"], frozen, parts, lo["conditions"], ends))
        st = LedgerState(trust, limits=limits, condition_cap=condition_cap)
        st._tree = tree
        st._policy_history = history
        st._policy = history[-1][1]
        st._sequences = {str(k): int(v) for k, v in body["sequences"].items()}
        st._min_base_size = int(body["min_base_size"])
        st._last_round = int(body["last_round"])
        st._kinds = [str(k) for k in body["kinds"]]
        st._label_history = [(int(at), LabelLedger.from_json_obj(obj)) for at, obj in body["label_history"]]
        st._labels = st._label_history[-1][1]
        digests = {int(k): str(v) for k, v in body["digests"].items()}
        st._digests = [digests.get(i) for i in range(size + 1)]
        st._versions = [
            None if v is None else _Model(lineages[v[0]], int(v[1]), int(v[2]), digest=digests.get(i))
            for i, v in enumerate(body["versions"])
        ]
        if not (len(st._versions) == len(st._digests) == size + 1 == len(st._kinds) + 1):
            raise bad("its per-version lists do not match its tree size")
        head = st._versions[-1]
        if head is None or head.n_chunks != head.lineage.n_chunks:
            raise bad("its newest version is not the head of its lineage")
        st._model = head
        if st.digest_at(size) != body["head_digest"]:  # recorded in both places when taken
            raise bad("its newest version's digest is not the one it recorded")
    except LedgerError:
        raise
    except (VerificationError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise bad(f"malformed ({type(exc).__name__}: {exc})") from exc
    return st


RECEIPT_FORMAT = "scarches-fl.receipt"


@dataclass(frozen=True)
class Receipt:
    """Proof that an entry was logged: its index, its leaf hash, the signed checkpoint note that
    includes it, and the inclusion proof from the leaf to that checkpoint's root. The one
    definition: the coordinator builds it, the gRPC answer carries it
    (:mod:`protocols.proto.serde`), a site verifies it with :func:`verify_receipt` and stores its
    canonical JSON (``log_index`` and ``checkpoint`` there). ``duplicate`` says the coordinator
    already held this entry and answered with its original receipt; it is not part of the proof
    and not serialised."""

    leaf_index: int
    leaf_hash: bytes
    signed_note: bytes  # the C2SP signed note, exactly as served
    inclusion_proof: tuple[bytes, ...]
    duplicate: bool = False

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "format": RECEIPT_FORMAT,
            "format_version": 1,
            "log_index": self.leaf_index,
            "leaf_hash": self.leaf_hash.hex(),
            "checkpoint": self.signed_note.decode("utf-8"),
            "inclusion_proof": [h.hex() for h in self.inclusion_proof],
        }

    def to_json(self) -> bytes:
        return canonical_json(self.to_json_obj())


def make_receipt(tree: merkle.MerkleTree, index: int, checkpoint_note: bytes, tree_size: int) -> Receipt:
    """The receipt for leaf ``index`` against the checkpoint of ``tree_size`` (coordinator side)."""
    return Receipt(index, tree.leaf_hash(index), bytes(checkpoint_note), tuple(tree.inclusion_proof(index, tree_size)))


def parse_receipt(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Receipt:
    try:
        obj = parse_json_strict(data, max_bytes=limits.max_envelope_bytes, max_depth=3, what="receipt")
    except VerificationError as exc:
        raise ReceiptError(exc.message) from exc
    fields = {"format", "format_version", "log_index", "leaf_hash", "checkpoint", "inclusion_proof"}
    if not isinstance(obj, dict) or set(obj) != fields or obj["format"] != RECEIPT_FORMAT or type(obj["format_version"]) is not int or obj["format_version"] != 1:
        raise ReceiptError(f"a receipt has exactly the fields {sorted(fields)} (format {RECEIPT_FORMAT} v1)")
    idx = obj["log_index"]
    if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
        raise ReceiptError("log_index must be an integer >= 0")
    if not isinstance(obj["leaf_hash"], str) or not _HEX64.fullmatch(obj["leaf_hash"]):
        raise ReceiptError("leaf_hash must be 64 lowercase hex characters")
    proof = obj["inclusion_proof"]
    if not isinstance(proof, list) or len(proof) > 64 or not all(
        isinstance(h, str) and _HEX64.fullmatch(h) for h in proof
    ):
        raise ReceiptError("inclusion_proof must be a list of at most 64 hashes (64 hex each)")
    if not isinstance(obj["checkpoint"], str):
        raise ReceiptError("checkpoint must be the signed note text")
    return Receipt(idx, bytes.fromhex(obj["leaf_hash"]), obj["checkpoint"].encode("utf-8"),
                   tuple(bytes.fromhex(h) for h in proof))


def verify_receipt(receipt: Receipt, envelope: bytes, *, policy: TrustPolicy) -> Any:
    """Check that ``envelope`` is leaf ``receipt.leaf_index`` of the log whose checkpoint the
    receipt carries, signed by the log key pinned in ``policy``. Returns verified
    :class:`protocols.checkpoint.Checkpoint`; raises :class:`ReceiptError`."""
    from protocols.checkpoint import verify_checkpoint

    leaf = merkle.leaf_hash(envelope)
    if not hmac.compare_digest(leaf, receipt.leaf_hash):
        raise ReceiptError("the receipt is for another entry: leaf hash differs from the envelope's")
    try:
        cp = verify_checkpoint(receipt.signed_note, origin=policy.origin, log_verifier=policy.log_public_key)
    except VerificationError as exc:
        raise ReceiptError(f"the receipt's checkpoint does not verify: {exc}", reason_code=exc.reason_code
                           if exc.reason_code.startswith("E_CHECKPOINT") else "E_RECEIPT_INVALID") from exc
    if not receipt.leaf_index < cp.size:
        raise ReceiptError(f"log index {receipt.leaf_index} is not inside the checkpoint (size {cp.size})")
    try:
        merkle.verify_inclusion(leaf, receipt.leaf_index, cp.size, list(receipt.inclusion_proof), cp.root_hash)
    except VerificationError as exc:
        raise ReceiptError(f"inclusion proof does not verify: {exc}", reason_code="E_PROOF_INVALID") from exc
    return cp

