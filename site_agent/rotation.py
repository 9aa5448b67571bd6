"""``site rotate-key``: the site's half of a key rotation, in two explicit steps.

The ledger rule (``docs/adr/0003-key-ids-and-rotation.md``): a ``rotate`` policy entry is signed
by the operators *and* by the site's old and new key. The site signs first; the operator
countersigns and appends (``scarches-fl coordinator rotate --request FILE``). Until the site has
seen that entry in the verified ledger its old key is still the active one, so the new key
never replaces it before then:

1. ``request``: make a fresh Ed25519 key and keep it as the **pending** key beside the active
   one (``<key>.pending``: PEM PKCS#8, mode 0600, never overwriting a file, like ``site
   keygen``); build the ``rotate`` change (origin from the pinned trust.json, the site id, the
   new public key, the active key's id), sign it with the active AND the pending key (no
   operator signature), write it atomically to ``--out`` (and a copy to
   ``STATE/rotation-request.dsse``), and record the rotation in ``STATE/rotation.json``. If
   the request cannot be written, the pending key is removed again (no request names it).
2. ``finish``: pull and verify the ledger (rules 1-4 of :mod:`site_agent.verify`). If the
   verified policy names the pending key as the site's active key, the old key file is kept as
   ``<key>.rotated-<16 hex of its key id>``, the pending key is renamed over ``<key>`` (one
   atomic rename), ``<key stem>.pub`` is rewritten when it exists, and the record is removed.
   If the ledger still names the old key, nothing changes and the command says so.

``cancel`` moves the pending key aside as ``<key>.cancelled-<16 hex>`` and removes the record.
No step deletes a private key that a written request names.

Crash safety: ``request`` writes the pending key first and the record last, and never touches
the active key; a run killed before the record leaves the pending key behind, which the next
``request`` names (``cancel`` moves it aside). ``finish`` archives the old key before the
rename and checks what it finds on every step, so running it again after a crash completes it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocols.errors import KeyFormatError, ScarchesFLError, VerificationError
from protocols.policy import TrustPolicy
from site_agent.agent import _say, with_remembered_coordinator
from site_agent.config import SiteConfig
from site_agent.state import SiteState, StateError, atomic_write
from site_agent.verify import load_trust

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "PendingRotation",
    "RotationError",
    "RotationNotLoggedError",
    "pending_rotation",
    "pending_key_path",
    "request_rotation",
    "finish_rotation",
    "cancel_rotation",
]

logger = logging.getLogger(__name__)

RECORD_NAME = "rotation.json"
REQUEST_COPY_NAME = "rotation-request.dsse"
_RECORD_FORMAT = "scarches-fl.site-rotation"


class RotationError(ScarchesFLError):
    """A key rotation step cannot run; the message names the problem and the fix."""

    exit_code = 2


class RotationNotLoggedError(RotationError):
    """The verified ledger does not show the rotation yet (the operator has not appended it)."""

    exit_code = 6


@dataclass(frozen=True)
class PendingRotation:
    """What ``STATE/rotation.json`` remembers between ``request`` and ``finish``."""

    site_id: str
    origin: str
    key: Path
    pending_key: Path
    old_key_id: str
    new_key_id: str
    request: Path
    requested_at: str

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "format": _RECORD_FORMAT, "format_version": 1, "site_id": self.site_id,
            "origin": self.origin, "key": str(self.key), "pending_key": str(self.pending_key),
            "old_key_id": self.old_key_id, "new_key_id": self.new_key_id,
            "request": str(self.request), "requested_at": self.requested_at,
        }


def pending_key_path(key: Path) -> Path:
    """Where ``request`` keeps the new key: beside the active one (same directory, so the
    promotion is one rename on one file system)."""
    return key.with_name(key.name + ".pending")


def _record_path(state: SiteState) -> Path:
    return state.path / RECORD_NAME


def pending_rotation(state: SiteState) -> PendingRotation | None:
    """The rotation waiting for ``finish`` in ``state`` (None when there is none)."""
    path = _record_path(state)
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != _RECORD_FORMAT or doc.get("format_version") != 1:
            raise ValueError(f"format {doc.get('format')!r} v{doc.get('format_version')!r}")
        return PendingRotation(
            site_id=str(doc["site_id"]), origin=str(doc["origin"]), key=Path(doc["key"]),
            pending_key=Path(doc["pending_key"]), old_key_id=str(doc["old_key_id"]),
            new_key_id=str(doc["new_key_id"]), request=Path(doc["request"]),
            requested_at=str(doc["requested_at"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StateError(
            f"{path} is unreadable ({exc}). It names the pending key of a key rotation: look "
            "for a `*.key.pending` file beside the site key; restore the record from a backup, "
            "or run `scarches-fl site rotate-key cancel --state STATE --key KEY`"
        ) from exc


def _load_key(path: Path, what: str) -> Any:
    from site_agent.agent import load_site_key

    try:
        return load_site_key(path)
    except KeyFormatError as exc:
        raise RotationError(f"{what}: {exc.message}") from exc


def _site_id(config: SiteConfig, state: SiteState) -> str:
    remembered = state.remembered().get("site_id")
    if config.site_id and remembered and config.site_id != remembered:
        raise RotationError(
            f"--site-id {config.site_id} but the state directory {state.path} belongs to site "
            f"{remembered!r}; pass the state directory of {config.site_id!r} or check --site-id"
        )
    site_id = config.site_id or remembered
    if not site_id:
        raise RotationError(
            f"which site? {state.path} does not remember a site id (no `site map` ran on it); "
            "pass --site-id (the id the operator enrolled)"
        )
    return str(site_id)


def _trust(config: SiteConfig, state: SiteState) -> TrustPolicy:
    if state.pinned_trust() is None and config.trust is None:
        raise RotationError(
            f"{state.path} has no pinned trust.json; pass --trust with the trust.json the "
            "operator handed out (it is pinned, as `site map` does)"
        )
    raw = state.pin_trust(config.trust) if config.trust is not None else state.pinned_trust()
    assert raw is not None
    return load_trust(raw, source=str(state.trust_path))


def _refuse_if_pending(state: SiteState, key: Path) -> None:
    rec = pending_rotation(state)
    if rec is not None:
        raise RotationError(
            f"a key rotation of site {rec.site_id!r} is already pending (requested "
            f"{rec.requested_at}; new key {rec.new_key_id[:16]}... in {rec.pending_key}; the "
            f"request is {state.path / REQUEST_COPY_NAME}). Once the operator appended it, run "
            f"`scarches-fl site rotate-key finish --state {state.path}`; to abandon it, run "
            f"`scarches-fl site rotate-key cancel --state {state.path}`"
        )
    pending = pending_key_path(key)
    if pending.exists():
        raise RotationError(
            f"{pending} exists but {state.path} records no pending rotation: an earlier `site "
            "rotate-key` stopped before it finished (or this key directory belongs to another "
            f"state directory). Run `scarches-fl site rotate-key cancel --state {state.path} "
            f"--key {key}` (it moves that key aside, deleting nothing) and start again"
        )


def request_rotation(
    config: SiteConfig, *, out: str | os.PathLike[str], note: str = "",
    printer: Callable[[str], None] | None = print,
) -> PendingRotation:
    """Step 1 (module docstring): pending key, signed request at ``out``, record."""
    from protocols.keys import generate_private_key, key_id, public_key_text, save_private_key

    config.require("state", "key")
    assert config.state is not None and config.key is not None
    state = SiteState(config.state)
    if not state.exists() and config.trust is None:
        raise RotationError(
            f"no site state directory at {state.path}: pass the --state your `site map` uses, "
            "or --trust with the operator's trust.json to create it"
        )
    out_path = Path(out).expanduser()
    if out_path.exists():
        raise RotationError(
            f"--out {out_path} already exists; pick a new file name for the rotation request "
            "(nothing was changed)"
        )
    key_path = config.key.expanduser().absolute()
    with state.locked():
        _refuse_if_pending(state, key_path)
        trust = _trust(config, state)
        site_id = _site_id(config, state)
        old = _load_key(key_path, "--key")
        last_used = state.remembered().get("key_id")
        if last_used and last_used != old.key_id:
            raise RotationError(
                f"--key {key_path} has key id {old.key_id[:16]}..., but this site last used key "
                f"{str(last_used)[:16]}... ({state.path / 'agent.json'}); pass the site's active key "
                "with --key"
            )
        new = generate_private_key()
        pending = pending_key_path(key_path)
        try:
            save_private_key(new, pending)  # 0600, fsynced, never overwrites
        except OSError as exc:
            raise RotationError(
                f"cannot write the new key {pending}: {exc.strerror or exc}; the key directory "
                f"{key_path.parent} must be writable (nothing was changed)"
            ) from exc
        try:
            envelope = build_rotation_request(
                trust=trust, site_id=site_id, old_key=old.private, new_key=new, note=note,
            )
            try:
                atomic_write(out_path, envelope, mode=0o644)
            except OSError as exc:
                raise RotationError(
                    f"cannot write --out {out_path}: {exc.strerror or exc}; pass a writable "
                    "file name (nothing was changed)"
                ) from exc
        except BaseException:
            pending.unlink()  # no request names it: it was never anything but a pending key
            raise
        atomic_write(state.path / REQUEST_COPY_NAME, envelope, mode=0o644)
        rec = PendingRotation(
            site_id=site_id, origin=trust.origin, key=key_path, pending_key=pending,
            old_key_id=old.key_id, new_key_id=key_id(new), request=out_path.absolute(),
            requested_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        atomic_write(_record_path(state),
                     json.dumps(rec.to_json_obj(), indent=2, sort_keys=True).encode() + b"\n",
                     mode=0o600)
    _say(printer, f"new key (pending): {pending} (mode 0600; it never leaves this site)")
    _say(printer, f"new key text: {public_key_text(new)}")
    _say(printer, f"new key fingerprint (key id): {rec.new_key_id}")
    _say(printer, f"replaces key: {rec.old_key_id} (still this site's active key)")
    _say(printer, f"rotation request: {out_path} ({len(envelope)} bytes; signed by the old and "
                  f"the new key of site {site_id!r} for log {trust.origin!r})")
    _say(printer, "Send the request to the operator (`scarches-fl coordinator rotate --request "
                  "FILE`) and read both fingerprints to them over a second channel. Once they "
                  f"appended it, run `scarches-fl site rotate-key finish --state {state.path}`.")
    return rec


def _check_key_id(path: Path, want: str, what: str) -> Any:
    key = _load_key(path, what)
    if key.key_id != want:
        raise RotationError(
            f"{path} holds key {key.key_id[:16]}..., the rotation record expects "
            f"{want[:16]}...; it was replaced since `site rotate-key` ran. Restore it from a "
            "backup before finishing the rotation"
        )
    return key


def _promote(state: SiteState, rec: PendingRotation) -> Path:
    """Make the pending key the site key (idempotent: a crashed run is completed)."""
    from protocols.bundle import fsync_dir
    from protocols.keys import save_private_key, save_public_key

    archive = rec.key.with_name(f"{rec.key.name}.rotated-{rec.old_key_id[:16]}")
    if rec.pending_key.exists():
        new = _check_key_id(rec.pending_key, rec.new_key_id, "the pending key")
        if archive.exists():
            _check_key_id(archive, rec.old_key_id, "the archived old key")
        else:
            old = _check_key_id(rec.key, rec.old_key_id, "the site key")
            save_private_key(old.private, archive)  # 0600, fsynced, never overwrites
        os.replace(rec.pending_key, rec.key)
        fsync_dir(rec.key.parent)
    else:  # an earlier finish renamed it already
        new = _check_key_id(rec.key, rec.new_key_id, "the site key")
    pub = rec.key.with_suffix(".pub")
    if pub.exists():
        save_public_key(new.private, pub)
    remembered = state.remembered()
    if remembered:
        state.remember(**(remembered | {"key_id": rec.new_key_id}))
    (state.path / REQUEST_COPY_NAME).unlink(missing_ok=True)
    _record_path(state).unlink()
    fsync_dir(state.path)
    return archive


def finish_rotation(
    config: SiteConfig, *, printer: Callable[[str], None] | None = print,
    client_factory: Callable[..., Any] | None = None,
) -> PendingRotation:
    """Step 2 (module docstring): promote the pending key once the verified ledger shows it."""
    from site_agent.verify import SiteTrustError, verify_ledger

    config.require("state")
    assert config.state is not None
    state = SiteState(config.state).require_existing()
    config = with_remembered_coordinator(config, state)
    with state.locked():
        rec = pending_rotation(state)
        if rec is None:
            raise RotationError(
                f"no key rotation is pending in {state.path}; start one with `scarches-fl site "
                f"rotate-key --state {state.path} --key KEY --out REQUEST_FILE`"
            )
        config.require("coordinator")
        pinned = state.pinned_trust()
        if pinned is None:  # pragma: no cover - request pins it
            raise RotationError(f"{state.path} has no pinned trust.json")
        trust = load_trust(pinned, source=str(state.trust_path))
        from site_agent.agent import connect

        factory = client_factory if client_factory is not None else connect
        with factory(config, trust) as client:
            ledger = verify_ledger(client, state=state, trust=trust, site_id=rec.site_id)
        record, size = ledger.site_record, ledger.tree_size
        state.store_checkpoint(origin=ledger.checkpoint.origin, size=size,
                               root=ledger.checkpoint.root_hash, note=ledger.note)
        if rec.new_key_id not in record.key_ids:
            if rec.old_key_id in record.key_ids:
                raise RotationNotLoggedError(
                    f"the verified ledger (size {size}) still names key {rec.old_key_id[:16]}... "
                    f"as the active key of {rec.site_id!r}: the operator has not appended the "
                    f"rotation yet. Send {state.path / REQUEST_COPY_NAME} to the operator "
                    "(`scarches-fl coordinator rotate --dir STATE --request FILE`) and run this "
                    "again. Nothing was changed; the old key stays this site's key"
                )
            raise SiteTrustError(
                f"the verified ledger (size {size}) names neither the old nor the pending key as "
                f"the active key of {rec.site_id!r} (active: "
                f"{', '.join(k[:16] + '...' for k in record.key_ids) or 'none'}"
                f"{'; the site was revoked' if record.revoked else ''}). Nothing was changed; "
                "ask the operator", reason_code="E_KEY_UNKNOWN",
            )
        archive = _promote(state, rec)
    _say(printer, f"the ledger (verified up to size {size}) names key {rec.new_key_id[:16]}... "
                  f"as the active key of {rec.site_id!r}")
    _say(printer, f"{rec.key} is now the new key; the old key is kept in {archive} (rotated out: "
                  "the coordinator refuses what it signs; delete it when your backups allow)")
    return rec


def cancel_rotation(
    config: SiteConfig, *, printer: Callable[[str], None] | None = print,
) -> Path:
    """Abandon a pending rotation: move the pending key aside (never deleted) and drop the
    record. Returns where the pending key went."""
    config.require("state")
    assert config.state is not None
    state = SiteState(config.state).require_existing()
    with state.locked():
        rec = pending_rotation(state)
        if rec is not None:
            pending = rec.pending_key
        elif config.key is not None:
            pending = pending_key_path(config.key.expanduser().absolute())
        else:
            raise RotationError(
                f"no key rotation is pending in {state.path}; if a `*.key.pending` file was "
                "left beside the site key, pass that site key with --key"
            )
        if not pending.exists():
            if rec is None:
                raise RotationError(f"nothing to cancel: no pending rotation and no {pending}")
            moved = None
        else:
            kid = _load_key(pending, "the pending key").key_id
            moved = pending.with_name(
                pending.name.removesuffix(".pending") + f".cancelled-{kid[:16]}"
            )
            if moved.exists():
                raise RotationError(f"{moved} exists already; move it away and run this again")
            os.rename(pending, moved)
        (state.path / REQUEST_COPY_NAME).unlink(missing_ok=True)
        _record_path(state).unlink(missing_ok=True)
    if moved is None:
        _say(printer, f"cancelled the pending rotation ({pending} was already gone)")
        return pending
    _say(printer, f"cancelled: the pending key was moved to {moved}. The active key is unchanged. "
                  "If the operator appended the request after all, that file is now this site's "
                  "key: move it back over the site key")
    return moved


def build_rotation_request(
    *, trust: TrustPolicy, site_id: str, old_key: Ed25519PrivateKey, new_key: Ed25519PrivateKey,
    note: str = "",
) -> bytes:
    """The site's rotation request (:func:`protocols.ledger.rotation_request`): a ``rotate``
    policy change for the pinned origin, signed by the old and the new key. Read back and
    checked before it is handed out: it parses as that change and both signatures verify."""
    from protocols.dsse import parse_envelope, verify_envelope
    from protocols.keys import key_id, public_key_text
    from protocols.ledger import POLICY_TYPE, entry_payload, rotation_request
    from protocols.policy import parse_policy_change

    envelope = rotation_request(origin=trust.origin, site_id=site_id, old_key=old_key,
                                new_key=new_key, note=note)
    _kind, obj = entry_payload(envelope)
    change = parse_policy_change(obj)
    env = parse_envelope(envelope)
    for key in (old_key, new_key):
        verify_envelope(env, trusted_keys=[key.public_key()], threshold=1,
                        payload_type=POLICY_TYPE)
    if (change.action, change.origin, change.site_id, change.public_key,
            change.previous_key_id) != ("rotate", trust.origin, site_id,
                                        public_key_text(new_key), key_id(old_key)):
        raise VerificationError(  # pragma: no cover - a bug in the builder
            "the rotation request does not say what was asked; nothing was written (a bug: "
            "report it)", reason_code="E_INTERNAL",
        )
    return envelope
