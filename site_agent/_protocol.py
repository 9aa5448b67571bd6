"""The site agent's seam to the protocols core: every call into trust policy, update
payloads, envelopes and ledger replay, and into checkpoints, goes through here. Nothing here
re-implements a rule of ``protocols``; it adapts their values to what the agent needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocols.errors import ConfigError, VerificationError
from protocols.policy import TrustPolicy, UpdateLimits

if TYPE_CHECKING:
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from protocols.checkpoint import Checkpoint
    from protocols.labels import LabelLedger
    from protocols.registry_client import LedgerEntry
    from protocols.update import UpdatePayload
    from site_agent.verify import VerifiedReference

__all__ = [
    "Trust",
    "SiteEnrolment",
    "load_trust",
    "verify_checkpoint_note",
    "verify_cosignatures",
    "check_entries_match",
    "site_record_from_entries",
    "build_update_payload",
    "payload_bytes",
    "sign_update",
    "max_diff_bytes",
    "build_rotation_request",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trust:
    """The pinned trust.json (:class:`protocols.policy.TrustPolicy`) and views of it."""

    policy: TrustPolicy
    raw: bytes
    source: str

    @property
    def origin(self) -> str:
        return str(self.policy.origin)

    @property
    def log_keys(self) -> list[str]:
        return [self.policy.log_public_key]

    @property
    def log_key_names(self) -> list[str]:
        return [k.split("+", 1)[0] + "+" + k.split("+")[1] for k in self.log_keys]

    @property
    def operator_key_ids(self) -> list[str]:
        return sorted(self.policy.operator_key_ids())

    @property
    def witness_keys(self) -> list[str]:
        return list(self.policy.witness_keys)

    @property
    def witness_names(self) -> list[str]:
        return [k.split("+", 1)[0] for k in self.witness_keys]

    @property
    def witness_threshold(self) -> int:
        return int(self.policy.witnesses_required)

    @property
    def tls_source(self) -> bytes:
        """What :class:`protocols.registry_client.RegistryClient` pins for TLS."""
        pem = self.policy.tls_root_pem
        if not pem:
            raise ConfigError(
                f"{self.source} carries no TLS root certificate (tls_root_pem); ask the operator "
                "for a trust.json written by `scarches-fl coordinator init`, or use --insecure on "
                "loopback only"
            )
        return pem.encode()

    @property
    def update_limits(self) -> UpdateLimits:
        return self.policy.update_limits


def load_trust(data: bytes, *, source: str) -> Trust:
    from protocols.errors import PolicyError
    from protocols.policy import parse_trust

    try:
        policy = parse_trust(data)
    except PolicyError as exc:
        raise ConfigError(f"{source}: {exc.message}") from exc
    return Trust(policy=policy, raw=data, source=source)


# -- checkpoints ---------------------------------------------------------------------------


def verify_checkpoint_note(note: bytes, trust: Trust) -> Checkpoint:
    from protocols.checkpoint import verify_checkpoint

    return verify_checkpoint(bytes(note), origin=trust.origin, log_verifier=trust.log_keys)


def verify_cosignatures(note: bytes, trust: Trust, *, expect: Checkpoint) -> dict[str, int]:
    """Witness cosignatures on the checkpoint ``expect`` (same size and root)."""
    from protocols.checkpoint import verify_cosigned_checkpoint

    res = verify_cosigned_checkpoint(
        bytes(note), origin=trust.origin, log_verifier=trust.log_keys,
        witnesses=trust.witness_keys, threshold=trust.witness_threshold,
    )
    if res.checkpoint.size != expect.size or res.checkpoint.root_hash != expect.root_hash:
        raise VerificationError(
            f"the cosigned checkpoint (size {res.checkpoint.size}) is not the one served "
            f"(size {expect.size})", reason_code="E_CHECKPOINT_INVALID",
        )
    return dict(res.cosigned_at)


def check_entries_match(entries: Sequence[LedgerEntry], checkpoint: Checkpoint) -> None:
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


# -- ledger replay -> this site's enrolment --------------------------------------------


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
    entries: Sequence[LedgerEntry], trust: Trust, *, site_id: str,
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

    state = replay(trust.policy, [e.envelope for e in entries], lookup)
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


# -- update payload and envelope ----------------------------------------------------------


def max_diff_bytes() -> int:
    from protocols.limits import DEFAULT_LIMITS

    return int(DEFAULT_LIMITS.max_diff_bytes)


def build_update_payload(
    *, trust: Trust, site_id: str, key_id: str, sequence: int, verified: VerifiedReference,
    new_conditions: Sequence[str], diff_bytes: bytes, diff_tensors: Mapping[str, np.ndarray],
) -> UpdatePayload:
    """:class:`protocols.update.UpdatePayload` (statistics from the parsed diff bytes)."""
    from protocols.update import build_update_payload as _build

    return _build(
        origin=trust.origin, site_id=site_id, site_key_id=key_id, sequence=sequence,
        base_size=verified.tree_size, base_root=bytes(verified.checkpoint.root_hash),
        base_digest=verified.digest, new_conditions=list(new_conditions),
        diff=diff_tensors, diff_bytes=diff_bytes,
    )


def payload_bytes(payload: UpdatePayload) -> bytes:
    return bytes(payload.to_bytes())


def sign_update(payload: UpdatePayload, checked_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """Sign ``payload`` with the site key; the signed bytes must be exactly the bytes the
    privacy guard checked."""
    from protocols.dsse import parse_envelope
    from protocols.update import sign_update as _sign

    envelope = _sign(payload, key)
    if parse_envelope(envelope).payload != checked_bytes:
        raise VerificationError(
            "the envelope would carry other bytes than the privacy guard checked; nothing was "
            "sent (a bug: report it)", reason_code="E_INTERNAL",
        )
    return envelope


# -- key rotation request -----------------------------------------------------------------


def build_rotation_request(
    *, trust: Trust, site_id: str, old_key: Ed25519PrivateKey, new_key: Ed25519PrivateKey,
    note: str = "",
) -> bytes:
    """The site's rotation request (:func:`protocols.ledger.rotation_request`): a ``rotate``
    policy change for the pinned origin, signed by the old and the new key. Read back and
    checked before it is handed out: it parses as that change and both signatures verify."""
    from protocols.dsse import parse_envelope, verify_envelope
    from protocols.keys import key_id, public_key_text
    from protocols.ledger import POLICY_TYPE, entry_payload, rotation_request
    from protocols.policy import parse_policy_change

    envelope = rotation_request(origin=trust.origin, site_id=site_id, old_key=old_key,
                                new_key=new_key, note=note)
    _kind, obj = entry_payload(envelope)
    change = parse_policy_change(obj)
    env = parse_envelope(envelope)
    for key in (old_key, new_key):
        verify_envelope(env, trusted_keys=[key.public_key()], threshold=1,
                        payload_type=POLICY_TYPE)
    if (change.action, change.origin, change.site_id, change.public_key,
            change.previous_key_id) != ("rotate", trust.origin, site_id,
                                        public_key_text(new_key), key_id(old_key)):
        raise VerificationError(  # pragma: no cover - a bug in the builder
            "the rotation request does not say what was asked; nothing was written (a bug: "
            "report it)", reason_code="E_INTERNAL",
        )
    return envelope
