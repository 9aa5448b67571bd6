"""Witnessing: an auditor cosigns checkpoints it has verified, and sites can require witnesses.

A witness is an auditor with a ``cosignature/v1`` key (C2SP tlog-cosignature, type 0x04). After
a full audit verifies a checkpoint -- signature, every entry, consistency with the witness's own
previous checkpoint, the replay of the served model -- the witness appends its cosignature line
to the checkpoint note and hands it to the coordinator (``AddCosignature``), which stores and
serves it (``GetCosignatures``). A site whose ``trust.json`` names witnesses and a threshold
``k`` accepts a checkpoint only when ``k`` distinct trusted witnesses cosigned it
(:func:`verify_witnessed_checkpoint`), so a coordinator that shows a site a forked history must
also fool ``k`` independent auditors.

Key files (written by :func:`generate_witness_key`, ``scarches-fl audit witness-keygen``):

* ``witness.key`` (mode 0600): the signer key string ``PRIVATE+KEY+<name>+<id>+<base64>``.
* ``witness.vkey``: the verifier key string ``<name>+<id>+<base64>`` to hand to the operator,
  who lists it in ``trust.json`` under ``"witnesses": {"keys": [...], "threshold": k}``.

The cryptography lives in (:mod:`protocols.checkpoint`); this module is key files and policy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.checkpoint import (
    KEY_TYPE_COSIGNATURE_V1,
    Checkpoint,
    CosignatureError,
    NoteSigner,
    NoteVerifier,
    cosign_checkpoint,
    generate_signer,
    open_note,
    parse_note,
    parse_signer_key,
    parse_verifier_key,
    verify_cosigned_checkpoint,
)
from protocols.errors import ConfigError

__all__ = [
    "WITNESS_KEY_FILE",
    "WITNESS_VKEY_FILE",
    "WitnessPolicy",
    "generate_witness_key",
    "load_witness_key",
    "witness_policy_from_trust",
    "cosign",
    "trusted_cosigners",
    "verify_witnessed_checkpoint",
]

logger = logging.getLogger(__name__)

WITNESS_KEY_FILE = "witness.key"
WITNESS_VKEY_FILE = "witness.vkey"


@dataclass(frozen=True)
class WitnessPolicy:
    """Witnesses a site trusts and how many of them must cosign (0: none required)."""

    witnesses: tuple[NoteVerifier, ...] = ()
    threshold: int = 0


def generate_witness_key(out_dir: str | Path, name: str, *, overwrite: bool = False) -> NoteVerifier:
    """Create a fresh witness key in ``out_dir``; returns its public verifier."""
    out = Path(out_dir)
    key_path, vkey_path = out / WITNESS_KEY_FILE, out / WITNESS_VKEY_FILE
    if key_path.exists() and not overwrite:
        raise ConfigError(
            f"{key_path} already exists; a witness keeps its key. Pick another --out directory "
            "(or delete the old key deliberately)"
        )
    out.mkdir(parents=True, exist_ok=True)
    signer = generate_signer(name, KEY_TYPE_COSIGNATURE_V1)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(signer.skey + "\n")
    os.chmod(key_path, 0o600)
    vkey_path.write_text(signer.verifier.vkey + "\n", encoding="ascii")
    return signer.verifier


def load_witness_key(path: str | Path) -> NoteSigner:
    """The witness signer in ``path`` (a ``witness.key`` file, or a directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / WITNESS_KEY_FILE
    try:
        text = p.read_text(encoding="ascii").strip()
    except (OSError, UnicodeError) as exc:
        raise ConfigError(
            f"cannot read the witness key {p}: {exc}; make one with "
            "`scarches-fl audit witness-keygen --out DIR --name NAME`"
        ) from exc
    if p.stat().st_mode & 0o077:
        logger.warning("witness key %s is readable by others; chmod 600 it", p)
    signer = parse_signer_key(text)
    if signer.key_type != KEY_TYPE_COSIGNATURE_V1:
        signer = signer.as_cosigner()
    return signer


def witness_policy_from_trust(trust: Mapping[str, Any]) -> WitnessPolicy:
    """Read ``"witnesses": {"keys": [vkey, ...], "threshold": k}`` from a parsed trust.json
    (absent: no witness required). Keys must be ``cosignature/v1`` verifier key strings."""
    doc = trust.get("witnesses")
    if doc is None:
        return WitnessPolicy()
    if isinstance(doc, list):  # a bare list: every listed witness is trusted, none required
        doc = {"keys": doc, "threshold": 0}
    if not isinstance(doc, Mapping):
        raise ConfigError('trust.json: "witnesses" must be {"keys": [...], "threshold": k}')
    keys_raw = doc.get("keys", [])
    threshold = doc.get("threshold", 0)
    if not isinstance(keys_raw, list) or not all(isinstance(k, str) for k in keys_raw):
        raise ConfigError('trust.json: "witnesses.keys" must be a list of verifier key strings')
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ConfigError('trust.json: "witnesses.threshold" must be a non-negative integer')
    keys = tuple(parse_verifier_key(k) for k in keys_raw)
    for k in keys:
        if k.key_type != KEY_TYPE_COSIGNATURE_V1:
            raise ConfigError(
                f"trust.json: witness key {k.name!r} is not a cosignature/v1 (type 0x04) key"
            )
    if threshold > len(keys):
        raise ConfigError(
            f'trust.json: "witnesses.threshold" {threshold} exceeds the {len(keys)} listed keys'
        )
    return WitnessPolicy(keys, threshold)


def cosign(
    note: bytes,
    *,
    origin: str,
    log_verifiers: Sequence[NoteVerifier],
    witness: NoteSigner,
    previous: Checkpoint | None,
    consistency_proof: Sequence[bytes],
    timestamp: int,
) -> bytes:
    """The checkpoint note with this witness's cosignature appended (it re-verifies the log
    signature and the advance from ``previous`` first)."""
    _, out = cosign_checkpoint(
        note,
        origin=origin,
        log_verifier=list(log_verifiers),
        witness=witness,
        timestamp=timestamp,
        previous=previous,
        consistency_proof=consistency_proof,
    )
    return out


def trusted_cosigners(note: bytes, witnesses: Sequence[NoteVerifier]) -> list[str]:
    """Names of the trusted witnesses whose cosignature on ``note`` verifies (a trusted line
    that fails to verify raises :class:`CosignatureError`)."""
    if not witnesses:
        return []
    from protocols.checkpoint import NoteSignatureError, UntrustedNoteError

    try:
        opened = open_note(note, witnesses)
    except UntrustedNoteError:
        return []
    except NoteSignatureError as exc:
        raise CosignatureError(f"a trusted witness cosignature does not verify: {exc}") from exc
    return sorted({s.name for s in opened.verified})


def cosignature_names(note: bytes) -> list[str]:
    """Names on every signature line of a note (verified or not), for display."""
    return [s.name for s in parse_note(note).signatures]


def verify_witnessed_checkpoint(
    note: bytes,
    *,
    origin: str,
    log_verifiers: Sequence[NoteVerifier],
    policy: WitnessPolicy,
    now: int | None = None,
) -> Checkpoint:
    """A site's check: the log signed ``note`` and at least ``policy.threshold`` trusted
    witnesses cosigned it. With a threshold of 0 only the log signature is checked."""
    from protocols.checkpoint import verify_checkpoint

    if policy.threshold == 0:
        return verify_checkpoint(note, origin=origin, log_verifier=list(log_verifiers))
    return verify_cosigned_checkpoint(
        note,
        origin=origin,
        log_verifier=list(log_verifiers),
        witnesses=list(policy.witnesses),
        threshold=policy.threshold,
        now=now,
    ).checkpoint
