"""A seeded, structured fuzzer over every handler of the registry gRPC service (used by
``tests/coordinator/test_grpc_fuzz.py`` and ``benchmarks/bench_attacks.py``).

Each request sets every field of its message from values chosen to break range and format
checks: integers at the edges of the tree size, of int32 / int53 / int63 (SQLite's integer) and
of uint64; bytes that are empty, random, a valid item mutated or crafted (the quadratic-scan
envelope); strings that are empty, huge, non-ASCII or nearly valid. Streaming answers are read to
the end. Every call has a deadline; the only acceptable outcomes are OK or a typed status with a
message -- never INTERNAL or UNKNOWN (an untyped exception in a handler).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.protocols._crafted import crafted_envelope, mutate

__all__ = ["FuzzContext", "HANDLERS", "fuzz", "BAD_STATUSES"]

BAD_STATUSES = frozenset({"INTERNAL", "UNKNOWN"})


@dataclass
class FuzzContext:
    """What a realistic request may reuse: valid items of the running log."""

    size: int
    envelope: bytes
    diff: bytes
    note: bytes
    leaf_hash: bytes
    blob_name: str
    site_id: str


def _int(rng: random.Random, ctx: FuzzContext) -> int:
    n = ctx.size
    edges = (
        0,
        1,
        2,
        n - 1,
        n,
        n + 1,
        2**31 - 1,
        2**31,
        2**32,
        2**53,
        2**53 + 1,
        2**62,
        2**63 - 1,
        2**63,
        2**63 + 1,
        2**64 - 2,
        2**64 - 1,
    )
    r = rng.random()
    if r < 0.7:
        return max(0, rng.choice(edges))
    if r < 0.85:
        return rng.randint(0, max(n + 2, 2))
    return rng.getrandbits(64)


def _bytes(rng: random.Random, valid: bytes) -> bytes:
    r = rng.random()
    if r < 0.15:
        return b""
    if r < 0.3:
        return rng.randbytes(rng.randint(1, 256))
    if r < 0.4:
        return valid
    if r < 0.45:  # the quadratic-scan envelope of the report, 64 KiB
        return crafted_envelope("escaped_quotes", 64 * 1024)
    return mutate(valid, rng.getrandbits(64))


def _string(rng: random.Random, valid: str) -> str:
    r = rng.random()
    if r < 0.15:
        return ""
    if r < 0.3:
        return valid
    if r < 0.4:
        return "x" * rng.choice((65, 1024, 64 * 1024))
    if r < 0.55:
        return "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(1, 40)))
    if r < 0.7:
        return valid[: rng.randint(0, len(valid))]
    return valid.replace(valid[rng.randrange(len(valid))], rng.choice("G/.\\ %\u00e9"), 1)


def _checkpoint(pb: Any, rng: random.Random, ctx: FuzzContext) -> Any:
    return pb.GetCheckpointRequest()


def _consistency(pb: Any, rng: random.Random, ctx: FuzzContext) -> Any:
    return pb.ConsistencyProofRequest(old_size=_int(rng, ctx), new_size=_int(rng, ctx))


def _inclusion(pb: Any, rng: random.Random, ctx: FuzzContext) -> Any:
    if rng.random() < 0.5:
        return pb.InclusionProofRequest(leaf_index=_int(rng, ctx), tree_size=_int(rng, ctx))
    if rng.random() < 0.1:
        return pb.InclusionProofRequest(tree_size=_int(rng, ctx))  # no leaf at all
    return pb.InclusionProofRequest(leaf_hash=_bytes(rng, ctx.leaf_hash), tree_size=_int(rng, ctx))


def _entries(pb: Any, rng: random.Random, ctx: FuzzContext) -> Any:
    return pb.GetEntriesRequest(start=_int(rng, ctx), end=_int(rng, ctx))


def _blob(pb: Any, rng: random.Random, ctx: FuzzContext) -> Any:
    return pb.GetBlobRequest(sha256=_string(rng, ctx.blob_name))


def _reference(pb: Any, rng: random.Random, ctx: FuzzContext) -> Any:
    return pb.GetReferenceRequest(tree_size=_int(rng, ctx))


def _submit(pb: Any, rng: random.Random, ctx: FuzzContext) -> Any:
    return pb.SubmitUpdateRequest(envelope=_bytes(rng, ctx.envelope), diff=_bytes(rng, ctx.diff))


def _site_info(pb: Any, rng: random.Random, ctx: FuzzContext) -> Any:
    return pb.GetSiteInfoRequest(site_id=_string(rng, ctx.site_id))


def _cosignatures(pb: Any, rng: random.Random, ctx: FuzzContext) -> Any:
    return pb.GetCosignaturesRequest(tree_size=_int(rng, ctx))


def _add_cosignature(pb: Any, rng: random.Random, ctx: FuzzContext) -> Any:
    return pb.AddCosignatureRequest(cosigned_note=_bytes(rng, ctx.note))


def _health(pb: Any, rng: random.Random, ctx: FuzzContext) -> Any:
    return pb.HealthRequest()


#: handler -> (request builder, streams its answer)
HANDLERS: dict[str, tuple[Callable[[Any, random.Random, FuzzContext], Any], bool]] = {
    "GetCheckpoint": (_checkpoint, False),
    "GetConsistencyProof": (_consistency, False),
    "GetInclusionProof": (_inclusion, False),
    "GetEntries": (_entries, False),
    "GetBlob": (_blob, True),
    "GetReference": (_reference, True),
    "SubmitUpdate": (_submit, False),
    "GetSiteInfo": (_site_info, False),
    "GetCosignatures": (_cosignatures, False),
    "AddCosignature": (_add_cosignature, False),
    "Health": (_health, False),
}


@dataclass
class HandlerResult:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    max_s: float = 0.0
    bad: list[str] = field(default_factory=list)  # first few INTERNAL / UNKNOWN, with the request


def fuzz(
    stub: Any,
    ctx: FuzzContext,
    *,
    per_handler: int,
    seed: int,
    handlers: tuple[str, ...] | None = None,
    deadline_s: float = 10.0,
) -> dict[str, HandlerResult]:
    """Send ``per_handler`` fuzzed requests to each handler (seeded), one at a time, and count
    the status codes. Bounded: ``per_handler`` requests, each with ``deadline_s``."""
    import grpc

    from protocols.proto import registry_pb2 as pb

    out: dict[str, HandlerResult] = {}
    for name in handlers or tuple(HANDLERS):
        build, streams = HANDLERS[name]
        rng = random.Random(f"{seed}:{name}")
        method = getattr(stub, name)
        res = out[name] = HandlerResult()
        for _ in range(per_handler):
            request = build(pb, rng, ctx)
            t0 = time.perf_counter()
            try:
                answer = method(request, timeout=deadline_s)
                if streams:
                    for _chunk in answer:
                        pass
                status = "OK"
                if name == "SubmitUpdate" and answer.HasField("rejection"):
                    status = f"OK {answer.rejection.reason_code}"  # a typed rejection in the body
            except grpc.RpcError as exc:
                status = exc.code().name
                if status in BAD_STATUSES and len(res.bad) < 5:
                    res.bad.append(f"{status} {exc.details()!r} on {str(request)[:200]!r}")
            res.max_s = max(res.max_s, time.perf_counter() - t0)
            res.requests += 1
            res.statuses[status] += 1
    return out
