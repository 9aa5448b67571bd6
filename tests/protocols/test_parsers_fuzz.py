"""Property tests: random and mutated bytes into every strict parser. The only acceptable
outcomes are a value or a typed :class:`protocols.errors.ScarchesFLError`; never another
exception, never a hang. 10,000 examples per parser (the issue's bar), kept fast by tiny seeds.

Set ``SCARCHES_FL_FUZZ_EXAMPLES`` to run more (or fewer) examples locally.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.errors import ScarchesFLError
from tests.protocols._crafted import mutate
from tests.protocols._factories import consortium, det_key, tiny_bundle, tiny_diff

EXAMPLES = int(os.environ.get("SCARCHES_FL_FUZZ_EXAMPLES", "10000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


# -- seeds: one valid input per parser, built once ---------------------------------------------

def _seeds() -> dict[str, bytes]:
    from protocols.bundle import bundle_to_bytes
    from protocols.canonical import canonical_json
    from protocols.checkpoint import Checkpoint, sign_checkpoint
    from protocols.ledger import enrol_entry, make_receipt

    c = consortium(n_genes=2, n_cond=1, hidden=2)
    c.enrol("site-a", det_key(10))
    u = c.update("site-a")
    applied = c.submit(u)
    note = sign_checkpoint(Checkpoint(c.trust.origin, c.state.size, c.state.root()), c.log_signer)
    b = tiny_bundle(n_genes=2, n_cond=1, hidden=2)
    mbytes, sbytes = bundle_to_bytes(b)
    return {
        "json": canonical_json({"a": [1, 2.5, None, True], "b": {"c": "d\u00e9"}}),
        "envelope": u.envelope,
        "payload": u.payload.to_bytes(),
        "diff": u.diff_bytes,
        "trust": c.trust.to_json(),
        "policy_entry": enrol_entry(origin=c.trust.origin, site_id="site-b",
                                    public_key=det_key(11).public_key(), operator_keys=[c.operator]),
        "receipt": make_receipt(c.state.tree, applied.index, note, c.state.size).to_json(),
        "manifest": mbytes,
        "model": sbytes,
        "_consortium": c,  # type: ignore[dict-item]
    }


SEEDS = _seeds()


def mutated(seed_name: str):
    return st.integers(0, 2**64 - 1).map(lambda n: mutate(SEEDS[seed_name], n))


def _only_typed(name: str, fn, data) -> None:
    try:
        fn(data)
    except ScarchesFLError:
        pass
    except Exception as exc:  # an untyped exception is the bug this test exists to find
        raise AssertionError(f"parser {name!r} raised untyped {type(exc).__name__}: {exc!r} "
                             f"on input {data!r:.300}") from exc


def _canonical_roundtrip(data: bytes) -> None:
    from protocols.canonical import canonical_json, parse_json_strict

    value = parse_json_strict(data, max_bytes=4096, max_depth=8)
    # whatever parses re-encodes and re-parses to the same value
    assert parse_json_strict(canonical_json(value), max_bytes=1 << 20, require_canonical=True) == value


def _parsers():
    from protocols.bundle import bundle_from_bytes, parse_safetensors_header
    from protocols.canonical import canonical_json
    from protocols.diff import diff_from_bytes
    from protocols.dsse import parse_envelope, sign_envelope, verify_envelope
    from protocols.ledger import entry_blobs, entry_payload, parse_receipt
    from protocols.policy import parse_trust
    from protocols.update import SITE_UPDATE_TYPE, parse_update_payload, validate_update

    c = SEEDS["_consortium"]
    ctx = c.state.update_context()
    key = det_key(10).public_key()
    diff = SEEDS["diff"]
    envelope = SEEDS["envelope"]

    def ledger_entry(d: bytes) -> None:
        size = c.state.size
        for fn in (entry_payload, entry_blobs, lambda x: c.state.check(x, c.lookup)):
            try:
                fn(d)
            except ScarchesFLError:
                pass
        assert c.state.size == size

    site_key = c.site_keys["site-a"]
    payload_obj = json.loads(SEEDS["payload"])

    def resigned_payload(d: bytes) -> None:
        """A validly signed envelope around mutated payload bytes: reaches the payload parser
        and every later rule."""
        validate_update(sign_envelope(SITE_UPDATE_TYPE, d, [site_key]), diff, ctx)

    def resigned_diff(d: bytes) -> None:
        """A validly signed payload naming the mutated diff's sha256 and size: reaches the
        strict diff reader and the tensor rules."""
        p = {**payload_obj, "diff": {**payload_obj["diff"], "sha256": hashlib.sha256(d).hexdigest(),
                                     "size": len(d)}}
        validate_update(sign_envelope(SITE_UPDATE_TYPE, canonical_json(p), [site_key]), d, ctx)

    return [
        ("canonical_json", "json", _canonical_roundtrip),
        ("dsse.parse_envelope", "envelope", parse_envelope),
        ("dsse.verify_envelope", "envelope",
         lambda d: verify_envelope(d, trusted_keys=[key], threshold=1, payload_type=None)),
        ("safetensors header", "diff", parse_safetensors_header),
        ("diff_from_bytes", "diff", lambda d: diff_from_bytes(d, max_bytes=1 << 16)),
        ("update payload", "payload", parse_update_payload),
        ("validate_update(envelope)", "envelope", lambda d: validate_update(d, diff, ctx)),
        ("validate_update(diff)", "diff", lambda d: validate_update(envelope, d, ctx)),
        ("validate_update(re-signed payload)", "payload", resigned_payload),
        ("validate_update(re-signed diff)", "diff", resigned_diff),
        ("trust.json", "trust", parse_trust),
        ("ledger entry", "policy_entry", ledger_entry),
        ("ledger entry (site update)", "envelope", ledger_entry),
        ("receipt", "receipt", parse_receipt),
        ("bundle manifest", "manifest", lambda d: bundle_from_bytes(d, SEEDS["model"])),
        ("bundle model", "model", lambda d: bundle_from_bytes(SEEDS["manifest"], d)),
    ]


PARSERS = _parsers()


@pytest.mark.slow
@FUZZ
@given(st.integers(0, 2**64 - 1))
def test_fuzz_every_parser(n):
    """Each example feeds every parser its own mutation of its seed: 10,000 inputs per parser
    while paying Hypothesis' per-example overhead once."""
    for i, (name, seed, fn) in enumerate(PARSERS):
        _only_typed(name, fn, mutate(SEEDS[seed], n * 64 + i))


@settings(FUZZ, max_examples=min(EXAMPLES, 2000))
@given(st.text(max_size=80) | st.builds(lambda b: "ed25519:" + b, st.text(max_size=60)))
def test_fuzz_public_key_text(text):
    from protocols.keys import public_key_from_text

    _only_typed("public_key_from_text", public_key_from_text, text)


@settings(FUZZ, max_examples=min(EXAMPLES, 1000))
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    """Unstructured bytes (Hypothesis' own generator and shrinker) into every parser."""
    for name, _seed, fn in PARSERS:
        _only_typed(name, fn, data)


def test_seeds_are_valid():
    """The fuzzers start from inputs that parse (so mutations explore near valid ones)."""
    from protocols.bundle import bundle_from_bytes
    from protocols.dsse import parse_envelope
    from protocols.ledger import parse_receipt
    from protocols.policy import parse_trust
    from protocols.update import parse_update_payload

    parse_envelope(SEEDS["envelope"])
    parse_update_payload(SEEDS["payload"])
    parse_trust(SEEDS["trust"])
    parse_receipt(SEEDS["receipt"])
    bundle_from_bytes(SEEDS["manifest"], SEEDS["model"])
    assert tiny_diff(tiny_bundle())


pytestmark = pytest.mark.timeout(300)
