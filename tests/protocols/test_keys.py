"""Ed25519 key files, text form and key ids."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from protocols.errors import KeyFormatError
from protocols.keys import (
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    public_key_from_text,
    public_key_raw,
    public_key_text,
    save_private_key,
    save_public_key,
)
from tests.protocols._factories import det_key


def test_key_id_is_sha256_of_raw_public_key():
    k = det_key(7)
    raw = public_key_raw(k.public_key())
    assert len(raw) == 32
    assert key_id(k) == key_id(k.public_key()) == hashlib.sha256(raw).hexdigest()


def test_rfc8032_test1_public_key():
    # RFC 8032 section 7.1 TEST 1: secret key 9d61b1...7f60 -> public key d75a98...511a
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    sk = Ed25519PrivateKey.from_private_bytes(
        bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    )
    assert public_key_raw(sk.public_key()).hex() == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )
    assert sk.sign(b"").hex().startswith("e5564300c360ac729086e2cc806e828a")


def test_text_roundtrip_and_strictness():
    k = generate_private_key()
    text = public_key_text(k)
    assert text.startswith("ed25519:")
    assert key_id(public_key_from_text(text)) == key_id(k)
    for bad in ["", "ed25519:", "rsa:AAAA", text[:-2], text + "A", text.replace("ed25519:", "ED25519:"), 5]:
        with pytest.raises(KeyFormatError):
            public_key_from_text(bad)


def test_private_key_file_mode_and_no_overwrite(tmp_path):
    k = generate_private_key()
    p = tmp_path / "site.key"
    save_private_key(k, p)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert p.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert key_id(load_private_key(p)) == key_id(k)
    with pytest.raises(KeyFormatError, match="refusing"):
        save_private_key(generate_private_key(), p)
    save_private_key(generate_private_key(), p, overwrite=True)
    assert key_id(load_private_key(p)) != key_id(k)


def test_public_key_files(tmp_path):
    k = generate_private_key()
    save_public_key(k, tmp_path / "site.pub")
    assert key_id(load_public_key(tmp_path / "site.pub")) == key_id(k)
    (tmp_path / "site.txt").write_text(public_key_text(k) + "\n")
    assert key_id(load_public_key(tmp_path / "site.txt")) == key_id(k)


def test_bad_key_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"not a key")
    with pytest.raises(KeyFormatError):
        load_private_key(tmp_path / "junk")
    with pytest.raises(KeyFormatError):
        load_public_key(tmp_path / "junk")
    with pytest.raises(KeyFormatError):
        load_private_key(tmp_path / "missing")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ec.key").write_bytes(ec_pem)
    with pytest.raises(KeyFormatError, match="Ed25519"):
        load_private_key(tmp_path / "ec.key")
