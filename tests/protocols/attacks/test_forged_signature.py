"""Attack: a site update whose signature does not verify (payload altered after signing, or
signed with a key that merely claims an enrolled key id)."""

from __future__ import annotations

import base64
import json

from protocols.canonical import canonical_json
from protocols.keys import key_id
from tests.protocols._factories import assert_rejected, det_key, enrolled


def test_payload_altered_after_signing():
    c = enrolled()
    u = c.update("site-a")
    env = json.loads(u.envelope)
    payload = json.loads(base64.b64decode(env["payload"]))
    payload["new_conditions"] = ["site-a/renamed"]
    env["payload"] = base64.b64encode(canonical_json(payload)).decode()
    assert_rejected(c, canonical_json(env), u.diff_bytes, "E_SIG_INVALID")


def test_signed_by_attacker_key_claiming_enrolled_key_id():
    c = enrolled()
    honest = c.update("site-a")
    forged = c.update("site-a", key=det_key(66))  # payload says attacker's key id
    env = json.loads(forged.envelope)
    payload = json.loads(base64.b64decode(env["payload"]))
    payload["key_id"] = key_id(c.site_keys["site-a"])
    env["payload"] = base64.b64encode(canonical_json(payload)).decode()
    env["signatures"][0]["keyid"] = key_id(c.site_keys["site-a"])  # claim the honest key id
    assert_rejected(c, canonical_json(env), forged.diff_bytes, "E_SIG_INVALID")
    c.submit(honest)


def test_signature_bytes_flipped():
    c = enrolled()
    u = c.update("site-a")
    env = json.loads(u.envelope)
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[0] ^= 1
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    assert_rejected(c, canonical_json(env), u.diff_bytes, "E_SIG_INVALID")
