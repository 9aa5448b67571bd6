"""The coordinator's ledger state: the :class:`protocols.ledger.LedgerState` of the stored
entries (replayed at start-up, or restored from a snapshot checked against the log), every
submission checked and applied by its rules, and the entries the operator signs. The rules
themselves are :mod:`protocols.ledger`'s; this module connects them to storage and to the
coordinator's configuration.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.storage import BlobStore, LedgerStore, StoredEntry
from protocols.bundle import atomic_write
from protocols.errors import ConfigError, VerificationError
from protocols.limits import DEFAULT_LIMITS
from protocols.proto.serde import BlobRef

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from coordinator.config import CoordinatorConfig
    from protocols.bundle import ReferenceBundle
    from protocols.labels import AuthenticatedContribution
    from protocols.ledger import AppliedEntry, BlobLookup, ConditionCap, LedgerState, StateSnapshot
    from protocols.limits import Limits
    from protocols.policy import TrustPolicy
    from protocols.update import AuthenticatedUpdate

__all__ = [
    "protocol_limits",
    "blob_lookup",
    "SNAPSHOT_META",
    "write_snapshot",
    "replay_state",
    "apply_entry",
    "CheckedUpdate",
    "check_and_apply_site_update",
    "authenticate_submission",
    "claimed_update",
    "site_status",
    "genesis_envelope",
    "enroll_envelope",
    "revoke_envelope",
    "checked",
    "countersign_rotation",
]

logger = logging.getLogger(__name__)

#: a rotation request is one DSSE envelope: the protocol's envelope limit bounds it
MAX_ROTATION_REQUEST_BYTES = DEFAULT_LIMITS.max_envelope_bytes


def protocol_limits(cfg: CoordinatorConfig) -> Limits:
    """:class:`protocols.limits.Limits` with this coordinator's envelope and diff caps."""
    import dataclasses

    return dataclasses.replace(
        DEFAULT_LIMITS,
        max_envelope_bytes=cfg.limits.max_envelope_bytes,
        max_diff_bytes=cfg.limits.max_diff_bytes,
    )


def condition_cap(cfg: CoordinatorConfig) -> ConditionCap:
    """The operator's :class:`protocols.ledger.ConditionCap` from ``limits`` in the config."""
    from protocols.ledger import ConditionCap

    return ConditionCap(
        per_site=cfg.limits.max_conditions_per_site,
        per_reference=cfg.limits.max_conditions_per_reference,
    )


def _hex(name: str) -> str:
    return name[7:] if name.startswith("sha256:") else name


def blob_lookup(blobs: BlobStore, extra: dict[str, bytes] | None = None) -> BlobLookup:
    """``BlobLookup`` (hex sha256 -> bytes or None) over the blob store (+ ``extra``)."""

    def lookup(hexname: str) -> bytes | None:
        if extra and hexname in extra:
            return extra[hexname]
        name = "sha256:" + hexname
        if not blobs.exists(name):
            return None
        return blobs.read(name, verify=False)  # the ledger checks the hash itself

    return lookup


SNAPSHOT_META = "ledger-state.json"


def write_snapshot(snapshot: StateSnapshot, cfg: CoordinatorConfig) -> Path:
    """Write a :class:`protocols.ledger.StateSnapshot` under ``paths.snapshot``: the tensors
    file (named by its SHA-256) first, then the JSON that names it, each atomically; older
    tensor files go last. A crash at any point leaves the previous snapshot or the new one."""
    meta, tensors = snapshot.encode()
    d = cfg.path(cfg.paths.snapshot)
    d.mkdir(parents=True, exist_ok=True)
    name = f"ledger-state-{hashlib.sha256(tensors).hexdigest()}.safetensors"
    atomic_write(d / name, tensors, durable=cfg.durable)
    atomic_write(d / SNAPSHOT_META, meta, durable=cfg.durable)
    for old in d.glob("ledger-state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return d / SNAPSHOT_META


def _restore_snapshot(
    store: LedgerStore, trust: TrustPolicy, cfg: CoordinatorConfig
) -> LedgerState | None:
    """The state a snapshot recorded, checked against the log; None (with a warning) when there
    is none that holds."""
    import json

    from protocols.ledger import restore_state

    path = cfg.path(cfg.paths.snapshot) / SNAPSHOT_META
    if not path.is_file():
        return None
    try:
        meta = path.read_bytes()
        sha = json.loads(meta)["body"]["tensors_sha256"]
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ValueError("tensors_sha256 is not 64 hex digits")
        tensors = (path.parent / f"ledger-state-{sha}.safetensors").read_bytes()
        return restore_state(
            trust,
            meta,
            tensors,
            store.leaf_hashes(),
            limits=protocol_limits(cfg),
            condition_cap=condition_cap(cfg),
        )
    except (OSError, ValueError, KeyError, TypeError, VerificationError) as exc:
        logger.warning("%s: not used (%s); replaying the whole log", path, exc)
        return None


def replay_state(store: LedgerStore, blobs: BlobStore, cfg: CoordinatorConfig) -> LedgerState:
    """The :class:`protocols.ledger.LedgerState` of every stored entry: from the snapshot when
    one matches the log (then only the entries after it are applied), else replayed from the
    pinned roots of trust.json. Refuses to start on a broken log."""
    from protocols.ledger import LedgerState
    from protocols.policy import read_trust

    trust = read_trust(cfg.path(cfg.paths.trust))
    state = _restore_snapshot(store, trust, cfg)
    if state is not None:
        try:
            _apply_stored(state, store, blobs, state.size)
            return state
        except Exception as exc:  # noqa: BLE001 - the full replay below names a real break
            logger.warning(
                "entries after the snapshot do not apply (%s); replaying the whole log", exc
            )
    state = LedgerState(trust, limits=protocol_limits(cfg), condition_cap=condition_cap(cfg))
    _apply_stored(state, store, blobs, 0)
    return state


def _apply_stored(state: LedgerState, store: LedgerStore, blobs: BlobStore, start: int) -> None:
    lookup = blob_lookup(blobs)
    for e in store.entries(start, store.size):
        try:
            state.apply(e.envelope, lookup)
        except VerificationError as exc:
            from coordinator.storage import StorageError

            raise StorageError(
                f"{store.db_path}: entry {e.index} does not replay ({exc}); the ledger or its "
                "blobs are damaged, restore the state directory from a backup"
            ) from exc


def apply_entry(state: LedgerState, entry: StoredEntry, blobs: BlobStore) -> AppliedEntry:
    """Apply a stored entry (appended by this or another process) to the state."""
    return state.apply(entry.envelope, blob_lookup(blobs))


@dataclass(frozen=True)
class CheckedUpdate:
    site_id: str
    sequence: int
    new_conditions: tuple[str, ...]
    kind: str = "site_update"


def _checked_update(applied: AppliedEntry) -> CheckedUpdate:
    from protocols.update import AcceptedUpdate

    acc = applied.accepted_update
    if not isinstance(acc, AcceptedUpdate):  # pragma: no cover - only site updates reach here
        raise VerificationError(
            "the ledger applied an entry that is not a site update", reason_code="E_INTERNAL"
        )
    return CheckedUpdate(acc.site_id, acc.sequence, tuple(acc.new_conditions))


def check_and_apply_site_update(
    state: LedgerState,
    envelope: bytes,
    diff: bytes,
    limits: Limits,
    *,
    authenticated: AuthenticatedUpdate | AuthenticatedContribution | None = None,
) -> CheckedUpdate:
    """Run validation of a submitted site update or label contribution against ``state`` and
    apply it (the state is unchanged when it raises). Only these two site-signed kinds are
    accepted here; a label contribution comes with an empty ``diff``.

    ``authenticated``: :func:`authenticate_submission`'s result for these bytes (from the
    request thread): a site update's envelope is then not parsed nor its signature verified
    again while the policy in force still holds the same active key (``LedgerState.apply``)."""
    from protocols.dsse import parse_envelope
    from protocols.errors import UpdateRejectedError
    from protocols.labels import LABEL_CONTRIBUTION_TYPE, AuthenticatedContribution
    from protocols.ledger import PAYLOAD_TYPES
    from protocols.update import SITE_UPDATE_TYPE

    if (
        authenticated is not None
        and authenticated.envelope == envelope
        and not isinstance(authenticated, AuthenticatedContribution)
    ):
        # authenticate_update parsed it strictly and checked its payloadType
        applied = state.apply(
            envelope, blob_lookup_bytes({}), diff_bytes=diff, authenticated=authenticated
        )
        return _checked_update(applied)
    try:
        env = parse_envelope(envelope, limits=limits)
    except VerificationError as exc:
        code = exc.reason_code if exc.reason_code == "E_OVERSIZE" else "E_ENVELOPE_MALFORMED"
        raise UpdateRejectedError(code, exc.message or str(exc)) from exc
    if env.payload_type == LABEL_CONTRIBUTION_TYPE:
        applied = state.apply(envelope, blob_lookup_bytes({}), diff_bytes=diff)
        acc = applied.accepted_update
        if acc is None:  # pragma: no cover - the ledger records what it accepted
            raise VerificationError(
                "the ledger applied a label contribution without recording it",
                reason_code="E_INTERNAL",
            )
        return CheckedUpdate(acc.site_id, acc.sequence, (), kind="label_contribution")
    if env.payload_type != SITE_UPDATE_TYPE:
        kind = PAYLOAD_TYPES.get(env.payload_type, "unknown")
        raise UpdateRejectedError(
            "E_PAYLOAD_TYPE",
            f"SubmitUpdate takes site updates ({SITE_UPDATE_TYPE}) and label contributions "
            f"({LABEL_CONTRIBUTION_TYPE}); this envelope is a {kind} entry, which only the "
            "operator appends",
        )
    # The submitted diff is handed over as bytes: the update rules compare it with the signed
    # sha256 and size only after the signature verified (E_DIFF_*_MISMATCH), never look it up
    # under the name the unverified payload claims (which answered a forger E_BLOB_MISSING).
    applied = state.apply(envelope, blob_lookup_bytes({}), diff_bytes=diff)
    return _checked_update(applied)


def authenticate_submission(
    state: LedgerState, envelope: bytes, limits: Limits
) -> AuthenticatedUpdate | AuthenticatedContribution:
    """:func:`protocols.update.authenticate_update` against the policy in force: the
    :class:`~protocols.update.AuthenticatedUpdate` (its ``site_id`` is the signer's) or an
    :class:`~protocols.errors.UpdateRejectedError` whose code means "not authenticated"."""
    from protocols.labels import LABEL_CONTRIBUTION_TYPE, authenticate_contribution
    from protocols.update import authenticate_update

    if _payload_type(envelope) == LABEL_CONTRIBUTION_TYPE:
        return authenticate_contribution(envelope, state.policy, limits=limits)
    return authenticate_update(envelope, state.policy, limits=limits)


def _payload_type(envelope: bytes) -> str | None:
    """The payloadType an envelope claims (lenient, unverified: only picks the rules)."""
    import json

    try:
        env = json.loads(envelope)
        return env.get("payloadType") if isinstance(env, dict) else None
    except ValueError:
        return None


def blob_lookup_bytes(mapping: dict[str, bytes]) -> BlobLookup:
    return lambda hexname: mapping.get(hexname)


def claimed_update(envelope: bytes, limits: Limits) -> tuple[str | None, int | None]:
    """The (site id, sequence) a site update *claims*: unverified, for the log line of a
    submission refused before its signature was checked (logged as ``claimed_site``, never as
    ``site``), so a plain (fast, linear) JSON parse is enough."""
    import base64
    import json

    if len(envelope) > limits.max_envelope_bytes:
        return None, None
    try:
        env = json.loads(envelope)
        payload = json.loads(base64.b64decode(env["payload"], validate=True))
        if payload.get("kind") not in ("site_update", "label_contribution"):
            return None, None
        sid, seq = payload.get("site_id"), payload.get("sequence")
    except Exception:  # noqa: BLE001 - unparseable: no claim
        return None, None
    sid = sid if isinstance(sid, str) and 0 < len(sid) <= 64 else None
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
    return sid, seq


def site_status(state: LedgerState, site_id: str) -> dict[str, Any]:
    rec = state.policy.sites.get(site_id)
    if rec is None:
        return {"enrolled": False, "revoked": False, "key_ids": (), "last_sequence": 0}
    active = rec.active_key
    return {
        "enrolled": True,
        "revoked": active is None,
        "key_ids": tuple(k.key_id for k in rec.keys if k.status == "active"),
        "last_sequence": int(state.sequences.get(site_id, 0)),
    }


def genesis_envelope(
    operator_key: Ed25519PrivateKey, *, bundle: ReferenceBundle, origin: str, blobs: list[BlobRef]
) -> bytes:
    from protocols.ledger import entry_blobs, make_genesis

    g = make_genesis(bundle, origin=origin, operator_keys=[operator_key])
    named = {(b.role, b.sha256, b.size) for b in entry_blobs(g.envelope)}
    ours = {(b.role, _hex(b.sha256), b.size) for b in blobs}
    if named != ours:  # pragma: no cover - both serialize with bundle_to_bytes
        raise VerificationError(
            "the genesis names other blobs than the ones stored", reason_code="E_INTERNAL"
        )
    return bytes(g.envelope)


def enroll_envelope(
    operator_key: Ed25519PrivateKey,
    state: LedgerState,
    *,
    site_id: str,
    public_key: Ed25519PublicKey,
    origin: str,
    log_size: int,
) -> bytes:
    from protocols.ledger import enrol_entry

    env = enrol_entry(
        origin=origin, site_id=site_id, public_key=public_key, operator_keys=[operator_key]
    )
    state.check(env, blob_lookup_bytes({}))  # the policy rules' own message when refused
    return bytes(env)


def revoke_envelope(
    operator_key: Ed25519PrivateKey, state: LedgerState, *, site_id: str, origin: str, log_size: int
) -> bytes:
    from protocols.ledger import revoke_entry

    env = revoke_entry(origin=origin, site_id=site_id, operator_keys=[operator_key])
    state.check(env, blob_lookup_bytes({}))
    return bytes(env)


def checked(state: LedgerState, envelope: bytes) -> bytes:
    """``envelope`` after the ledger rules accepted it as the next entry (no change yet)."""
    state.check(envelope, blob_lookup_bytes({}))
    return envelope


def countersign_rotation(
    operator_key: Ed25519PrivateKey, request: bytes, *, origin: str, what: str
) -> tuple[bytes, str]:
    """Check that ``request`` is a site's 'rotate' policy change for this log and add the
    operator's signature. The ledger rules (old and new site key signed it, the old key is the
    site's active one) are checked when it is appended."""
    from protocols.dsse import add_signatures
    from protocols.errors import PolicyError
    from protocols.ledger import entry_payload
    from protocols.policy import parse_policy_change

    if len(request) > MAX_ROTATION_REQUEST_BYTES:
        raise ConfigError(
            f"{what}: larger than {MAX_ROTATION_REQUEST_BYTES / 2**20:g} MiB; a rotation request is a few "
            "hundred bytes"
        )
    try:
        kind, obj = entry_payload(request)
        if kind != "policy":
            raise PolicyError(f"it is a {kind} entry, not a policy change")
        change = parse_policy_change(obj)
    except VerificationError as exc:
        raise VerificationError(
            f"{what} is not a rotation request ({exc.message or exc}); the site makes it with "
            "its old and new key",
            reason_code=exc.reason_code,
        ) from exc
    if change.action != "rotate":
        raise VerificationError(
            f"{what} asks to {change.action!r}, not to rotate a key; use `coordinator enroll` "
            "or `coordinator revoke` for that",
            reason_code="E_POLICY_CHANGE",
        )
    if change.origin != origin:
        raise VerificationError(
            f"{what} is for log {change.origin!r}, this coordinator is {origin!r}",
            reason_code="E_ORIGIN_MISMATCH",
        )
    return bytes(add_signatures(request, [operator_key])), change.site_id
