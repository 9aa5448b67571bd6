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
from protocols.policy import TrustPolicy
from site_agent.state import SiteState

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from protocols.bundle import ReferenceBundle
    from protocols.checkpoint import Checkpoint
    from protocols.labels import LabelLedger
    from protocols.registry_client import LedgerEntry

__all__ = ["SiteTrustError", "SiteEnrolment", "VerifiedReference", "VerifiedLedger", "load_trust",
           "pull_and_verify", "verify_ledger", "verify_receipt", "verified_checkpoint_from_state"]

logger = logging.getLogger(__name__)


class SiteTrustError(VerificationError):
    """The coordinator served something this site must not trust. Nothing was sent."""

    exit_code = 3

    def __init__(self, message: str, *, reason_code: str = "E_INTERNAL") -> None:
        super().__init__(message, reason_code=reason_code)


def load_trust(data: bytes, *, source: str) -> TrustPolicy:
    """The pinned trust.json (:func:`protocols.policy.parse_trust`); a file that does not parse
    is a :class:`~protocols.errors.ConfigError` naming ``source``."""
    from protocols.errors import ConfigError, PolicyError
    from protocols.policy import parse_trust

    try:
        return parse_trust(data)
    except PolicyError as exc:
        raise ConfigError(f"{source}: {exc.message}") from exc


def _verify_checkpoint(note: bytes, trust: TrustPolicy) -> Checkpoint:
    """Rule 1: the checkpoint in ``note``, signed by the pinned log key for the pinned origin."""
    from protocols.checkpoint import verify_checkpoint

    return verify_checkpoint(bytes(note), origin=trust.origin, log_verifier=[trust.log_public_key])


def _verify_cosignatures(note: bytes, trust: TrustPolicy, *, expect: Checkpoint) -> dict[str, int]:
    """Rule 2: witness cosignatures on the checkpoint ``expect`` (same size and root)."""
    from protocols.checkpoint import verify_cosigned_checkpoint

    res = verify_cosigned_checkpoint(
        bytes(note), origin=trust.origin, log_verifier=[trust.log_public_key],
        witnesses=list(trust.witness_keys), threshold=trust.witnesses_required,
    )
    if res.checkpoint.size != expect.size or res.checkpoint.root_hash != expect.root_hash:
        raise VerificationError(
            f"the cosigned checkpoint (size {res.checkpoint.size}) is not the one served "
            f"(size {expect.size})", reason_code="E_CHECKPOINT_INVALID",
        )
    return dict(res.cosigned_at)


def _check_entries_match(entries: Sequence[LedgerEntry], checkpoint: Checkpoint) -> None:
    """The entries [0, size) are exactly the leaves the verified checkpoint commits to."""
    import hmac

    from protocols.merkle import leaf_hash, root

    if len(entries) != checkpoint.size:
        raise VerificationError(
            f"the coordinator returned {len(entries)} entries for a log of size "
            f"{checkpoint.size}", reason_code="E_LEDGER_ORDER",
        )
    for i, e in enumerate(entries):
        if e.index != i:
            raise VerificationError(f"entry {e.index} where {i} was due",
                                    reason_code="E_LEDGER_ORDER")
    got = root([leaf_hash(e.envelope) for e in entries])
    if not hmac.compare_digest(got, bytes(checkpoint.root_hash)):
        raise VerificationError(
            f"the ledger entries do not hash to the root of the signed checkpoint of size "
            f"{checkpoint.size}: the coordinator served entries other than the ones it signed",
            reason_code="E_PROOF_INVALID",
        )


@dataclass(frozen=True)
class SiteEnrolment:
    """This site as the verified ledger sees it."""

    site_id: str
    enrolled: bool
    revoked: bool
    key_ids: tuple[str, ...]
    last_sequence: int = 0
    expected_digest: str | None = None
    #: the replayed label state at this size
    labels: LabelLedger | None = None


def site_record_from_entries(
    entries: Sequence[LedgerEntry], trust: TrustPolicy, *, site_id: str,
    fetch_blob: Callable[[str], bytes],
) -> SiteEnrolment:
    """Replay the (already root-checked) entries from the pinned roots with
    :func:`protocols.ledger.replay` (every signature, policy change, update rule and blob), and
    read this site's enrolment, active keys, last accepted sequence number and the digest the
    ledger implies for the reference version ``len(entries)``."""
    from protocols.ledger import replay

    cache: dict[str, bytes] = {}

    def lookup(sha: str) -> bytes:
        name = sha if sha.startswith("sha256:") else "sha256:" + sha
        if name not in cache:
            cache[name] = fetch_blob(name)
        return cache[name]

    state = replay(trust, [e.envelope for e in entries], lookup)
    policy = state.policy
    rec = policy.sites.get(site_id)
    digest = state.digest_at(len(entries))
    if rec is None:
        return SiteEnrolment(site_id, enrolled=False, revoked=False, key_ids=(),
                             expected_digest=digest, labels=state.labels)
    active = tuple(k.key_id for k in rec.keys if k.status == "active")
    revoked = not active and any(k.status == "revoked" for k in rec.keys)
    return SiteEnrolment(site_id, enrolled=True, revoked=revoked, key_ids=active,
                         last_sequence=int(state.sequences.get(site_id, 0)),
                         expected_digest=digest, labels=state.labels)


@dataclass
class VerifiedLedger:
    """Rules 1-4: a checkpoint signed by the pinned log key (cosigned as trust.json asks),
    consistent with this site's last one, and the replayed entries it commits to."""

    checkpoint: Any  # protocols.checkpoint.Checkpoint
    note: bytes
    site_record: SiteEnrolment
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


def verified_checkpoint_from_state(state: SiteState, trust: TrustPolicy) -> Any | None:
    """The last verified checkpoint, re-verified from its stored note (None on first contact)."""
    stored = state.last_checkpoint()
    if stored is None:
        return None
    try:
        return _verify_checkpoint(stored.note, trust)
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
    client: Any, *, state: SiteState, trust: TrustPolicy, site_id: str,
) -> VerifiedLedger:
    """Rules 1-4 of the module docstring, without judging the site's record (the caller does)
    and without storing anything."""
    old = verified_checkpoint_from_state(state, trust)
    # 1. signature
    served = client.get_checkpoint()
    try:
        cp = _verify_checkpoint(served.signed_note, trust)
    except VerificationError as exc:
        raise _wrap(exc, "the coordinator's checkpoint is not signed by the pinned log key") from exc
    # 2. witnesses
    cosigned: dict[str, int] = {}
    if trust.witnesses_required > 0:
        size, note = client.get_cosignatures(cp.size)
        try:
            cosigned = _verify_cosignatures(note, trust, expect=cp)
        except VerificationError as exc:
            raise _wrap(
                exc, f"trust.json requires {trust.witnesses_required} witness cosignature(s) on "
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
        _check_entries_match(entries, cp)
        record = site_record_from_entries(entries, trust, site_id=site_id,
                                          fetch_blob=client.get_blob)
    except VerificationError as exc:
        raise _wrap(exc, "the ledger does not verify") from exc
    return VerifiedLedger(
        checkpoint=cp, note=served.signed_note, site_record=record,
        entries_checked=len(entries), previous_size=old.size if old is not None else None,
        cosigned_by=cosigned,
    )


def _rotation_hint(state: SiteState, record: SiteEnrolment) -> str:
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
    client: Any, *, state: SiteState, trust: TrustPolicy, site_id: str, key_id: str,
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
    client: Any, receipt: Receipt, *, envelope: bytes, state: SiteState, trust: TrustPolicy,
) -> VerifiedReceipt:
    """Check a receipt: its leaf is our envelope, its checkpoint is signed by the pinned log key,
    the inclusion proof leads to that checkpoint's root, and that checkpoint is consistent with
    the last one this site verified. Moves the stored checkpoint forward (never back)."""
    from protocols.checkpoint import check_checkpoint_advance
    from protocols.ledger import verify_receipt as verify_receipt_proof

    try:
        cp = verify_receipt_proof(receipt, envelope, policy=trust)
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
