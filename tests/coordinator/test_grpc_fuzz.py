"""Fuzz every registry handler over real gRPC (TLS, loopback): a short seeded run (300
requests per handler by default; ``SCARCHES_FL_GRPC_FUZZ`` to change it). No INTERNAL, no
UNKNOWN (an untyped exception), every answer within its deadline. The full run (100,000 per
handler) is ``benchmarks/bench_attacks.py --fuzz-per-handler 100000``."""

from __future__ import annotations

import os

import pytest

from tests.coordinator._grpc_fuzz import BAD_STATUSES, HANDLERS, FuzzContext, fuzz
from tests.coordinator.conftest import fetch_base, make_site_update

pytestmark = pytest.mark.network

PER_HANDLER = int(os.environ.get("SCARCHES_FL_GRPC_FUZZ", "300"))


def fuzz_context(client, consortium) -> FuzzContext:
    from protocols.merkle import leaf_hash

    base = fetch_base(client, consortium)
    u = make_site_update(consortium.sites["site-a"], base)
    client.submit_update(u.envelope, u.diff_bytes).raise_for_rejection()
    entries = client.get_entries(0, client.get_checkpoint().size)
    blob = next(b.sha256 for e in entries for b in e.blobs)
    v = make_site_update(consortium.sites["site-a"], base)  # valid, not yet submitted
    return FuzzContext(
        size=len(entries),
        envelope=v.envelope,
        diff=v.diff_bytes,
        note=client.get_checkpoint().signed_note,
        leaf_hash=leaf_hash(u.envelope),
        blob_name=blob,
        site_id="site-a",
    )


def test_every_handler_answers_fuzzed_requests_with_a_typed_status(consortium, server) -> None:
    with server.client(consortium) as c:
        ctx = fuzz_context(c, consortium)
        results = fuzz(c._stub, ctx, per_handler=PER_HANDLER, seed=0)
    assert set(results) == set(HANDLERS)
    for name, res in results.items():
        assert res.requests == PER_HANDLER
        bad = {s: n for s, n in res.statuses.items() if s in BAD_STATUSES}
        assert not bad, (name, bad, res.bad)
        assert "DEADLINE_EXCEEDED" not in res.statuses, (name, res.statuses)


def test_integers_beyond_sqlite_are_out_of_range_on_every_handler(consortium, server) -> None:
    """The report's case (GetCosignatures(tree_size >= 2**63) reached SQLite and answered
    INTERNAL), for every integer field of every request message."""
    import grpc

    from protocols.proto import registry_pb2 as pb

    methods = pb.DESCRIPTOR.services_by_name["Registry"].methods_by_name
    checked = 0
    with server.client(consortium) as c:
        for name, method in methods.items():
            req_type = getattr(pb, method.input_type.name)
            for fd in method.input_type.fields:
                if fd.type != fd.TYPE_UINT64:
                    continue
                for value in (2**63, 2**64 - 1):
                    req = req_type(**{fd.name: value})
                    with pytest.raises(grpc.RpcError) as info:
                        answer = getattr(c._stub, name)(req, timeout=10)
                        if method.server_streaming:
                            list(answer)
                    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE, (name, fd.name)
                    assert fd.name in info.value.details()
                    checked += 1
        with pytest.raises(grpc.RpcError) as info:
            c._stub.GetSiteInfo(pb.GetSiteInfoRequest(site_id="x" * 300), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert checked >= 14  # 7 integer fields, two values each
