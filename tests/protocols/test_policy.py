"""trust.json and policy changes (enrol, revoke, rotate)."""

from __future__ import annotations

import json

import pytest

from protocols.canonical import canonical_json
from protocols.errors import PolicyError
from protocols.keys import key_id, public_key_text
from protocols.policy import (
    PolicyChange,
    UpdateLimits,
    apply_policy_change,
    build_trust,
    parse_trust,
    read_trust,
    write_trust,
)
from tests.protocols._factories import ORIGIN, consortium, det_key


def _trust(**kw):
    from protocols.checkpoint import NoteSigner

    return build_trust(
        origin=ORIGIN, log_public_key=NoteSigner(ORIGIN, bytes([2]) * 32).verifier.vkey,
        operator_keys=[det_key(1).public_key()], **kw,
    )


def _self_signed_pem() -> str:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_trust_roundtrip(tmp_path):
    t = _trust(tls_root_pem=_self_signed_pem(), update_limits=UpdateLimits(max_abs_value=10.0))
    write_trust(tmp_path / "trust.json", t)
    back = read_trust(tmp_path / "trust.json")
    assert back == t
    assert (tmp_path / "trust.json").read_bytes() == t.to_json()
    obj = json.loads(t.to_json())
    assert obj["format"] == "scarches-fl.trust" and obj["witnesses"] == {"keys": [], "threshold": 0}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o.update(origin=""),
        lambda o: o.update(log_public_key="nope"),
        lambda o: o["operators"].update(threshold=0),
        lambda o: o["operators"].update(threshold=2),
        lambda o: o["operators"].update(keys=[]),
        lambda o: o["operators"].update(keys=o["operators"]["keys"] * 2, threshold=1),
        lambda o: o.update(format_version=2),
        lambda o: o.update(extra=True),
        lambda o: o["witnesses"].update(threshold=1),
        lambda o: o.update(tls_root_pem="garbage"),
        lambda o: o.update(tls_root_pem="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
        lambda o: o.update(format_version=True),
        lambda o: o["update_limits"].update(max_abs_value=-1),
        lambda o: o["sites"].update({"Bad Site": {"keys": []}}),
        lambda o: o["sites"].update({"s": {"keys": [{"key_id": "0" * 64, "public_key": public_key_text(det_key(3)), "status": "active"}]}}),
    ],
)
def test_trust_rejections(mutate):
    obj = json.loads(_trust().to_json())
    mutate(obj)
    with pytest.raises(PolicyError):
        parse_trust(canonical_json(obj))


def test_read_trust_missing(tmp_path):
    with pytest.raises(PolicyError, match="coordinator init"):
        read_trust(tmp_path / "nope.json")


def test_policy_changes():
    t = _trust()
    a1, a2, a3 = det_key(10), det_key(11), det_key(12)
    p = apply_policy_change(t, PolicyChange("enrol", ORIGIN, "site-a", public_key_text(a1)), at_size=2)
    assert p.sites["site-a"].active_key.key_id == key_id(a1) and p.as_of_size == 2
    with pytest.raises(PolicyError):  # already active
        apply_policy_change(p, PolicyChange("enrol", ORIGIN, "site-a", public_key_text(a2)), at_size=3)
    with pytest.raises(PolicyError):  # wrong previous key
        apply_policy_change(p, PolicyChange("rotate", ORIGIN, "site-a", public_key_text(a2), key_id(a3)), at_size=3)
    p = apply_policy_change(p, PolicyChange("rotate", ORIGIN, "site-a", public_key_text(a2), key_id(a1)), at_size=3)
    assert [k.status for k in p.sites["site-a"].keys] == ["rotated", "active"]
    with pytest.raises(PolicyError):  # key reuse
        apply_policy_change(p, PolicyChange("enrol", ORIGIN, "site-b", public_key_text(a1)), at_size=4)
    p = apply_policy_change(p, PolicyChange("revoke", ORIGIN, "site-a"), at_size=4)
    assert [k.status for k in p.sites["site-a"].keys] == ["rotated", "revoked"]
    with pytest.raises(PolicyError) as ei:
        apply_policy_change(p, PolicyChange("revoke", ORIGIN, "site-a"), at_size=5)
    assert ei.value.reason_code == "E_SITE_NOT_ENROLLED"
    p = apply_policy_change(p, PolicyChange("enrol", ORIGIN, "site-a", public_key_text(a3)), at_size=5)
    assert p.sites["site-a"].active_key.key_id == key_id(a3)
    assert parse_trust(p.to_json()) == p
    with pytest.raises(PolicyError) as ei:
        apply_policy_change(p, PolicyChange("revoke", "other/log", "site-a"), at_size=6)
    assert ei.value.reason_code == "E_ORIGIN_MISMATCH"


def test_roots_drop_sites():
    c = consortium()
    c.enrol("site-a", det_key(10))
    assert "site-a" in c.state.policy.sites
    assert c.state.policy.roots().sites == {}
    assert c.state.policy_at(1).sites == {} and "site-a" in c.state.policy_at(2).sites
