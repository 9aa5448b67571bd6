"""Attack: oversized envelope, payload or diff; the size caps apply before any parsing."""

from __future__ import annotations

import json

import pytest

from protocols.errors import UpdateRejectedError
from protocols.limits import DEFAULT_LIMITS
from tests.protocols._factories import assert_rejected, enrolled, resign_payload


def test_envelope_over_the_cap_is_refused_unparsed():
    c = enrolled()
    u = c.update("site-a")
    junk = b"{" * (DEFAULT_LIMITS.max_envelope_bytes + 1)  # would be a deep-nesting bomb if parsed
    assert_rejected(c, junk, u.diff_bytes, "E_OVERSIZE")


def test_diff_over_the_policy_cap():
    c = enrolled()
    u = c.update("site-a")
    big = b"\x00" * (c.trust.update_limits.max_diff_bytes + 1)
    with pytest.raises(UpdateRejectedError) as ei:
        c.state.validate_site_update(u.envelope, big)
    assert ei.value.reason_code == "E_OVERSIZE"


def test_payload_over_the_cap():
    c = enrolled()
    u = c.update("site-a")
    obj = json.loads(u.payload.to_bytes())
    obj["padding"] = "x" * (DEFAULT_LIMITS.max_payload_bytes + 1)
    env = resign_payload(c, obj)
    assert_rejected(c, env, u.diff_bytes, "E_OVERSIZE")


def test_too_many_signatures():
    from protocols.dsse import add_signatures
    from tests.protocols._factories import det_key

    c = enrolled()
    u = c.update("site-a")
    env = add_signatures(u.envelope, [det_key(100 + i) for i in range(DEFAULT_LIMITS.max_signatures)])
    assert_rejected(c, env, u.diff_bytes, "E_OVERSIZE")
