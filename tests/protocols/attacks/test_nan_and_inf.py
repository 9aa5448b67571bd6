"""Attack: NaN or +-Inf in the diff (would poison every later mapping), and NaN/Infinity in
the signed JSON."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from protocols.canonical import canonical_json
from tests.protocols._factories import assert_rejected, enrolled, resign_payload, tiny_diff


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_diff_values(value):
    import hashlib

    from protocols.diff import diff_to_bytes
    from protocols.errors import UpdateRejectedError

    c = enrolled()
    diff = tiny_diff(c.state.bundle())
    diff["encoder.W_s"][1, 0] = value
    with pytest.raises(UpdateRejectedError) as ei:  # an honest site agent refuses to build it
        c.update("site-a", diff=diff)
    assert ei.value.reason_code == "E_NONFINITE"
    # an attacker signs it anyway, with made-up finite statistics
    honest = c.update("site-a")
    bad = diff_to_bytes(diff)
    obj = json.loads(honest.payload.to_bytes())
    obj["diff"]["sha256"] = hashlib.sha256(bad).hexdigest()
    obj["diff"]["size"] = len(bad)
    assert_rejected(c, resign_payload(c, obj), bad, "E_NONFINITE")


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_nonfinite_numbers_in_payload_json(token):
    c = enrolled()
    u = c.update("site-a")
    payload = canonical_json(json.loads(u.payload.to_bytes()))
    name = sorted(json.loads(payload)["diff"]["tensors"])[0]
    # splice the token in place of that tensor's l2 value (the bytes are then re-signed)
    obj = json.loads(payload)
    marker = 123.25
    obj["diff"]["tensors"][name]["l2"] = marker
    raw = canonical_json(obj).replace(b"123.25", token)
    from protocols.dsse import sign_envelope
    from protocols.update import SITE_UPDATE_TYPE

    env = sign_envelope(SITE_UPDATE_TYPE, raw, [c.site_keys["site-a"]])
    assert_rejected(c, env, u.diff_bytes, "E_PAYLOAD_MALFORMED")
    assert base64.b64decode(json.loads(env)["payload"]) == raw
    assert resign_payload(c, obj)  # sanity: the helper signs well-formed payloads
