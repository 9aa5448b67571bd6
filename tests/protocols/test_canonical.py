"""Canonical JSON (RFC 8785 subset) and the strict parser."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.canonical import MAX_SAFE_INTEGER, canonical_json, parse_json_strict
from protocols.errors import CanonicalJSONError, OversizeError


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # RFC 8785 appendix B number examples (those inside the accepted range)
        (0.0, b"0"),
        (-0.0, b"0"),
        (5e-324, b"5e-324"),
        (1.7976931348623157e308, b"1.7976931348623157e+308"),
        (9007199254740991.0, b"9007199254740991"),
        (1e21, b"1e+21"),
        (1e20, b"100000000000000000000"),
        (0.000001, b"0.000001"),
        (1e-7, b"1e-7"),
        (333333333.33333329, b"333333333.3333333"),
        (295147905179352830000.0, b"295147905179352830000"),
        (4.50, b"4.5"),
        (2e-3, b"0.002"),
        (1.0, b"1"),
        (np.float32(0.5), b"0.5"),
        (np.int64(7), b"7"),
    ],
)
def test_numbers(value, expected):
    assert canonical_json(value) == expected


def test_rfc8785_object_example_sorting_and_strings():
    obj = {"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh",
           "1": "One", "\U0001f600": "Emoji: Grinning Face", "\u0080": "Control", "\u00f6": "Latin Small Letter O With Diaeresis"}
    out = canonical_json(obj).decode("utf-8")
    keys = [k for k in parse_json_strict(out.encode(), max_bytes=10_000)]
    # sorted by UTF-16 code units: \r, 1, \x80, \xf6, \u20ac, \U0001f600 (surrogates D83D), \ufb33
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    assert out.startswith('{"\\r":"Carriage Return","1":"One"')


def test_string_escapes():
    assert canonical_json("a\"b\\c\n\x01\x7f/") == b'"a\\"b\\\\c\\n\\u0001\x7f/"'


def test_rejects_unencodable():
    for bad in [math.nan, math.inf, MAX_SAFE_INTEGER + 1, object(), {1: 2}, "\ud800", b"x"]:
        with pytest.raises(CanonicalJSONError):
            canonical_json(bad)


def test_roundtrip_and_canonical_check():
    obj = {"b": [1, 2.5, None, True, False], "a": {"z": "x", "y": []}}
    data = canonical_json(obj)
    assert parse_json_strict(data, max_bytes=1000, require_canonical=True) == obj
    with pytest.raises(CanonicalJSONError) as ei:
        parse_json_strict(b'{"b":1, "a":2}', max_bytes=1000, require_canonical=True)
    assert ei.value.reason_code == "E_JSON_NOT_CANONICAL"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b'{"a":1,"a":2}', "E_JSON_DUPLICATE_KEY"),
        (b"[NaN]", "E_JSON_NONFINITE"),
        (b"[Infinity]", "E_JSON_NONFINITE"),
        (b"[-Infinity]", "E_JSON_NONFINITE"),
        (b"[1e999]", "E_JSON_NONFINITE"),
        (b"[12345678901234567890123]", "E_JSON_NONFINITE"),
        (b"\xff\xfe", "E_JSON_NOT_UTF8"),
        (b"\xef\xbb\xbf{}", "E_JSON_NOT_UTF8"),
        (b'["\\udc00"]', "E_JSON_NOT_UTF8"),
        (b"[" * 40 + b"]" * 40, "E_JSON_TOO_DEEP"),
        (b"{", "E_JSON_MALFORMED"),
        (b"", "E_JSON_MALFORMED"),
        (b"[1,]", "E_JSON_MALFORMED"),
    ],
)
def test_strict_rejections(data, code):
    with pytest.raises(CanonicalJSONError) as ei:
        parse_json_strict(data, max_bytes=1000)
    assert ei.value.reason_code == code


def test_size_cap_checked_first():
    with pytest.raises(OversizeError) as ei:
        parse_json_strict(b"[" + b"1," * 100 + b"1]", max_bytes=10)
    assert ei.value.reason_code == "E_OVERSIZE"


def test_depth_scan_ignores_brackets_in_strings():
    data = b'["' + b"[" * 100 + b'"]'
    assert parse_json_strict(data, max_bytes=1000) == ["[" * 100]


def test_big_integral_floats_roundtrip():
    for x in [1e20, -2.0**60, 123456789012345678.0]:
        data = canonical_json(x)
        back = parse_json_strict(data, max_bytes=100, require_canonical=True)
        assert back == x and isinstance(back, float)
    with pytest.raises(CanonicalJSONError):
        parse_json_strict(b"123456789012345679", max_bytes=100, require_canonical=True)


@settings(max_examples=2_000, deadline=None)
@given(st.text())
def test_fast_string_path_matches_the_reference_encoder(s: str) -> None:
    from protocols import canonical

    try:
        slow = canonical._encode_string_slow(s)
    except CanonicalJSONError:
        with pytest.raises(CanonicalJSONError):
            canonical._encode_string(s)
        return
    assert canonical._encode_string(s) == slow


@settings(max_examples=3_000, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != 0))
def test_fast_float_path_matches_the_reference_encoder(x: float) -> None:
    from protocols import canonical

    assert canonical._encode_float(x) == canonical._encode_float_slow(x)


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=1_500, deadline=None)
@given(_JSON_VALUES)
def test_canonical_check_agrees_with_re_encoding(value) -> None:
    """parse_json_strict(require_canonical=True) accepts a text exactly when canonical_json of
    what it reads gives the same bytes: for the canonical form and for the standard library's
    encodings (Python float forms such as 1.0 or 1e-05, escaped non-ASCII)."""
    import json

    texts = {
        canonical_json(value),
        json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(),
        json.dumps(value, sort_keys=True, separators=(",", ":")).encode(),
    }
    for text in texts:
        read = parse_json_strict(text, max_bytes=1 << 20)  # the strict number rules
        expected = canonical_json(read) == text
        try:
            parse_json_strict(text, max_bytes=1 << 20, require_canonical=True)
            accepted = True
        except CanonicalJSONError as exc:
            assert exc.reason_code == "E_JSON_NOT_CANONICAL", exc
            accepted = False
        assert accepted == expected, text


@settings(max_examples=500, deadline=None)
@given(_JSON_VALUES, st.integers(1, 6))
def test_depth_of_a_parsed_value_is_its_bracket_depth(value, max_depth) -> None:
    """The walk over a parsed value (small documents) and the text scan (large ones) agree."""
    from protocols import canonical

    text = canonical_json(value).decode()
    try:
        canonical._check_depth(text, max_depth)
        scanned_too_deep = False
    except CanonicalJSONError:
        scanned_too_deep = True
    walked = isinstance(value, dict | list) and canonical._value_depth_exceeds(value, max_depth)
    assert walked == scanned_too_deep
