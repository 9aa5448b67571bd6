"""The auditor's torch-free replay of a ``federated_labels`` entry (ADR 0049) on a real
coordinator state: the labelled bundle is the served model, and a flipped byte in the stored
label knowledge is caught at that entry."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coordinator.admin import _open, publish_federated_labels, publish_federated_round
from protocols._audit_sources import StateDirSource
from protocols.audit import AUDIT_EXIT_CODES, load_trust_file, run_audit
from protocols.bundle import make_bundle
from tests.coordinator.conftest import (
    fetch_base,
    make_consortium,
    make_site_update,
    running_server,
)
from tests.protocols._label_factories import labels_manifest


def _published(tmp_path: Path):
    cons = make_consortium(tmp_path, sites=("site-a",))
    with _open(cons.state) as reg:
        size, digest = reg.state.size, reg.state.digest
        current = reg.state.bundle()
    manifest = {k: v for k, v in current.manifest.items() if k != "digest"}
    manifest["labels"] = {}
    agg = make_bundle(manifest, {k: np.asarray(v) * 1.5 for k, v in current.tensors.items()})
    publish_federated_round(
        cons.state, aggregate=agg, round_number=1, base_size=size, base_digest=digest,
        contributors=[("site-a", "sha256:" + "cd" * 32)],
    )  # fmt: skip
    labelled_manifest = dict(manifest, labels=labels_manifest(n_latent=4))
    extra = {"labels.expression.components": np.ones((2, 50), dtype=np.float32)}
    labelled_manifest["tensors"] = {
        **manifest["tensors"],
        "labels.expression.components": {"role": "frozen", "dtype": "float32", "shape": [2, 50]},
    }
    labelled = make_bundle(labelled_manifest, {**agg.tensors, **extra})
    entry = publish_federated_labels(
        cons.state, labelled=labelled, tensor_names=list(extra), round_number=1,
        labels_record="sha256:" + "ab" * 32,
    )  # fmt: skip
    with _open(cons.state) as reg:  # the coordinator materialises what it serves
        served = reg.references.materialize(reg.store.size)
    assert served.digest == labelled.digest
    return cons, labelled, entry


def _audit(cons, state: Path):
    src = StateDirSource(cons.state)
    try:
        return run_audit(src, load_trust_file(cons.trust_path), state_dir=state)
    finally:
        src.close()


def test_audit_replays_the_federated_labels_and_the_served_labelled_bundle(tmp_path: Path):
    cons, labelled, entry = _published(tmp_path)
    res = _audit(cons, tmp_path / "aud")
    assert res.ok, res.findings
    assert res.kind_counts["federated_labels"] == 1
    assert res.served_digest == res.replay_digest == labelled.digest
    (row,) = [e for e in res.entries if e.kind == "federated_labels"]
    assert row.index == entry.index and row.detail["labelled_digest"] == labelled.digest
    # a site's surgery on the labelled reference: the coordinator serves the extension, with
    # the federated label knowledge kept, and the audit replays it
    with running_server(cons.state) as server, server.client(cons) as client:
        base = fetch_base(client, cons)
        assert base[2].digest == labelled.digest  # what a site maps on
        update = make_site_update(cons.sites["site-a"], base)
        client.submit_update(update.envelope, update.diff_bytes).raise_for_rejection()
        size, _root, extended = fetch_base(client, cons)
    assert extended.digest != labelled.digest
    assert extended.manifest["labels"] == labelled.manifest["labels"]
    with _open(cons.state) as reg:
        served = reg.references.materialize(size)
        assert served.digest == reg.state.digest == extended.digest
    res = _audit(cons, tmp_path / "aud")
    assert res.ok, res.findings
    assert res.served_digest == served.digest


def test_a_flipped_byte_in_the_label_blob_is_caught(tmp_path: Path):
    cons, _labelled, entry = _published(tmp_path)
    with _open(cons.state) as reg:
        path = reg.blobs.path(next(b.sha256 for b in entry.blobs if b.role == "labels"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    res = _audit(cons, tmp_path / "aud")
    first = res.first_failure
    assert first is not None and first.entry_index == entry.index, res.findings
    assert first.failure_class == "BLOB"
    assert res.exit_code == AUDIT_EXIT_CODES["BLOB"].code
