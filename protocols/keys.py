"""Ed25519 keys: generation, files, text form and key ids (``docs/adr/0003-key-ids-and-rotation.md``).

* **Key id**: lowercase hex SHA-256 of the raw 32-byte Ed25519 public key. Computed, never
  trusted from a peer: verifiers derive it from the key they hold.
* **Public key text** (in ``trust.json`` and policy entries): ``"ed25519:" + base64(raw 32 bytes)``
  (standard alphabet, padded).
* **Private key file**: PEM PKCS#8, unencrypted, created with mode 0600 (never overwritten
  unless asked). **Public key file**: PEM SubjectPublicKeyInfo, or the text form above.

Parsing functions raise :class:`~protocols.errors.KeyFormatError` for anything else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols.bundle import atomic_write
from protocols.errors import KeyFormatError

__all__ = [
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "KEY_TEXT_PREFIX",
    "generate_private_key",
    "public_key_raw",
    "key_id",
    "public_key_text",
    "public_key_from_text",
    "public_key_from_raw",
    "save_private_key",
    "save_public_key",
    "load_private_key",
    "load_public_key",
    "private_key_pem",
    "private_key_from_pem",
]

logger = logging.getLogger(__name__)

KEY_TEXT_PREFIX = "ed25519:"
_MAX_KEY_FILE = 16 * 1024


def generate_private_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key (OS randomness)."""
    return Ed25519PrivateKey.generate()


def public_key_raw(pub: Ed25519PublicKey) -> bytes:
    """The raw 32 bytes of an Ed25519 public key."""
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(pub: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Lowercase hex SHA-256 of the raw public key (64 characters)."""
    if isinstance(pub, Ed25519PrivateKey):
        pub = pub.public_key()
    return hashlib.sha256(public_key_raw(pub)).hexdigest()


def public_key_text(pub: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """``"ed25519:<base64 of the raw 32 bytes>"``."""
    if isinstance(pub, Ed25519PrivateKey):
        pub = pub.public_key()
    return KEY_TEXT_PREFIX + base64.b64encode(public_key_raw(pub)).decode("ascii")


def public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise KeyFormatError("an Ed25519 public key is exactly 32 bytes")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFormatError(f"not an Ed25519 public key: {exc}") from exc


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """Parse ``"ed25519:<base64>"`` strictly (canonical padded base64 of 32 bytes)."""
    if not isinstance(text, str) or not text.startswith(KEY_TEXT_PREFIX) or len(text) > 100:
        raise KeyFormatError(
            f"public key {str(text)[:60]!r} is not of the form 'ed25519:<base64 of 32 bytes>'"
        )
    b64 = text[len(KEY_TEXT_PREFIX) :]
    try:
        raw = base64.b64decode(b64.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise KeyFormatError(f"public key {text[:60]!r}: bad base64 ({exc})") from exc
    if base64.b64encode(raw).decode("ascii") != b64:
        raise KeyFormatError(f"public key {text[:60]!r}: base64 is not in canonical form")
    return public_key_from_raw(raw)


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFormatError(
            f"not an unencrypted PEM PKCS#8 private key ({exc}); create one with "
            "`scarches-fl site keygen --out DIR`"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError(f"the private key is {type(key).__name__}, expected Ed25519")
    return key


def save_private_key(
    key: Ed25519PrivateKey, path: str | os.PathLike[str], *, overwrite: bool = False
) -> None:
    """Write ``key`` as PEM PKCS#8 with mode 0600, atomically. Refuses to replace an existing
    file unless ``overwrite`` (a lost site key cannot be recovered)."""
    path = Path(path)
    pem = private_key_pem(key)
    if overwrite:
        atomic_write(path, pem, mode=0o600)
        return
    # Write a 0600 temp file, fsync, then hard-link it into place: link() fails if the name
    # exists, so an existing key is never replaced, and readers never see a partial file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError as exc:
            raise KeyFormatError(
                f"{path} already exists; refusing to overwrite a private key (move it away first)"
            ) from exc
    finally:
        os.unlink(tmp)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save_public_key(pub: Ed25519PublicKey | Ed25519PrivateKey, path: str | os.PathLike[str]) -> None:
    """Write the public key as PEM SubjectPublicKeyInfo (mode 0644), atomically."""
    if isinstance(pub, Ed25519PrivateKey):
        pub = pub.public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write(Path(path), pem, mode=0o644)


def _read_small(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_KEY_FILE + 1)
    except FileNotFoundError as exc:
        raise KeyFormatError(f"key file {path} does not exist") from exc
    except OSError as exc:
        raise KeyFormatError(f"cannot read key file {path}: {exc.strerror}") from exc
    if len(data) > _MAX_KEY_FILE:
        raise KeyFormatError(f"key file {path} is larger than {_MAX_KEY_FILE} bytes")
    return data


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load a PEM PKCS#8 Ed25519 private key; warns when group/other can read it."""
    path = Path(path)
    data = _read_small(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            logger.warning(
                "private key %s has mode %o; restrict it with `chmod 600 %s`", path, mode, path
            )
    except OSError:  # pragma: no cover
        pass
    try:
        return private_key_from_pem(data)
    except KeyFormatError as exc:
        raise KeyFormatError(f"{path}: {exc.message}") from exc


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load a public key file: PEM SubjectPublicKeyInfo or the ``ed25519:<base64>`` text form."""
    path = Path(path)
    data = _read_small(path)
    text = data.strip()
    if text.startswith(KEY_TEXT_PREFIX.encode()):
        try:
            return public_key_from_text(text.decode("ascii"))
        except (UnicodeDecodeError, KeyFormatError) as exc:
            raise KeyFormatError(f"{path}: not a valid ed25519 public key text") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFormatError(
            f"{path} is not a PEM public key or 'ed25519:<base64>' text ({exc}); export it with "
            "`scarches-fl site keygen`"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFormatError(f"{path} holds a {type(key).__name__}, expected Ed25519")
    return key
