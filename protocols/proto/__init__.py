"""gRPC definitions of the scarches-fl registry.

``registry.proto`` is the source of truth; ``registry_pb2*.py`` are generated from it by
``python -m protocols.proto.generate`` and committed. ``tests/protocols/test_proto_stubs.py``
fails when they are stale. Import the stubs as ``from protocols.proto import registry_pb2``;
they need ``grpcio`` and ``protobuf`` at runtime, so nothing here imports them eagerly.
"""

from __future__ import annotations

__all__ = ["SERVICE_NAME", "PROTO_PACKAGE"]

PROTO_PACKAGE = "scarches_fl.registry.v1"
SERVICE_NAME = f"{PROTO_PACKAGE}.Registry"
