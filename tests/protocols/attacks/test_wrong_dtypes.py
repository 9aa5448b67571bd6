"""Attack: diff tensors in another dtype than the base tensor, or a dtype outside the allowed
set (e.g. bfloat16 that numpy cannot represent)."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from tests.protocols._factories import assert_rejected, enrolled, resign_payload, tiny_diff


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.uint8])
def test_other_allowed_dtype(dtype):
    c = enrolled()
    diff = tiny_diff(c.state.bundle())
    diff["px_r"] = diff["px_r"].astype(dtype)
    u = c.update("site-a", diff=diff)
    assert_rejected(c, u.envelope, u.diff_bytes, "E_TENSOR_DTYPE")


def test_disallowed_dtype_in_header():
    c = enrolled()
    h = json.dumps({"px_r": {"dtype": "BF16", "shape": [4, 1], "data_offsets": [0, 8]}}).encode()
    bad = struct.pack("<Q", len(h)) + h + b"\x00" * 8
    u = c.update("site-a")
    obj = json.loads(u.payload.to_bytes())
    obj["diff"]["sha256"] = hashlib.sha256(bad).hexdigest()
    obj["diff"]["size"] = len(bad)
    assert_rejected(c, resign_payload(c, obj), bad, "E_DTYPE_NOT_ALLOWED")
