"""The log's checkpoints on the coordinator's side: the log key that signs them (a C2SP note
signer named after the origin) and the witness cosignatures the coordinator accepts and stores.
The formats and their verification are :mod:`protocols.checkpoint`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.storage import LedgerStore
from protocols.bundle import atomic_write
from protocols.errors import ConfigError, VerificationError

if TYPE_CHECKING:
    from protocols.checkpoint import Checkpoint, NoteSigner, NoteVerifier

__all__ = [
    "LogSigner",
    "new_log_key",
    "load_log_signer",
    "check_origin",
    "MAX_UNPINNED_COSIGNATURES",
    "cosignature_lines_for",
]


class LogSigner:
    """The log's checkpoint key (a C2SP note signer named after the origin)."""

    def __init__(self, signer: NoteSigner, origin: str) -> None:
        self._signer = signer
        self.origin = origin

    @property
    def verifier(self) -> NoteVerifier:
        return self._signer.verifier

    @property
    def vkey(self) -> str:
        return str(self._signer.verifier.vkey)

    def sign_checkpoint(self, size: int, root_hash: bytes) -> bytes:
        from protocols.checkpoint import Checkpoint, sign_checkpoint

        return sign_checkpoint(Checkpoint(self.origin, size, root_hash), self._signer)

    def verify(self, note: bytes) -> Checkpoint:
        """The checkpoint in ``note``, after this log's signature on it verified."""
        from protocols.checkpoint import verify_checkpoint

        return verify_checkpoint(note, origin=self.origin, log_verifier=self.verifier)


def new_log_key(path: Path, origin: str) -> LogSigner:
    """Generate the log key (C2SP signer key string, mode 0600)."""
    from protocols.checkpoint import generate_signer

    signer = generate_signer(origin)
    atomic_write(path, (signer.skey + "\n").encode(), mode=0o600)
    return LogSigner(signer, origin)


def load_log_signer(path: Path, *, origin: str) -> LogSigner:
    from protocols.checkpoint import parse_signer_key

    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the log key {path}: {exc}; restore it from the backup of the state "
            "directory (paths.log_key in coordinator.yaml)"
        ) from exc
    signer = parse_signer_key(text)
    if signer.name != origin:
        raise ConfigError(
            f"{path}: the log key is named {signer.name!r} but coordinator.yaml says origin "
            f"{origin!r}; the origin is fixed at init -- restore the original coordinator.yaml"
        )
    return LogSigner(signer, origin)


def check_origin(origin: str) -> None:
    from protocols.checkpoint import Checkpoint, NoteSigner
    from protocols.merkle import EMPTY_ROOT

    try:
        Checkpoint(origin, 0, EMPTY_ROOT)
        NoteSigner(origin, b"\0" * 32)
    except (VerificationError, ValueError) as exc:
        raise ConfigError(
            f"--origin {origin!r}: not usable as a log origin ({exc}); use a single line without "
            "spaces or '+', e.g. consortium.example/ledger"
        ) from exc


#: Cosignature lines from keys trust.json does not pin, kept per checkpoint (pinned witnesses'
#: lines are always kept: junk from unknown keys can never crowd them out).
MAX_UNPINNED_COSIGNATURES = 8


def cosignature_lines_for(
    store: LedgerStore,
    signer: LogSigner,
    cosigned_note: bytes,
    witness_keys: tuple[str, ...] = (),
) -> tuple[int, list[str]]:
    """Check a witness's cosigned note and return (size, its cosignature lines to store).

    The note must be one of this log's checkpoints (our signature verifies and its text is the
    stored checkpoint of that size). Every other line must be a well-formed ``cosignature/v1``
    line; a line from a witness pinned in trust.json must verify (``open_note``), and lines
    from unpinned keys are kept only up to :data:`MAX_UNPINNED_COSIGNATURES` per checkpoint.
    Which witnesses count is decided by each verifier against its own trust.json."""
    from protocols.checkpoint import (
        KEY_TYPE_COSIGNATURE_V1,
        NoteSignatureError,
        UntrustedNoteError,
        open_note,
        parse_note,
        parse_verifier_key,
    )

    cp = signer.verify(cosigned_note)
    stored = store.checkpoint(cp.size)
    if stored is None or parse_note(stored.signed_note).text != parse_note(cosigned_note).text:
        raise VerificationError(
            f"the cosigned checkpoint of size {cp.size} is not one this log issued",
            reason_code="E_CHECKPOINT_INVALID",
        )
    note = parse_note(cosigned_note)
    pinned = [parse_verifier_key(k) for k in witness_keys]
    pinned_ids = {(v.name, v.key_id) for v in pinned}
    if pinned:
        try:
            open_note(cosigned_note, pinned)  # every line of a pinned witness must verify
        except UntrustedNoteError:
            pass  # no pinned witness in this note
        except NoteSignatureError as exc:
            raise VerificationError(
                f"a pinned witness's cosignature does not verify: {exc}",
                reason_code="E_CHECKPOINT_INVALID",
            ) from exc
    own = (signer.verifier.name, signer.verifier.key_id)
    lines: list[str] = []
    unpinned: list[str] = []
    for sig in note.signatures:
        if (sig.name, sig.key_id) == own:
            continue
        if sig.timestamp is None:
            raise VerificationError(
                f"signature line of {sig.name!r} is not a cosignature/v1 line (type "
                f"{KEY_TYPE_COSIGNATURE_V1:#x}: 8-byte timestamp + Ed25519 signature)",
                reason_code="E_CHECKPOINT_INVALID",
            )
        line = sig.line.rstrip("\n")
        (lines if (sig.name, sig.key_id) in pinned_ids else unpinned).append(line)
    if not lines and not unpinned:
        raise VerificationError(
            "the note carries no cosignature besides the log's own",
            reason_code="E_CHECKPOINT_INVALID",
        )
    if unpinned:
        have = store.cosignature_lines(cp.size)
        stored_unpinned = [ln for ln in have if _line_id(ln) not in pinned_ids]
        room = MAX_UNPINNED_COSIGNATURES - len(stored_unpinned)
        new = [ln for ln in unpinned if ln not in have]
        if len(new) > room:
            raise VerificationError(
                f"checkpoint {cp.size} already has {len(stored_unpinned)} cosignatures from "
                "witnesses trust.json does not pin (the limit); ask the operator to pin your "
                "witness key (`coordinator init --witness`)",
                reason_code="E_OVERSIZE",
            )
        lines += unpinned
    return cp.size, lines


def _line_id(line: str) -> tuple[str, int]:
    from protocols.checkpoint import parse_note

    sig = parse_note(b"x\n\n" + (line + "\n").encode()).signatures[0]
    return sig.name, sig.key_id
