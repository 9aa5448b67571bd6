"""Attack: a safetensors diff whose header claims a huge length (memory bomb) or is huge."""

from __future__ import annotations

import hashlib
import json
import struct

from protocols.limits import DEFAULT_LIMITS
from tests.protocols._factories import assert_rejected, enrolled, resign_payload


def _with_diff(c, diff_bytes):
    u = c.update("site-a")
    obj = json.loads(u.payload.to_bytes())
    obj["diff"]["sha256"] = hashlib.sha256(diff_bytes).hexdigest()
    obj["diff"]["size"] = len(diff_bytes)
    return resign_payload(c, obj)


def test_header_length_claims_terabytes():
    c = enrolled()
    bomb = struct.pack("<Q", 2**40) + b"{}"
    assert_rejected(c, _with_diff(c, bomb), bomb, "E_SAFETENSORS_HEADER_OVERSIZE")


def test_header_over_the_cap():
    c = enrolled()
    n = DEFAULT_LIMITS.max_safetensors_header_bytes + 8
    header = b'{"__metadata__":{"pad":"' + b"x" * (n - 26) + b'"}}'
    bomb = struct.pack("<Q", len(header)) + header
    assert_rejected(c, _with_diff(c, bomb), bomb, "E_SAFETENSORS_HEADER_OVERSIZE")


def test_header_length_past_end_of_file():
    c = enrolled()
    bad = struct.pack("<Q", 1000) + b"{}"
    assert_rejected(c, _with_diff(c, bad), bad, "E_SAFETENSORS_MALFORMED")


def test_offsets_point_outside_the_data():
    c = enrolled()
    h = json.dumps({"px_r": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}}).encode()
    bad = struct.pack("<Q", len(h)) + h + b"\x00" * 16
    assert_rejected(c, _with_diff(c, bad), bad, "E_SAFETENSORS_MALFORMED")
