from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetCheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("signed_note", "size", "root_hash")
    SIGNED_NOTE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ROOT_HASH_FIELD_NUMBER: _ClassVar[int]
    signed_note: bytes
    size: int
    root_hash: bytes
    def __init__(self, signed_note: _Optional[bytes] = ..., size: _Optional[int] = ..., root_hash: _Optional[bytes] = ...) -> None: ...

class ConsistencyProofRequest(_message.Message):
    __slots__ = ("old_size", "new_size")
    OLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NEW_SIZE_FIELD_NUMBER: _ClassVar[int]
    old_size: int
    new_size: int
    def __init__(self, old_size: _Optional[int] = ..., new_size: _Optional[int] = ...) -> None: ...

class ConsistencyProofResponse(_message.Message):
    __slots__ = ("old_size", "new_size", "hashes")
    OLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NEW_SIZE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    old_size: int
    new_size: int
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, old_size: _Optional[int] = ..., new_size: _Optional[int] = ..., hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class InclusionProofRequest(_message.Message):
    __slots__ = ("leaf_index", "leaf_hash", "tree_size")
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEAF_HASH_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    leaf_index: int
    leaf_hash: bytes
    tree_size: int
    def __init__(self, leaf_index: _Optional[int] = ..., leaf_hash: _Optional[bytes] = ..., tree_size: _Optional[int] = ...) -> None: ...

class InclusionProofResponse(_message.Message):
    __slots__ = ("leaf_index", "tree_size", "hashes")
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    leaf_index: int
    tree_size: int
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, leaf_index: _Optional[int] = ..., tree_size: _Optional[int] = ..., hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class GetEntriesRequest(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class BlobRef(_message.Message):
    __slots__ = ("role", "sha256", "size")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    role: str
    sha256: str
    size: int
    def __init__(self, role: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("index", "envelope", "kind", "blobs")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    index: int
    envelope: bytes
    kind: str
    blobs: _containers.RepeatedCompositeFieldContainer[BlobRef]
    def __init__(self, index: _Optional[int] = ..., envelope: _Optional[bytes] = ..., kind: _Optional[str] = ..., blobs: _Optional[_Iterable[_Union[BlobRef, _Mapping]]] = ...) -> None: ...

class GetEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_start", "tree_size")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_START_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    next_start: int
    tree_size: int
    def __init__(self, entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., next_start: _Optional[int] = ..., tree_size: _Optional[int] = ...) -> None: ...

class GetBlobRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("total_size", "offset", "data")
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    total_size: int
    offset: int
    data: bytes
    def __init__(self, total_size: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetReferenceRequest(_message.Message):
    __slots__ = ("tree_size",)
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    tree_size: int
    def __init__(self, tree_size: _Optional[int] = ...) -> None: ...

class ReferenceHeader(_message.Message):
    __slots__ = ("tree_size", "digest", "manifest_size", "safetensors_size", "manifest_sha256", "safetensors_sha256")
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_SIZE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_SHA256_FIELD_NUMBER: _ClassVar[int]
    tree_size: int
    digest: str
    manifest_size: int
    safetensors_size: int
    manifest_sha256: str
    safetensors_sha256: str
    def __init__(self, tree_size: _Optional[int] = ..., digest: _Optional[str] = ..., manifest_size: _Optional[int] = ..., safetensors_size: _Optional[int] = ..., manifest_sha256: _Optional[str] = ..., safetensors_sha256: _Optional[str] = ...) -> None: ...

class ReferenceChunk(_message.Message):
    __slots__ = ("part", "header", "offset", "data")
    class Part(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PART_UNSPECIFIED: _ClassVar[ReferenceChunk.Part]
        PART_HEADER: _ClassVar[ReferenceChunk.Part]
        PART_MANIFEST: _ClassVar[ReferenceChunk.Part]
        PART_SAFETENSORS: _ClassVar[ReferenceChunk.Part]
    PART_UNSPECIFIED: ReferenceChunk.Part
    PART_HEADER: ReferenceChunk.Part
    PART_MANIFEST: ReferenceChunk.Part
    PART_SAFETENSORS: ReferenceChunk.Part
    PART_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    part: ReferenceChunk.Part
    header: ReferenceHeader
    offset: int
    data: bytes
    def __init__(self, part: _Optional[_Union[ReferenceChunk.Part, str]] = ..., header: _Optional[_Union[ReferenceHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("envelope", "diff")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    diff: bytes
    def __init__(self, envelope: _Optional[bytes] = ..., diff: _Optional[bytes] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("leaf_index", "leaf_hash", "tree_size", "signed_note", "inclusion_proof", "duplicate")
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEAF_HASH_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SIGNED_NOTE_FIELD_NUMBER: _ClassVar[int]
    INCLUSION_PROOF_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    leaf_index: int
    leaf_hash: bytes
    tree_size: int
    signed_note: bytes
    inclusion_proof: _containers.RepeatedScalarFieldContainer[bytes]
    duplicate: bool
    def __init__(self, leaf_index: _Optional[int] = ..., leaf_hash: _Optional[bytes] = ..., tree_size: _Optional[int] = ..., signed_note: _Optional[bytes] = ..., inclusion_proof: _Optional[_Iterable[bytes]] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("reason_code", "message", "retry_after_s")
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    reason_code: str
    message: str
    retry_after_s: float
    def __init__(self, reason_code: _Optional[str] = ..., message: _Optional[str] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("receipt", "rejection")
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    REJECTION_FIELD_NUMBER: _ClassVar[int]
    receipt: Receipt
    rejection: Rejection
    def __init__(self, receipt: _Optional[_Union[Receipt, _Mapping]] = ..., rejection: _Optional[_Union[Rejection, _Mapping]] = ...) -> None: ...

class GetSiteInfoRequest(_message.Message):
    __slots__ = ("site_id",)
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    def __init__(self, site_id: _Optional[str] = ...) -> None: ...

class SiteInfoResponse(_message.Message):
    __slots__ = ("site_id", "enrolled", "revoked", "key_ids", "last_sequence", "contributions")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    enrolled: bool
    revoked: bool
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    last_sequence: int
    contributions: int
    def __init__(self, site_id: _Optional[str] = ..., enrolled: _Optional[bool] = ..., revoked: _Optional[bool] = ..., key_ids: _Optional[_Iterable[str]] = ..., last_sequence: _Optional[int] = ..., contributions: _Optional[int] = ...) -> None: ...

class GetCosignaturesRequest(_message.Message):
    __slots__ = ("tree_size",)
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    tree_size: int
    def __init__(self, tree_size: _Optional[int] = ...) -> None: ...

class CosignaturesResponse(_message.Message):
    __slots__ = ("tree_size", "signed_note")
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SIGNED_NOTE_FIELD_NUMBER: _ClassVar[int]
    tree_size: int
    signed_note: bytes
    def __init__(self, tree_size: _Optional[int] = ..., signed_note: _Optional[bytes] = ...) -> None: ...

class AddCosignatureRequest(_message.Message):
    __slots__ = ("cosigned_note",)
    COSIGNED_NOTE_FIELD_NUMBER: _ClassVar[int]
    cosigned_note: bytes
    def __init__(self, cosigned_note: _Optional[bytes] = ...) -> None: ...

class AddCosignatureResponse(_message.Message):
    __slots__ = ("accepted", "added", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    added: int
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., added: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "tree_size", "origin", "version")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    status: str
    tree_size: int
    origin: str
    version: str
    def __init__(self, status: _Optional[str] = ..., tree_size: _Optional[int] = ..., origin: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...
