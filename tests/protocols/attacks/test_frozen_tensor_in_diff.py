"""Attack: a diff that also carries a frozen tensor (trying to overwrite shared weights), or
that drops a condition tensor."""

from __future__ import annotations

import numpy as np

from tests.protocols._factories import assert_rejected, enrolled, tiny_diff


def test_frozen_tensor_is_refused():
    c = enrolled()
    diff = tiny_diff(c.state.bundle())
    diff["encoder.W_x"] = np.zeros((3, 1), np.float32)
    u = c.update("site-a", diff=diff)
    assert_rejected(c, u.envelope, u.diff_bytes, "E_TENSOR_FROZEN")


def test_full_frozen_tensor_replacement_is_refused():
    c = enrolled()
    diff = tiny_diff(c.state.bundle())
    diff["decoder.bias"] = np.zeros(3, np.float32)
    u = c.update("site-a", diff=diff)
    assert_rejected(c, u.envelope, u.diff_bytes, "E_TENSOR_FROZEN")


def test_unknown_or_missing_tensor_is_refused():
    c = enrolled()
    diff = tiny_diff(c.state.bundle())
    diff["new.tensor"] = np.zeros((3, 1), np.float32)
    u = c.update("site-a", diff=diff)
    assert_rejected(c, u.envelope, u.diff_bytes, "E_TENSOR_SET")
    diff = tiny_diff(c.state.bundle())
    del diff["px_r"]
    u = c.update("site-a", diff=diff)
    assert_rejected(c, u.envelope, u.diff_bytes, "E_TENSOR_SET")
