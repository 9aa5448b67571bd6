"""Worst-case inputs of a chosen size for the strict parsers (used by the linear-time tests and
by ``benchmarks/bench_parsers.py``).

Each family targets a super-linear step a JSON front end could have: escaped quotes in an
unterminated string (what made the old depth pre-scan quadratic), a bracket bomb (the recursive
parser), a valid document of many escaped characters (the string decoder and the canonical
re-encode), and a valid object of many keys (duplicate-key check, key sort).
"""

from __future__ import annotations

import base64
import random
import struct
from collections.abc import Callable

__all__ = [
    "FAMILIES",
    "crafted_json",
    "crafted_envelope",
    "safetensors_with_header",
    "parsers",
    "mutate",
]


def _escaped_quotes(n: int) -> bytes:
    body = b'{{{{{"'
    return body + b'\\"' * ((n - len(body)) // 2)


def _bracket_bomb(n: int) -> bytes:
    return b"[" * n


def _escapes_string(n: int) -> bytes:
    head, tail = b'{"a":"', b'"}'
    return head + b"\\u0001" * ((n - len(head) - len(tail)) // 6) + tail


def _many_keys(n: int) -> bytes:
    parts, size, i = [], 2, 0
    while True:
        item = b'"k%09d":0' % i
        if size + len(item) + 1 > n:
            break
        parts.append(item)
        size += len(item) + 1
        i += 1
    return b"{" + b",".join(parts) + b"}"


#: family name -> builder(size in bytes) -> JSON-ish bytes of at most that size
FAMILIES: dict[str, Callable[[int], bytes]] = {
    "escaped_quotes": _escaped_quotes,
    "bracket_bomb": _bracket_bomb,
    "escapes_string": _escapes_string,
    "many_keys": _many_keys,
}


def crafted_json(family: str, size: int) -> bytes:
    data = FAMILIES[family](size)
    assert len(data) <= size
    return data


def crafted_envelope(family: str, size: int) -> bytes:
    """The issue's attack shape for ``SubmitUpdate``: the crafted bytes ARE the envelope."""
    return crafted_json(family, size)


def _payload_envelope(payload: bytes) -> bytes:
    """A well-formed (unsigned-looking) envelope around a crafted payload, for the parsers that
    decode the payload (entry payloads); one fake signature so the envelope parses."""
    from protocols.canonical import canonical_json

    return canonical_json(
        {
            "payload": base64.b64encode(payload).decode("ascii"),
            "payloadType": "application/vnd.scarches-fl.site-update.v1+json",
            "signatures": [{"keyid": "0" * 64, "sig": base64.b64encode(b"\0" * 64).decode()}],
        }
    )


def safetensors_with_header(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def parsers() -> dict[str, tuple[Callable[[bytes], object], Callable[[], int]]]:
    """parser name -> (call on crafted bytes, its maximum allowed input size)."""
    from protocols.bundle import bundle_from_bytes, parse_safetensors_header
    from protocols.dsse import parse_envelope
    from protocols.ledger import entry_payload, parse_receipt
    from protocols.limits import DEFAULT_LIMITS as L
    from protocols.policy import parse_trust
    from protocols.update import parse_update_payload

    # the base64 of the payload must fit in the envelope, and the payload in its own cap
    payload_cap = min(L.max_payload_bytes, (L.max_envelope_bytes - 400) * 3 // 4)
    return {
        "envelope": (parse_envelope, lambda: L.max_envelope_bytes),
        "update_payload": (parse_update_payload, lambda: L.max_payload_bytes),
        "entry_payload": (lambda d: entry_payload(_payload_envelope(d)), lambda: payload_cap),
        "safetensors_header": (
            lambda d: parse_safetensors_header(safetensors_with_header(d)),
            lambda: L.max_safetensors_header_bytes,
        ),
        "manifest": (lambda d: bundle_from_bytes(d, b""), lambda: L.max_manifest_bytes),
        "receipt": (parse_receipt, lambda: L.max_envelope_bytes),
        "trust": (parse_trust, lambda: L.max_trust_bytes),
    }


_TOKENS = [b'"', b"{", b"}", b"[", b"]", b",", b":", b"\\", b"NaN", b"1e999", b"-", b"\x00",
           b"\xff", b"\\ud800", b"1" * 30]  # fmt: skip


def mutate(seed: bytes, n: int) -> bytes:
    """Deterministic edits of ``seed`` chosen by ``n``: flip, insert, delete, truncate, splice a
    token, or (one time in ten) random bytes. One integer per example keeps Hypothesis cheap."""
    rng = random.Random(n)
    if rng.random() < 0.1:
        return rng.randbytes(rng.randint(0, 64))
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        op = rng.randint(0, 4)
        pos = rng.randint(0, max(len(data) - 1, 0))
        if op == 0 and data:
            data[pos] ^= 1 << rng.randint(0, 7)
        elif op == 1:
            data[pos:pos] = rng.randbytes(rng.randint(1, 4))
        elif op == 2 and data:
            del data[pos : pos + rng.randint(1, 8)]
        elif op == 3:
            del data[pos:]
        else:
            data[pos : pos + 1] = rng.choice(_TOKENS)
    return bytes(data)
