"""C2SP signed notes and key strings: the Go sumdb/note reference vector, and every rule of
c2sp.org/signed-note about known and unknown keys and malformed notes."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from protocols.checkpoint import (
    KEY_TYPE_COSIGNATURE_V1,
    KEY_TYPE_ED25519,
    MAX_NOTE_SIGNATURES,
    KeyFormatError,
    Note,
    NoteFormatError,
    NoteSignature,
    NoteSignatureError,
    NoteSigner,
    NoteVerifier,
    UntrustedNoteError,
    append_signatures,
    generate_signer,
    key_id,
    open_note,
    parse_note,
    parse_signer_key,
    parse_verifier_key,
    sign_note,
    signer_from_private_key,
    verifier_from_public_key,
)
from protocols.errors import ConfigError, ScarchesFLError, VerificationError


@pytest.fixture(scope="module")
def vector(testvectors: Path) -> dict:
    return json.loads((testvectors / "signed-note" / "go-sumdb-note.json").read_text())


def _seeded(name: str, seed_byte: int, key_type: int = KEY_TYPE_ED25519) -> NoteSigner:
    return NoteSigner(name, hashlib.sha256(bytes([seed_byte])).digest(), key_type)


LOG = _seeded("log.example/one", 1)
OTHER = _seeded("other.example/two", 2)
TEXT = b"line one\nline two\n"


# --------------------------------------------------------------------------------------------
# The reference vector (Go sumdb/note, the C2SP example key)


def test_go_vector_signs_byte_for_byte(vector: dict) -> None:
    signer = parse_signer_key(vector["signer_key"])
    verifier = parse_verifier_key(vector["verifier_key"])
    assert signer.verifier == verifier
    assert signer.skey == vector["signer_key"]
    assert verifier.vkey == vector["verifier_key"]
    assert f"{verifier.key_id:08x}" == "c74f20a3"
    note = sign_note(vector["text"], signer)
    assert note == vector["note"].encode("utf-8")
    assert signer.sign(vector["text"].encode()).line == vector["signature_line"]


def test_go_vector_opens(vector: dict) -> None:
    verifier = parse_verifier_key(vector["verifier_key"])
    opened = open_note(vector["note"].encode("utf-8"), [verifier])
    assert opened.text == vector["text"].encode("utf-8")
    assert [s.name for s in opened.verified] == ["PeterNeumann"]
    assert opened.unverified == ()


def test_go_vector_every_changed_text_byte_fails(vector: dict) -> None:
    verifier = parse_verifier_key(vector["verifier_key"])
    note = vector["note"].encode("utf-8")
    text_len = len(vector["text"].encode("utf-8"))
    for i in range(text_len - 1):  # the final newline is structural
        b = bytearray(note)
        b[i] = ord("x") if b[i] != ord("x") else ord("y")
        with pytest.raises(VerificationError):
            open_note(bytes(b), [verifier])


def test_key_id_definition() -> None:
    pub = LOG.verifier.public_key
    want = hashlib.sha256(b"log.example/one\n\x01" + pub).digest()[:4]
    assert key_id("log.example/one", pub) == int.from_bytes(want, "big")
    want4 = hashlib.sha256(b"log.example/one\n\x04" + pub).digest()[:4]
    assert key_id("log.example/one", pub, KEY_TYPE_COSIGNATURE_V1) == int.from_bytes(want4, "big")


# --------------------------------------------------------------------------------------------
# Known / unknown keys


def test_signature_lines_from_unknown_keys_are_ignored() -> None:
    note = sign_note(TEXT, [OTHER, LOG])
    opened = open_note(note, [LOG.verifier])
    assert [s.name for s in opened.verified] == [LOG.name]
    assert [s.name for s in opened.unverified] == [OTHER.name]


def test_same_name_different_id_is_unknown_and_ignored() -> None:
    impostor = _seeded(LOG.name, 99)  # same name, other key: other key ID
    assert impostor.key_id != LOG.key_id
    note = sign_note(TEXT, [impostor, LOG])
    opened = open_note(note, [LOG.verifier])
    assert len(opened.verified) == 1 and len(opened.unverified) == 1
    with pytest.raises(UntrustedNoteError):
        open_note(sign_note(TEXT, impostor), [LOG.verifier])


def test_same_id_different_name_is_unknown_and_ignored() -> None:
    good = LOG.sign(TEXT)
    renamed = NoteSignature("someone.else", good.key_id, good.signature)
    note = Note(TEXT, (renamed, good)).to_bytes()
    opened = open_note(note, [LOG.verifier])
    assert opened.unverified == (renamed,)
    with pytest.raises(UntrustedNoteError):
        open_note(Note(TEXT, (renamed,)).to_bytes(), [LOG.verifier])


def test_failed_known_signature_rejects_the_whole_note() -> None:
    good = LOG.sign(TEXT)
    bad = NoteSignature(OTHER.name, OTHER.key_id, OTHER.sign(b"other text\n").signature)
    note = Note(TEXT, (good, bad)).to_bytes()
    with pytest.raises(NoteSignatureError, match="does not verify"):
        open_note(note, [LOG.verifier, OTHER.verifier])
    # trusting only LOG, the bad line is from an unknown key and is ignored
    assert open_note(note, [LOG.verifier]).verified == (good,)


def test_no_trusted_keys_rejects_everything() -> None:
    with pytest.raises(UntrustedNoteError):
        open_note(sign_note(TEXT, LOG), [])


def test_ambiguous_trusted_keys_are_a_config_error() -> None:
    a = LOG.verifier
    with pytest.raises(ConfigError):
        # same name, same ID, different key (forged collision)
        open_note(sign_note(TEXT, LOG), [a, _FakeIdVerifier(a.name, b"\x07" * 32, a.key_id)])
    with pytest.raises(ConfigError):
        open_note(sign_note(TEXT, LOG), ["not a verifier"])  # type: ignore[list-item]


class _FakeIdVerifier(NoteVerifier):
    """A verifier whose key ID is forced (to build a name+ID collision)."""

    def __init__(self, name: str, public_key: bytes, forced_id: int) -> None:
        super().__init__(name, public_key)
        object.__setattr__(self, "_forced", forced_id)

    @property
    def key_id(self) -> int:  # type: ignore[override]
        return self._forced  # type: ignore[attr-defined]


def test_sixteen_signatures_are_accepted_and_the_cap_is_enforced() -> None:
    signers = [_seeded(f"w{i}.example", 10 + i) for i in range(16)]
    note = sign_note(TEXT, signers)
    assert len(open_note(note, [signers[7].verifier]).unverified) == 15
    many = Note(TEXT, tuple(LOG.sign(TEXT) for _ in range(MAX_NOTE_SIGNATURES + 1))).to_bytes()
    with pytest.raises(NoteFormatError, match="signatures"):
        parse_note(many)


def test_text_may_contain_blank_lines() -> None:
    text = b"a\n\nb\n\nc\n"
    note = sign_note(text, LOG)
    assert open_note(note, [LOG.verifier]).text == text


def test_size_limit_checked_first() -> None:
    note = sign_note(TEXT, LOG)
    with pytest.raises(NoteFormatError, match="limit"):
        parse_note(note, max_bytes=len(note) - 1)
    parse_note(note, max_bytes=len(note))


# --------------------------------------------------------------------------------------------
# Malformed notes


GOOD_LINE = LOG.sign(TEXT).line


@pytest.mark.parametrize(
    "note",
    [
        b"",
        b"\n",
        TEXT,  # no signatures
        TEXT + b"\n",  # blank line but no signature lines
        TEXT + b"\n" + GOOD_LINE.encode()[:-1],  # last line without newline
        TEXT + b"\n" + GOOD_LINE.replace("\u2014", "-").encode(),  # hyphen, not em dash
        TEXT + b"\n" + GOOD_LINE.replace("\u2014 ", "\u2014").encode(),  # no space
        TEXT + b"\n" + GOOD_LINE.replace(" ", "  ", 2).encode(),  # double space
        TEXT + b"\n" + GOOD_LINE.replace(LOG.name, "a+b").encode(),  # '+' in name
        TEXT + b"\n" + GOOD_LINE.replace(LOG.name + " ", "").encode(),  # no name
        TEXT + b"\n" + GOOD_LINE.replace("=", "").encode(),  # unpadded base64
        TEXT + b"\n" + GOOD_LINE.rstrip("\n").encode() + b"!\n",  # non-base64
        TEXT + "\n\u2014 n AAAA\n".encode(),  # 3 bytes
        TEXT + b"\n" + ("\u2014 n " + base64.b64encode(b"\0" * 4).decode() + "\n").encode(),
        TEXT + b"\n" + GOOD_LINE.encode() + b"\n",  # blank line after signatures
        TEXT + b"\n" + GOOD_LINE.encode() + b"trailing\n",
        b"line\r\n\n" + GOOD_LINE.encode(),  # control character
        b"tab\there\n\n" + GOOD_LINE.encode(),
        b"\xff\xfe\n\n" + GOOD_LINE.encode(),  # invalid UTF-8
        "caf\u00e9\n\n".encode("latin-1") + GOOD_LINE.encode(),
    ],
)
def test_malformed_notes_are_rejected(note: bytes) -> None:
    with pytest.raises(NoteFormatError):
        parse_note(note)
    with pytest.raises(NoteFormatError):
        open_note(note, [LOG.verifier])


def test_non_canonical_base64_signature_is_rejected() -> None:
    blob = GOOD_LINE.split(" ")[-1].strip()
    raw = base64.b64decode(blob)
    # 68 bytes -> one padding char; the last data character then has two unused low bits, and
    # setting one of them gives a different text for the same bytes (non-canonical)
    assert blob.endswith("=") and not blob.endswith("==")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    tweaked = blob[:-2] + alphabet[alphabet.index(blob[-2]) | 1] + "="
    assert tweaked != blob and base64.b64decode(tweaked) == raw
    with pytest.raises(NoteFormatError):
        parse_note(TEXT + b"\n" + GOOD_LINE.replace(blob, tweaked).encode())


def test_note_round_trip_and_append() -> None:
    note = sign_note(TEXT, LOG)
    parsed = parse_note(note)
    assert parsed.to_bytes() == note
    extra = OTHER.sign(TEXT)
    both = append_signatures(note, [extra, extra.line, GOOD_LINE])  # duplicates skipped
    assert parse_note(both).signatures == (parsed.signatures[0], extra)
    assert open_note(both, [LOG.verifier, OTHER.verifier]).verified == parse_note(both).signatures
    with pytest.raises(NoteFormatError):
        append_signatures(note, ["not a signature line"])


def test_signing_rejects_bad_text() -> None:
    with pytest.raises(NoteFormatError):
        sign_note(b"no newline", LOG)
    with pytest.raises(NoteFormatError):
        sign_note(b"bell\x07\n", LOG)
    with pytest.raises(ValueError):
        sign_note(TEXT, [])
    with pytest.raises(ValueError):
        LOG.sign(TEXT, timestamp=5)


# --------------------------------------------------------------------------------------------
# Key strings


def test_key_strings_round_trip_and_repr_hides_seed() -> None:
    s = generate_signer("example.org/log")
    assert parse_signer_key(s.skey) == s
    assert parse_verifier_key(s.verifier.vkey) == s.verifier
    assert str(s.verifier) == s.verifier.vkey
    assert s.seed.hex() not in repr(s) and base64.b64encode(s.seed).decode() not in repr(s)
    w = s.as_cosigner()
    assert w.key_type == KEY_TYPE_COSIGNATURE_V1 and w.key_id != s.key_id
    assert parse_verifier_key(w.verifier.vkey) == w.verifier
    assert parse_signer_key(w.skey) == w


def test_cryptography_key_wrappers() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    priv = Ed25519PrivateKey.generate()
    s = signer_from_private_key("example.org/log", priv)
    v = verifier_from_public_key("example.org/log", priv.public_key())
    assert s.verifier == v
    assert open_note(sign_note(TEXT, s), [v]).text == TEXT


def _vkey_parts(v: NoteVerifier) -> tuple[str, str, str]:
    name, hid, blob = v.vkey.split("+", 2)
    return name, hid, blob


@pytest.mark.parametrize(
    "mutate",
    [
        lambda n, h, b: f"{n}+{h}",  # missing field
        lambda n, h, b: f"{n}+{h.upper()}+{b}" if h != h.upper() else f"{n}+zzzzzzzz+{b}",
        lambda n, h, b: f"{n}+{h[:7]}+{b}",
        lambda n, h, b: f"{n}+{(int(h, 16) ^ 1):08x}+{b}",  # wrong key ID
        lambda n, h, b: f"x{n}+{h}+{b}",  # name changed: ID mismatch
        lambda n, h, b: f"+{h}+{b}",  # empty name
        lambda n, h, b: f"a b+{h}+{b}",  # space in name
        lambda n, h, b: f"{n}+{h}+{b}=",  # bad padding
        lambda n, h, b: f"{n}+{h}+" + base64.b64encode(b"\x02" + base64.b64decode(b)[1:]).decode(),
        lambda n, h, b: f"{n}+{h}+" + base64.b64encode(base64.b64decode(b)[:-1]).decode(),
        lambda n, h, b: f"{n}+{h}+" + base64.b64encode(base64.b64decode(b) + b"\0").decode(),
    ],
)
def test_malformed_verifier_keys(mutate) -> None:
    n, h, b = _vkey_parts(LOG.verifier)
    with pytest.raises(KeyFormatError):
        parse_verifier_key(mutate(n, h, b))


@pytest.mark.parametrize(
    "skey",
    [
        "",
        "PRIVATE+KEY",
        "PRIVATE+KEYS+" + LOG.skey.split("+", 2)[2],
        "private+key+" + LOG.skey.split("+", 2)[2],
        LOG.skey.replace(f"{LOG.key_id:08x}", f"{LOG.key_id ^ 1:08x}"),
        LOG.verifier.vkey,
    ],
)
def test_malformed_signer_keys(skey: str) -> None:
    with pytest.raises(KeyFormatError) as info:
        parse_signer_key(skey)
    assert LOG.skey.rsplit("+", 1)[1] not in str(info.value)  # never echo the secret


def test_key_objects_validate() -> None:
    with pytest.raises(KeyFormatError):
        NoteVerifier("n", b"\0" * 31)
    with pytest.raises(KeyFormatError):
        NoteSigner("n", b"\0" * 32, 0x02)
    with pytest.raises(KeyFormatError):
        NoteVerifier("", b"\0" * 32)
    with pytest.raises(KeyFormatError):
        parse_verifier_key(123)  # type: ignore[arg-type]


def test_all_errors_are_typed() -> None:
    for err in (KeyFormatError, NoteFormatError, NoteSignatureError, UntrustedNoteError):
        assert issubclass(err, ScarchesFLError)
