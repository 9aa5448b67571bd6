"""Pull and verify: what a site checks before it maps a single cell on a reference.

Rules, in order (each failure is a :class:`SiteTrustError` that names which rule broke and what
to do; nothing is mapped, signed or sent after one):

1. The latest checkpoint is a C2SP signed note by the log key pinned in the site's trust.json,
   for the pinned origin (``protocols.checkpoint.verify_checkpoint``).
2. If the trust policy names witnesses with a threshold ``k``, at least ``k`` of them cosigned
   that checkpoint (``verify_cosigned_checkpoint``).
3. It is consistent with the last checkpoint this site verified (kept in the state directory):
   never smaller (rollback), never a different root at the same size or without a valid
   consistency proof (fork) -- ``protocols.checkpoint.check_checkpoint_advance``.
4. The ledger entries ``[0, size)`` hash to the checkpoint's root (RFC 6962), so the entries
   are exactly the log the checkpoint commits to; the site's enrolment is read from those
   verified entries (policy replay), never from ``GetSiteInfo``'s word alone: the site id must be
   enrolled, not revoked, and the site's key must be one of its active keys.
5. The reference at that size is fetched and its content digest recomputed from the bytes
   (``protocols.bundle.bundle_from_bytes``); the header's digest is only compared, never used.

Only after all of these does the site store the new checkpoint as its last verified one.
``site rotate-key finish`` needs no reference: it runs rules 1-4 (:func:`verify_ledger`) and
stores the checkpoint after them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protocols.errors import ScarchesFLError, VerificationError
from protocols.ledger import Receipt
from site_agent import _protocol as proto
from site_agent.state import SiteState

if TYPE_CHECKING:
    from protocols.bundle import ReferenceBundle

__all__ = ["SiteTrustError", "VerifiedReference", "VerifiedLedger", "pull_and_verify",
           "verify_ledger", "verify_receipt", "verified_checkpoint_from_state"]

logger = logging.getLogger(__name__)


class SiteTrustError(VerificationError):
    """The coordinator served something this site must not trust. Nothing was sent."""

    exit_code = 3

    def __init__(self, message: str, *, reason_code: str = "E_INTERNAL") -> None:
        super().__init__(message, reason_code=reason_code)


@dataclass
class VerifiedLedger:
    """Rules 1-4: a checkpoint signed by the pinned log key (cosigned as trust.json asks),
    consistent with this site's last one, and the replayed entries it commits to."""

    checkpoint: Any  # protocols.checkpoint.Checkpoint
    note: bytes
    site_record: proto.SiteEnrolment
    entries_checked: int
    previous_size: int | None = None
    cosigned_by: dict[str, int] = field(default_factory=dict)

    @property
    def tree_size(self) -> int:
        return int(self.checkpoint.size)

    @property
    def root_hex(self) -> str:
        return bytes(self.checkpoint.root_hash).hex()


@dataclass
class VerifiedReference(VerifiedLedger):
    """A reference version whose every link to the pinned trust was checked (rules 1-5)."""

    bundle: ReferenceBundle | None = None  # always set by pull_and_verify

    @property
    def reference(self) -> ReferenceBundle:
        """The verified bundle."""
        if self.bundle is None:
            raise SiteTrustError("no verified reference bundle", reason_code="E_INTERNAL")
        return self.bundle

    @property
    def digest(self) -> str:
        return str(self.reference.digest)


def _wrap(exc: VerificationError, prefix: str) -> SiteTrustError:
    code = getattr(exc, "reason_code", "E_INTERNAL")
    return SiteTrustError(f"{prefix}: {exc}. Nothing was mapped or sent", reason_code=code)


def verified_checkpoint_from_state(state: SiteState, trust: proto.Trust) -> Any | None:
    """The last verified checkpoint, re-verified from its stored note (None on first contact)."""
    stored = state.last_checkpoint()
    if stored is None:
        return None
    try:
        return proto.verify_checkpoint_note(stored.note, trust)
    except VerificationError as exc:
        raise SiteTrustError(
            f"the checkpoint stored in {state.path} no longer verifies against the pinned "
            f"trust.json ({exc}); the state directory was tampered with or the trust changed"
        ) from exc


def _check_advance(client: Any, old: Any, new: Any) -> None:
    """Rule 3, in either direction (a receipt may name a checkpoint older than the stored)."""
    from protocols.checkpoint import check_checkpoint_advance

    if old is None:
        return
    if new.size > old.size and old.size > 0:
        proof = client.get_consistency_proof(old.size, new.size)
        if (proof.old_size, proof.new_size) not in ((old.size, new.size), (0, 0)):
            raise SiteTrustError(
                f"asked for a consistency proof {old.size}->{new.size}, the coordinator sent "
                f"one for {proof.old_size}->{proof.new_size}; refusing",
                reason_code="E_PROOF_INVALID",
            )
        hashes = proof.hashes
    else:
        hashes = ()
    check_checkpoint_advance(old, new, hashes)


def verify_ledger(
    client: Any, *, state: SiteState, trust: proto.Trust, site_id: str,
) -> VerifiedLedger:
    """Rules 1-4 of the module docstring, without judging the site's record (the caller does)
    and without storing anything."""
    old = verified_checkpoint_from_state(state, trust)
    # 1. signature
    served = client.get_checkpoint()
    try:
        cp = proto.verify_checkpoint_note(served.signed_note, trust)
    except VerificationError as exc:
        raise _wrap(exc, "the coordinator's checkpoint is not signed by the pinned log key") from exc
    # 2. witnesses
    cosigned: dict[str, int] = {}
    if trust.witness_threshold > 0:
        size, note = client.get_cosignatures(cp.size)
        try:
            cosigned = proto.verify_cosignatures(note, trust, expect=cp)
        except VerificationError as exc:
            raise _wrap(
                exc, f"trust.json requires {trust.witness_threshold} witness cosignature(s) on "
                f"the checkpoint of size {cp.size}"
            ) from exc
    # 3. rollback / fork
    try:
        _check_advance(client, old, cp)
    except VerificationError as exc:
        kind = type(exc).__name__
        what = ("ROLLBACK" if kind == "RollbackError" else "FORK" if kind == "ForkError"
                else "INCONSISTENT LOG")
        raise SiteTrustError(
            f"{what}: refusing the coordinator's checkpoint (size {cp.size}): {exc}. "
            f"Nothing was mapped or sent; the last verified checkpoint (size "
            f"{old.size if old is not None else 0}) is kept",
            reason_code=getattr(exc, "reason_code", "E_CHECKPOINT_ROLLBACK"),
        ) from exc
    # 4. ledger entries and enrolment
    try:
        entries = client.get_entries(0, cp.size) if cp.size else []
        proto.check_entries_match(entries, cp)
        record = proto.site_record_from_entries(entries, trust, site_id=site_id,
                                                fetch_blob=client.get_blob)
    except VerificationError as exc:
        raise _wrap(exc, "the ledger does not verify") from exc
    return VerifiedLedger(
        checkpoint=cp, note=served.signed_note, site_record=record,
        entries_checked=len(entries), previous_size=old.size if old is not None else None,
        cosigned_by=cosigned,
    )


def _rotation_hint(state: SiteState, record: proto.SiteEnrolment) -> str:
    """What to do when the key is not active because a rotation of this site was logged."""
    from site_agent.rotation import pending_rotation

    try:
        pending = pending_rotation(state)
    except (ScarchesFLError, OSError):  # a hint must never hide the real error
        return ""
    if pending is not None and pending.new_key_id in record.key_ids:
        return (
            f". The operator appended this site's key rotation (the new key "
            f"{pending.new_key_id[:16]}... is active): run `scarches-fl site rotate-key finish "
            f"--state {state.path}` to make it this site's key"
        )
    return ""


def pull_and_verify(
    client: Any, *, state: SiteState, trust: proto.Trust, site_id: str, key_id: str,
) -> VerifiedReference:
    """Rules 1-5 of the module docstring; stores the checkpoint when all pass."""
    from protocols.bundle import bundle_from_bytes

    ledger = verify_ledger(client, state=state, trust=trust, site_id=site_id)
    cp, record = ledger.checkpoint, ledger.site_record
    if not record.enrolled:
        raise SiteTrustError(
            f"site {site_id!r} is not enrolled in this ledger (checked against the signed policy "
            f"entries up to size {cp.size}); send site.pub to the operator to enrol it "
            "(`scarches-fl coordinator enroll`), or check --site-id",
            reason_code="E_SITE_NOT_ENROLLED",
        )
    if record.revoked:
        raise SiteTrustError(
            f"site {site_id!r} was revoked by the operator; ask the operator before contributing",
            reason_code="E_KEY_REVOKED",
        )
    if key_id not in record.key_ids:
        hint = _rotation_hint(state, record)
        raise SiteTrustError(
            f"this site's key {key_id} is not an active key of site {site_id!r} in the ledger "
            f"(active: {', '.join(record.key_ids) or 'none'})"
            + (hint or "; use the key the operator enrolled (--key) or have the new key enrolled"),
            reason_code="E_KEY_UNKNOWN",
        )
    # 5. reference bytes -> recomputed digest
    ref = client.get_reference(cp.size)
    if ref.header.tree_size != cp.size:
        raise SiteTrustError(
            f"asked for reference version {cp.size}, the coordinator sent version "
            f"{ref.header.tree_size}; refusing", reason_code="E_DIGEST_MISMATCH",
        )
    try:
        bundle = bundle_from_bytes(ref.manifest_bytes, ref.safetensors_bytes, verify=True)
    except VerificationError as exc:
        raise _wrap(exc, f"reference version {cp.size} does not match its content digest") from exc
    if bundle.digest != ref.header.digest:
        raise SiteTrustError(
            f"reference version {cp.size}: the bytes have content digest {bundle.digest}, the "
            f"coordinator announced {ref.header.digest}; refusing",
            reason_code="E_DIGEST_MISMATCH",
        )
    if record.expected_digest is not None and record.expected_digest != bundle.digest:
        raise SiteTrustError(
            f"reference version {cp.size} has digest {bundle.digest}, but the verified ledger "
            f"implies {record.expected_digest}; refusing", reason_code="E_DIGEST_MISMATCH",
        )
    state.store_checkpoint(origin=cp.origin, size=cp.size, root=cp.root_hash,
                           note=ledger.note)
    logger.info("verified reference version %d (%s)", cp.size, bundle.digest)
    return VerifiedReference(
        checkpoint=cp, note=ledger.note, bundle=bundle, site_record=record,
        entries_checked=ledger.entries_checked, previous_size=ledger.previous_size,
        cosigned_by=ledger.cosigned_by,
    )


@dataclass(frozen=True)
class VerifiedReceipt:
    leaf_index: int
    tree_size: int
    root_hex: str
    duplicate: bool

    def to_dict(self) -> dict[str, Any]:
        return {"leaf_index": self.leaf_index, "tree_size": self.tree_size,
                "root": self.root_hex, "duplicate": self.duplicate}


def verify_receipt(
    client: Any, receipt: Receipt, *, envelope: bytes, state: SiteState, trust: proto.Trust,
) -> VerifiedReceipt:
    """Check a receipt: its leaf is our envelope, its checkpoint is signed by the pinned log key,
    the inclusion proof leads to that checkpoint's root, and that checkpoint is consistent with
    the last one this site verified. Moves the stored checkpoint forward (never back)."""
    from protocols.checkpoint import check_checkpoint_advance
    from protocols.ledger import verify_receipt as verify_receipt_proof

    try:
        cp = verify_receipt_proof(receipt, envelope, policy=trust.policy)
    except VerificationError as exc:
        raise _wrap(exc, "the coordinator's receipt does not prove this update was logged") from exc
    old = verified_checkpoint_from_state(state, trust)
    try:
        if old is None or cp.size >= old.size:
            _check_advance(client, old, cp)
        else:  # a duplicate's receipt may predate our latest view: prove it is a prefix
            proof = client.get_consistency_proof(cp.size, old.size)
            check_checkpoint_advance(cp, old, proof.hashes)
    except VerificationError as exc:
        raise _wrap(exc, "the receipt's checkpoint is not consistent with this site's view") from exc
    if old is None or cp.size > old.size:
        state.store_checkpoint(origin=cp.origin, size=cp.size, root=cp.root_hash,
                               note=receipt.signed_note)
    return VerifiedReceipt(
        leaf_index=int(receipt.leaf_index), tree_size=cp.size,
        root_hex=bytes(cp.root_hash).hex(), duplicate=bool(receipt.duplicate),
    )
