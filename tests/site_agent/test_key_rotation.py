"""``site rotate-key``: the site builds a rotation request (old + new key), the operator
countersigns and appends it, the site promotes its pending key only after the verified ledger
shows it. In process, on loopback: a synthetic reference (no torch, no shared data), the real
coordinator state and its TLS server in a thread of this process."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.admin import rotate_site_key
from protocols.keys import (
    key_id,
    load_private_key,
    load_public_key,
    private_key_pem,
    public_key_text,
    save_private_key,
    save_public_key,
)
from scarches_fl_cli.main import main
from site_agent.config import SiteConfig
from site_agent.rotation import (
    RotationError,
    RotationNotLoggedError,
    cancel_rotation,
    finish_rotation,
    pending_key_path,
    pending_rotation,
    request_rotation,
)
from site_agent.state import SiteState
from tests.coordinator.conftest import ORIGIN, Consortium, Site, make_consortium, make_site_update


@dataclass
class SiteSetup:
    consortium: Consortium
    site: Site
    key: Path  # the site's site.key on disk
    state: Path  # the site's state directory
    address: str | None = None

    def config(self, **kw) -> SiteConfig:
        base = {"state": self.state, "key": self.key, "trust": self.consortium.trust_path,
                "site_id": self.site.site_id}
        return SiteConfig(**(base | kw))

    def finish_config(self) -> SiteConfig:
        assert self.address is not None
        return SiteConfig(state=self.state, coordinator=self.address)


def _setup(tmp_path: Path) -> SiteSetup:
    c = make_consortium(tmp_path / "coord", sites=("site-a",))
    site = c.sites["site-a"]
    keys = tmp_path / "site-a" / "keys"
    keys.mkdir(parents=True, mode=0o700)
    save_private_key(site.key, keys / "site.key")  # what `site keygen` writes
    save_public_key(site.key, keys / "site.pub")
    return SiteSetup(c, site, keys / "site.key", tmp_path / "site-a" / "state")


@pytest.fixture
def setup(tmp_path: Path) -> SiteSetup:
    return _setup(tmp_path)


@pytest.fixture
def served(setup: SiteSetup) -> Iterator[SiteSetup]:
    """The coordinator's real TLS server in a thread, for `finish` to pull the ledger from."""
    from tests.coordinator.conftest import running_server

    with running_server(setup.consortium.state, name="rotation-serve") as running:
        setup.address = running.address
        yield setup


def _client(s: SiteSetup):
    from protocols.policy import read_trust
    from protocols.registry_client import RegistryClient

    pem = read_trust(s.consortium.trust_path).tls_root_pem
    return RegistryClient(s.address, trust=pem.encode(), timeout=30)


def _base(client, s: SiteSetup):
    from tests.coordinator.conftest import fetch_base

    return fetch_base(client, s.consortium)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_rotation_end_to_end(served: SiteSetup, tmp_path: Path, capsys) -> None:
    """request (site CLI) -> finish refused while not logged -> `coordinator rotate` (CLI) ->
    old key's update E_KEY_ROTATED, new key's accepted -> `site map`'s check points at finish
    -> finish promotes the pending key; the old key is archived, never lost."""
    from site_agent.verify import SiteTrustError, load_trust, pull_and_verify

    s = served
    old_pem = s.key.read_bytes()
    old_id = key_id(s.site.key)
    out = tmp_path / "hospital-a-rotation.dsse"
    rc = main(["site", "rotate-key", "--state", str(s.state), "--key", str(s.key),
               "--trust", str(s.consortium.trust_path), "--site-id", "site-a",
               "--out", str(out), "--note", "scheduled rotation"])
    assert rc == 0
    printed = capsys.readouterr().out
    pending = pending_key_path(s.key.absolute())
    new_key = load_private_key(pending)
    new_id = key_id(new_key)
    assert new_id in printed and old_id in printed and "rotate-key finish" in printed
    # The pending key: same format and permissions as site.key; the active key untouched.
    assert _mode(pending) == 0o600 and _mode(s.key) == 0o600
    assert pending.read_bytes() == private_key_pem(new_key)
    assert s.key.read_bytes() == old_pem
    # The request: exactly the rotate change for this log, signed by old and new key only.
    from protocols.dsse import parse_envelope
    from protocols.ledger import POLICY_TYPE, entry_payload
    from protocols.policy import parse_policy_change

    data = out.read_bytes()
    assert _mode(out) == 0o644
    env = parse_envelope(data)
    assert env.payload_type == POLICY_TYPE
    assert set(env.keyids) == {old_id, new_id}
    change = parse_policy_change(entry_payload(data)[1])
    assert (change.action, change.origin, change.site_id) == ("rotate", ORIGIN, "site-a")
    assert change.public_key == public_key_text(new_key)
    assert change.previous_key_id == old_id and change.note == "scheduled rotation"
    rec = pending_rotation(SiteState(s.state))
    assert rec is not None and (rec.old_key_id, rec.new_key_id) == (old_id, new_id)
    assert (s.state / "rotation-request.dsse").read_bytes() == data

    # Not logged yet: finish changes nothing and says what to do (exit 6).
    rc = main(["site", "rotate-key", "finish", "--state", str(s.state),
               "--coordinator", s.address])
    assert rc == 6
    err = capsys.readouterr().err
    assert "has not appended" in err and "coordinator rotate" in err
    assert s.key.read_bytes() == old_pem and pending.exists()

    # The operator countersigns and appends it (the CLI path).
    rc = main(["coordinator", "rotate", "--dir", str(s.consortium.state), "--request", str(out)])
    assert rc == 0
    assert "rotated the key of site-a" in capsys.readouterr().out

    with _client(s) as client:
        base = _base(client, s)
        stale = make_site_update(s.site, base)
        res = client.submit_update(stale.envelope, stale.diff_bytes)
        assert res.rejection is not None and res.rejection.reason_code == "E_KEY_ROTATED"
        # `site map` with the old key stops at the key check and points at `finish`.
        state = SiteState(s.state)
        trust = load_trust(state.pinned_trust(), source="trust.json")
        with pytest.raises(SiteTrustError) as info:
            pull_and_verify(client, state=state, trust=trust, site_id="site-a", key_id=old_id)
        assert info.value.reason_code == "E_KEY_UNKNOWN"
        assert "rotate-key finish" in info.value.message

    # finish: the verified ledger names the new key -> it becomes site.key.
    rc = main(["site", "rotate-key", "finish", "--state", str(s.state),
               "--coordinator", s.address])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert key_id(load_private_key(s.key)) == new_id and _mode(s.key) == 0o600
    assert not pending.exists() and pending_rotation(SiteState(s.state)) is None
    assert not (s.state / "rotation-request.dsse").exists()
    archive = s.key.with_name(f"site.key.rotated-{old_id[:16]}")
    assert archive.read_bytes() == old_pem and _mode(archive) == 0o600
    assert key_id(load_public_key(s.key.with_name("site.pub"))) == new_id
    assert SiteState(s.state).last_checkpoint() is not None  # the site's view moved forward

    # The promoted key signs updates the coordinator accepts (same per-site sequence counter).
    with _client(s) as client:
        base = _base(client, s)
        s.site.key = load_private_key(s.key)
        s.site.sequence -= 1  # the rejected update did not use its number
        fresh = make_site_update(s.site, base)
        res = client.submit_update(fresh.envelope, fresh.diff_bytes)
        assert res.rejection is None and res.receipt is not None
        assert res.receipt.leaf_index == base[0]


def test_request_refusals_name_the_fix(setup: SiteSetup, tmp_path: Path) -> None:
    s = setup
    old_pem = s.key.read_bytes()
    # No state directory and no trust.json to start one from.
    with pytest.raises(RotationError, match="no site state directory"):
        request_rotation(s.config(trust=None), out=tmp_path / "r0.dsse", printer=None)
    # An existing --out file is never overwritten.
    taken = tmp_path / "taken.dsse"
    taken.write_bytes(b"keep me")
    with pytest.raises(RotationError, match="already exists"):
        request_rotation(s.config(), out=taken, printer=None)
    assert taken.read_bytes() == b"keep me"
    # A state directory that belongs to another site.
    SiteState(s.state).ensure().remember(site_id="site-b", key_id=key_id(s.site.key))
    with pytest.raises(RotationError, match="belongs to site 'site-b'"):
        request_rotation(s.config(), out=tmp_path / "r1.dsse", printer=None)
    # A key other than the one the state last used.
    SiteState(s.state).remember(site_id="site-a", key_id="0" * 64)
    with pytest.raises(RotationError, match="pass the site's active key"):
        request_rotation(s.config(), out=tmp_path / "r2.dsse", printer=None)
    SiteState(s.state).remember(site_id="site-a", key_id=key_id(s.site.key))
    # A second request while one is pending.
    first = request_rotation(s.config(), out=tmp_path / "r3.dsse", printer=None)
    with pytest.raises(RotationError, match="already pending") as info:
        request_rotation(s.config(), out=tmp_path / "r4.dsse", printer=None)
    assert "rotate-key finish" in str(info.value) and "rotate-key cancel" in str(info.value)
    assert not (tmp_path / "r4.dsse").exists()
    assert key_id(load_private_key(first.pending_key)) == first.new_key_id
    assert s.key.read_bytes() == old_pem
    # finish without a pending rotation, request without --out: clear errors through the CLI.
    assert cancel_rotation(s.config(), printer=None).name.startswith("site.key.cancelled-")
    with pytest.raises(RotationError, match="no key rotation is pending"):
        finish_rotation(s.config(coordinator="127.0.0.1:1"), printer=None)
    assert main(["site", "rotate-key", "--state", str(s.state), "--key", str(s.key)]) == 2


def test_interrupted_request_and_cancel_never_lose_a_key(setup: SiteSetup, tmp_path: Path) -> None:
    s = setup
    old_pem = s.key.read_bytes()
    # A request whose --out cannot be written leaves nothing behind (no request names the key).
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(RotationError, match="cannot write --out"):
        request_rotation(s.config(), out=blocker / "r.dsse", printer=None)
    assert not pending_key_path(s.key).exists()
    assert pending_rotation(SiteState(s.state)) is None
    # A run killed after the pending key was written, before the record: the next request
    # names the leftover key and the fix.
    leftover = load_private_key(s.key)  # any key stands in for the half-made one
    save_private_key(leftover, pending_key_path(s.key))
    with pytest.raises(RotationError, match="stopped before it finished") as info:
        request_rotation(s.config(), out=tmp_path / "r.dsse", printer=None)
    assert "rotate-key cancel" in str(info.value)
    moved = cancel_rotation(s.config(), printer=None)
    assert moved.exists() and not pending_key_path(s.key).exists()  # moved aside, not deleted
    # Cancelling a recorded rotation keeps its key too; then a new request works.
    rec = request_rotation(s.config(), out=tmp_path / "r5.dsse", printer=None)
    moved = cancel_rotation(SiteConfig(state=s.state), printer=None)
    assert key_id(load_private_key(moved)) == rec.new_key_id
    assert pending_rotation(SiteState(s.state)) is None
    rec2 = request_rotation(s.config(), out=tmp_path / "r6.dsse", printer=None)
    assert rec2.new_key_id != rec.new_key_id
    assert s.key.read_bytes() == old_pem


def test_finish_completes_after_a_crash(served: SiteSetup, tmp_path: Path, monkeypatch) -> None:
    """A crash between archiving the old key and the rename, and one after the rename: running
    finish again completes the rotation; the old key exists at every point."""
    import site_agent.rotation as rotation

    s = served
    old_pem = s.key.read_bytes()
    rec = request_rotation(s.config(), out=tmp_path / "one.dsse", printer=None)
    with pytest.raises(RotationNotLoggedError):
        finish_rotation(s.finish_config(), printer=None)
    assert s.key.read_bytes() == old_pem and rec.pending_key.exists()
    rotate_site_key(s.consortium.state, request=tmp_path / "one.dsse")

    real_replace = rotation.os.replace

    def crash(src, dst, *a, **k):  # only the rename of the pending key over site.key
        if Path(dst) == rec.key:
            raise OSError("power cut (test)")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(rotation.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        finish_rotation(s.finish_config(), printer=None)
    monkeypatch.undo()
    archive = s.key.with_name(f"site.key.rotated-{rec.old_key_id[:16]}")
    assert s.key.read_bytes() == old_pem and archive.read_bytes() == old_pem
    assert rec.pending_key.exists() and pending_rotation(SiteState(s.state)) is not None
    finish_rotation(s.finish_config(), printer=None)
    assert key_id(load_private_key(s.key)) == rec.new_key_id

    # Second rotation (the promoted key is now the old one); crash right after the rename.
    second_old = s.key.read_bytes()
    rec2 = request_rotation(s.config(), out=tmp_path / "two.dsse", printer=None)
    assert rec2.old_key_id == rec.new_key_id
    rotate_site_key(s.consortium.state, request=tmp_path / "two.dsse")
    archive2 = s.key.with_name(f"site.key.rotated-{rec2.old_key_id[:16]}")
    save_private_key(load_private_key(s.key), archive2)
    rotation.os.replace(rec2.pending_key, s.key)  # what finish did before the "crash"
    assert pending_rotation(SiteState(s.state)) is not None
    finish_rotation(s.finish_config(), printer=None)
    assert key_id(load_private_key(s.key)) == rec2.new_key_id
    assert archive2.read_bytes() == second_old
    assert pending_rotation(SiteState(s.state)) is None
