"""Client of the coordinator's registry gRPC service (``protocols/proto/registry.proto``).

A thin transport: it fetches bytes and returns the typed values of :mod:`protocols.proto.serde`.
It checks what transport can check (blob and reference bytes against the sha256 they were
announced with, every size against :class:`ClientLimits`) and nothing else: checkpoints,
envelopes and proofs are verified by the caller with ``protocols.checkpoint``,
``protocols.dsse`` and ``protocols.merkle`` against the keys pinned in ``trust.json``.

Errors: gRPC failures become :class:`RegistryError` subclasses (all ``TransportError``; retrying
may help for :class:`RegistryUnavailableError` and :class:`RegistryTimeoutError`); bytes that do
not match their announced hash raise :class:`BlobIntegrityError` (a ``VerificationError``). A
rejected update is not an exception: :meth:`RegistryClient.submit_update` returns a
:class:`SubmitResult` with the stable reason code (``raise_for_rejection()`` turns it into one).

Usage::

    with RegistryClient("127.0.0.1:7443", trust="state/trust.json") as client:
        cp = client.get_checkpoint()
        result = client.submit_update(envelope_bytes, diff_bytes)
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from protocols.errors import ConfigError, TransportError, VerificationError
from protocols.proto.serde import (
    BlobRef,
    CheckpointInfo,
    ConsistencyProof,
    EntriesPage,
    HealthInfo,
    InclusionProof,
    LedgerEntry,
    Receipt,
    ReferenceHeader,
    Rejection,
    SiteInfo,
    SubmissionRejectedError,
    SubmitResult,
)

__all__ = [
    "RegistryClient",
    "ClientLimits",
    "ReferenceDownload",
    "RegistryError",
    "RegistryUnavailableError",
    "RegistryTimeoutError",
    "RegistryNotFoundError",
    "RegistryRequestError",
    "MessageTooLargeError",
    "BlobIntegrityError",
    "load_tls_root",
    "is_loopback_address",
    # re-exported wire types
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
]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


# --- errors ----------------------------------------------------------------------------------


class RegistryError(TransportError):
    """A registry call failed in transport. ``status`` is the gRPC status code name."""

    def __init__(self, message: str, *, status: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.status = status


class RegistryUnavailableError(RegistryError):
    """The coordinator could not be reached (down, wrong address, TLS handshake failed)."""


class RegistryTimeoutError(RegistryError):
    """The call ran past its deadline."""


class RegistryNotFoundError(RegistryError):
    """The registry has no such blob, entry or tree size."""


class RegistryRequestError(RegistryError):
    """The registry refused the request as malformed or out of range."""


class MessageTooLargeError(RegistryError):
    """A message or stream exceeded a size limit (ours or the server's)."""


class BlobIntegrityError(VerificationError):
    """Bytes received do not match the sha256 they were announced with."""

    default_reason_code = "E_BLOB_MISMATCH"


# --- limits ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientLimits:
    """Every size the client accepts from the network, in one place."""

    max_message_bytes: int = 32 * 1024 * 1024  # one gRPC message (receive and send)
    max_blob_bytes: int = 2 * 1024**3  # one blob, reassembled
    max_reference_bytes: int = 2 * 1024**3  # manifest + safetensors of one reference version
    max_manifest_bytes: int = 64 * 1024 * 1024


# --- TLS trust -------------------------------------------------------------------------------

_PEM_MARKER = b"-----BEGIN CERTIFICATE-----"


def _tls_root_from_mapping(doc: Any) -> bytes | None:
    if not isinstance(doc, dict):
        return None
    for key in ("tls_root_pem", "tls_root", "tls_certificate_pem", "tls_certificate"):
        val = doc.get(key)
        if isinstance(val, str) and _PEM_MARKER.decode() in val:
            return val.encode()
    tls = doc.get("tls")
    if isinstance(tls, dict):
        return _tls_root_from_mapping(tls) or _tls_root_from_mapping(
            {"tls_root_pem": tls.get("root_pem") or tls.get("certificate_pem")}
        )
    return None


def load_tls_root(trust: Any) -> bytes:
    """The PEM root certificate to pin, from: PEM bytes or text; a path to a PEM file or to a
    ``trust.json``; a parsed trust mapping; or an object with a ``tls_root_pem`` attribute.

    A trust.json embeds the certificate, so JSON is recognised first (by its leading ``{``) and
    only the certificate inside it is returned, never the whole document."""
    if isinstance(trust, (bytes, str)) and not _looks_like_path(trust):
        data = trust if isinstance(trust, bytes) else trust.encode()
        return _tls_root_from_bytes(data, "the trust material passed in")
    if isinstance(trust, (str, os.PathLike)):
        path = Path(trust)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the TLS trust file {path}: {exc.strerror}; pass the trust.json the "
                "operator handed out (or the coordinator's PEM certificate)"
            ) from exc
        return _tls_root_from_bytes(data, str(path))
    if isinstance(trust, dict):
        pem = _tls_root_from_mapping(trust)
        if pem is not None:
            return pem
    attr = getattr(trust, "tls_root_pem", None)
    if isinstance(attr, (bytes, str)) and attr:
        return attr if isinstance(attr, bytes) else attr.encode()
    raise ConfigError(
        "no TLS root certificate to pin: pass trust= (trust.json path, PEM bytes) or, for "
        "loopback development only, insecure=True"
    )


def _looks_like_path(value: bytes | str) -> bool:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    stripped = text.lstrip()
    return not (stripped.startswith("{") or _PEM_MARKER.decode() in text)


def _tls_root_from_bytes(data: bytes, where: str) -> bytes:
    if data.lstrip().startswith(b"{"):
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise ConfigError(
                f"{where} is not valid JSON; pass the trust.json the operator handed out"
            ) from exc
        pem = _tls_root_from_mapping(doc)
        if pem is None:
            raise ConfigError(
                f"{where} has no TLS root certificate (field 'tls_root_pem'); ask the operator for "
                "the trust.json written by `scarches-fl coordinator init`"
            )
        return pem
    if _PEM_MARKER in data:
        return data
    raise ConfigError(
        f"{where} is neither a PEM certificate nor a JSON trust file; pass the trust.json "
        "the operator handed out"
    )


def _split_host(address: str) -> str:
    host = address
    if host.startswith("["):
        return host[1 : host.index("]")]
    if host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host


def is_loopback_address(address: str) -> bool:
    """True when ``HOST:PORT`` names this machine only (localhost, 127.0.0.0/8, ::1)."""
    host = _split_host(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- client ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceDownload:
    """A reference version as received; its bytes matched the sha256 in its header. Build the
    bundle with ``protocols.bundle.bundle_from_bytes`` (which verifies the content digest) and
    compare ``header.digest`` with the ledger replay."""

    header: ReferenceHeader
    manifest_bytes: bytes
    safetensors_bytes: bytes


_GRPC_ERRORS: dict[str, type[RegistryError]] = {
    "UNAVAILABLE": RegistryUnavailableError,
    "DEADLINE_EXCEEDED": RegistryTimeoutError,
    "NOT_FOUND": RegistryNotFoundError,
    "INVALID_ARGUMENT": RegistryRequestError,
    "OUT_OF_RANGE": RegistryRequestError,
    "FAILED_PRECONDITION": RegistryRequestError,
    "RESOURCE_EXHAUSTED": MessageTooLargeError,
}
_RETRYABLE = ("UNAVAILABLE",)  # (and RESOURCE_EXHAUSTED when it is not a size limit)


class RegistryClient:
    """Client of the registry service.

    ``address`` is ``HOST:PORT``. TLS is the default and needs ``trust`` (see
    :func:`load_tls_root`); ``insecure=True`` is for loopback development only and refuses any
    other address. ``timeout`` is the deadline of unary calls in seconds, ``stream_timeout`` of
    blob and reference downloads. ``retries`` re-sends a call that failed with UNAVAILABLE
    (every call here is idempotent, submissions included).
    """

    def __init__(
        self,
        address: str,
        *,
        trust: Any = None,
        insecure: bool = False,
        timeout: float = 30.0,
        stream_timeout: float = 600.0,
        retries: int = 2,
        limits: ClientLimits | None = None,
        server_name: str | None = None,
    ) -> None:
        import grpc

        from protocols.proto import registry_pb2_grpc

        self.address = address
        self.timeout = float(timeout)
        self.stream_timeout = float(stream_timeout)
        self.retries = max(0, int(retries))
        self.limits = limits or ClientLimits()
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.limits.max_message_bytes),
            ("grpc.max_send_message_length", self.limits.max_message_bytes),
            ("grpc.enable_retries", 0),
        ]
        if insecure:
            if not is_loopback_address(address):
                raise ConfigError(
                    f"refusing an insecure (plain-text) connection to {address}: insecure=True is "
                    "for loopback development only; connect with TLS (trust=trust.json)"
                )
            logger.warning(
                "INSECURE: talking to the registry at %s without TLS (loopback development only)",
                address,
            )
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            root = load_tls_root(trust)
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            self._channel = grpc.secure_channel(address, creds, options=options)
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)

    # -- lifecycle --

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --

    def _map_error(self, exc: Any, what: str) -> RegistryError:
        code = exc.code() if hasattr(exc, "code") else None
        name = code.name if code is not None else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        cls = _GRPC_ERRORS.get(name, RegistryError)
        if name == "RESOURCE_EXHAUSTED" and "larger than max" not in (details or ""):
            # Not a size limit: the server is at its concurrency limit. Retrying helps.
            cls = RegistryUnavailableError
        hint = {
            "UNAVAILABLE": "check the address, that the coordinator is running, and that the "
            "TLS certificate in trust.json is the coordinator's",
            "DEADLINE_EXCEEDED": "the coordinator is slow or unreachable; retry later or raise "
            "the timeout",
            "RESOURCE_EXHAUSTED": "a message exceeded a size limit; check the limits of the "
            "client (ClientLimits) and of the coordinator (limits in its config)",
        }.get(name, "")
        msg = f"registry {what} at {self.address} failed ({name}): {details}"
        if hint:
            msg += f"; {hint}"
        return cls(msg, status=name)

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        import grpc

        attempt = 0
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                err = self._map_error(exc, what)
                retryable = err.status in _RETRYABLE or isinstance(err, RegistryUnavailableError)
                if retryable and attempt < self.retries:
                    attempt += 1
                    time.sleep(min(2.0, 0.2 * 2**attempt))
                    continue
                raise err from exc

    # -- calls --

    def health(self) -> HealthInfo:
        from protocols.proto import registry_pb2 as pb
        from protocols.proto.serde import health_from_proto

        resp = self._call(
            "health", lambda: self._stub.Health(pb.HealthRequest(), timeout=self.timeout)
        )
        return health_from_proto(resp)

    def get_checkpoint(self) -> CheckpointInfo:
        from protocols.proto import registry_pb2 as pb
        from protocols.proto.serde import checkpoint_from_proto

        resp = self._call(
            "get_checkpoint",
            lambda: self._stub.GetCheckpoint(pb.GetCheckpointRequest(), timeout=self.timeout),
        )
        return checkpoint_from_proto(resp)

    def get_consistency_proof(self, old_size: int, new_size: int = 0) -> ConsistencyProof:
        from protocols.proto import registry_pb2 as pb
        from protocols.proto.serde import consistency_from_proto

        req = pb.ConsistencyProofRequest(old_size=old_size, new_size=new_size)
        resp = self._call(
            "get_consistency_proof",
            lambda: self._stub.GetConsistencyProof(req, timeout=self.timeout),
        )
        return consistency_from_proto(resp)

    def get_inclusion_proof(
        self, *, leaf_index: int | None = None, leaf_hash: bytes | None = None, tree_size: int = 0
    ) -> InclusionProof:
        """Inclusion proof of one leaf, named by index or by leaf hash (exactly one)."""
        from protocols.proto import registry_pb2 as pb
        from protocols.proto.serde import inclusion_from_proto

        if (leaf_index is None) == (leaf_hash is None):
            raise ValueError("give exactly one of leaf_index and leaf_hash")
        if leaf_index is not None:
            req = pb.InclusionProofRequest(leaf_index=leaf_index, tree_size=tree_size)
        else:
            req = pb.InclusionProofRequest(leaf_hash=leaf_hash, tree_size=tree_size)
        resp = self._call(
            "get_inclusion_proof", lambda: self._stub.GetInclusionProof(req, timeout=self.timeout)
        )
        return inclusion_from_proto(resp)

    def get_entries_page(self, start: int, end: int = 0) -> EntriesPage:
        """One page of entries from ``start`` (the server decides the page size)."""
        from protocols.proto import registry_pb2 as pb
        from protocols.proto.serde import entries_page_from_proto

        req = pb.GetEntriesRequest(start=start, end=end)
        resp = self._call("get_entries", lambda: self._stub.GetEntries(req, timeout=self.timeout))
        return entries_page_from_proto(resp)

    def iter_entries(self, start: int = 0, end: int = 0) -> Iterator[LedgerEntry]:
        """Entries [start, end) (``end=0``: the tree size when the first page was read), paging."""
        page = self.get_entries_page(start, end)
        stop = end or page.tree_size
        expected = start
        while True:
            for entry in page.entries:
                if entry.index != expected:
                    raise VerificationError(
                        f"the registry returned entry {entry.index} where {expected} was due; "
                        "the coordinator is misbehaving",
                        reason_code="E_LEDGER_ORDER",
                    )
                expected += 1
                yield entry
            if expected >= stop:
                return
            if not page.entries:
                raise RegistryRequestError(
                    f"the registry returned an empty page at {expected} before {stop}",
                    status="OUT_OF_RANGE",
                )
            page = self.get_entries_page(expected, stop)

    def get_entries(self, start: int = 0, end: int = 0) -> list[LedgerEntry]:
        return list(self.iter_entries(start, end))

    def get_blob(self, sha256: str) -> bytes:
        """The blob named ``"sha256:<hex>"``, checked against its name."""
        from protocols.proto import registry_pb2 as pb

        if not sha256.startswith("sha256:"):
            raise ValueError("blob names look like 'sha256:<hex>'")

        def fetch() -> bytes:
            buf = bytearray()
            total = None
            for chunk in self._stub.GetBlob(
                pb.GetBlobRequest(sha256=sha256), timeout=self.stream_timeout
            ):
                if total is None:
                    total = chunk.total_size
                    if total > self.limits.max_blob_bytes:
                        raise MessageTooLargeError(
                            f"blob {sha256} is {total} bytes, over the client limit "
                            f"{self.limits.max_blob_bytes} (ClientLimits.max_blob_bytes)",
                            status="RESOURCE_EXHAUSTED",
                        )
                if chunk.offset != len(buf):
                    raise BlobIntegrityError(f"blob {sha256} arrived out of order")
                buf += chunk.data
                if len(buf) > (total or 0):
                    raise BlobIntegrityError(f"blob {sha256} is longer than announced")
            return bytes(buf)

        data = self._call("get_blob", fetch)
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise BlobIntegrityError(
                f"blob {sha256} arrived with hash {got}; the coordinator served wrong bytes"
            )
        return data

    def get_reference(self, tree_size: int = 0) -> ReferenceDownload:
        """Reference version ``tree_size`` (0: the latest): header, manifest and safetensors
        bytes, each checked against the sha256 in the header."""
        from protocols.proto import registry_pb2 as pb
        from protocols.proto.serde import reference_header_from_proto

        def fetch() -> ReferenceDownload:
            header = None
            parts = {
                pb.ReferenceChunk.PART_MANIFEST: bytearray(),
                pb.ReferenceChunk.PART_SAFETENSORS: bytearray(),
            }
            stream = self._stub.GetReference(
                pb.GetReferenceRequest(tree_size=tree_size), timeout=self.stream_timeout
            )
            for chunk in stream:
                if chunk.part == pb.ReferenceChunk.PART_HEADER:
                    if header is not None:
                        raise BlobIntegrityError("the reference stream has two headers")
                    header = reference_header_from_proto(chunk.header)
                    if header.manifest_size > self.limits.max_manifest_bytes or (
                        header.manifest_size + header.safetensors_size
                        > self.limits.max_reference_bytes
                    ):
                        raise MessageTooLargeError(
                            f"reference version {header.tree_size} is "
                            f"{header.manifest_size + header.safetensors_size} bytes, over the "
                            "client limits (ClientLimits.max_reference_bytes)",
                            status="RESOURCE_EXHAUSTED",
                        )
                    continue
                if header is None or chunk.part not in parts:
                    raise BlobIntegrityError(
                        "the reference stream is malformed (data before header)"
                    )
                buf = parts[chunk.part]
                if chunk.offset != len(buf):
                    raise BlobIntegrityError("the reference stream arrived out of order")
                buf += chunk.data
                limit = (
                    header.manifest_size
                    if chunk.part == pb.ReferenceChunk.PART_MANIFEST
                    else header.safetensors_size
                )
                if len(buf) > limit:
                    raise BlobIntegrityError("the reference stream is longer than its header says")
            if header is None:
                raise BlobIntegrityError("the reference stream had no header")
            return ReferenceDownload(
                header=header,
                manifest_bytes=bytes(parts[pb.ReferenceChunk.PART_MANIFEST]),
                safetensors_bytes=bytes(parts[pb.ReferenceChunk.PART_SAFETENSORS]),
            )

        ref = self._call("get_reference", fetch)
        for label, data, want in (
            ("manifest", ref.manifest_bytes, ref.header.manifest_sha256),
            ("safetensors", ref.safetensors_bytes, ref.header.safetensors_sha256),
        ):
            got = "sha256:" + hashlib.sha256(data).hexdigest()
            if got != want:
                raise BlobIntegrityError(
                    f"reference {label} bytes hash to {got}, the header announced {want}"
                )
        return ref

    def submit_update(self, envelope: bytes, diff: bytes) -> SubmitResult:
        """Submit a signed update. A rejection is returned, not raised (``result.rejection``
        has the stable reason code). Resubmitting the same envelope is safe: the coordinator
        answers with the original receipt (``receipt.duplicate``)."""
        from protocols.proto import registry_pb2 as pb
        from protocols.proto.serde import submit_result_from_proto

        req = pb.SubmitUpdateRequest(envelope=envelope, diff=diff)
        resp = self._call(
            "submit_update", lambda: self._stub.SubmitUpdate(req, timeout=self.timeout)
        )
        return submit_result_from_proto(resp)

    def get_site_info(self, site_id: str) -> SiteInfo:
        from protocols.proto import registry_pb2 as pb
        from protocols.proto.serde import site_info_from_proto

        resp = self._call(
            "get_site_info",
            lambda: self._stub.GetSiteInfo(
                pb.GetSiteInfoRequest(site_id=site_id), timeout=self.timeout
            ),
        )
        return site_info_from_proto(resp)

    def get_cosignatures(self, tree_size: int = 0) -> tuple[int, bytes]:
        """(tree size, the checkpoint note of that size with every stored cosignature)."""
        from protocols.proto import registry_pb2 as pb

        resp = self._call(
            "get_cosignatures",
            lambda: self._stub.GetCosignatures(
                pb.GetCosignaturesRequest(tree_size=tree_size), timeout=self.timeout
            ),
        )
        return resp.tree_size, bytes(resp.signed_note)

    def add_cosignature(self, cosigned_note: bytes) -> int:
        """Hand a witness-cosigned checkpoint note to the coordinator; returns how many new
        signature lines it stored. Raises :class:`RegistryRequestError` when refused."""
        from protocols.proto import registry_pb2 as pb

        resp = self._call(
            "add_cosignature",
            lambda: self._stub.AddCosignature(
                pb.AddCosignatureRequest(cosigned_note=cosigned_note), timeout=self.timeout
            ),
        )
        if not resp.accepted:
            raise RegistryRequestError(
                f"the coordinator refused the cosignature: {resp.message}", status="REFUSED"
            )
        return int(resp.added)
