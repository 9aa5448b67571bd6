"""The registry gRPC server: a thin shell that maps ``registry.proto`` onto :class:`Registry`.

Request errors become gRPC statuses (``NOT_FOUND``, ``OUT_OF_RANGE``, ``INVALID_ARGUMENT``); an
update rejection is a normal response carrying its reason code. TLS is the default; plain text
is allowed only on a loopback address and logs a warning on start.

Every field of every request is range-checked here, before a handler sees it
(:func:`check_request_fields`): integers (sizes, indexes) at most :data:`MAX_REQUEST_INT`
(SQLite's INTEGER is signed 64-bit; no log is that long) else ``OUT_OF_RANGE``, strings (site
ids, blob names) at most :data:`MAX_REQUEST_STRING` characters else ``INVALID_ARGUMENT``. The
handlers then check values against the log (a size beyond the tree is ``OUT_OF_RANGE``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import TYPE_CHECKING, Any

from coordinator.config import CoordinatorConfig, parse_listen
from protocols.errors import ConfigError
from protocols.registry_client import is_loopback_address

if TYPE_CHECKING:  # pragma: no cover
    import grpc

    from coordinator.service import Registry

__all__ = ["RegistryServer", "RequestError", "NotFoundError", "check_listen_address"]

logger = logging.getLogger(__name__)

#: How long before the client's deadline SubmitUpdate stops waiting for the ledger writer.
_DEADLINE_MARGIN_S = 0.5


#: The largest integer a request field may carry (SQLite INTEGER: signed 64-bit).
MAX_REQUEST_INT = 2**63 - 1
#: The longest string a request field may carry (site ids and blob names are far shorter).
MAX_REQUEST_STRING = 256


class RequestError(ValueError):
    """A malformed request (answered INVALID_ARGUMENT)."""


class NotFoundError(LookupError):
    """No such blob, entry or size (answered NOT_FOUND)."""


def check_listen_address(listen: str, *, insecure: bool) -> tuple[str, int]:
    host, port = parse_listen(listen, where="--listen")
    if insecure and not is_loopback_address(listen):
        raise ConfigError(
            f"--listen {listen}: refusing to serve without TLS on a non-loopback address; "
            "drop --insecure (TLS is configured by `coordinator init`) or listen on 127.0.0.1"
        )
    return host, port


def check_request_fields(request: Any) -> None:
    """Range-check every set field of a request message (module docstring); raises
    :class:`~protocols.merkle.TreeRangeError` (OUT_OF_RANGE) or :class:`RequestError`."""
    from google.protobuf.descriptor import FieldDescriptor as F

    from protocols.merkle import TreeRangeError

    for fd, value in request.ListFields():
        if fd.type in (F.TYPE_UINT64, F.TYPE_INT64, F.TYPE_UINT32, F.TYPE_INT32):
            if not 0 <= value <= MAX_REQUEST_INT:
                raise TreeRangeError(
                    f"{fd.name} = {value} is out of range: sizes and indexes are at most "
                    f"2**63 - 1 ({MAX_REQUEST_INT}) and no larger than the log"
                )
        elif fd.type == F.TYPE_STRING and len(value) > MAX_REQUEST_STRING:
            raise RequestError(
                f"{fd.name} is {len(value)} characters, over {MAX_REQUEST_STRING}; site ids and "
                "blob names ('sha256:<64 hex>') are much shorter"
            )


def _servicer_class() -> type:
    import grpc

    from protocols.merkle import TreeRangeError
    from protocols.proto import registry_pb2 as pb
    from protocols.proto import registry_pb2_grpc as pbg
    from protocols.proto import serde

    def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, NotFoundError):
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        if isinstance(exc, TreeRangeError):
            context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
        if isinstance(exc, RequestError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        raise exc

    def _checked(handler: Any) -> Any:
        """Every handler checks its request's fields first (module docstring)."""

        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                check_request_fields(request)
            except (TreeRangeError, RequestError) as exc:
                _abort(context, exc)
            return handler(self, request, context)

        wrapper.__name__ = handler.__name__
        wrapper.__doc__ = handler.__doc__
        return wrapper

    class RegistryServicer(pbg.RegistryServicer):
        def __init__(self, registry: Registry) -> None:
            self.registry = registry

        def _guard(self, context: grpc.ServicerContext, fn: Any, *args: Any) -> Any:
            try:
                return fn(*args)
            except (NotFoundError, TreeRangeError, RequestError) as exc:
                _abort(context, exc)
            except Exception:
                logger.exception("internal error in %s", getattr(fn, "__name__", fn))
                context.abort(grpc.StatusCode.INTERNAL, "internal error; see the coordinator log")

        def GetCheckpoint(self, request: Any, context: grpc.ServicerContext) -> Any:
            return serde.checkpoint_to_proto(self._guard(context, self.registry.checkpoint))

        def GetConsistencyProof(self, request: Any, context: grpc.ServicerContext) -> Any:
            return serde.consistency_to_proto(
                self._guard(
                    context, self.registry.consistency_proof, request.old_size, request.new_size
                )
            )

        def GetInclusionProof(self, request: Any, context: grpc.ServicerContext) -> Any:
            which = request.WhichOneof("leaf")
            if which is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name a leaf_index or leaf_hash")
            leaf: int | bytes = (
                request.leaf_index if which == "leaf_index" else bytes(request.leaf_hash)
            )
            return serde.inclusion_to_proto(
                self._guard(context, self.registry.inclusion_proof, leaf, request.tree_size)
            )

        def GetEntries(self, request: Any, context: grpc.ServicerContext) -> Any:
            return serde.entries_page_to_proto(
                self._guard(context, self.registry.entries_page, request.start, request.end)
            )

        def GetBlob(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            chunks = self._guard(context, self.registry.blob_chunks, request.sha256)
            for total, offset, data in chunks:
                yield pb.BlobChunk(total_size=total, offset=offset, data=data)

        def GetReference(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            header, parts = self._guard(context, self.registry.reference_stream, request.tree_size)
            yield pb.ReferenceChunk(
                part=pb.ReferenceChunk.PART_HEADER,
                header=serde.reference_header_to_proto(header),
            )
            for part_name, offset, data in parts:
                part = (
                    pb.ReferenceChunk.PART_MANIFEST
                    if part_name == "manifest"
                    else pb.ReferenceChunk.PART_SAFETENSORS
                )
                yield pb.ReferenceChunk(part=part, offset=offset, data=data)

        def SubmitUpdate(self, request: Any, context: grpc.ServicerContext) -> Any:
            remaining = context.time_remaining()  # None without a client deadline
            # answer before the client's deadline, so a slow commit reaches the site as the
            # "resubmit" rejection rather than as DEADLINE_EXCEEDED
            wait = None if remaining is None else max(0.0, remaining - _DEADLINE_MARGIN_S)
            result = self._guard(
                context,
                lambda: self.registry.submit(
                    bytes(request.envelope), bytes(request.diff), wait_s=wait
                ),
            )
            return serde.submit_result_to_proto(result)

        def GetSiteInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
            return serde.site_info_to_proto(
                self._guard(context, self.registry.site_info, request.site_id)
            )

        def GetCosignatures(self, request: Any, context: grpc.ServicerContext) -> Any:
            size, note = self._guard(context, self.registry.cosigned_note, request.tree_size)
            return pb.CosignaturesResponse(tree_size=size, signed_note=note)

        def AddCosignature(self, request: Any, context: grpc.ServicerContext) -> Any:
            accepted, added, message = self._guard(
                context, self.registry.add_cosignature, bytes(request.cosigned_note)
            )
            return pb.AddCosignatureResponse(accepted=accepted, added=added, message=message)

        def Health(self, request: Any, context: grpc.ServicerContext) -> Any:
            return serde.health_to_proto(self._guard(context, self.registry.health))

    for name in pb.DESCRIPTOR.services_by_name["Registry"].methods_by_name:
        setattr(RegistryServicer, name, _checked(getattr(RegistryServicer, name)))
    return RegistryServicer


class RegistryServer:
    """A running registry server. ``start()`` binds; ``port`` is the bound port (useful with
    ``:0``); ``stop()`` drains in-flight calls for ``grace`` seconds."""

    def __init__(
        self, registry: Registry, cfg: CoordinatorConfig, *, listen: str, insecure: bool = False
    ) -> None:
        self.registry = registry
        self.cfg = cfg
        self.listen = listen
        self.insecure = insecure
        check_listen_address(listen, insecure=insecure)
        self._server: grpc.Server | None = None
        self.port: int | None = None
        self._stopped = threading.Event()

    def start(self) -> int:
        import grpc

        from protocols.proto import registry_pb2_grpc as pbg

        lim = self.cfg.limits
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=lim.max_workers, thread_name_prefix="registry"),
            options=[
                ("grpc.max_receive_message_length", lim.max_message_bytes),
                ("grpc.max_send_message_length", lim.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=lim.max_concurrent_rpcs,
        )
        pbg.add_RegistryServicer_to_server(_servicer_class()(self.registry), server)
        if self.insecure:
            logger.warning(
                "INSECURE: serving the registry WITHOUT TLS on %s. Loopback development only; "
                "sites cannot authenticate this server. Never do this in production.",
                self.listen,
            )
            port = server.add_insecure_port(self.listen)
        else:
            cert = self.cfg.path(self.cfg.tls.certificate)
            key = self.cfg.path(self.cfg.tls.private_key)
            try:
                creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
            except OSError as exc:
                raise ConfigError(
                    f"{self.cfg.state_dir / 'coordinator.yaml'}: tls: cannot read {exc.filename}: "
                    f"{exc.strerror}; restore the TLS files or fix tls.certificate / "
                    "tls.private_key"
                ) from exc
            port = server.add_secure_port(self.listen, creds)
        if port == 0:
            raise ConfigError(
                f"--listen {self.listen}: cannot bind (address in use or not on this machine); "
                "pick another HOST:PORT"
            )
        server.start()
        self._server = server
        self.port = port
        logger.info(
            "registry serving on %s (port %d, %s), tree size %d, origin %s",
            self.listen,
            port,
            "plain text" if self.insecure else "TLS",
            self.registry.size,
            self.registry.origin,
        )
        return port

    def stop(self, grace: float | None = 5.0) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._server is None:
            return True
        return bool(self._server.wait_for_termination(timeout))
