"""Attack: fork (split view). A malicious coordinator signs two inconsistent histories with its
real log key, showing one to some sites and another to others (for example one with a site's
update, one without). Both checkpoints carry valid signatures of the same origin; only the
consistency check exposes them. The client must refuse with a ForkError."""

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
    verify_cosigned_checkpoint,
)
from protocols.merkle import ConsistencyProofError, MerkleTree, leaf_hash, verify_consistency

ORIGIN = "consortium.example/ledger"
LOG = NoteSigner(ORIGIN, hashlib.sha256(b"fork-log-key").digest())
WITNESS = NoteSigner("witness.example", hashlib.sha256(b"fork-witness").digest(), 0x04)

# Two histories that agree on entries 0..9 and then diverge at entry 10.
COMMON = [leaf_hash(b"entry %d" % i) for i in range(10)]
HONEST = MerkleTree(COMMON + [leaf_hash(b"honest %d" % i) for i in range(10)])
EVIL = MerkleTree(COMMON + [leaf_hash(b"evil %d" % i) for i in range(10)])


def verified(tree: MerkleTree, size: int) -> Checkpoint:
    note = sign_checkpoint(Checkpoint(ORIGIN, size, tree.root(size)), LOG)
    return verify_checkpoint(note, origin=ORIGIN, log_verifier=LOG.verifier)


def test_both_histories_are_validly_signed_and_agree_before_the_split() -> None:
    for size in range(1, 11):
        assert verified(HONEST, size) == verified(EVIL, size)
    assert verified(HONEST, 15) != verified(EVIL, 15)


@pytest.mark.parametrize("size", [11, 15, 20])
def test_same_size_different_root_is_a_fork(size: int) -> None:
    with pytest.raises(ForkError) as info:
        check_checkpoint_advance(verified(HONEST, size), verified(EVIL, size), [])
    msg = str(info.value)
    assert "fork" in msg and "evidence" in msg and "report" in msg


@pytest.mark.parametrize("old,new", [(11, 12), (11, 20), (15, 20), (19, 20)])
def test_growth_onto_the_other_history_cannot_be_proven(old: int, new: int) -> None:
    stored = verified(HONEST, old)
    served = verified(EVIL, new)
    candidate_proofs = [
        [],
        EVIL.consistency_proof(old, new),  # the evil log's own proof
        HONEST.consistency_proof(old, new),  # the honest proof, stolen
        EVIL.consistency_proof(old, new)[:-1],
    ]
    for proof in candidate_proofs:
        with pytest.raises(ForkError):
            check_checkpoint_advance(stored, served, proof)
        with pytest.raises(ConsistencyProofError):
            verify_consistency(stored.size, served.size, stored.root_hash, served.root_hash, proof)


def test_forks_after_the_split_point_only() -> None:
    # A client that verified size 10 (before the split) cannot tell yet: both extend it.
    check_checkpoint_advance(
        verified(HONEST, 10), verified(EVIL, 20), EVIL.consistency_proof(10, 20)
    )
    check_checkpoint_advance(
        verified(HONEST, 10), verified(HONEST, 20), HONEST.consistency_proof(10, 20)
    )
    # ...which is why witnesses exist: a witness that saw one branch refuses the other.
    _, cosigned = cosign_checkpoint(
        sign_checkpoint(verified(HONEST, 15), LOG),
        origin=ORIGIN,
        log_verifier=LOG.verifier,
        witness=WITNESS,
        timestamp=1_700_000_000,
        previous=verified(HONEST, 10),
        consistency_proof=HONEST.consistency_proof(10, 15),
    )
    verify_cosigned_checkpoint(
        cosigned,
        origin=ORIGIN,
        log_verifier=LOG.verifier,
        witnesses=[WITNESS.verifier],
        threshold=1,
    )
    with pytest.raises(ForkError):
        cosign_checkpoint(
            sign_checkpoint(verified(EVIL, 18), LOG),
            origin=ORIGIN,
            log_verifier=LOG.verifier,
            witness=WITNESS,
            timestamp=1_700_000_100,
            previous=verified(HONEST, 15),
            consistency_proof=EVIL.consistency_proof(15, 18),
        )


def test_fork_is_not_reported_as_rollback() -> None:
    try:
        check_checkpoint_advance(verified(HONEST, 12), verified(EVIL, 12), [])
    except RollbackError:  # pragma: no cover - must not happen
        pytest.fail("a fork must raise ForkError, not RollbackError")
    except ForkError:
        pass
