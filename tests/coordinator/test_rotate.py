"""``coordinator rotate`` (``admin.rotate_site_key`` -> ``ledger.countersign_rotation``): what
it appends, and every request it refuses with nothing appended."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.admin import rotate_site_key
from coordinator.config import load_config
from coordinator.service import Registry
from protocols.dsse import parse_envelope
from protocols.errors import ConfigError, VerificationError
from protocols.keys import generate_private_key, key_id, load_private_key, public_key_text
from protocols.ledger import enrol_entry, revoke_entry, rotation_request
from scarches_fl_cli.main import main
from tests.coordinator.conftest import ORIGIN, make_site_update


def _size(state: Path) -> int:
    with Registry(load_config(state)) as reg:
        return reg.store.size


def _request(tmp_path: Path, data: bytes, name: str = "rotation.dsse") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _operator_key(state: Path):
    cfg = load_config(state)
    return load_private_key(cfg.path(cfg.paths.operator_key))


def test_rotation_is_countersigned_appended_and_applied(consortium, tmp_path: Path) -> None:
    site = consortium.sites["site-a"]
    new = generate_private_key()
    data = rotation_request(origin=ORIGIN, site_id="site-a", old_key=site.key, new_key=new)
    size = _size(consortium.state)
    entry, site_id = rotate_site_key(consortium.state, request=_request(tmp_path, data))
    assert site_id == "site-a" and entry.index == size
    # The logged envelope: the site's exact payload, signed by old, new and operator key.
    logged = parse_envelope(entry.envelope)
    assert logged.payload == parse_envelope(data).payload
    op_id = key_id(_operator_key(consortium.state))
    assert set(logged.keyids) == {key_id(site.key), key_id(new), op_id}
    # After replay (a fresh Registry), the old key is rotated out and the new one active.
    with Registry(load_config(consortium.state)) as reg:
        keys = reg.state.policy.sites["site-a"].keys
        assert [(k.key_id, k.status) for k in keys] == [
            (key_id(site.key), "rotated"), (key_id(new), "active"),
        ]
        assert reg.state.policy.sites["site-a"].active_key.public_key == public_key_text(new)
        reg.start_writer()
        base = (reg.store.size, reg.store.root(reg.store.size), reg.state.bundle())
        stale = make_site_update(site, base)
        res = reg.submit(stale.envelope, stale.diff_bytes)
        assert res.rejection is not None and res.rejection.reason_code == "E_KEY_ROTATED"
        site.key, site.sequence = new, 0  # the rejected update did not use its number
        fresh = make_site_update(site, base)
        res = reg.submit(fresh.envelope, fresh.diff_bytes)
        assert res.receipt is not None and res.receipt.leaf_index == size + 1
    # The same request again names a key that is no longer active: refused, nothing appended.
    with pytest.raises(VerificationError) as info:
        rotate_site_key(consortium.state, request=_request(tmp_path, data, "again.dsse"))
    assert info.value.reason_code == "E_POLICY_CHANGE"
    assert _size(consortium.state) == size + 2


@pytest.mark.parametrize("signer", ["old", "new"])
def test_request_signed_by_one_key_is_refused(consortium, tmp_path: Path, signer: str) -> None:
    from protocols.canonical import canonical_json
    from protocols.dsse import sign_envelope
    from protocols.ledger import POLICY_TYPE
    from protocols.policy import PolicyChange

    site = consortium.sites["site-a"]
    new = generate_private_key()
    change = PolicyChange("rotate", ORIGIN, "site-a", public_key_text(new), key_id(site.key))
    only = site.key if signer == "old" else new
    data = sign_envelope(POLICY_TYPE, canonical_json(change.to_json_obj()), [only])
    size = _size(consortium.state)
    with pytest.raises(VerificationError) as info:
        rotate_site_key(consortium.state, request=_request(tmp_path, data))
    assert info.value.reason_code == "E_ROTATION_SIGNATURES"
    assert "old and the new site key" in info.value.message
    assert _size(consortium.state) == size


def test_request_for_another_origin_is_refused(consortium, tmp_path: Path) -> None:
    site = consortium.sites["site-a"]
    data = rotation_request(origin="other.example/ledger", site_id="site-a", old_key=site.key,
                            new_key=generate_private_key())
    size = _size(consortium.state)
    with pytest.raises(VerificationError) as info:
        rotate_site_key(consortium.state, request=_request(tmp_path, data))
    assert info.value.reason_code == "E_ORIGIN_MISMATCH"
    assert "other.example/ledger" in info.value.message and ORIGIN in info.value.message
    assert _size(consortium.state) == size


def test_enrol_revoke_and_update_envelopes_are_not_rotations(consortium, tmp_path: Path) -> None:
    op = _operator_key(consortium.state)
    enrol = enrol_entry(origin=ORIGIN, site_id="site-z", public_key=generate_private_key(),
                        operator_keys=[op])
    revoke = revoke_entry(origin=ORIGIN, site_id="site-a", operator_keys=[op])
    size = _size(consortium.state)
    for name, data, action in (("enrol", enrol, "enrol"), ("revoke", revoke, "revoke")):
        with pytest.raises(VerificationError) as info:
            rotate_site_key(consortium.state, request=_request(tmp_path, data, f"{name}.dsse"))
        assert info.value.reason_code == "E_POLICY_CHANGE"
        assert f"asks to {action!r}, not to rotate" in info.value.message
    with Registry(load_config(consortium.state)) as reg:
        base = (reg.store.size, reg.store.root(reg.store.size), reg.state.bundle())
    update = make_site_update(consortium.sites["site-a"], base)
    with pytest.raises(VerificationError, match="site_update entry, not a policy change"):
        rotate_site_key(consortium.state, request=_request(tmp_path, update.envelope, "u.dsse"))
    with pytest.raises(VerificationError, match="is not a rotation request"):
        rotate_site_key(consortium.state, request=_request(tmp_path, b"not json", "junk.dsse"))
    assert _size(consortium.state) == size
    with Registry(load_config(consortium.state)) as reg:  # site-a untouched, site-z absent
        assert reg.state.policy.sites["site-a"].active_key is not None
        assert "site-z" not in reg.state.policy.sites


def test_oversize_and_missing_request_through_the_cli(consortium, tmp_path: Path, capsys) -> None:
    site = consortium.sites["site-a"]
    data = rotation_request(origin=ORIGIN, site_id="site-a", old_key=site.key,
                            new_key=generate_private_key())
    big = _request(tmp_path, data + b" " * (1024 * 1024), "big.dsse")
    size = _size(consortium.state)
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        rotate_site_key(consortium.state, request=big)
    rc = main(["coordinator", "rotate", "--dir", str(consortium.state), "--request", str(big)])
    assert rc == 2
    assert "larger than 1 MiB" in capsys.readouterr().err
    rc = main(["coordinator", "rotate", "--dir", str(consortium.state), "--request",
               str(tmp_path / "missing.dsse")])
    assert rc == 2
    assert "cannot read it" in capsys.readouterr().err
    assert _size(consortium.state) == size
