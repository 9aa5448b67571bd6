"""C2SP checkpoints, signed notes and witness cosignatures for the scarches-fl ledger.

Formats (byte-exact specification: ``docs/protocol-log.md``):

* **Signed note** (c2sp.org/signed-note): a UTF-8 text ending in ``\\n``, a blank line, then one
  or more lines ``"\\u2014 " name " " base64(key_id[4] || signature) "\\n"``.
* **Checkpoint** (c2sp.org/tlog-checkpoint): a note whose text is ``origin\\n``, the tree size in
  decimal without leading zeroes ``\\n``, ``base64(root_hash)\\n``, then optional non-empty
  extension lines.
* **Ed25519 note signature** (type 0x01): Ed25519 over the note text. Key ID =
  ``SHA-256(name || 0x0A || 0x01 || public_key)[:4]``.
* **Witness cosignature** (c2sp.org/tlog-cosignature, ``cosignature/v1``, type 0x04): the
  signature bytes are ``timestamp (u64 big-endian) || Ed25519(message)`` where message =
  ``"cosignature/v1\\ntime " decimal(timestamp) "\\n" || note text``. Key ID =
  ``SHA-256(name || 0x0A || 0x04 || public_key)[:4]``.
* **Key strings** (Go ``sumdb/note`` form): verifier ``name+hhhhhhhh+base64(type || public_key)``,
  signer ``PRIVATE+KEY+name+hhhhhhhh+base64(type || seed)``, ``hhhhhhhh`` = key ID in lowercase hex.

Rules the verification core enforces (pure functions of bytes and trusted keys; no I/O, no clock
unless the caller passes ``now``):

1. Size first: a note longer than ``max_bytes`` (default :data:`MAX_NOTE_BYTES`) is rejected
   before it is decoded. At most :data:`MAX_NOTE_SIGNATURES` signature lines.
2. Strict syntax: valid UTF-8; no control character other than ``\\n``; the text is everything up
   to and including the newline before the *last* blank line; every following line is a well-formed
   signature line (em dash, space, key name without spaces or ``+``, space, canonical base64 of
   at least 5 bytes). Anything else is a :class:`NoteFormatError`.
3. A signature line whose (name, key ID) pair matches no trusted key is ignored, even if the name
   or the ID alone matches one (c2sp signed-note). A line that matches a trusted key MUST verify;
   if it does not, the whole note is rejected (:class:`NoteSignatureError`). If no line from a
   trusted key verifies, the note is rejected (:class:`UntrustedNoteError`). There is no
   permissive mode: an empty set of trusted keys rejects every note.
4. A checkpoint's origin must equal, byte for byte, the origin the caller pinned
   (:class:`CheckpointOriginError`); its size is a decimal uint64 without leading zeroes; its root
   is canonical base64 of exactly 32 bytes; the empty tree's root must be SHA-256 of the empty
   string (:class:`CheckpointFormatError` otherwise).
5. A client accepts a newer checkpoint only through :func:`check_checkpoint_advance`: the same
   origin, never a smaller size (:class:`RollbackError`), never a different root at the same
   size, and never a larger size without a valid RFC 9162 consistency proof from the last
   verified checkpoint (:class:`ForkError`). Tree sizes and roots handed to
   :mod:`protocols.merkle` come from verified checkpoints only, never from unsigned hints.
6. Cosignatures: only witnesses the caller trusts count; a trusted witness line that fails to
   verify rejects the note; fewer than ``threshold`` valid witnesses is a
   :class:`CosignatureError`; the threshold must be between 1 and the number of witnesses;
   timestamps above ``2**63 - 1`` are malformed, and with ``now`` given, timestamps more than
   ``max_clock_skew`` seconds in the future are rejected.

Every error raised by ``cryptography``, ``base64`` or UTF-8 decoding is caught here and re-raised
as one of the typed errors below (all :class:`protocols.errors.ScarchesFLError`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols.errors import CheckpointError, ConfigError, FormatError, KeyFormatError
from protocols.merkle import EMPTY_ROOT, HASH_SIZE, MAX_TREE_SIZE, ConsistencyProofError
from protocols.merkle import verify_consistency as _verify_consistency

__all__ = [
    # constants
    "KEY_TYPE_ED25519",
    "KEY_TYPE_COSIGNATURE_V1",
    "MAX_NOTE_BYTES",
    "MAX_NOTE_SIGNATURES",
    "MAX_TIMESTAMP",
    # keys
    "key_id",
    "NoteVerifier",
    "NoteSigner",
    "parse_verifier_key",
    "parse_signer_key",
    "generate_signer",
    "signer_from_private_key",
    "verifier_from_public_key",
    # notes
    "NoteSignature",
    "Note",
    "VerifiedNote",
    "parse_note",
    "sign_note",
    "open_note",
    "append_signatures",
    # checkpoints
    "Checkpoint",
    "parse_checkpoint_body",
    "sign_checkpoint",
    "verify_checkpoint",
    "check_checkpoint_advance",
    # cosignatures
    "cosignature_message",
    "sign_cosignature",
    "cosign_checkpoint",
    "CosignedCheckpoint",
    "verify_cosigned_checkpoint",
    # errors
    "NoteFormatError",
    "KeyFormatError",
    "NoteSignatureError",
    "UntrustedNoteError",
    "CheckpointFormatError",
    "CheckpointOriginError",
    "RollbackError",
    "ForkError",
    "CosignatureError",
]

logger = logging.getLogger(__name__)

KEY_TYPE_ED25519 = 0x01
"""Signature type byte of plain Ed25519 note signatures (the log's key)."""
KEY_TYPE_COSIGNATURE_V1 = 0x04
"""Signature type byte of timestamped Ed25519 ``cosignature/v1`` witness signatures."""
_KEY_TYPES = {KEY_TYPE_ED25519: "Ed25519", KEY_TYPE_COSIGNATURE_V1: "cosignature/v1"}

MAX_NOTE_BYTES = 64 * 1024
"""Default cap on a signed note's size, checked before decoding."""
MAX_NOTE_SIGNATURES = 100
"""Most signature lines accepted in one note (c2sp requires accepting at least 16)."""
MAX_TIMESTAMP = 2**63 - 1
"""Largest cosignature timestamp (c2sp tlog-cosignature)."""

_EM_DASH = "\u2014"
_SIG_PREFIX = _EM_DASH + " "
_ED25519_SIG_LEN = 64
_COSIG_LEN = 8 + _ED25519_SIG_LEN
_HEX8 = re.compile(r"[0-9a-f]{8}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")
_NAME_FORBIDDEN = re.compile(r"[\s+\x00-\x1f\x7f-\x9f]")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")  # control characters other than newline


# --------------------------------------------------------------------------------------------
# Errors


class NoteFormatError(FormatError):
    default_reason_code = "E_CHECKPOINT_INVALID"

    """The bytes are not a well-formed C2SP signed note."""



class NoteSignatureError(CheckpointError):
    """A signature from a trusted key does not verify: the note was altered or forged."""


class UntrustedNoteError(CheckpointError):
    """No signature in the note comes from a trusted key."""


class CheckpointFormatError(FormatError):
    default_reason_code = "E_CHECKPOINT_INVALID"

    """The note text is not a well-formed C2SP tlog checkpoint."""


class CheckpointOriginError(CheckpointError):
    """The checkpoint (or pair of checkpoints) names a different log than the one pinned."""


class RollbackError(CheckpointError):
    default_reason_code = "E_CHECKPOINT_ROLLBACK"

    """A newer checkpoint has a smaller tree than one already verified: a rollback."""


class ForkError(CheckpointError):
    default_reason_code = "E_CHECKPOINT_ROLLBACK"

    """Two signed checkpoints of one log cannot both be true: a split view (fork)."""


class CosignatureError(CheckpointError):
    """Witness cosignatures do not meet the required threshold, or one is invalid."""


# --------------------------------------------------------------------------------------------
# Names, base64, keys


def _valid_name(name: object) -> bool:
    """Non-empty; no Unicode space (``str.isspace``: categories Zs, Zl, Zp and the ASCII
    spaces), no ``+``, no C0/C1 control character."""
    return isinstance(name, str) and bool(name) and _NAME_FORBIDDEN.search(name) is None


def _check_name(name: object, error: type[Exception] = KeyFormatError) -> str:
    if not _valid_name(name):
        raise error(
            f"key name {name!r} is not valid: it must be non-empty and contain no spaces, no '+' "
            "and no control characters (use a schema-less URL such as example.org/log)"
        )
    assert isinstance(name, str)
    return name


def _b64decode_strict(text: str) -> bytes:
    """Standard base64 with padding; canonical only (re-encoding gives back the same text)."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as e:
        raise ValueError(f"not standard base64: {e}") from e
    if base64.b64encode(raw).decode("ascii") != text:
        raise ValueError("non-canonical base64")
    return raw


def key_id(name: str, public_key: bytes, key_type: int = KEY_TYPE_ED25519) -> int:
    """C2SP key ID: the first four bytes, big-endian, of
    ``SHA-256(name || 0x0A || key_type || public_key)``."""
    _check_name(name)
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([key_type]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


def _check_key_type(key_type: int) -> int:
    if key_type not in _KEY_TYPES:
        raise KeyFormatError(
            f"signature type 0x{key_type:02x} is not supported; use 0x01 (Ed25519 note "
            "signatures, the log key) or 0x04 (cosignature/v1, witness keys)"
        )
    return key_type


@dataclass(frozen=True)
class NoteVerifier:
    """A trusted public key: name, key type (0x01 log / 0x04 witness) and 32-byte Ed25519 key."""

    name: str
    public_key: bytes
    key_type: int = KEY_TYPE_ED25519

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_key_type(self.key_type)
        if not isinstance(self.public_key, bytes) or len(self.public_key) != 32:
            raise KeyFormatError("an Ed25519 public key is exactly 32 bytes")

    @cached_property
    def key_id(self) -> int:
        """The 32-bit key ID that signature lines of this key carry."""
        return key_id(self.name, self.public_key, self.key_type)

    @property
    def vkey(self) -> str:
        """The verifier key string ``name+hhhhhhhh+base64(type || public_key)``."""
        blob = base64.b64encode(bytes([self.key_type]) + self.public_key).decode("ascii")
        return f"{self.name}+{self.key_id:08x}+{blob}"

    def __str__(self) -> str:
        return self.vkey

    def _verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except (InvalidSignature, ValueError, UnsupportedAlgorithm):
            return False
        return True


@dataclass(frozen=True)
class NoteSigner:
    """A private signing key: name, key type and 32-byte Ed25519 seed (never printed)."""

    name: str
    seed: bytes = field(repr=False)
    key_type: int = KEY_TYPE_ED25519

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_key_type(self.key_type)
        if not isinstance(self.seed, bytes) or len(self.seed) != 32:
            raise KeyFormatError("an Ed25519 private key seed is exactly 32 bytes")

    def _private(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    @cached_property
    def verifier(self) -> NoteVerifier:
        """The matching public :class:`NoteVerifier`."""
        pub = (
            self._private()
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        return NoteVerifier(self.name, pub, self.key_type)

    @property
    def key_id(self) -> int:
        return self.verifier.key_id

    @property
    def skey(self) -> str:
        """The signer key string ``PRIVATE+KEY+name+hhhhhhhh+base64(type || seed)``. Secret."""
        blob = base64.b64encode(bytes([self.key_type]) + self.seed).decode("ascii")
        return f"PRIVATE+KEY+{self.name}+{self.key_id:08x}+{blob}"

    def as_cosigner(self) -> NoteSigner:
        """The same key material as a ``cosignature/v1`` witness signer (type 0x04, so a
        different key ID)."""
        return NoteSigner(self.name, self.seed, KEY_TYPE_COSIGNATURE_V1)

    def sign(self, text: bytes, *, timestamp: int | None = None) -> NoteSignature:
        """Sign a note text: plain Ed25519 for type 0x01 (``timestamp`` must be None);
        ``cosignature/v1`` for type 0x04 (``timestamp`` required, POSIX seconds)."""
        text = _check_text(text)
        if self.key_type == KEY_TYPE_ED25519:
            if timestamp is not None:
                raise ValueError("plain Ed25519 note signatures carry no timestamp")
            sig = self._private().sign(text)
        else:
            if timestamp is None:
                raise ValueError("a cosignature/v1 needs a timestamp (POSIX seconds)")
            ts = _check_timestamp(timestamp, ValueError)
            sig = ts.to_bytes(8, "big") + self._private().sign(cosignature_message(text, ts))
        return NoteSignature(self.name, self.key_id, sig)


def parse_verifier_key(vkey: str) -> NoteVerifier:
    """Parse ``name+hhhhhhhh+base64(type || public_key)``; checks the key ID against the key."""
    if not isinstance(vkey, str):
        raise KeyFormatError(f"a verifier key is a string, got {type(vkey).__name__}")
    parts = vkey.split("+", 2)  # base64 may itself contain "+"
    if len(parts) != 3:
        raise KeyFormatError(
            f"verifier key {vkey[:80]!r} is not of the form name+keyid+base64key; copy the log's "
            "public key string exactly as published (trust.json)"
        )
    return _key_from_parts(parts[0], parts[1], parts[2], private=False)  # type: ignore[return-value]


def parse_signer_key(skey: str) -> NoteSigner:
    """Parse ``PRIVATE+KEY+name+hhhhhhhh+base64(type || seed)``; checks the key ID."""
    if not isinstance(skey, str):
        raise KeyFormatError(f"a signer key is a string, got {type(skey).__name__}")
    parts = skey.split("+", 4)  # base64 may itself contain "+"
    if len(parts) != 5 or parts[0] != "PRIVATE" or parts[1] != "KEY":
        raise KeyFormatError(
            "signer key is not of the form PRIVATE+KEY+name+keyid+base64key (contents not shown)"
        )
    return _key_from_parts(parts[2], parts[3], parts[4], private=True)  # type: ignore[return-value]


def _key_from_parts(
    name: str, hex_id: str, blob64: str, *, private: bool
) -> NoteVerifier | NoteSigner:
    what = "signer" if private else "verifier"
    _check_name(name)
    if not _HEX8.fullmatch(hex_id):
        raise KeyFormatError(f"{what} key ID {hex_id!r} must be 8 lowercase hex digits")
    try:
        blob = _b64decode_strict(blob64)
    except ValueError as e:
        raise KeyFormatError(f"{what} key material is not canonical base64") from e
    if len(blob) != 33:
        raise KeyFormatError(
            f"{what} key material must be 1 type byte + 32 key bytes, got {len(blob)}"
        )
    key_type = _check_key_type(blob[0])
    key: NoteVerifier | NoteSigner
    if private:
        key = NoteSigner(name, blob[1:], key_type)
    else:
        key = NoteVerifier(name, blob[1:], key_type)
    if key.key_id != int(hex_id, 16):
        raise KeyFormatError(
            f"{what} key for {name!r} says key ID {hex_id} but its key hashes to "
            f"{key.key_id:08x}: the key string is corrupt; copy it again from its source"
        )
    return key


def generate_signer(name: str, key_type: int = KEY_TYPE_ED25519) -> NoteSigner:
    """A fresh random Ed25519 signer (log key: type 0x01; witness key: type 0x04)."""
    return NoteSigner(name, secrets.token_bytes(32), key_type)


def signer_from_private_key(
    name: str, private_key: Ed25519PrivateKey, key_type: int = KEY_TYPE_ED25519
) -> NoteSigner:
    """Wrap a ``cryptography`` Ed25519 private key (e.g. from ``protocols.keys``) as a signer."""
    seed = private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return NoteSigner(name, seed, key_type)


def verifier_from_public_key(
    name: str, public_key: Ed25519PublicKey | bytes, key_type: int = KEY_TYPE_ED25519
) -> NoteVerifier:
    """Wrap a ``cryptography`` Ed25519 public key (or its 32 raw bytes) as a verifier."""
    if isinstance(public_key, Ed25519PublicKey):
        public_key = public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return NoteVerifier(name, bytes(public_key), key_type)


# --------------------------------------------------------------------------------------------
# Notes


def _check_text(text: bytes | str) -> bytes:
    """Validate a note text to be signed: UTF-8, ends in newline, no control characters."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    if not isinstance(text, bytes):
        raise TypeError(f"note text must be bytes or str, got {type(text).__name__}")
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NoteFormatError("note text must be valid UTF-8") from e
    if not decoded.endswith("\n"):
        raise NoteFormatError("note text must end with a newline")
    if _CONTROL.search(decoded):
        raise NoteFormatError("note text must not contain control characters other than newline")
    return text


def _check_timestamp(ts: object, error: type[Exception]) -> int:
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= MAX_TIMESTAMP:
        raise error(f"cosignature timestamp {ts!r} must be an integer in [0, 2**63)")
    return ts


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, 32-bit key ID, and the signature bytes after the ID."""

    name: str
    key_id: int
    signature: bytes

    @property
    def line(self) -> str:
        """The line as it appears in a note, newline included."""
        blob = base64.b64encode(self.key_id.to_bytes(4, "big") + self.signature).decode("ascii")
        return f"{_SIG_PREFIX}{self.name} {blob}\n"

    @property
    def timestamp(self) -> int | None:
        """For a cosignature/v1 line: its big-endian timestamp; else None (unknown type)."""
        if len(self.signature) == _COSIG_LEN:
            return int.from_bytes(self.signature[:8], "big")
        return None


@dataclass(frozen=True)
class Note:
    """A parsed (not yet verified) signed note."""

    text: bytes
    signatures: tuple[NoteSignature, ...]

    def to_bytes(self) -> bytes:
        return self.text + b"\n" + "".join(s.line for s in self.signatures).encode("utf-8")


@dataclass(frozen=True)
class VerifiedNote:
    """A note whose text was verified by at least one trusted key."""

    text: bytes
    verified: tuple[NoteSignature, ...]
    unverified: tuple[NoteSignature, ...]


def parse_note(data: bytes, *, max_bytes: int = MAX_NOTE_BYTES) -> Note:
    """Parse a signed note's syntax (rules 1 and 2). Verifies nothing: use :func:`open_note`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise NoteFormatError(f"a signed note is bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise NoteFormatError(
            f"signed note is {len(data)} bytes, over the {max_bytes}-byte limit; refuse it (a "
            "checkpoint is a few hundred bytes)"
        )
    try:
        msg = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NoteFormatError("signed note is not valid UTF-8") from e
    if _CONTROL.search(msg):
        raise NoteFormatError("signed note contains a control character other than newline")
    split = msg.rfind("\n\n")
    if split < 0:
        raise NoteFormatError("signed note has no blank line separating text from signatures")
    text, block = msg[: split + 1], msg[split + 2 :]
    if not block or not block.endswith("\n"):
        raise NoteFormatError("signed note has no signature lines, or they do not end in newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_NOTE_SIGNATURES:
        raise NoteFormatError(
            f"signed note has {len(lines)} signatures, more than the {MAX_NOTE_SIGNATURES} accepted"
        )
    sigs = []
    for n, line in enumerate(lines, 1):
        if not line.startswith(_SIG_PREFIX):
            raise NoteFormatError(f"signature line {n} does not start with an em dash and a space")
        rest = line[len(_SIG_PREFIX) :]
        name, sep, blob64 = rest.partition(" ")
        if not sep or not _valid_name(name):
            raise NoteFormatError(f"signature line {n} has no valid key name")
        try:
            blob = _b64decode_strict(blob64)
        except ValueError as e:
            raise NoteFormatError(f"signature line {n} is not canonical base64") from e
        if len(blob) < 5:
            raise NoteFormatError(f"signature line {n} is too short for a key ID and a signature")
        sigs.append(NoteSignature(name, int.from_bytes(blob[:4], "big"), blob[4:]))
    return Note(text.encode("utf-8"), tuple(sigs))


def _index_verifiers(verifiers: Iterable[NoteVerifier]) -> dict[tuple[str, int], NoteVerifier]:
    known: dict[tuple[str, int], NoteVerifier] = {}
    for v in verifiers:
        if not isinstance(v, NoteVerifier):
            raise ConfigError(f"trusted keys must be NoteVerifier objects, got {type(v).__name__}")
        k = (v.name, v.key_id)
        if k in known and known[k] != v:
            raise ConfigError(
                f"two different trusted keys share name {v.name!r} and key ID {v.key_id:08x}; "
                "remove one from the trust configuration"
            )
        known[k] = v
    return known


def _verify_line(v: NoteVerifier, text: bytes, sig: NoteSignature) -> bool:
    if v.key_type == KEY_TYPE_ED25519:
        return len(sig.signature) == _ED25519_SIG_LEN and v._verify(text, sig.signature)
    if len(sig.signature) != _COSIG_LEN:
        return False
    ts = int.from_bytes(sig.signature[:8], "big")
    if ts > MAX_TIMESTAMP:
        return False
    return v._verify(cosignature_message(text, ts), sig.signature[8:])


def open_note(
    data: bytes, verifiers: Iterable[NoteVerifier], *, max_bytes: int = MAX_NOTE_BYTES
) -> VerifiedNote:
    """Parse and verify a signed note against trusted keys (rules 1 to 3)."""
    known = _index_verifiers(verifiers)
    note = parse_note(data, max_bytes=max_bytes)
    verified, unverified = [], []
    for sig in note.signatures:
        v = known.get((sig.name, sig.key_id))
        if v is None:
            unverified.append(sig)
            continue
        if not _verify_line(v, note.text, sig):
            raise NoteSignatureError(
                f"the signature of trusted key {sig.name!r} ({sig.key_id:08x}) does not verify: "
                "the note was altered or forged. Do not use it; keep your last verified "
                "checkpoint and report the coordinator"
            )
        verified.append(sig)
    if not verified:
        names = ", ".join(sorted({f"{n}+{i:08x}" for n, i in known})) or "none"
        raise UntrustedNoteError(
            f"no signature in the note comes from a trusted key (trusted: {names}); check that "
            "trust.json pins the right log key, or the note was signed by someone else"
        )
    return VerifiedNote(note.text, tuple(verified), tuple(unverified))


def sign_note(text: bytes | str, signers: NoteSigner | Sequence[NoteSigner]) -> bytes:
    """Sign a note text with one or more type 0x01 signers; returns the signed note bytes."""
    if isinstance(signers, NoteSigner):
        signers = [signers]
    if not signers:
        raise ValueError("sign_note needs at least one signer")
    raw = _check_text(text)
    return Note(raw, tuple(s.sign(raw) for s in signers)).to_bytes()


def append_signatures(
    note_bytes: bytes,
    signatures: Iterable[NoteSignature | str],
    *,
    max_bytes: int = MAX_NOTE_BYTES,
) -> bytes:
    """Append signature lines (objects or line strings) to a note, skipping exact duplicates.
    Verifies nothing: verify the new lines with :func:`open_note` or
    :func:`verify_cosigned_checkpoint`."""
    note = parse_note(note_bytes, max_bytes=max_bytes)
    sigs = list(note.signatures)
    for s in signatures:
        if isinstance(s, str):
            line = s if s.endswith("\n") else s + "\n"
            parsed = parse_note(b"x\n\n" + line.encode("utf-8"), max_bytes=max_bytes).signatures
            if len(parsed) != 1:
                raise NoteFormatError("append_signatures takes one signature line per string")
            s = parsed[0]
        if s not in sigs:
            sigs.append(s)
    out = Note(note.text, tuple(sigs)).to_bytes()
    parse_note(out, max_bytes=max_bytes)  # the result obeys the same limits
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """The body of a C2SP tlog checkpoint: which log, how many leaves, and the root hash."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (
            not isinstance(self.origin, str)
            or not self.origin
            or any(ord(c) < 0x20 for c in self.origin)
        ):
            raise CheckpointFormatError("checkpoint origin must be a non-empty single line")
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise CheckpointFormatError("checkpoint size must be an integer")
        if not 0 <= self.size <= MAX_TREE_SIZE:
            raise CheckpointFormatError(f"checkpoint size {self.size} is outside [0, 2**64)")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            raise CheckpointFormatError("checkpoint root hash must be 32 bytes")
        if self.size == 0 and self.root_hash != EMPTY_ROOT:
            raise CheckpointFormatError(
                "a checkpoint of the empty tree must carry SHA-256 of the empty string as its root"
            )
        exts = tuple(self.extensions)
        for e in exts:
            if not isinstance(e, str) or not e or any(ord(c) < 0x20 for c in e):
                raise CheckpointFormatError(
                    "checkpoint extension lines must be non-empty single lines"
                )
        object.__setattr__(self, "extensions", exts)

    def body(self) -> bytes:
        """The note text: ``origin\\nsize\\nbase64(root)\\n`` plus extension lines."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root_hash).decode("ascii")]
        lines += self.extensions
        return ("\n".join(lines) + "\n").encode("utf-8")

    @classmethod
    def from_body(cls, text: bytes | str) -> Checkpoint:
        return parse_checkpoint_body(text)


def parse_checkpoint_body(text: bytes | str) -> Checkpoint:
    """Parse a checkpoint note text strictly (rule 4, except the origin pin)."""
    if isinstance(text, bytes | bytearray | memoryview):
        if len(text) > MAX_NOTE_BYTES:
            raise CheckpointFormatError("checkpoint body is over the note size limit")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointFormatError("checkpoint body is not valid UTF-8") from e
    if not isinstance(text, str):
        raise CheckpointFormatError(
            f"checkpoint body must be bytes or str, got {type(text).__name__}"
        )
    if len(text) > MAX_NOTE_BYTES:
        raise CheckpointFormatError("checkpoint body is over the note size limit")
    if not text.endswith("\n"):
        raise CheckpointFormatError("checkpoint body must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise CheckpointFormatError(
            "checkpoint body needs at least three lines: origin, tree size, root hash"
        )
    origin, size_s, root_s, *exts = lines
    if not origin or _CONTROL.search(text):
        raise CheckpointFormatError("checkpoint origin is empty or contains control characters")
    if not _DECIMAL.fullmatch(size_s) or int(size_s) > MAX_TREE_SIZE:
        raise CheckpointFormatError(
            f"checkpoint tree size {size_s[:30]!r} is not a decimal uint64 without leading zeroes"
        )
    try:
        root = _b64decode_strict(root_s)
    except ValueError as e:
        raise CheckpointFormatError("checkpoint root hash is not canonical base64") from e
    if len(root) != HASH_SIZE:
        raise CheckpointFormatError(f"checkpoint root hash is {len(root)} bytes, not 32")
    if any(not e for e in exts):
        raise CheckpointFormatError("checkpoint extension lines must be non-empty")
    return Checkpoint(origin, int(size_s), root, tuple(exts))


def sign_checkpoint(checkpoint: Checkpoint, signer: NoteSigner) -> bytes:
    """Sign a checkpoint as a C2SP signed note with the log's type 0x01 key. The key name
    SHOULD equal the origin (c2sp tlog-checkpoint)."""
    if signer.key_type != KEY_TYPE_ED25519:
        raise ValueError("a log signs checkpoints with a type 0x01 (Ed25519 note) key")
    if signer.name != checkpoint.origin:
        logger.warning(
            "log key name %r differs from checkpoint origin %r", signer.name, checkpoint.origin
        )
    return sign_note(checkpoint.body(), signer)


def _log_verifiers(
    log_verifier: NoteVerifier | str | Sequence[NoteVerifier | str],
) -> list[NoteVerifier]:
    items = [log_verifier] if isinstance(log_verifier, NoteVerifier | str) else list(log_verifier)
    out = [parse_verifier_key(v) if isinstance(v, str) else v for v in items]
    if not out:
        raise ConfigError("verify_checkpoint needs at least one trusted log key; none was given")
    for v in out:
        if not isinstance(v, NoteVerifier) or v.key_type != KEY_TYPE_ED25519:
            raise ConfigError("the log key must be a type 0x01 (Ed25519 note) verifier key")
    return out


def _open_checkpoint(
    note_bytes: bytes,
    origin: str,
    verifiers: Sequence[NoteVerifier],
    max_bytes: int,
) -> tuple[Checkpoint, VerifiedNote]:
    if not isinstance(origin, str) or not origin:
        raise ConfigError("the pinned log origin must be a non-empty string (see trust.json)")
    opened = open_note(note_bytes, verifiers, max_bytes=max_bytes)
    cp = parse_checkpoint_body(opened.text)
    if cp.origin != origin:
        raise CheckpointOriginError(
            f"checkpoint is for log {cp.origin!r}, but this client trusts log {origin!r}: "
            "point the client at the right coordinator, or fix the origin in trust.json"
        )
    return cp, opened


def verify_checkpoint(
    note_bytes: bytes,
    *,
    origin: str,
    log_verifier: NoteVerifier | str | Sequence[NoteVerifier | str],
    max_bytes: int = MAX_NOTE_BYTES,
) -> Checkpoint:
    """Verify a signed checkpoint note against the pinned log key(s) and origin (rules 1-4) and
    return its body. Several log keys may be given (rotation); any one suffices."""
    cp, _ = _open_checkpoint(note_bytes, origin, _log_verifiers(log_verifier), max_bytes)
    return cp


def check_checkpoint_advance(
    old: Checkpoint | None, new: Checkpoint, consistency_proof: Sequence[bytes]
) -> None:
    """Decide whether a client that last verified ``old`` may move to ``new`` (rule 5). Both MUST
    be verified checkpoints (:func:`verify_checkpoint`); ``consistency_proof`` is the RFC 9162
    proof from ``old.size`` to ``new.size``. Returns None, or raises :class:`RollbackError`,
    :class:`ForkError` or :class:`CheckpointOriginError`."""
    if not isinstance(new, Checkpoint) or (old is not None and not isinstance(old, Checkpoint)):
        raise TypeError("check_checkpoint_advance takes verified Checkpoint objects")
    if old is None:
        return  # first contact: the signature is all there is (trust on first use of the key)
    if old.origin != new.origin:
        raise CheckpointOriginError(
            f"the new checkpoint is for log {new.origin!r} but the stored one is for "
            f"{old.origin!r}: they are different logs; fix the coordinator address or trust.json"
        )
    if new.size < old.size:
        raise RollbackError(
            f"rollback: the coordinator served a checkpoint of size {new.size}, older than the "
            f"size-{old.size} checkpoint this client already verified. Refuse it and keep the "
            "stored checkpoint; retry later, and report the coordinator if it persists"
        )
    if new.size == old.size:
        if new.root_hash != old.root_hash:
            raise ForkError(
                f"fork: two checkpoints of log {new.origin!r} at size {new.size} have different "
                "roots, both signed by the log key. Refuse the new one, keep both notes as "
                "evidence, and report them to the operator and the auditors"
            )
        return
    if old.size == 0:
        return  # every tree extends the empty tree
    try:
        _verify_consistency(old.size, new.size, old.root_hash, new.root_hash, consistency_proof)
    except ConsistencyProofError as e:
        raise ForkError(
            f"fork or corrupt proof: the log could not prove that its size-{new.size} tree "
            f"extends the size-{old.size} tree this client verified ({e}). Refuse the new "
            "checkpoint and keep the stored one; refetch the proof, and if no valid proof can be "
            "had, keep both notes as evidence of a split view and report them to the auditors"
        ) from e


# --------------------------------------------------------------------------------------------
# Witness cosignatures (cosignature/v1)


def cosignature_message(text: bytes, timestamp: int) -> bytes:
    """The bytes a ``cosignature/v1`` signs: ``cosignature/v1\\ntime <ts>\\n`` + note text."""
    ts = _check_timestamp(timestamp, ValueError)
    return b"cosignature/v1\ntime " + str(ts).encode("ascii") + b"\n" + text


def sign_cosignature(
    checkpoint_text: bytes, witness: NoteSigner, *, timestamp: int
) -> NoteSignature:
    """A witness's cosignature line over a checkpoint text. The witness MUST have verified the
    log's signature and consistency with its previous view first (see :func:`cosign_checkpoint`)."""
    if witness.key_type != KEY_TYPE_COSIGNATURE_V1:
        raise ValueError("a witness cosigns with a type 0x04 key; use signer.as_cosigner()")
    return witness.sign(checkpoint_text, timestamp=timestamp)


def cosign_checkpoint(
    note_bytes: bytes,
    *,
    origin: str,
    log_verifier: NoteVerifier | str | Sequence[NoteVerifier | str],
    witness: NoteSigner,
    timestamp: int,
    previous: Checkpoint | None = None,
    consistency_proof: Sequence[bytes] = (),
    max_bytes: int = MAX_NOTE_BYTES,
) -> tuple[Checkpoint, bytes]:
    """What a witness does: verify the log's checkpoint, check it advances from the witness's
    ``previous`` view (rollback / fork refused), and append its cosignature line. Returns the
    checkpoint and the note with the cosignature added."""
    cp, opened = _open_checkpoint(note_bytes, origin, _log_verifiers(log_verifier), max_bytes)
    check_checkpoint_advance(previous, cp, consistency_proof)
    line = sign_cosignature(opened.text, witness, timestamp=timestamp)
    return cp, append_signatures(note_bytes, [line], max_bytes=max_bytes)


@dataclass(frozen=True)
class CosignedCheckpoint:
    """A checkpoint verified by the log key and by ``threshold`` or more trusted witnesses."""

    checkpoint: Checkpoint
    cosigned_at: dict[str, int]  # witness key name -> cosignature timestamp


def verify_cosigned_checkpoint(
    note_bytes: bytes,
    *,
    origin: str,
    log_verifier: NoteVerifier | str | Sequence[NoteVerifier | str],
    witnesses: Sequence[NoteVerifier | str],
    threshold: int,
    now: int | None = None,
    max_clock_skew: int = 300,
    max_bytes: int = MAX_NOTE_BYTES,
) -> CosignedCheckpoint:
    """Verify a checkpoint and its witness cosignatures (rules 1-4 and 6)."""
    logs = _log_verifiers(log_verifier)
    wits = [parse_verifier_key(w) if isinstance(w, str) else w for w in witnesses]
    for w in wits:
        if not isinstance(w, NoteVerifier) or w.key_type != KEY_TYPE_COSIGNATURE_V1:
            raise ConfigError("witness keys must be type 0x04 (cosignature/v1) verifier keys")
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int)
        or not 1 <= threshold <= len(wits)
    ):
        raise ConfigError(
            f"cosignature threshold {threshold!r} must be between 1 and the number of trusted "
            f"witnesses ({len(wits)}); an empty policy would accept anything"
        )
    cp, _ = _open_checkpoint(note_bytes, origin, logs, max_bytes)
    try:
        opened = open_note(note_bytes, wits, max_bytes=max_bytes)
    except UntrustedNoteError as e:
        raise CosignatureError(
            f"no trusted witness cosigned this checkpoint (need {threshold}); ask the witnesses "
            "to cosign, or wait for them"
        ) from e
    except NoteSignatureError as e:
        raise CosignatureError(f"a trusted witness cosignature does not verify: {e}") from e
    seen: dict[str, int] = {}
    for sig in opened.verified:
        ts = sig.timestamp
        assert ts is not None  # a verified type 0x04 line has a timestamp
        if now is not None and ts > now + max_clock_skew:
            raise CosignatureError(
                f"witness {sig.name!r} dated its cosignature {ts}, in the future of now={now}; "
                "check the clocks of this machine and the witness"
            )
        seen[sig.name] = max(ts, seen.get(sig.name, 0))
    if len(seen) < threshold:
        raise CosignatureError(
            f"only {len(seen)} of the required {threshold} trusted witnesses cosigned this "
            "checkpoint; wait for more witnesses, or lower the threshold in the trust policy"
        )
    return CosignedCheckpoint(cp, seen)
