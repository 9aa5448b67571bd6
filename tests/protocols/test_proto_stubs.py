"""The committed gRPC stubs must be exactly what registry.proto generates."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocols.proto import SERVICE_NAME

pytest.importorskip("grpc_tools")

from protocols.proto.generate import GENERATED_SUFFIXES, PROTO_FILES, generate  # noqa: E402

PROTO_DIR = Path(__file__).resolve().parents[2] / "protocols" / "proto"


def test_stubs_are_current(tmp_path: Path) -> None:
    written = generate(tmp_path)
    assert written, "protoc produced nothing"
    stale = []
    for fresh in written:
        committed = PROTO_DIR / fresh.name
        if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
            stale.append(fresh.name)
    assert not stale, (
        f"stale gRPC stubs {stale}: run `python -m protocols.proto.generate` and commit the result"
    )
    expected = {Path(p).stem + s for p in PROTO_FILES for s in GENERATED_SUFFIXES}
    assert {p.name for p in written} == expected


def test_service_descriptor_matches_package_constant() -> None:
    from protocols.proto import registry_pb2

    service = registry_pb2.DESCRIPTOR.services_by_name["Registry"]
    assert service.full_name == SERVICE_NAME
    assert {m.name for m in service.methods} >= {
        "GetCheckpoint",
        "GetConsistencyProof",
        "GetInclusionProof",
        "GetEntries",
        "GetBlob",
        "GetReference",
        "SubmitUpdate",
        "GetCosignatures",
        "AddCosignature",
        "Health",
    }
