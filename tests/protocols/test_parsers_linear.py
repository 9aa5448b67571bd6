"""Attack: one crafted input of the largest size a parser accepts stalls the verifier.

The strict JSON front end of every parser used to run a depth pre-scan that was quadratic on
escaped quotes (64 KiB took 22 s before any signature check). Each strict parser gets every
crafted family (``tests/protocols/_crafted.py``) at its maximum allowed size and must answer, with
a value or a typed error, well inside a generous bound that only a return to super-linear time
can break (figures: ``benchmarks/bench_parsers.py``).

The bound is on this process's CPU time (``time.process_time``), not wall time: on the shared
2-core machine at load 30 a linear parse of 16 MiB took 2.13 s of wall time while its CPU time
stayed well under the bound; a quadratic scan costs minutes of CPU whatever the load.
"""

from __future__ import annotations

import time

import pytest

from protocols.errors import ScarchesFLError
from tests.protocols._crafted import FAMILIES, crafted_json, parsers

#: Generous CPU seconds per started 2 MiB of input (the manifest may be 16 MiB, and parsing 16 MiB
#: of valid JSON objects is itself about 1 s of CPU here); a quadratic scan takes minutes.
BOUND_S = 2.0
_PER_BYTES = 2 * 1024 * 1024


def _bound(n: int) -> float:
    return BOUND_S * max(1, -(-n // _PER_BYTES))


PARSERS = parsers()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_crafted_input_of_maximum_size_is_answered_in_linear_time(parser: str, family: str) -> None:
    call, cap = PARSERS[parser]
    data = crafted_json(family, cap())
    t0 = time.process_time()
    try:
        call(data)
    except ScarchesFLError:
        pass  # a typed rejection is the expected answer for most families
    elapsed = time.process_time() - t0
    assert elapsed < _bound(len(data)), (
        f"{parser} took {elapsed:.2f} s of CPU on {len(data)} bytes of {family}"
    )


def test_escaped_quotes_depth_scan_is_linear() -> None:
    """The exact input of the report, 1 MiB: the depth scan alone must not restart at every
    escaped quote (it used to: ~an hour at this size)."""
    from protocols.canonical import parse_json_strict
    from protocols.errors import CanonicalJSONError

    data = crafted_json("escaped_quotes", 1024 * 1024)
    t0 = time.process_time()
    with pytest.raises(CanonicalJSONError):
        parse_json_strict(data, max_bytes=len(data), max_depth=4)
    assert time.process_time() - t0 < BOUND_S


@pytest.mark.parametrize(
    "text, deep",
    [
        ('["\\"[[[[[[[[", 1', False),  # brackets inside a string with an escaped quote
        ('["\\\\",[[[[[[[[]]]]]]]]]', True),  # an escaped backslash ends the string
        ('["a",[[[[[[[[', True),  # invalid, but too deep before the first error
        ('["a"[[[[[[[[', False),  # the first error (a missing comma) comes first
        ('"unterminated [[[[[[[[', False),  # the parser fails at the string, never recurses
        ("[" * 9, True),
    ],
)
def test_depth_scan_reads_strings_as_the_json_lexer_does(text: str, deep: bool) -> None:
    """Depth is read as the JSON lexer reads it, up to the first error in reading order."""
    from protocols.canonical import parse_json_strict
    from protocols.errors import CanonicalJSONError

    with pytest.raises(CanonicalJSONError) as info:
        parse_json_strict(text.encode(), max_bytes=1024, max_depth=4)
    assert (info.value.reason_code == "E_JSON_TOO_DEEP") is deep
