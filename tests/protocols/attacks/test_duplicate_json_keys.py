"""Attack: duplicate keys in signed JSON (parsers disagree on which wins: a verifier and a
consumer could see different payloads) and in a safetensors header."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from protocols.canonical import parse_json_strict
from protocols.dsse import sign_envelope
from protocols.errors import CanonicalJSONError, EnvelopeFormatError
from protocols.update import SITE_UPDATE_TYPE
from tests.protocols._factories import assert_rejected, enrolled, resign_payload


def test_duplicate_key_in_payload():
    c = enrolled()
    u = c.update("site-a")
    raw = u.payload.to_bytes()
    dup = raw.replace(b'"kind":"site_update"', b'"kind":"site_update","kind":"genesis"', 1)
    assert dup != raw
    env = sign_envelope(SITE_UPDATE_TYPE, dup, [c.site_keys["site-a"]])
    assert_rejected(c, env, u.diff_bytes, "E_PAYLOAD_MALFORMED")


def test_duplicate_key_in_envelope():
    c = enrolled()
    u = c.update("site-a")
    dup = u.envelope.replace(b'"payloadType":', b'"payloadType":"x","payloadType":', 1)
    with pytest.raises(EnvelopeFormatError):
        from protocols.dsse import parse_envelope

        parse_envelope(dup)
    assert_rejected(c, dup, u.diff_bytes, "E_ENVELOPE_MALFORMED")


def test_duplicate_key_in_safetensors_header():
    c = enrolled()
    u = c.update("site-a")
    entry = '{"dtype":"F32","shape":[4,1],"data_offsets":[0,16]}'
    h = ('{"px_r":' + entry + ',"px_r":' + entry + "}").encode()
    bad = struct.pack("<Q", len(h)) + h + b"\x00" * 16
    obj = json.loads(u.payload.to_bytes())
    obj["diff"]["sha256"] = hashlib.sha256(bad).hexdigest()
    obj["diff"]["size"] = len(bad)
    assert_rejected(c, resign_payload(c, obj), bad, "E_SAFETENSORS_MALFORMED")


def test_strict_parser_reports_the_code():
    with pytest.raises(CanonicalJSONError) as ei:
        parse_json_strict(b'{"a":{"b":1,"b":1}}', max_bytes=100)
    assert ei.value.reason_code == "E_JSON_DUPLICATE_KEY"
