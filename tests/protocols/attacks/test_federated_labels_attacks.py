"""Attacks on the ``federated_labels`` entry (ADR 0049): a labels entry replayed onto another
base (a later round, after a site update, a second time for one round), signed by a site
instead of the operator, claiming a labelled digest its blobs do not give, with a flipped blob
byte, or with blobs over the size limits. Each is refused with its reason code and leaves the
ledger unchanged."""

from __future__ import annotations

import hashlib
import json

import pytest

from protocols.canonical import canonical_json
from protocols.dsse import sign_envelope
from protocols.errors import LedgerError
from protocols.ledger import FEDERATED_LABELS_TYPE, entry_blobs, entry_payload
from protocols.limits import Limits
from tests.protocols.test_federated_labels_entry import (
    federated_round,
    labels_entry,
    published,
    round_to_label,
)


def _refused(c, envelope: bytes, blobs: dict, code: str) -> None:
    size, root = c.state.size, c.state.root()
    with pytest.raises(LedgerError) as ei:
        c.append(envelope, blobs)
    assert ei.value.reason_code == code, ei.value
    assert (c.state.size, c.state.root()) == (size, root)


def test_labels_entry_replayed_onto_a_later_round_is_refused():
    c, _labelled, entry = published()
    federated_round(c, round_number=2, scale=3.0)
    _refused(c, entry.envelope, entry.blobs, "E_FEDERATED_LABELS")


def test_labels_entry_replayed_after_a_site_update_is_refused():
    c, labelled, names = round_to_label()
    entry = labels_entry(c, labelled, names)
    c.submit(c.update("site-a", sequence=1))
    _refused(c, entry.envelope, entry.blobs, "E_FEDERATED_LABELS")
    # re-signed on the current head (not a round's version): refused as well
    moved = labels_entry(c, labelled, names)
    _refused(c, moved.envelope, moved.blobs, "E_FEDERATED_LABELS")


def test_a_second_labels_entry_for_one_round_is_refused():
    c, labelled, entry = published()
    names = ["labels.expression.components"]
    again = labels_entry(c, labelled, names)  # on the labelled head: no round precedes it
    _refused(c, again.envelope, again.blobs, "E_FEDERATED_LABELS")
    _refused(c, entry.envelope, entry.blobs, "E_FEDERATED_LABELS")


def test_labels_entry_names_the_last_round():
    c, labelled, names = round_to_label()
    entry = labels_entry(c, labelled, names, round_number=2)
    _refused(c, entry.envelope, entry.blobs, "E_FEDERATED_LABELS")


def test_labels_signed_by_a_site_key_are_refused():
    c, labelled, names = round_to_label()
    entry = labels_entry(c, labelled, names, keys=[c.site_keys["site-a"]])
    with pytest.raises(LedgerError) as ei:
        c.append(entry.envelope, entry.blobs)
    assert ei.value.reason_code.startswith("E_SIG")


def _resigned(c, entry, **changes) -> bytes:
    _kind, obj = entry_payload(entry.envelope)
    obj.update(changes)
    return sign_envelope(FEDERATED_LABELS_TYPE, canonical_json(obj), [c.operator])


def test_a_labelled_digest_the_blobs_do_not_give_is_refused():
    c, labelled, names = round_to_label()
    entry = labels_entry(c, labelled, names)
    forged = _resigned(c, entry, digest="sha256:" + "0" * 64)
    _refused(c, forged, entry.blobs, "E_DIGEST_MISMATCH")


def test_a_flipped_blob_byte_is_refused():
    c, labelled, names = round_to_label()
    entry = labels_entry(c, labelled, names)
    for ref in entry_blobs(entry.envelope):
        blobs = dict(entry.blobs)
        data = bytearray(blobs[ref.sha256])
        data[len(data) // 2] ^= 0x01
        blobs[ref.sha256] = bytes(data)
        _refused(c, entry.envelope, blobs, "E_BLOB_MISMATCH")
    # the same flip, re-named and re-signed by the operator: the content is checked too
    (jref, _tref) = entry_blobs(entry.envelope)
    obj = json.loads(entry.blobs[jref.sha256])
    obj["labels"]["levels"]["cell_type"]["prototype"]["classes"] = ["alpha", "gamma"]
    data = canonical_json(obj)
    h = hashlib.sha256(data).hexdigest()
    _kind, payload = entry_payload(entry.envelope)
    labels = {**payload["labels"], "json": {"sha256": h, "size": len(data)}}
    forged = _resigned(c, entry, labels=labels)
    _refused(c, forged, {**entry.blobs, h: data}, "E_DIGEST_MISMATCH")


def test_blobs_over_the_limits_are_refused_before_they_are_read():
    c, labelled, names = round_to_label()
    entry = labels_entry(c, labelled, names)
    c.state.limits = Limits(max_manifest_bytes=64)
    _refused(c, entry.envelope, {}, "E_OVERSIZE")  # no blob given: it was never looked up
