"""Attack: diff tensors with shapes other than the base implies (extra rows reaching into
frozen structure, transposed blocks, a condition count that disagrees with the names)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.protocols._factories import assert_rejected, enrolled, tiny_diff


@pytest.mark.parametrize(
    "reshape",
    [
        lambda a: np.zeros((a.shape[0] + 1, a.shape[1]), a.dtype),
        lambda a: np.ascontiguousarray(a.T),
        lambda a: a.reshape(-1),
        lambda a: np.zeros((a.shape[0], 2), a.dtype),
        lambda a: a[None],
    ],
)
def test_wrong_shape(reshape):
    c = enrolled()
    diff = tiny_diff(c.state.bundle(), m=1)
    diff["encoder.W_s"] = reshape(diff["encoder.W_s"])
    u = c.update("site-a", diff=diff)
    assert_rejected(c, u.envelope, u.diff_bytes, "E_TENSOR_SHAPE")


def test_condition_count_disagrees_with_names():
    c = enrolled()
    diff = tiny_diff(c.state.bundle(), m=2)
    u = c.update("site-a", diff=diff, names=["site-a/only-one"])
    assert_rejected(c, u.envelope, u.diff_bytes, "E_TENSOR_SHAPE")
