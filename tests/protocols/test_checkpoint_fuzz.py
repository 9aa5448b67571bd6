"""Property test: random and mutated bytes fed to the checkpoint body parser. Only
CheckpointFormatError may come out, and whatever parses re-serialises to the same bytes
(one encoding per checkpoint, so signatures cannot be replayed over a re-spelled body)."""

from __future__ import annotations

import base64
import hashlib
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.checkpoint import Checkpoint, CheckpointFormatError, parse_checkpoint_body

FUZZ = settings(
    max_examples=10_000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ROOT = hashlib.sha256(b"root").digest()
SEEDS = [
    Checkpoint("example.org/log", 5, ROOT).body(),
    Checkpoint("example.org/log", 0, hashlib.sha256(b"").digest()).body(),
    Checkpoint("o", 2**64 - 1, ROOT, ("ext a", "ext b")).body(),
]
TOKENS = [
    b"\n", b"0", b"00", b"-", b"+", b" ", b"=", b"==", b"/", b"\r", b"\xff", b"\xd9\xa5",
    base64.b64encode(ROOT), b"18446744073709551616", b"\xe2\x80\x94",
]  # fmt: skip


def mutate(seed: int) -> bytes:
    """Deterministic mutation of a valid body driven by one Hypothesis-drawn integer (cheap per
    example; the failing seed reproduces a failure exactly)."""
    rng = random.Random(seed)
    mode = rng.random()
    if mode < 0.15:
        return rng.randbytes(rng.randrange(0, 200))
    if mode < 0.35:  # lines of tokens and short random strings
        parts = [
            rng.choice(TOKENS) if rng.random() < 0.6 else rng.randbytes(rng.randrange(0, 8))
            for _ in range(rng.randrange(0, 8))
        ]
        return b"\n".join(parts) + b"\n"
    data = bytearray(rng.choice(SEEDS))
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(5)
        pos = rng.randrange(0, len(data) + 1)
        if op == 0 and pos < len(data):
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and pos < len(data):
            data[pos] = rng.randrange(256)
        elif op == 2:
            data[pos:pos] = rng.choice(TOKENS) if rng.random() < 0.7 else rng.randbytes(3)
        elif op == 3:
            del data[pos : pos + rng.randrange(1, 9)]
        else:
            del data[pos:]
    return bytes(data)


@pytest.mark.timeout(120)
@FUZZ
@given(st.one_of(st.binary(max_size=200), st.integers(0, 2**64 - 1).map(mutate)))
def test_checkpoint_body_parser_fuzz(data: bytes | str) -> None:
    try:
        cp = parse_checkpoint_body(data)
    except CheckpointFormatError:
        return
    raw = data.encode("utf-8") if isinstance(data, str) else data
    assert cp.body() == raw
