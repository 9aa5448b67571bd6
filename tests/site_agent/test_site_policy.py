"""What the site reads from the verified ledger and the pinned trust: enrolment and the active
key (never GetSiteInfo's word), and witness cosignatures when trust.json requires them."""

from __future__ import annotations

import dataclasses
import time

import pytest

from site_agent.agent import run_map
from site_agent.config import SiteConfig
from site_agent.verify import SiteTrustError


def _cfg(consortium, tmp_path, *, site_id, key, address=None, insecure=False, trust=None):
    return SiteConfig(
        coordinator=address or consortium.address, insecure=insecure,
        trust=trust or consortium.trust, key=key, site_id=site_id, state=tmp_path / "state",
        data=tmp_path / "unused.h5ad", batch_key="batch", out=tmp_path / "out.h5ad",
    )


def test_unenrolled_site_is_refused_before_mapping(consortium, tmp_path):
    from scarches_fl_cli.main import main

    assert main(["site", "keygen", "--out", str(tmp_path / "k")]) == 0
    cfg = _cfg(consortium, tmp_path, site_id="site-x", key=tmp_path / "k" / "site.key")
    with pytest.raises(SiteTrustError, match="not enrolled"):
        run_map(cfg, dry_run=True, printer=None)


def test_enrolled_site_with_another_key_is_refused(consortium, tmp_path):
    key_m, _ = consortium.site_dirs("site-m")
    cfg = _cfg(consortium, tmp_path, site_id="site-a", key=key_m)
    with pytest.raises(SiteTrustError, match="not an active key of site 'site-a'"):
        run_map(cfg, dry_run=True, printer=None)


def _trust_with_witness(consortium, tmp_path):
    from protocols.checkpoint import generate_signer
    from protocols.policy import read_trust

    witness = generate_signer("witness.test.local").as_cosigner()
    policy = read_trust(consortium.trust)
    policy = dataclasses.replace(policy, witness_keys=(witness.verifier.vkey,),
                                 witnesses_required=1)
    path = tmp_path / "trust-with-witness.json"
    path.write_bytes(policy.validate().to_json())
    return witness, path


def test_required_witness_cosignatures(consortium, evil, panc8, tmp_path):
    from protocols.checkpoint import cosign_checkpoint
    from protocols.policy import read_trust

    witness, trust_path = _trust_with_witness(consortium, tmp_path)
    key, _ = consortium.site_dirs("site-m")
    cfg = _cfg(consortium, tmp_path, site_id="site-m", key=key, trust=trust_path)
    cfg = dataclasses.replace(cfg, data=panc8, batches=("smartseq2",), max_epochs=1)
    with pytest.raises(SiteTrustError, match="requires 1 witness cosignature"):
        run_map(cfg, dry_run=True, printer=None)
    assert not (tmp_path / "state" / "checkpoint.json").exists()

    # the same checkpoint, cosigned by the pinned witness (served by the double): accepted
    trust = read_trust(consortium.trust)
    evil.tamper.mode = "pass"

    def cosigned(note: bytes) -> bytes:
        _, out = cosign_checkpoint(note, origin=trust.origin, log_verifier=trust.log_public_key,
                                   witness=witness, timestamp=int(time.time()))
        return out

    evil.tamper.cosign = cosigned
    try:
        cfg = dataclasses.replace(cfg, coordinator=evil.address, insecure=True)
        rep = run_map(cfg, dry_run=True, printer=None)
    finally:
        evil.tamper.cosign = None
    assert list(rep.verified.cosigned_by) == ["witness.test.local"]
    assert rep.entry is not None and rep.entry.id.startswith("dry-run-")
