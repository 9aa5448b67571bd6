"""End to end with a real coordinator on loopback (TLS): two sites map panc8 query studies on the
same base, both are accepted with receipts that verify, a third site then pulls a reference that
holds both; the outbox shows byte for byte what was sent."""

from __future__ import annotations

import hashlib
import json
import threading

import anndata as ad
import numpy as np
from site_helpers import BarrierClient, run_cli

from site_agent.agent import connect, run_map
from site_agent.config import SiteConfig
from site_agent.outbox import Outbox
from site_agent.state import SiteState


def _config(consortium, site, panc8, tmp_path, batch, **kw):
    key, state = consortium.site_dirs(site)
    base = dict(
        coordinator=consortium.address, trust=consortium.trust, key=key, site_id=site,
        state=state, data=panc8, batch_key="batch", label_key="cell_type",
        batches=(batch,), out=tmp_path / f"{site}.h5ad", max_epochs=3,
    )
    base.update(kw)
    return SiteConfig(**base)


def _verify_receipt_independently(entry, trust_path):
    """Re-check a stored receipt from the outbox files alone (no agent code)."""
    from protocols.checkpoint import verify_checkpoint
    from protocols.merkle import leaf_hash, verify_inclusion
    from protocols.policy import read_trust

    trust = read_trust(trust_path)
    rec = entry.receipt()
    note = (entry.path / "receipt.note").read_bytes()
    cp = verify_checkpoint(note, origin=trust.origin, log_verifier=trust.log_public_key)
    verify_inclusion(leaf_hash(entry.envelope_bytes), rec["leaf_index"], cp.size,
                     [bytes.fromhex(h) for h in rec["inclusion_proof"]], cp.root_hash)
    return rec


def test_two_sites_same_base_then_a_third_pulls_both(consortium, panc8, tmp_path, capsys):
    barrier = threading.Barrier(2)

    def factory(config, trust):
        return BarrierClient(connect(config, trust), barrier)

    reports: dict[str, object] = {}
    errors: list[BaseException] = []

    def run(site, batch):
        try:
            cfg = _config(consortium, site, panc8, tmp_path, batch)
            reports[site] = run_map(cfg, printer=None, client_factory=factory)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=("site-a", "celseq2")),
               threading.Thread(target=run, args=("site-b", "smartseq2"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    ra, rb = reports["site-a"], reports["site-b"]
    # the same base, both accepted, both receipts verified by the agent and again here
    assert ra.verified.tree_size == rb.verified.tree_size
    assert ra.verified.digest == rb.verified.digest
    assert ra.delivered and rb.delivered
    assert {ra.receipt["leaf_index"], rb.receipt["leaf_index"]} == {
        ra.verified.tree_size, ra.verified.tree_size + 1}
    for site, rep in (("site-a", ra), ("site-b", rb)):
        assert rep.entry.state == "delivered"
        _verify_receipt_independently(rep.entry, consortium.trust)
        out = ad.read_h5ad(rep.out_path)
        assert out.obsm["X_scarches"].shape == (140, 8)
        assert "cell_type_pred" in out.obs and "cell_type_uncertainty" in out.obs
        u = out.obs["cell_type_uncertainty"].to_numpy()
        assert np.all((u >= 0) & (u <= 1))
        meta = out.uns["scarches_fl"]
        assert int(meta["tree_size"]) == rep.verified.tree_size
        assert meta["reference_digest"] == rep.verified.digest
        assert meta["checkpoint_root"] == rep.verified.root_hex
        assert list(meta["new_conditions"]) == [f"{site}/{rep.new_conditions[0].split('/')[1]}"]

    # the outbox shows byte for byte what was sent: the logged envelope and the stored diff blob
    with consortium.client() as client:
        for rep in (ra, rb):
            entry = rep.entry
            logged = client.get_entries(entry.receipt()["leaf_index"],
                                        entry.receipt()["leaf_index"] + 1)[0]
            assert logged.envelope == entry.envelope_bytes
            diff_ref = [b for b in logged.blobs if b.role == "diff"][0]
            assert client.get_blob(diff_ref.sha256) == entry.diff_bytes
            assert diff_ref.sha256 == "sha256:" + hashlib.sha256(entry.diff_bytes).hexdigest()
            payload = json.loads(entry.payload_bytes)
            assert payload["sequence"] == 1 and payload["base"]["size"] == rep.verified.tree_size

    # a third site, with the CLI, pulls a reference that contains both contributions
    key, state = consortium.site_dirs("site-c")
    out = tmp_path / "site-c.h5ad"
    proc = run_cli("site", "map", "--coordinator", consortium.address, "--trust",
                   str(consortium.trust), "--key", str(key), "--site-id", "site-c", "--state",
                   str(state), "--data", str(panc8), "--batch-key", "batch", "--label-key",
                   "cell_type", "--batches", "celseq2", "--out", str(out), "--max-epochs", "2")
    assert "privacy guard passed" in proc.stdout and "delivered" in proc.stdout
    meta = ad.read_h5ad(out).uns["scarches_fl"]
    size = int(meta["tree_size"])
    assert size >= ra.verified.tree_size + 2
    with consortium.client() as client:
        from protocols.bundle import bundle_from_bytes

        ref = client.get_reference(size)
        bundle = bundle_from_bytes(ref.manifest_bytes, ref.safetensors_bytes)
        assert bundle.digest == meta["reference_digest"]
        assert "site-a/celseq2" in bundle.conditions and "site-b/smartseq2" in bundle.conditions

    # status and outbox commands
    from scarches_fl_cli.main import main

    capsys.readouterr()
    assert main(["site", "status", "--state", str(state)]) == 0
    text = capsys.readouterr().out
    assert "last verified checkpoint: tree size" in text and "contributions accepted: 1" in text
    assert main(["site", "outbox", "--state", str(state)]) == 0
    assert "update-000001" in capsys.readouterr().out
    assert main(["site", "outbox", "--state", str(state), "show", "1"]) == 0
    shown = capsys.readouterr().out
    assert "diff.safetensors" in shown and "receipt: log index" in shown
    assert SiteState(state).last_sequence() == 1
    assert len(Outbox(SiteState(state).outbox_path).entries()) == 1

    # mapping a study that is already in the reference embeds it and contributes nothing
    again = run_map(_config(consortium, "site-c", panc8, tmp_path, "celseq2",
                            out=tmp_path / "again.h5ad", max_epochs=1), printer=None)
    assert again.new_conditions == [] and again.entry is None and not again.delivered
    assert any("already in the reference" in n for n in again.notes)
    assert ad.read_h5ad(tmp_path / "again.h5ad").obsm["X_scarches"].shape == (140, 8)
    assert len(Outbox(SiteState(state).outbox_path).entries()) == 1
