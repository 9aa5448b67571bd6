"""The ``federated_labels`` entry (ADR 0049): a federated run's label knowledge, published right
after its final round, becomes the served reference's label knowledge; later label
contributions add to it; the replay, a snapshot restore and the rule set agree."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.bundle import make_bundle
from protocols.errors import LedgerError, UpdateRejectedError
from protocols.ledger import (
    apply_federated_labels,
    capture_snapshot,
    entry_blobs,
    make_federated_labels,
    make_federated_round,
    replay,
    restore_state,
)
from tests.protocols._factories import ORIGIN, Consortium, consortium, det_key
from tests.protocols._label_factories import contribution, labels_manifest

RECORD = "sha256:" + "ab" * 32


def federated_round(c: Consortium, round_number: int = 1, scale: float = 2.0):
    """Append a round whose aggregate is the current model with its frozen tensors scaled."""
    b = c.state.bundle()
    manifest = {k: v for k, v in b.manifest.items() if k != "digest"}
    tensors = {
        k: np.asarray(v) * (scale if manifest["tensors"][k]["role"] == "frozen" else 1)
        for k, v in b.tensors.items()
    }
    agg = make_bundle(manifest, tensors)
    r = make_federated_round(
        agg,
        origin=ORIGIN,
        round_number=round_number,
        base_size=c.state.size,
        base_digest=b.digest,
        contributors=[("site-a", "sha256:" + "cd" * 32)],
        operator_keys=[c.operator],
    )
    c.append(r.envelope, r.blobs)
    return agg


def labelled_of(agg, *, seed: int = 0):
    """The run's bundle: the aggregate plus label knowledge and one expression tensor."""
    rng = np.random.default_rng(seed)
    manifest = {k: v for k, v in agg.manifest.items() if k != "digest"}
    extra = {"labels.expression.components": rng.normal(size=(2, 4)).astype(np.float32)}
    manifest["labels"] = labels_manifest()
    manifest["tensors"] = {
        **manifest["tensors"],
        "labels.expression.components": {"role": "frozen", "dtype": "float32", "shape": [2, 4]},
    }
    return make_bundle(manifest, {**agg.tensors, **extra}), list(extra)


def labels_entry(c: Consortium, labelled, names, *, size=None, round_number=1, keys=None):
    size = c.state.size if size is None else size
    return make_federated_labels(
        labelled,
        tensor_names=names,
        origin=ORIGIN,
        round_number=round_number,
        base_size=size,
        base_digest=c.state.digest_at(size),
        labels_record=RECORD,
        operator_keys=keys or [c.operator],
    )


def round_to_label() -> tuple[Consortium, object, list[str]]:
    """A consortium whose head is one federated round, with that round's labelled bundle and
    the names of its label tensors (the entry is not made)."""
    c = consortium()
    c.enrol("site-a", det_key(10))
    labelled, names = labelled_of(federated_round(c))
    return c, labelled, names


def published() -> tuple[Consortium, object, object]:
    c, labelled, names = round_to_label()
    entry = labels_entry(c, labelled, names)
    applied = c.append(entry.envelope, entry.blobs)
    assert applied.kind == "federated_labels"
    return c, labelled, entry


def test_the_labels_become_the_served_reference_and_contributions_add_to_them():
    c, labelled, entry = published()
    assert c.state.digest == labelled.digest
    assert c.state.bundle().manifest["labels"] == labelled.manifest["labels"]
    assert c.state.label_knowledge()["levels"]["cell_type"]["prototype"]["classes"] == [
        "alpha", "beta",
    ]  # fmt: skip
    assert [b.role for b in entry_blobs(entry.envelope)] == ["labels", "label_tensors"]
    # a site's later contribution adds to the federated knowledge as to a genesis's
    applied = c.append(contribution(c))
    classes = c.state.label_knowledge()["levels"]["cell_type"]["prototype"]["classes"]
    assert classes == ["alpha", "beta", "site-a:delta"]
    assert c.state.label_knowledge(size=applied.index)["levels"]["cell_type"]["prototype"][
        "classes"
    ] == ["alpha", "beta"]
    # surgery extends the labelled version; the replay and a snapshot agree
    c.submit(c.update("site-a", sequence=2))
    again = replay(c.trust, c.entries, c.lookup)
    assert again.digest == c.state.digest and again.label_knowledge() == c.state.label_knowledge()
    meta, tensors = capture_snapshot(c.state).encode()
    leaves = [c.state.tree.leaf_hash(i) for i in range(c.state.size)]
    restored = restore_state(c.trust, meta, tensors, leaves)
    assert restored.label_knowledge() == c.state.label_knowledge()


def test_an_update_on_the_bare_aggregate_is_stale_after_the_labels():
    c = consortium()
    c.enrol("site-a", det_key(10))
    agg = federated_round(c)
    stale = c.update("site-a", sequence=1)  # base: the round's aggregate
    labelled, names = labelled_of(agg)
    entry = labels_entry(c, labelled, names)
    c.append(entry.envelope, entry.blobs)
    with pytest.raises(UpdateRejectedError) as ei:
        c.submit(stale)
    assert ei.value.reason_code == "E_BASE_STALE"


def test_labels_that_do_not_fit_the_aggregate_are_refused():
    c = consortium()
    c.enrol("site-a", det_key(10))
    agg = federated_round(c)
    labelled, names = labelled_of(agg)
    entry = labels_entry(c, labelled, names)
    jbytes, tbytes = (entry.blobs[r.sha256] for r in entry_blobs(entry.envelope))
    with pytest.raises(LedgerError) as ei:  # onto an aggregate that has labels already
        apply_federated_labels(labelled, jbytes, tbytes)
    assert ei.value.reason_code == "E_FEDERATED_LABELS"
    # a tensor that would replace one of the aggregate's
    clash = {k: v for k, v in labelled.manifest.items() if k != "digest"}
    clash["tensors"] = dict(agg.manifest["tensors"])
    clash["labels"] = labels_manifest()
    bad = make_bundle(clash, dict(agg.tensors))
    entry = labels_entry(c, bad, ["decoder.bias"])
    with pytest.raises(LedgerError) as ei:
        c.append(entry.envelope, entry.blobs)
    assert ei.value.reason_code == "E_FEDERATED_LABELS"
    # no label level: nothing to publish
    empty = {k: v for k, v in agg.manifest.items() if k != "digest"}
    entry = labels_entry(c, make_bundle(empty, dict(agg.tensors)), [])
    with pytest.raises(LedgerError) as ei:
        c.append(entry.envelope, entry.blobs)
    assert ei.value.reason_code == "E_FEDERATED_LABELS"
    # still accepted once, as built
    good = labels_entry(c, labelled, names)
    c.append(good.envelope, good.blobs)
    assert c.state.digest == labelled.digest
