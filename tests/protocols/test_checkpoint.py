"""C2SP tlog checkpoints: body format, signing and verification, advancing from a verified
checkpoint, and cosignature/v1 witness signatures."""

from __future__ import annotations

import base64
import hashlib

import pytest

from protocols.checkpoint import (
    KEY_TYPE_COSIGNATURE_V1,
    Checkpoint,
    CheckpointFormatError,
    CheckpointOriginError,
    CosignatureError,
    ForkError,
    NoteSignature,
    NoteSigner,
    RollbackError,
    UntrustedNoteError,
    append_signatures,
    check_checkpoint_advance,
    cosign_checkpoint,
    cosignature_message,
    open_note,
    parse_checkpoint_body,
    parse_note,
    sign_checkpoint,
    sign_cosignature,
    sign_note,
    verify_checkpoint,
    verify_cosigned_checkpoint,
)
from protocols.errors import ConfigError, VerificationError
from protocols.merkle import EMPTY_ROOT, MerkleTree, leaf_hash

ORIGIN = "scarches-fl.example/consortium"


def _seeded(name: str, seed_byte: int, key_type: int = 0x01) -> NoteSigner:
    return NoteSigner(name, hashlib.sha256(b"cp" + bytes([seed_byte])).digest(), key_type)


LOG = _seeded(ORIGIN, 1)
WITNESSES = [_seeded(f"witness{i}.example/w", 10 + i, KEY_TYPE_COSIGNATURE_V1) for i in range(3)]
TREE = MerkleTree(leaf_hash(f"entry {i}".encode()) for i in range(20))


def cp_at(size: int) -> Checkpoint:
    return Checkpoint(ORIGIN, size, TREE.root(size))


# --------------------------------------------------------------------------------------------
# Body format


def test_body_is_exactly_the_c2sp_format() -> None:
    cp = cp_at(7)
    want = f"{ORIGIN}\n7\n{base64.b64encode(TREE.root(7)).decode()}\n".encode()
    assert cp.body() == want
    assert parse_checkpoint_body(want) == cp == Checkpoint.from_body(want.decode())
    ext = Checkpoint(ORIGIN, 7, TREE.root(7), ("ext one", "ext two"))
    assert ext.body() == want + b"ext one\next two\n"
    assert parse_checkpoint_body(ext.body()) == ext


def test_c2sp_spec_example_parses() -> None:
    # The example checkpoint and witness cosignature of c2sp.org/tlog-checkpoint and
    # c2sp.org/tlog-cosignature.
    note = (
        "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n"
        "\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7"
        "u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
        "\u2014 witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dl"
        "rDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==\n"
    ).encode()
    parsed = parse_note(note)
    cp = parse_checkpoint_body(parsed.text)
    assert (cp.origin, cp.size, len(cp.root_hash)) == ("example.com/behind-the-sofa", 20852163, 32)
    log_sig, wit_sig = parsed.signatures
    assert len(log_sig.signature) == 64
    # the spec's example signed message says "time 1679315147": the big-endian timestamp
    assert wit_sig.timestamp == 1679315147


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"origin\n5\n",  # two lines
        b"origin\n5\n" + base64.b64encode(b"\0" * 32),  # no final newline
        b"\n5\n" + base64.b64encode(b"\0" * 32) + b"\n",  # empty origin
        b"o\n05\n" + base64.b64encode(b"\0" * 32) + b"\n",  # leading zero
        b"o\n-5\n" + base64.b64encode(b"\0" * 32) + b"\n",
        b"o\n+5\n" + base64.b64encode(b"\0" * 32) + b"\n",
        b"o\n 5\n" + base64.b64encode(b"\0" * 32) + b"\n",
        b"o\n5 \n" + base64.b64encode(b"\0" * 32) + b"\n",
        b"o\n0x5\n" + base64.b64encode(b"\0" * 32) + b"\n",
        b"o\n\xd9\xa5\n" + base64.b64encode(b"\0" * 32) + b"\n",  # Arabic-Indic digit five
        b"o\n18446744073709551616\n" + base64.b64encode(b"\0" * 32) + b"\n",  # 2**64
        b"o\n5\n" + base64.b64encode(b"\0" * 31) + b"\n",
        b"o\n5\n" + base64.b64encode(b"\0" * 33) + b"\n",
        b"o\n5\n" + base64.b64encode(b"\0" * 32).rstrip(b"=") + b"\n",
        b"o\n5\n" + base64.urlsafe_b64encode(b"\xff" * 32) + b"\n",
        b"o\n5\n" + base64.b64encode(b"\0" * 32) + b"\n\n",  # empty extension line
        b"o\n5\n" + base64.b64encode(b"\0" * 32) + b"\next\n\n",
        b"o\r\n5\n" + base64.b64encode(b"\0" * 32) + b"\n",
        b"o\n0\n" + base64.b64encode(b"\0" * 32) + b"\n",  # empty tree with a non-empty root
        b"\xff\n5\n" + base64.b64encode(b"\0" * 32) + b"\n",
    ],
)
def test_malformed_bodies_are_rejected(body: bytes) -> None:
    with pytest.raises(CheckpointFormatError):
        parse_checkpoint_body(body)


def test_edge_sizes() -> None:
    empty = b"o\n0\n" + base64.b64encode(EMPTY_ROOT) + b"\n"
    assert parse_checkpoint_body(empty).size == 0
    top = b"o\n18446744073709551615\n" + base64.b64encode(b"\0" * 32) + b"\n"
    assert parse_checkpoint_body(top).size == 2**64 - 1


def test_checkpoint_object_validates() -> None:
    for args in [
        ("", 1, b"\0" * 32),
        ("a\nb", 1, b"\0" * 32),
        ("o", -1, b"\0" * 32),
        ("o", True, b"\0" * 32),
        ("o", 1, b"\0" * 31),
        ("o", 0, b"\0" * 32),
    ]:
        with pytest.raises(CheckpointFormatError):
            Checkpoint(*args)  # type: ignore[arg-type]
    with pytest.raises(CheckpointFormatError):
        Checkpoint("o", 1, b"\0" * 32, ("",))
    with pytest.raises(CheckpointFormatError):
        Checkpoint("o", 1, b"\0" * 32, ("a\nb",))


# --------------------------------------------------------------------------------------------
# Signing and verifying


def test_sign_and_verify() -> None:
    note = sign_checkpoint(cp_at(12), LOG)
    assert verify_checkpoint(note, origin=ORIGIN, log_verifier=LOG.verifier) == cp_at(12)
    assert verify_checkpoint(note, origin=ORIGIN, log_verifier=LOG.verifier.vkey) == cp_at(12)
    # key rotation: any of several pinned log keys
    new_key = _seeded(ORIGIN, 2)
    assert verify_checkpoint(note, origin=ORIGIN, log_verifier=[new_key.verifier, LOG.verifier])
    # the note is exactly body + blank line + one signature line
    assert note == cp_at(12).body() + b"\n" + LOG.sign(cp_at(12).body()).line.encode()


def test_wrong_origin_and_wrong_key() -> None:
    note = sign_checkpoint(cp_at(3), LOG)
    with pytest.raises(CheckpointOriginError, match="trust.json"):
        verify_checkpoint(note, origin="another.example/log", log_verifier=LOG.verifier)
    other_log = _seeded(ORIGIN, 3)
    with pytest.raises(UntrustedNoteError):
        verify_checkpoint(note, origin=ORIGIN, log_verifier=other_log.verifier)


def test_verify_checkpoint_refuses_empty_or_wrong_policy() -> None:
    note = sign_checkpoint(cp_at(3), LOG)
    with pytest.raises(ConfigError):
        verify_checkpoint(note, origin=ORIGIN, log_verifier=[])
    with pytest.raises(ConfigError):
        verify_checkpoint(note, origin="", log_verifier=LOG.verifier)
    with pytest.raises(ConfigError):  # a witness key is not a log key
        verify_checkpoint(note, origin=ORIGIN, log_verifier=WITNESSES[0].verifier)


def test_signed_note_that_is_not_a_checkpoint() -> None:
    note = sign_note(b"hello\n", LOG)
    with pytest.raises(CheckpointFormatError):
        verify_checkpoint(note, origin=ORIGIN, log_verifier=LOG.verifier)


# --------------------------------------------------------------------------------------------
# Advancing


def test_advance_accepts_honest_growth() -> None:
    check_checkpoint_advance(None, cp_at(4), [])
    check_checkpoint_advance(cp_at(4), cp_at(4), [])
    check_checkpoint_advance(Checkpoint(ORIGIN, 0, EMPTY_ROOT), cp_at(4), [])
    for old in range(1, 20):
        for new in range(old, 21):
            check_checkpoint_advance(cp_at(old), cp_at(new), TREE.consistency_proof(old, new))


def test_advance_refuses_different_logs() -> None:
    with pytest.raises(CheckpointOriginError):
        check_checkpoint_advance(cp_at(3), Checkpoint("other", 4, TREE.root(4)), [])
    with pytest.raises(TypeError):
        check_checkpoint_advance(cp_at(3), "not a checkpoint", [])  # type: ignore[arg-type]


def test_rollback_and_fork_errors_are_distinct() -> None:
    assert issubclass(RollbackError, VerificationError)
    assert issubclass(ForkError, VerificationError)
    assert not issubclass(RollbackError, ForkError) and not issubclass(ForkError, RollbackError)
    with pytest.raises(RollbackError, match="rollback"):
        check_checkpoint_advance(cp_at(9), cp_at(8), [])
    with pytest.raises(ForkError, match="fork"):
        check_checkpoint_advance(cp_at(9), Checkpoint(ORIGIN, 9, TREE.root(10)), [])


# --------------------------------------------------------------------------------------------
# Cosignatures


def test_cosignature_bytes() -> None:
    body = cp_at(5).body()
    assert cosignature_message(body, 1679315147) == b"cosignature/v1\ntime 1679315147\n" + body
    w = WITNESSES[0]
    sig = sign_cosignature(body, w, timestamp=1679315147)
    assert sig.signature[:8] == (1679315147).to_bytes(8, "big") and len(sig.signature) == 72
    assert sig.timestamp == 1679315147
    pub = w.verifier.public_key
    assert sig.key_id == int.from_bytes(
        hashlib.sha256(w.name.encode() + b"\n\x04" + pub).digest()[:4], "big"
    )
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    Ed25519PublicKey.from_public_bytes(pub).verify(
        sig.signature[8:], b"cosignature/v1\ntime 1679315147\n" + body
    )
    with pytest.raises(ValueError):
        sign_cosignature(body, LOG, timestamp=1)  # a log key is not a witness key
    with pytest.raises(ValueError):
        w.sign(body)  # no timestamp
    with pytest.raises(ValueError):
        w.sign(body, timestamp=2**63)


def _cosigned(size: int, witnesses: list[NoteSigner], ts: int = 1_700_000_000) -> bytes:
    note = sign_checkpoint(cp_at(size), LOG)
    for w in witnesses:
        _, note = cosign_checkpoint(
            note, origin=ORIGIN, log_verifier=LOG.verifier, witness=w, timestamp=ts
        )
    return note


def test_cosigned_checkpoint_threshold() -> None:
    note = _cosigned(6, WITNESSES[:2])
    wits = [w.verifier for w in WITNESSES]
    # the log signature alone still verifies: witness lines are unknown keys to it
    assert verify_checkpoint(note, origin=ORIGIN, log_verifier=LOG.verifier) == cp_at(6)
    got = verify_cosigned_checkpoint(
        note, origin=ORIGIN, log_verifier=LOG.verifier, witnesses=wits, threshold=2
    )
    assert got.checkpoint == cp_at(6)
    assert set(got.cosigned_at) == {WITNESSES[0].name, WITNESSES[1].name}
    with pytest.raises(CosignatureError, match="only 2 of the required 3"):
        verify_cosigned_checkpoint(
            note, origin=ORIGIN, log_verifier=LOG.verifier, witnesses=wits, threshold=3
        )
    with pytest.raises(CosignatureError, match="no trusted witness"):
        verify_cosigned_checkpoint(
            sign_checkpoint(cp_at(6), LOG),
            origin=ORIGIN,
            log_verifier=LOG.verifier,
            witnesses=wits,
            threshold=1,
        )


def test_cosignature_policy_must_be_explicit() -> None:
    note = _cosigned(6, WITNESSES[:1])
    for threshold in (0, -1, 4, True):
        with pytest.raises(ConfigError):
            verify_cosigned_checkpoint(
                note,
                origin=ORIGIN,
                log_verifier=LOG.verifier,
                witnesses=[w.verifier for w in WITNESSES],
                threshold=threshold,
            )
    with pytest.raises(ConfigError):
        verify_cosigned_checkpoint(
            note, origin=ORIGIN, log_verifier=LOG.verifier, witnesses=[], threshold=1
        )
    with pytest.raises(ConfigError):  # a plain Ed25519 key is not a witness key
        verify_cosigned_checkpoint(
            note, origin=ORIGIN, log_verifier=LOG.verifier, witnesses=[LOG.verifier], threshold=1
        )


def test_bad_and_future_cosignatures() -> None:
    note = _cosigned(6, WITNESSES[:1])
    wits = [w.verifier.vkey for w in WITNESSES]
    # a cosignature of another checkpoint pasted under this one
    other = sign_cosignature(cp_at(7).body(), WITNESSES[1], timestamp=1_700_000_000)
    tampered = append_signatures(note, [other])
    with pytest.raises(CosignatureError, match="does not verify"):
        verify_cosigned_checkpoint(
            tampered, origin=ORIGIN, log_verifier=LOG.verifier, witnesses=wits, threshold=1
        )
    # a changed timestamp breaks the signature
    sig = sign_cosignature(cp_at(6).body(), WITNESSES[2], timestamp=100)
    moved = NoteSignature(sig.name, sig.key_id, (101).to_bytes(8, "big") + sig.signature[8:])
    with pytest.raises(CosignatureError):
        verify_cosigned_checkpoint(
            append_signatures(note, [moved]),
            origin=ORIGIN,
            log_verifier=LOG.verifier,
            witnesses=wits,
            threshold=1,
        )
    # a timestamp above 2**63 - 1 never verifies
    huge = NoteSignature(sig.name, sig.key_id, (2**63).to_bytes(8, "big") + sig.signature[8:])
    with pytest.raises(CosignatureError):
        verify_cosigned_checkpoint(
            append_signatures(note, [huge]),
            origin=ORIGIN,
            log_verifier=LOG.verifier,
            witnesses=wits,
            threshold=1,
        )
    # dated in the future
    future = _cosigned(6, WITNESSES[:1], ts=2_000_000_000)
    with pytest.raises(CosignatureError, match="future"):
        verify_cosigned_checkpoint(
            future,
            origin=ORIGIN,
            log_verifier=LOG.verifier,
            witnesses=wits,
            threshold=1,
            now=1_900_000_000,
        )
    assert verify_cosigned_checkpoint(
        future,
        origin=ORIGIN,
        log_verifier=LOG.verifier,
        witnesses=wits,
        threshold=1,
        now=2_000_000_100,
    ).cosigned_at == {WITNESSES[0].name: 2_000_000_000}


def test_witness_refuses_rollback_and_fork() -> None:
    note = sign_checkpoint(cp_at(5), LOG)
    with pytest.raises(RollbackError):
        cosign_checkpoint(
            note,
            origin=ORIGIN,
            log_verifier=LOG.verifier,
            witness=WITNESSES[0],
            timestamp=1,
            previous=cp_at(8),
        )
    forked = sign_checkpoint(Checkpoint(ORIGIN, 5, TREE.root(6)), LOG)
    with pytest.raises(ForkError):
        cosign_checkpoint(
            forked,
            origin=ORIGIN,
            log_verifier=LOG.verifier,
            witness=WITNESSES[0],
            timestamp=1,
            previous=cp_at(5),
        )
    cp, grown = cosign_checkpoint(
        sign_checkpoint(cp_at(9), LOG),
        origin=ORIGIN,
        log_verifier=LOG.verifier,
        witness=WITNESSES[0],
        timestamp=1,
        previous=cp_at(5),
        consistency_proof=TREE.consistency_proof(5, 9),
    )
    assert cp == cp_at(9)
    assert len(open_note(grown, [WITNESSES[0].verifier]).verified) == 1
