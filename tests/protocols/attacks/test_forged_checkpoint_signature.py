"""Attack: forged checkpoint signatures. Someone without the log's private key tries to get a
client to accept a checkpoint: a key of their own under the log's name, a claimed key ID,
a genuine signature moved onto a different body, type confusion with witness cosignatures,
or a stripped signature. Every attempt must fail with a typed VerificationError."""

from __future__ import annotations

import base64
import hashlib

import pytest

from protocols.checkpoint import (
    Checkpoint,
    NoteFormatError,
    NoteSignature,
    NoteSignatureError,
    NoteSigner,
    UntrustedNoteError,
    append_signatures,
    parse_note,
    sign_checkpoint,
    verify_checkpoint,
)
from protocols.errors import VerificationError
from protocols.merkle import MerkleTree, leaf_hash

ORIGIN = "consortium.example/ledger"
LOG = NoteSigner(ORIGIN, hashlib.sha256(b"forge-log-key").digest())
ATTACKER = NoteSigner(ORIGIN, hashlib.sha256(b"forge-attacker").digest())  # same name
TREE = MerkleTree(leaf_hash(b"entry %d" % i) for i in range(12))
GENUINE = Checkpoint(ORIGIN, 10, TREE.root(10))
BOGUS = Checkpoint(ORIGIN, 11, hashlib.sha256(b"attacker root").digest())


def verify(note: bytes) -> Checkpoint:
    return verify_checkpoint(note, origin=ORIGIN, log_verifier=LOG.verifier)


def test_genuine_checkpoint_verifies() -> None:
    assert verify(sign_checkpoint(GENUINE, LOG)) == GENUINE


def test_attacker_key_with_the_log_name_is_ignored_then_rejected() -> None:
    note = sign_checkpoint(BOGUS, ATTACKER)
    with pytest.raises(UntrustedNoteError):
        verify(note)


def test_attacker_claims_the_log_key_id() -> None:
    # Same name and the log's key ID, but the attacker's signature: a known key that fails.
    forged_sig = ATTACKER.sign(BOGUS.body())
    line = NoteSignature(LOG.name, LOG.key_id, forged_sig.signature)
    note = BOGUS.body() + b"\n" + line.line.encode()
    with pytest.raises(NoteSignatureError):
        verify(note)


def test_genuine_signature_moved_to_another_body() -> None:
    genuine_line = LOG.sign(GENUINE.body()).line.encode()
    for body in (
        BOGUS.body(),
        Checkpoint(ORIGIN, 11, GENUINE.root_hash).body(),  # size bumped
        Checkpoint(ORIGIN, 10, TREE.root(11)).body(),  # root swapped
        Checkpoint(ORIGIN, 10, GENUINE.root_hash, ("extra",)).body(),  # line appended
    ):
        with pytest.raises(NoteSignatureError):
            verify(body + b"\n" + genuine_line)


def test_every_flipped_bit_of_the_note_is_rejected() -> None:
    note = sign_checkpoint(GENUINE, LOG)
    for i in range(len(note)):
        for bit in range(8):
            b = bytearray(note)
            b[i] ^= 1 << bit
            try:
                cp = verify(bytes(b))
            except VerificationError:
                continue
            # Any single-bit change alters the text (bad signature), the signature line
            # (bad signature or unknown key) or the syntax (strict, canonical parsing).
            pytest.fail(f"bit {bit} of byte {i} flipped and still verified as {cp}")


def test_stripped_or_truncated_signature() -> None:
    note = sign_checkpoint(GENUINE, LOG)
    body, _, line = note.partition(b"\n\n")
    with pytest.raises(NoteFormatError):
        verify(body + b"\n\n")
    blob = line.split(b" ")[-1].strip()
    raw = base64.b64decode(blob)
    short = NoteSignature(LOG.name, LOG.key_id, raw[4:-1]).line.encode()
    with pytest.raises(NoteSignatureError):
        verify(body + b"\n\n" + short)
    empty = NoteSignature(LOG.name, LOG.key_id, b"\0").line.encode()
    with pytest.raises(NoteSignatureError):
        verify(body + b"\n\n" + empty)


def test_witness_cosignature_by_the_log_key_material_is_not_a_log_signature() -> None:
    # Type confusion: the log key's own material used as a cosignature/v1 key (type 0x04) has a
    # different key ID, so its line is an unknown key to a verifier of the log key.
    as_witness = LOG.as_cosigner()
    line = as_witness.sign(BOGUS.body(), timestamp=1_700_000_000)
    assert line.key_id != LOG.key_id
    with pytest.raises(UntrustedNoteError):
        verify(BOGUS.body() + b"\n" + line.line.encode())
    # and relabelled with the log key ID, the signature is over a different message: rejected
    relabelled = NoteSignature(LOG.name, LOG.key_id, line.signature[8:])
    with pytest.raises(NoteSignatureError):
        verify(BOGUS.body() + b"\n" + relabelled.line.encode())


def test_appending_lines_cannot_change_what_was_signed() -> None:
    note = sign_checkpoint(GENUINE, LOG)
    extra = append_signatures(note, [ATTACKER.sign(GENUINE.body())])
    assert verify(extra) == GENUINE
    assert parse_note(extra).text == GENUINE.body()
    # an attacker cannot smuggle body lines in as "signatures": they are not signature lines
    with pytest.raises(NoteFormatError):
        verify(note + b"99\n")
