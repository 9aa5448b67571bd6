"""Attacks: nothing an unauthenticated peer sends charges, allocates for, or is attributed to a
site (ADR 0023). Real gRPC on loopback (TLS on); the check order of docs/protocol.md section 6.2:
size caps, strict parse, signature from an enrolled unrevoked key, THEN per-site work (rate
limit, sequence, diff size / sha256)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from protocols.canonical import canonical_json
from protocols.keys import generate_private_key
from tests.coordinator.conftest import (
    Consortium,
    Site,
    accept_log_lines,
    fetch_base,
    make_consortium,
    make_site_update,
    running_server,
)

pytestmark = pytest.mark.network


def _limited_consortium(tmp_path: Path, *, burst: int = 2, per_second: float = 0.01) -> Consortium:
    cons = make_consortium(tmp_path)
    cfg_path = cons.state / "coordinator.yaml"
    doc = yaml.safe_load(cfg_path.read_text())
    doc["rate_limit"] = {"enabled": True, "burst": burst, "per_second": per_second}
    cfg_path.write_text(yaml.safe_dump(doc))
    return cons


def _flip_signature(envelope: bytes) -> bytes:
    env = json.loads(envelope)
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[0] ^= 0x01
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    return canonical_json(env)


def _other_bytes(diff: bytes) -> bytes:
    return diff[:-1] + bytes([diff[-1] ^ 0xFF])


def test_forged_envelope_with_a_mismatched_diff_is_a_signature_code(tmp_path: Path) -> None:
    cons = make_consortium(tmp_path)
    with running_server(cons.state) as server, server.client(cons) as c:
        base = fetch_base(c, cons)
        good = make_site_update(cons.sites["site-b"], base)
        # site-b's key id, a broken signature, a diff the payload does not name
        res = c.submit_update(_flip_signature(good.envelope), _other_bytes(good.diff_bytes))
        assert res.rejection.reason_code == "E_SIG_INVALID", res.rejection
        res = c.submit_update(_flip_signature(good.envelope), b"")
        assert res.rejection.reason_code == "E_SIG_INVALID", res.rejection
        # an unenrolled key claiming site-b
        mallory = make_site_update(Site("site-b", generate_private_key()), base)
        res = c.submit_update(mallory.envelope, _other_bytes(mallory.diff_bytes))
        assert res.rejection.reason_code == "E_KEY_UNKNOWN", res.rejection


def test_authenticated_mismatched_diff_gets_the_diff_codes(tmp_path: Path) -> None:
    cons = make_consortium(tmp_path)
    with running_server(cons.state) as server, server.client(cons) as c:
        base = fetch_base(c, cons)
        site = cons.sites["site-a"]
        u = make_site_update(site, base)
        res = c.submit_update(u.envelope, u.diff_bytes + b"\0")
        assert res.rejection.reason_code == "E_DIFF_SIZE_MISMATCH", res.rejection
        res = c.submit_update(u.envelope, _other_bytes(u.diff_bytes))
        assert res.rejection.reason_code == "E_DIFF_SHA256_MISMATCH", res.rejection
        size = c.get_checkpoint().size
        c.submit_update(u.envelope, u.diff_bytes).raise_for_rejection()  # the real diff
        assert c.get_checkpoint().size == size + 1


def test_forger_cannot_drain_another_sites_rate_limit(tmp_path: Path) -> None:
    """The report's attack: many forged submissions claiming site-b (an unenrolled key, and
    site-b's key id with a bad signature, each with a mismatched diff) while site-b's bucket
    holds 2 tokens that refill once per 100 s. site-b's own updates are accepted at once."""
    cons = _limited_consortium(tmp_path)
    with running_server(cons.state) as server, server.client(cons) as c:
        base = fetch_base(c, cons)
        b = cons.sites["site-b"]
        template = make_site_update(b, base, sequence=1000)
        mallory = Site("site-b", generate_private_key())
        codes = set()
        for i in range(60):
            if i % 2:
                env = _flip_signature(template.envelope)
            else:
                env = make_site_update(mallory, base, sequence=i + 1).envelope
            res = c.submit_update(env, _other_bytes(template.diff_bytes))
            codes.add(res.rejection.reason_code)
        assert codes == {"E_SIG_INVALID", "E_KEY_UNKNOWN"}
        for _ in range(2):  # site-b's whole burst is still there
            u = make_site_update(b, base)
            c.submit_update(u.envelope, u.diff_bytes).raise_for_rejection()
        res = c.submit_update(*_pair(make_site_update(b, base)))
        assert res.rejection.reason_code == "E_RATE_LIMITED"  # its own third one is limited


def _pair(u):
    return u.envelope, u.diff_bytes


def test_junk_site_ids_allocate_no_rate_limit_state(tmp_path: Path) -> None:
    """5,000 unauthenticated submissions claiming 5,000 different site ids make no bucket."""
    from coordinator.config import load_config
    from coordinator.service import Registry

    cons = _limited_consortium(tmp_path)
    key = generate_private_key()
    with Registry(load_config(cons.state)) as reg:
        reg.start_writer()
        size = reg.size
        envelope = make_site_update(Site("x", key), _registry_base(reg), sequence=1).envelope
        payload = json.loads(base64.b64decode(json.loads(envelope)["payload"]))
        env = json.loads(envelope)
        for i in range(5000):
            payload["site_id"] = f"junk-{i}"
            env["payload"] = base64.b64encode(canonical_json(payload)).decode()
            res = reg.submit(canonical_json(env), b"")
            assert res.rejection is not None and res.rejection.reason_code == "E_KEY_UNKNOWN"
        assert reg.limiter is not None and len(reg.limiter) == 0
        assert reg.size == size


def _registry_base(reg):
    from protocols.bundle import bundle_from_bytes

    ref = reg.references.materialize(reg.size)
    bundle = bundle_from_bytes(ref.manifest_path.read_bytes(), ref.safetensors_path.read_bytes())
    return reg.size, reg.state.root_at(reg.size), bundle


def test_unauthenticated_rejections_are_logged_as_claims_not_as_the_site(tmp_path: Path) -> None:
    cons = make_consortium(tmp_path)
    with accept_log_lines() as lines:
        with running_server(cons.state) as server, server.client(cons) as c:
            base = fetch_base(c, cons)
            u = make_site_update(cons.sites["site-b"], base)
            c.submit_update(_flip_signature(u.envelope), u.diff_bytes)
    kind, fields = lines[-1].split(" ", 1)
    line = json.loads(fields)
    assert kind == "reject" and line["reason"] == "E_SIG_INVALID"
    assert line["site"] is None and line["claimed_site"] == "site-b"
