"""A malicious coordinator (a gRPC double that forwards to the real coordinator and tampers):
rolled-back checkpoint, forked checkpoint (same size, and larger without a valid consistency
proof), a reference whose bytes do not match its digest, a checkpoint signed by another key.
The site refuses each, says which, maps nothing and sends nothing. Then: the coordinator goes
away mid-submit, and the retry delivers the update exactly once."""

from __future__ import annotations

import dataclasses

import pytest

from site_agent.agent import DeliveryError, retry_pending, run_map
from site_agent.config import SiteConfig
from site_agent.outbox import Outbox
from site_agent.state import SiteState
from site_agent.verify import SiteTrustError


def _cfg(consortium, evil, site, panc8, tmp_path, batch="celseq2"):
    key, state = consortium.site_dirs(site)
    return SiteConfig(
        coordinator=evil.address, insecure=True, trust=consortium.trust, key=key, site_id=site,
        state=state, data=panc8, batch_key="batch", label_key="cell_type", batches=(batch,),
        out=tmp_path / f"{site}-{batch}.h5ad", max_epochs=2,
    )


@pytest.fixture(scope="module")
def seen_site(consortium, evil, panc8, tmp_path_factory):
    """site-m, having verified the honest log once (a dry run through the double)."""
    cfg = _cfg(consortium, evil, "site-m", panc8, tmp_path_factory.mktemp("site-m"))
    evil.tamper.mode = "pass"
    run_map(cfg, dry_run=True, printer=None)
    assert evil.tamper.submits == []
    state = SiteState(cfg.state)
    return cfg, state


@pytest.mark.parametrize(
    "mode, says",
    [
        ("rollback", "ROLLBACK"),
        ("fork_same_size", "FORK"),
        ("fork_bigger", "FORK"),
        ("bad_blob", "does not match its content digest"),
        ("bad_signature", "not signed by the pinned log key"),
    ],
)
def test_site_refuses_a_malicious_coordinator(seen_site, evil, tmp_path, mode, says):
    cfg, state = seen_site
    before = state.last_checkpoint()
    entries_before = len(Outbox(state.outbox_path).entries())
    out = tmp_path / f"refused-{mode}.h5ad"
    evil.tamper.mode = mode
    evil.tamper.submits.clear()
    cfg = dataclasses.replace(cfg, out=out)
    with pytest.raises(SiteTrustError) as ei:
        run_map(cfg, printer=None)
    assert says in str(ei.value)
    assert "Nothing was mapped or sent" in str(ei.value)
    assert evil.tamper.submits == []  # nothing sent
    assert not out.exists()  # nothing mapped
    after = state.last_checkpoint()
    assert (after.size, after.root_hex) == (before.size, before.root_hex)  # view kept
    assert len(Outbox(state.outbox_path).entries()) == entries_before


def _site_entries(consortium, site):
    import json

    from protocols.ledger import entry_payload

    out = []
    with consortium.client() as client:
        for e in client.get_entries(0, 0):
            kind, payload = entry_payload(e.envelope)
            if kind == "site_update" and payload["site_id"] == site:
                out.append((e.index, payload["sequence"], json.dumps(payload["new_conditions"])))
    return out


def test_coordinator_down_mid_submit_delivered_once_after_retry(consortium, evil, panc8,
                                                               tmp_path, capsys):
    # 1. the update arrives, then the connection is lost before the receipt comes back
    cfg = _cfg(consortium, evil, "site-d", panc8, tmp_path, batch="celseq2")
    evil.tamper.mode = "lost_reply"
    with pytest.raises(DeliveryError, match="stays in the outbox"):
        run_map(cfg, printer=None)
    assert evil.tamper.forwarded_submits >= 1  # it arrived (the client may resend once)
    assert len(set(evil.tamper.submits)) == 1  # always the same bytes
    state = SiteState(cfg.state)
    pending = Outbox(state.outbox_path).pending()
    assert [e.id for e in pending] == ["update-000001"]
    sent_env, sent_diff = evil.tamper.submits[-1]
    assert pending[0].envelope_bytes == sent_env and pending[0].diff_bytes == sent_diff

    # retry resends the same bytes (same sequence number): the coordinator's original entry
    evil.tamper.mode = "pass"
    recs = retry_pending(SiteConfig(coordinator=evil.address, insecure=True, state=cfg.state),
                         printer=None)
    assert recs[0]["duplicate"] is True
    assert evil.tamper.submits[-1] == (sent_env, sent_diff)
    mine = _site_entries(consortium, "site-d")
    assert len(mine) == 1 and mine[0][1] == 1  # exactly once
    assert Outbox(state.outbox_path).get("1").state == "delivered"

    # 2. the coordinator is down: nothing arrives; the signed update waits, retry delivers it
    cfg2 = _cfg(consortium, evil, "site-d", panc8, tmp_path, batch="smartseq2")
    evil.tamper.mode = "down"
    with pytest.raises(DeliveryError):
        run_map(cfg2, printer=None)
    assert [e.id for e in Outbox(state.outbox_path).pending()] == ["update-000002"]
    # `site retry` from the CLI, straight to the real coordinator over TLS
    from scarches_fl_cli.main import main

    evil.tamper.mode = "pass"
    rc = main(["site", "retry", "--state", str(cfg.state), "--coordinator", consortium.address,
               "--trust", str(consortium.trust)])
    assert rc == 0
    assert "delivered update-000002" in capsys.readouterr().out
    mine = _site_entries(consortium, "site-d")
    assert [m[1] for m in mine] == [1, 2]  # each sequence number exactly once
    assert Outbox(state.outbox_path).pending() == []
    assert state.last_sequence() == 2
