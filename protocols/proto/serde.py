"""Typed values of the registry protocol and their paired ``x_to_proto`` / ``x_from_proto``.

The rest of the code (coordinator, client, site agent, auditor) sees these frozen dataclasses,
never generated protobuf messages. Everything here is data as received: a checkpoint note, an
envelope or a proof is verified by the caller with ``protocols.checkpoint``, ``protocols.dsse``
and ``protocols.merkle``, never trusted because it came over TLS.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols.errors import REASON_CODES, UpdateRejectedError, VerificationError
from protocols.ledger import BlobRef, Receipt
from protocols.proto import registry_pb2 as pb

__all__ = [
    "CheckpointInfo",
    "ConsistencyProof",
    "InclusionProof",
    "BlobRef",
    "LedgerEntry",
    "EntriesPage",
    "Receipt",
    "Rejection",
    "SubmitResult",
    "SubmissionRejectedError",
    "SiteInfo",
    "HealthInfo",
    "ReferenceHeader",
    "checkpoint_to_proto",
    "checkpoint_from_proto",
    "consistency_to_proto",
    "consistency_from_proto",
    "inclusion_to_proto",
    "inclusion_from_proto",
    "entry_to_proto",
    "entry_from_proto",
    "entries_page_to_proto",
    "entries_page_from_proto",
    "receipt_to_proto",
    "receipt_from_proto",
    "rejection_to_proto",
    "rejection_from_proto",
    "submit_result_to_proto",
    "submit_result_from_proto",
    "site_info_to_proto",
    "site_info_from_proto",
    "health_to_proto",
    "health_from_proto",
    "reference_header_to_proto",
    "reference_header_from_proto",
]


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint as served: the signed note (verify it) and unverified hints."""

    signed_note: bytes
    size: int
    root_hash: bytes


@dataclass(frozen=True)
class ConsistencyProof:
    old_size: int
    new_size: int
    hashes: tuple[bytes, ...]


@dataclass(frozen=True)
class InclusionProof:
    leaf_index: int
    tree_size: int
    hashes: tuple[bytes, ...]


@dataclass(frozen=True)
class LedgerEntry:
    """One log entry: the envelope bytes exactly as logged (the Merkle leaf input)."""

    index: int
    envelope: bytes
    kind: str
    blobs: tuple[BlobRef, ...] = ()


@dataclass(frozen=True)
class EntriesPage:
    entries: tuple[LedgerEntry, ...]
    next_start: int
    tree_size: int


class SubmissionRejectedError(UpdateRejectedError):
    """The coordinator rejected a submitted update. ``reason_code`` is the coordinator's stable
    code, kept even when this client's registry does not know it (a newer coordinator);
    ``retry_after_s`` > 0 means that retrying later may succeed (rate limit)."""

    def __init__(self, reason_code: str, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(reason_code if reason_code in REASON_CODES else "E_INTERNAL", message)
        self.reason_code = reason_code
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Rejection:
    reason_code: str
    message: str
    retry_after_s: float = 0.0

    def to_error(self) -> SubmissionRejectedError:
        return SubmissionRejectedError(self.reason_code, self.message, self.retry_after_s)


@dataclass(frozen=True)
class SubmitResult:
    """Exactly one of ``receipt`` and ``rejection`` is set."""

    receipt: Receipt | None = None
    rejection: Rejection | None = None

    def __post_init__(self) -> None:
        if (self.receipt is None) == (self.rejection is None):
            raise ValueError("SubmitResult needs exactly one of receipt and rejection")

    @property
    def accepted(self) -> bool:
        return self.receipt is not None

    def raise_for_rejection(self) -> Receipt:
        """The receipt, or :class:`SubmissionRejectedError` with the reason code."""
        if self.rejection is not None:
            raise self.rejection.to_error()
        assert self.receipt is not None
        return self.receipt


@dataclass(frozen=True)
class SiteInfo:
    site_id: str
    enrolled: bool
    revoked: bool
    key_ids: tuple[str, ...] = ()
    last_sequence: int = 0
    contributions: int = 0


@dataclass(frozen=True)
class HealthInfo:
    status: str
    tree_size: int
    origin: str
    version: str


@dataclass(frozen=True)
class ReferenceHeader:
    tree_size: int
    digest: str
    manifest_size: int
    safetensors_size: int
    manifest_sha256: str
    safetensors_sha256: str


# ---------------------------------------------------------------------------------------------


def checkpoint_to_proto(x: CheckpointInfo) -> pb.CheckpointResponse:
    return pb.CheckpointResponse(signed_note=x.signed_note, size=x.size, root_hash=x.root_hash)


def checkpoint_from_proto(m: pb.CheckpointResponse) -> CheckpointInfo:
    return CheckpointInfo(
        signed_note=bytes(m.signed_note), size=m.size, root_hash=bytes(m.root_hash)
    )


def consistency_to_proto(x: ConsistencyProof) -> pb.ConsistencyProofResponse:
    return pb.ConsistencyProofResponse(
        old_size=x.old_size, new_size=x.new_size, hashes=list(x.hashes)
    )


def consistency_from_proto(m: pb.ConsistencyProofResponse) -> ConsistencyProof:
    return ConsistencyProof(
        old_size=m.old_size, new_size=m.new_size, hashes=tuple(bytes(h) for h in m.hashes)
    )


def inclusion_to_proto(x: InclusionProof) -> pb.InclusionProofResponse:
    return pb.InclusionProofResponse(
        leaf_index=x.leaf_index, tree_size=x.tree_size, hashes=list(x.hashes)
    )


def inclusion_from_proto(m: pb.InclusionProofResponse) -> InclusionProof:
    return InclusionProof(
        leaf_index=m.leaf_index, tree_size=m.tree_size, hashes=tuple(bytes(h) for h in m.hashes)
    )


def _blob_to_proto(x: BlobRef) -> pb.BlobRef:
    return pb.BlobRef(role=x.role, sha256=x.sha256, size=x.size)


def _blob_from_proto(m: pb.BlobRef) -> BlobRef:
    return BlobRef(role=m.role, sha256=m.sha256, size=m.size)


def entry_to_proto(x: LedgerEntry) -> pb.Entry:
    return pb.Entry(
        index=x.index, envelope=x.envelope, kind=x.kind, blobs=[_blob_to_proto(b) for b in x.blobs]
    )


def entry_from_proto(m: pb.Entry) -> LedgerEntry:
    return LedgerEntry(
        index=m.index,
        envelope=bytes(m.envelope),
        kind=m.kind,
        blobs=tuple(_blob_from_proto(b) for b in m.blobs),
    )


def entries_page_to_proto(x: EntriesPage) -> pb.GetEntriesResponse:
    return pb.GetEntriesResponse(
        entries=[entry_to_proto(e) for e in x.entries],
        next_start=x.next_start,
        tree_size=x.tree_size,
    )


def entries_page_from_proto(m: pb.GetEntriesResponse) -> EntriesPage:
    return EntriesPage(
        entries=tuple(entry_from_proto(e) for e in m.entries),
        next_start=m.next_start,
        tree_size=m.tree_size,
    )


def receipt_to_proto(x: Receipt) -> pb.Receipt:
    from protocols.checkpoint import parse_checkpoint_body, parse_note

    return pb.Receipt(
        leaf_index=x.leaf_index,
        leaf_hash=x.leaf_hash,
        tree_size=parse_checkpoint_body(parse_note(x.signed_note).text).size,
        signed_note=x.signed_note,
        inclusion_proof=list(x.inclusion_proof),
        duplicate=x.duplicate,
    )


def receipt_from_proto(m: pb.Receipt) -> Receipt:
    """The receipt; the message's ``tree_size`` is not kept: the signed note says the size, and
    :func:`protocols.ledger.verify_receipt` reads it from there."""
    return Receipt(
        leaf_index=m.leaf_index,
        leaf_hash=bytes(m.leaf_hash),
        signed_note=bytes(m.signed_note),
        inclusion_proof=tuple(bytes(h) for h in m.inclusion_proof),
        duplicate=m.duplicate,
    )


def rejection_to_proto(x: Rejection) -> pb.Rejection:
    return pb.Rejection(reason_code=x.reason_code, message=x.message, retry_after_s=x.retry_after_s)


def rejection_from_proto(m: pb.Rejection) -> Rejection:
    return Rejection(reason_code=m.reason_code, message=m.message, retry_after_s=m.retry_after_s)


def submit_result_to_proto(x: SubmitResult) -> pb.SubmitUpdateResponse:
    if x.receipt is not None:
        return pb.SubmitUpdateResponse(receipt=receipt_to_proto(x.receipt))
    assert x.rejection is not None
    return pb.SubmitUpdateResponse(rejection=rejection_to_proto(x.rejection))


def submit_result_from_proto(m: pb.SubmitUpdateResponse) -> SubmitResult:
    which = m.WhichOneof("outcome")
    if which == "receipt":
        return SubmitResult(receipt=receipt_from_proto(m.receipt))
    if which == "rejection":
        return SubmitResult(rejection=rejection_from_proto(m.rejection))
    raise VerificationError(
        "the registry answered a submission with neither a receipt nor a rejection; "
        "the coordinator is misbehaving or speaks another protocol version",
        reason_code="E_RECEIPT_INVALID",
    )


def site_info_to_proto(x: SiteInfo) -> pb.SiteInfoResponse:
    return pb.SiteInfoResponse(
        site_id=x.site_id,
        enrolled=x.enrolled,
        revoked=x.revoked,
        key_ids=list(x.key_ids),
        last_sequence=x.last_sequence,
        contributions=x.contributions,
    )


def site_info_from_proto(m: pb.SiteInfoResponse) -> SiteInfo:
    return SiteInfo(
        site_id=m.site_id,
        enrolled=m.enrolled,
        revoked=m.revoked,
        key_ids=tuple(m.key_ids),
        last_sequence=m.last_sequence,
        contributions=m.contributions,
    )


def health_to_proto(x: HealthInfo) -> pb.HealthResponse:
    return pb.HealthResponse(
        status=x.status, tree_size=x.tree_size, origin=x.origin, version=x.version
    )


def health_from_proto(m: pb.HealthResponse) -> HealthInfo:
    return HealthInfo(status=m.status, tree_size=m.tree_size, origin=m.origin, version=m.version)


def reference_header_to_proto(x: ReferenceHeader) -> pb.ReferenceHeader:
    return pb.ReferenceHeader(
        tree_size=x.tree_size,
        digest=x.digest,
        manifest_size=x.manifest_size,
        safetensors_size=x.safetensors_size,
        manifest_sha256=x.manifest_sha256,
        safetensors_sha256=x.safetensors_sha256,
    )


def reference_header_from_proto(m: pb.ReferenceHeader) -> ReferenceHeader:
    return ReferenceHeader(
        tree_size=m.tree_size,
        digest=m.digest,
        manifest_size=m.manifest_size,
        safetensors_size=m.safetensors_size,
        manifest_sha256=m.manifest_sha256,
        safetensors_sha256=m.safetensors_sha256,
    )
