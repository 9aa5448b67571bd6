"""Canonical JSON (an RFC 8785 / JCS subset) and a strict JSON parser.

Encoding rules of :func:`canonical_json` (see ``docs/adr/0001-canonical-encoding.md``):

* Values are ``null``, ``true``, ``false``, strings, integers, finite floats, arrays (lists or
  tuples) and objects (mappings with ``str`` keys). Anything else is a
  :class:`~protocols.errors.CanonicalJSONError`.
* Integers must lie in the I-JSON safe range ``-(2**53 - 1) .. 2**53 - 1`` so every JSON
  implementation reads them exactly. ``bool`` is not an integer here. NumPy scalars are
  accepted as the Python number they hold.
* Floats must be finite and are written as ECMAScript ``Number.prototype.toString`` writes them
  (RFC 8785 section 3.2.2.3): the shortest round-trip digits; ``1.0`` is written ``1`` and
  ``-0.0`` is written ``0``; exponent form only below ``1e-6`` or from ``1e21``.
* Strings are UTF-8, with only ``"``, ``\\`` and control characters U+0000..U+001F escaped
  (``\\b \\t \\n \\f \\r`` short forms, else ``\\u00xx`` lowercase). Lone surrogates are refused.
* Object members are sorted by the UTF-16 code units of their keys (RFC 8785 section 3.2.3);
  no insignificant whitespace anywhere.

Parsing rules of :func:`parse_json_strict` (no I/O; the length check comes first):

* ``len(data) <= max_bytes`` else :class:`~protocols.errors.OversizeError`.
* Strict UTF-8, no byte order mark, no lone surrogate escapes.
* Nesting at most ``max_depth`` objects/arrays, checked by a linear scan of what the parser read
  (everything, or the prefix up to its first error); the C parser itself refuses deeper nesting
  than the interpreter's recursion limit, so no input makes it recurse without bound.
* Every step is linear in the input (no backtracking regex, no repeated scans).
* No duplicate object keys, no ``NaN``/``Infinity``, no number outside the finite float range.
  Integer literals outside the I-JSON safe range are read as floats (JSON numbers are doubles),
  and literals longer than 22 characters are refused.
* With ``require_canonical=True`` the input must equal ``canonical_json`` of its value, byte
  for byte (used for everything that is signed).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import numpy as np

from protocols.errors import CanonicalJSONError, OversizeError
from protocols.limits import DEFAULT_LIMITS

__all__ = ["canonical_json", "parse_json_strict", "MAX_SAFE_INTEGER"]

MAX_SAFE_INTEGER = 2**53 - 1

_SHORT_ESCAPES = {
    0x08: "\\b",
    0x09: "\\t",
    0x0A: "\\n",
    0x0C: "\\f",
    0x0D: "\\r",
    0x22: '\\"',
    0x5C: "\\\\",
}


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_json_string = json.encoder.encode_basestring


def _encode_string(s: str) -> str:
    # Fast path: for text without lone surrogates, the standard library's (C) encoder writes
    # exactly the RFC 8785 form: short escapes for \b \t \n \f \r \" \\, lower-case \u00xx for
    # the other controls, everything else verbatim. tests/protocols/test_canonical.py checks the
    # two paths agree.
    if _LONE_SURROGATE.search(s) is None:
        return _json_string(s)
    return _encode_string_slow(s)


def _encode_string_slow(s: str) -> str:
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if cp in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[cp])
        elif cp < 0x20:
            out.append(f"\\u{cp:04x}")
        elif 0xD800 <= cp <= 0xDFFF:
            raise CanonicalJSONError(
                "string holds a lone surrogate; only valid Unicode text can be encoded",
                reason_code="E_JSON_NOT_UTF8",
            )
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _encode_float(x: float) -> str:
    if not math.isfinite(x):
        raise CanonicalJSONError(
            f"non-finite number {x!r}; only finite numbers can be encoded",
            reason_code="E_JSON_NONFINITE",
        )
    if x == 0:
        return "0"
    r = repr(x)
    if "e" not in r:
        # Fixed notation (1e-4 <= |x| < 1e16): repr's shortest round-trip digits, which are
        # ECMAScript's too; an integral value drops its ".0".
        return r[:-2] if r.endswith(".0") else r
    return _encode_float_slow(x)


def _encode_float_slow(x: float) -> str:
    """ECMAScript's Number::toString for a finite, non-zero ``x`` (RFC 8785 section 3.2.2.3)."""
    sign = "-" if x < 0 else ""
    # repr() gives the shortest digits that round-trip (same as ECMAScript's algorithm).
    tup = Decimal(repr(abs(x))).normalize().as_tuple()
    digits = "".join(str(d) for d in tup.digits)
    assert isinstance(tup.exponent, int)
    k = len(digits)
    n = tup.exponent + k  # value = 0.digits * 10**n
    if k <= n <= 21:
        body = digits + "0" * (n - k)
    elif 0 < n <= 21:
        body = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        body = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        esign = "+" if e >= 0 else "-"
        mant = digits if k == 1 else digits[0] + "." + digits[1:]
        body = f"{mant}e{esign}{abs(e)}"
    return sign + body


def _utf16_key(s: str) -> bytes:
    return s.encode("utf-16-be", "surrogatepass")


def _encode(obj: Any, out: list[str], depth: int, max_depth: int) -> None:
    if depth > max_depth:
        raise CanonicalJSONError(
            f"value nested deeper than {max_depth}", reason_code="E_JSON_TOO_DEEP"
        )
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, np.bool_):
        out.append("true" if bool(obj) else "false")
    elif isinstance(obj, int | np.integer):
        obj = int(obj)
        if not -MAX_SAFE_INTEGER <= obj <= MAX_SAFE_INTEGER:
            raise CanonicalJSONError(
                f"integer {obj} is outside the I-JSON safe range +-(2**53-1); encode it as a string",
                reason_code="E_JSON_NONFINITE",
            )
        out.append(str(int(obj)))
    elif isinstance(obj, float | np.floating):
        out.append(_encode_float(float(obj)))
    elif isinstance(obj, str):
        out.append(_encode_string(obj))
    elif isinstance(obj, Mapping):
        for key in obj:
            if not isinstance(key, str):
                raise CanonicalJSONError(
                    f"object key {key!r} is not a string; JSON object keys must be strings"
                )
        items = sorted(obj.items(), key=lambda kv: _utf16_key(kv[0]))
        out.append("{")
        for i, (key, value) in enumerate(items):
            if i:
                out.append(",")
            out.append(_encode_string(key))
            out.append(":")
            _encode(value, out, depth + 1, max_depth)
        out.append("}")
    elif isinstance(obj, list | tuple):
        if obj and depth < max_depth and all(type(v) is str for v in obj):
            # gene and condition lists: thousands of strings, encoded without recursion
            out.append("[" + ",".join(map(_encode_string, obj)) + "]")
            return
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            _encode(value, out, depth + 1, max_depth)
        out.append("]")
    else:
        raise CanonicalJSONError(
            f"cannot encode a {type(obj).__name__} as canonical JSON; convert it to "
            "str/int/float/bool/None/list/dict first"
        )


def canonical_json(obj: Any, *, max_depth: int = DEFAULT_LIMITS.max_json_depth) -> bytes:
    """The canonical JSON bytes of ``obj`` (rules in the module docstring)."""
    out: list[str] = []
    _encode(obj, out, 1, max_depth)
    return "".join(out).encode("utf-8")


# A JSON string literal (escapes included), or an unterminated one up to the end of the input;
# strings are removed before counting brackets. Possessive quantifiers and the optional closing
# quote mean a match never backtracks and never fails once it has seen the opening quote, so the
# scan moves left to right once: linear in the input. (The earlier pattern, which required the
# closing quote, restarted at every escaped quote of an unterminated string: quadratic, 22 s on
# 64 KiB of ``\\"``.) Where the input is valid JSON this is exactly the JSON lexer's view of
# strings; where it is not, the parser stops at the first error, and up to that point the two
# agree, so the depth checked here bounds the depth the parser reaches.
_STRING_RE = re.compile(r'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)


#: +1 for an opening bracket, -1 for a closing one, 0 for any other byte
_DEPTH_STEP = np.zeros(256, dtype=np.int8)
_DEPTH_STEP[[ord("["), ord("{")]] = 1
_DEPTH_STEP[[ord("]"), ord("}")]] = -1


def _check_depth(text: str, max_depth: int, what: str = "JSON") -> None:
    """Refuse nesting deeper than ``max_depth`` in linear time, at C speed (one left-to-right
    regex pass that cannot backtrack, then numpy), so that Python's recursive JSON parser never
    sees a nesting bomb."""
    if text.count("[") + text.count("{") <= max_depth:
        return
    skeleton = _STRING_RE.sub("", text).encode("utf-8", "surrogatepass")
    steps = _DEPTH_STEP[np.frombuffer(skeleton, dtype=np.uint8)]
    if steps.size and int(np.cumsum(steps, dtype=np.int32).max()) > max_depth:
        raise CanonicalJSONError(
            f"{what} is nested deeper than {max_depth}", reason_code="E_JSON_TOO_DEEP"
        )


#: Up to this many characters, the depth of a parsed value is read from the value itself (a walk
#: over its containers, cheaper than the scan for the small documents verified per entry).
_WALK_DEPTH_CHARS = 1 << 16


def _value_depth_exceeds(value: Any, max_depth: int) -> bool:
    """Whether a parsed value nests containers deeper than ``max_depth`` (the bracket depth of
    its text: a top-level object or array is depth 1)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > max_depth:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) == len(pairs):  # no duplicate key: the common case, at C speed
        return out
    out = {}
    for key, value in pairs:
        if key in out:
            raise CanonicalJSONError(
                f"duplicate key {key!r} in a JSON object; each key may appear once",
                reason_code="E_JSON_DUPLICATE_KEY",
            )
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise CanonicalJSONError(
        f"{name} is not allowed in JSON here; only finite numbers",
        reason_code="E_JSON_NONFINITE",
    )


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise CanonicalJSONError(
            f"number {text[:40]} is out of range", reason_code="E_JSON_NONFINITE"
        )
    return value


def _parse_int(text: str) -> int | float:
    # JSON numbers are IEEE doubles (RFC 8785). A float with an integral value of 1e21 or more is
    # written in exponent form, so an integer literal has at most 21 digits.
    if len(text) > 22:
        raise CanonicalJSONError(
            f"integer literal {text[:40]}... is too long", reason_code="E_JSON_NONFINITE"
        )
    value = int(text)
    if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        return value
    # Outside the I-JSON safe range an integer literal is a double (e.g. 1e20 is written
    # "100000000000000000000"); canonical re-encoding then tells whether it was exact.
    return float(value)


#: A lone surrogate can only come from a ``\\uD8xx``..``\\uDFxx`` escape (the text itself is valid
#: UTF-8); without one, the walk over every string of the value is skipped.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_strings(obj: Any) -> None:
    # Lone surrogates can arrive through \ud800 escapes; refuse them (they are not Unicode text).
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise CanonicalJSONError(
                    "JSON string holds a lone surrogate escape", reason_code="E_JSON_NOT_UTF8"
                ) from exc
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_json_strict(
    data: bytes,
    *,
    max_bytes: int,
    max_depth: int = DEFAULT_LIMITS.max_json_depth,
    require_canonical: bool = False,
    what: str = "JSON document",
    shape: Callable[[Any], None] | None = None,
) -> Any:
    """Parse ``data`` under the strict rules of the module docstring, or raise a typed error.

    ``what`` names the document in error messages (e.g. ``"manifest.json"``). ``shape``, when
    given, is called with the parsed value before the canonical re-encoding, so that a cheap
    structural check (e.g. an envelope's three keys) refuses a large wrong document before the
    costlier step; what it raises propagates unchanged.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CanonicalJSONError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise OversizeError(f"{what} is {len(data)} bytes, over the limit of {max_bytes}")
    raw = bytes(data)
    if raw.startswith(b"\xef\xbb\xbf"):
        raise CanonicalJSONError(
            f"{what} starts with a UTF-8 byte order mark; remove it", reason_code="E_JSON_NOT_UTF8"
        )
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise CanonicalJSONError(
            f"{what} is not valid UTF-8 (byte {exc.start}); re-encode it as UTF-8",
            reason_code="E_JSON_NOT_UTF8",
        ) from exc
    # The C parser runs first: it is linear, stops at the first error, and refuses a nesting bomb
    # at the interpreter's recursion limit (RecursionError). The depth rule is then checked on
    # what it read: the whole text when it parsed, the prefix up to the error when it did not
    # (so the first problem in reading order is the one reported, and a crafted input that
    # fails at byte 2 costs nothing more).
    # With require_canonical, every float literal is compared with its canonical form and with
    # Python's repr as it is read. When each is both, and the text is ASCII, the standard
    # library's (C) encoder with sorted keys writes exactly canonical_json's bytes (it writes
    # floats by repr; ASCII keys sort the same by code point and by UTF-16 unit; strings and
    # integers are written alike), so the re-encoding below runs at C speed. Otherwise
    # canonical_json itself decides.
    stdlib_encodes_canonically = True

    def parse_float_checked(literal: str) -> float:
        nonlocal stdlib_encodes_canonically
        value = _parse_float(literal)
        if stdlib_encodes_canonically and (
            literal != repr(value) or _encode_float(value) != literal
        ):
            stdlib_encodes_canonically = False
        return value

    def parse_int_checked(literal: str) -> int | float:
        nonlocal stdlib_encodes_canonically
        value = _parse_int(literal)
        if isinstance(value, float):  # outside the safe range: a double, written as JCS says
            stdlib_encodes_canonically = False
        return value

    try:
        value = json.loads(
            text,
            object_pairs_hook=_pairs_hook,
            parse_constant=_reject_constant,
            parse_float=parse_float_checked if require_canonical else _parse_float,
            parse_int=parse_int_checked if require_canonical else _parse_int,
        )
    except CanonicalJSONError as exc:
        raise type(exc)(f"{what}: {exc.message}", reason_code=exc.reason_code) from exc
    except json.JSONDecodeError as exc:
        _check_depth(text[: exc.pos + 1], max_depth, what)
        raise CanonicalJSONError(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except (ValueError, RecursionError) as exc:  # int digit limits, deep recursion
        _check_depth(text, max_depth, what)
        raise CanonicalJSONError(f"{what} is not acceptable JSON: {exc}") from exc
    if len(text) > _WALK_DEPTH_CHARS:
        _check_depth(text, max_depth, what)
    elif isinstance(value, dict | list) and _value_depth_exceeds(value, max_depth):
        raise CanonicalJSONError(
            f"{what} is nested deeper than {max_depth}", reason_code="E_JSON_TOO_DEEP"
        )
    if _SURROGATE_ESCAPE.search(text) is not None:
        _check_strings(value)
    if shape is not None:
        shape(value)
    if require_canonical:
        try:
            if stdlib_encodes_canonically and raw.isascii():
                again = json.dumps(
                    value, ensure_ascii=False, separators=(",", ":"), sort_keys=True,
                    allow_nan=False,
                ).encode("utf-8")
            else:
                again = canonical_json(value, max_depth=max_depth)
        except CanonicalJSONError as exc:
            raise CanonicalJSONError(f"{what}: {exc.message}", reason_code=exc.reason_code) from exc
        if again != raw:
            raise CanonicalJSONError(
                f"{what} is not in canonical form (sorted keys, no whitespace, RFC 8785 "
                "numbers); re-encode it with protocols.canonical.canonical_json",
                reason_code="E_JSON_NOT_CANONICAL",
            )
    return value
