"""Condition diffs: extract, apply, serialize; apply rule of CONTRACTS.md section 1."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.diff import (
    apply_condition_diff,
    diff_from_bytes,
    diff_to_bytes,
    expected_diff_shapes,
    extract_condition_diff,
)
from protocols.errors import FormatError, OversizeError, UpdateRejectedError
from tests.protocols._factories import tiny_bundle, tiny_diff


def test_apply_changes_only_what_the_rule_allows():
    base = tiny_bundle()
    diff = tiny_diff(base, m=2)
    new = apply_condition_diff(base, diff, ["site-a/b1", "site-a/b2"])
    assert new.conditions == base.conditions + ["site-a/b1", "site-a/b2"]
    for name, spec in base.manifest["tensors"].items():
        if spec["role"] == "frozen":
            assert new.tensors[name].tobytes() == base.tensors[name].tobytes()
            assert new.manifest["tensors"][name] == spec
        else:
            assert new.tensors[name].shape[spec["axis"]] == 4
            assert np.array_equal(new.tensors[name][:, :2], base.tensors[name])
    changed = {k for k in base.manifest if base.manifest[k] != new.manifest[k]}
    assert changed == {"conditions", "tensors", "digest"}


def test_extract_then_apply_gives_same_digest():
    base = tiny_bundle()
    new = apply_condition_diff(base, tiny_diff(base, m=3), ["s1/a", "s1/b", "s1/c"])
    diff = extract_condition_diff(base.manifest, new)
    again = apply_condition_diff(base, diff, ["s1/a", "s1/b", "s1/c"])
    assert again.digest == new.digest


def test_apply_order_is_column_order():
    base = tiny_bundle()
    d1, d2 = tiny_diff(base, seed=1), tiny_diff(base, seed=2)
    ab = apply_condition_diff(apply_condition_diff(base, d1, ["a/x"]), d2, ["b/x"])
    ba = apply_condition_diff(apply_condition_diff(base, d2, ["b/x"]), d1, ["a/x"])
    assert ab.digest != ba.digest
    assert np.array_equal(ab.tensors["px_r"][:, 2], ba.tensors["px_r"][:, 3])


def test_diff_bytes_roundtrip():
    base = tiny_bundle()
    diff = tiny_diff(base, m=2)
    data = diff_to_bytes(diff)
    assert data == diff_to_bytes(dict(reversed(list(diff.items()))))
    back = diff_from_bytes(data, max_bytes=len(data))
    assert {k: v.tobytes() for k, v in back.items()} == {k: v.tobytes() for k, v in diff.items()}
    with pytest.raises(OversizeError):
        diff_from_bytes(data, max_bytes=len(data) - 1)
    with pytest.raises(FormatError):
        diff_from_bytes(data[:-1], max_bytes=len(data))


def test_expected_shapes():
    base = tiny_bundle()
    assert expected_diff_shapes(base.manifest, 5)["encoder.W_s"] == ((3, 5), "float32")


@pytest.mark.parametrize(
    ("names", "code"),
    [
        (["ref/study0"], "E_CONDITION_EXISTS"),
        (["s/a", "s/a"], "E_CONDITION_EXISTS"),
        (["../etc"], "E_CONDITION_NAME"),
        (["s/.."], "E_CONDITION_NAME"),
        ([], "E_CONDITION_NAME"),
    ],
)
def test_apply_rejects_bad_names(names, code):
    base = tiny_bundle()
    with pytest.raises(UpdateRejectedError) as ei:
        apply_condition_diff(base, tiny_diff(base, m=max(len(names), 1)), names)
    assert ei.value.reason_code == code
