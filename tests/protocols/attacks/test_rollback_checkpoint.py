"""Attack: rollback. A coordinator (or a man in the middle with an old, validly signed note)
serves a checkpoint older than one the client already verified, to hide later entries (for
example a key revocation). The client must refuse it with a RollbackError that says so."""

from __future__ import annotations

import hashlib

import pytest

from protocols.checkpoint import (
    Checkpoint,
    ForkError,
    NoteSigner,
    RollbackError,
    check_checkpoint_advance,
    cosign_checkpoint,
    sign_checkpoint,
    verify_checkpoint,
)
from protocols.merkle import MerkleTree, leaf_hash

ORIGIN = "consortium.example/ledger"
LOG = NoteSigner(ORIGIN, hashlib.sha256(b"rollback-log-key").digest())
WITNESS = NoteSigner("witness.example", hashlib.sha256(b"rollback-witness").digest(), 0x04)
TREE = MerkleTree(leaf_hash(b"entry %d" % i) for i in range(40))


def signed(size: int) -> bytes:
    return sign_checkpoint(Checkpoint(ORIGIN, size, TREE.root(size)), LOG)


def verified(size: int) -> Checkpoint:
    return verify_checkpoint(signed(size), origin=ORIGIN, log_verifier=LOG.verifier)


def test_old_validly_signed_checkpoint_is_refused() -> None:
    stored = verified(30)  # what the site verified last time (e.g. includes a revocation)
    replayed = verified(25)  # an older note, genuinely signed by the log key
    with pytest.raises(RollbackError) as info:
        check_checkpoint_advance(stored, replayed, [])
    msg = str(info.value)
    assert "rollback" in msg and "25" in msg and "30" in msg
    assert "keep the stored checkpoint" in msg.lower()


@pytest.mark.parametrize("older", [0, 1, 15, 29])
def test_rollback_refused_whatever_proof_comes_with_it(older: int) -> None:
    stored = verified(30)
    old = verified(older) if older else Checkpoint(ORIGIN, 0, TREE.root(0))
    # an attacker may attach a (genuine) consistency proof in the other direction
    proof = TREE.consistency_proof(older, 30) if older else []
    with pytest.raises(RollbackError):
        check_checkpoint_advance(stored, old, proof)


def test_rollback_is_not_reported_as_fork() -> None:
    with pytest.raises(RollbackError):
        check_checkpoint_advance(verified(10), verified(9), [])
    try:
        check_checkpoint_advance(verified(10), verified(9), [])
    except ForkError:  # pragma: no cover - must not happen
        pytest.fail("a rollback must raise RollbackError, not ForkError")
    except RollbackError:
        pass


def test_same_checkpoint_again_is_not_a_rollback() -> None:
    check_checkpoint_advance(verified(30), verified(30), [])


def test_witness_refuses_to_cosign_a_rollback() -> None:
    with pytest.raises(RollbackError):
        cosign_checkpoint(
            signed(20),
            origin=ORIGIN,
            log_verifier=LOG.verifier,
            witness=WITNESS,
            timestamp=1_700_000_000,
            previous=verified(21),
        )
