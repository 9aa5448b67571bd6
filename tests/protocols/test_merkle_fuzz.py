"""Property tests: random and mutated proofs, sizes and indexes fed to the Merkle proof
verifiers. Only the typed proof errors may come out, and only genuine proofs verify (checked
against the tree, and for inclusion against an independent recursive recomputation).

Each example is one Hypothesis-drawn integer that seeds ``random.Random``: Hypothesis' own cost
per example stays low (10,000 examples in seconds on a shared 2-core machine) and a failing seed
reproduces the failure exactly."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.merkle import (
    ConsistencyProofError,
    InclusionProofError,
    MerkleTree,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

FUZZ = settings(
    max_examples=10_000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SEED = st.integers(min_value=0, max_value=2**64 - 1)

N = 40
LEAVES = [leaf_hash(b"leaf %d" % i) for i in range(N)]
TREE = MerkleTree(LEAVES)
ROOTS = [TREE.root(n) for n in range(N + 1)]
ODD_VALUES: list[object] = [True, False, None, 1.0, -1, 2**64, 2**64 - 1, 2**63, "3", b"3"]


def rand_hash(rng: random.Random) -> object:
    r = rng.random()
    if r < 0.4:
        return rng.randbytes(32)
    if r < 0.8:
        return rng.choice(LEAVES + ROOTS)
    if r < 0.95:
        return rng.randbytes(rng.randrange(0, 40))
    return rng.choice(["x" * 32, None, 32, bytearray(32)])


def rand_size(rng: random.Random) -> object:
    r = rng.random()
    if r < 0.8:
        return rng.randrange(0, N + 1)
    if r < 0.9:
        return rng.randrange(-3, 2**64 + 3)
    return rng.choice(ODD_VALUES)


def mutate_proof(rng: random.Random, proof: list) -> object:
    if rng.random() < 0.03:
        return rng.choice([b"\0" * 32, "proof", None, 5, (b"\0" * 32 for _ in range(2))])
    p = list(proof)
    for _ in range(rng.randrange(0, 4)):
        op = rng.randrange(6)
        i = rng.randrange(0, max(len(p), 1))
        if op == 0 or not p:
            p.insert(i, rand_hash(rng))
        elif op == 1:
            p[i] = rand_hash(rng)
        elif op == 2:
            del p[i]
        elif op == 3:
            p.insert(i, p[i])
        elif op == 4:
            j = rng.randrange(len(p))
            p[i], p[j] = p[j], p[i]
        elif isinstance(p[i], bytes) and p[i]:
            b = bytearray(p[i])
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            p[i] = bytes(b)
    return p


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def ref_root_from_path(leaf: bytes, m: int, n: int, proof: list[bytes]) -> bytes | None:
    """RFC 6962 PATH read backwards, recursively: an independent recomputation."""
    if n == 1:
        return leaf if not proof else None
    if not proof:
        return None
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        sub = ref_root_from_path(leaf, m, k, proof[:-1])
        return None if sub is None else node_hash(sub, proof[-1])
    sub = ref_root_from_path(leaf, m - k, n - k, proof[:-1])
    return None if sub is None else node_hash(proof[-1], sub)


@pytest.mark.timeout(120)
@FUZZ
@given(SEED)
def test_inclusion_verification_fuzz(seed: int) -> None:
    rng = random.Random(seed)
    size, index = rand_size(rng), rand_size(rng)
    real_n = size if is_int(size) and 0 < size <= N else N  # type: ignore[operator]
    real_i = index if is_int(index) and 0 <= index < real_n else rng.randrange(real_n)  # type: ignore[operator]
    if rng.random() < 0.6:
        proof: object = TREE.inclusion_proof(real_i, real_n)
    else:
        proof = [rand_hash(rng) for _ in range(rng.randrange(0, 10))]
    if rng.random() < 0.7:
        proof = mutate_proof(rng, proof)  # type: ignore[arg-type]
    leaf = LEAVES[real_i] if rng.random() < 0.6 else rand_hash(rng)
    root = ROOTS[real_n] if rng.random() < 0.6 else rand_hash(rng)
    try:
        verify_inclusion(leaf, index, size, proof, root)  # type: ignore[arg-type]
    except InclusionProofError:
        return
    # It verified: the arguments must be well-formed and the proof must really lead to root.
    assert is_int(index) and is_int(size) and 0 <= index < size  # type: ignore[operator]
    assert isinstance(proof, list)
    assert ref_root_from_path(leaf, index, size, proof) == root  # type: ignore[arg-type]
    if size <= N and root == ROOTS[size]:  # type: ignore[operator]
        assert leaf == LEAVES[index] and proof == TREE.inclusion_proof(index, size)  # type: ignore[arg-type]


@pytest.mark.timeout(120)
@FUZZ
@given(SEED)
def test_consistency_verification_fuzz(seed: int) -> None:
    rng = random.Random(seed)
    old, new = rand_size(rng), rand_size(rng)
    ok = is_int(old) and is_int(new) and 0 < old <= new <= N  # type: ignore[operator]
    real_old, real_new = (old, new) if ok else (rng.randrange(1, N + 1), N)
    if rng.random() < 0.6:
        proof: object = TREE.consistency_proof(real_old, real_new)  # type: ignore[arg-type]
    else:
        proof = [rand_hash(rng) for _ in range(rng.randrange(0, 12))]
    if rng.random() < 0.7:
        proof = mutate_proof(rng, proof)  # type: ignore[arg-type]
    old_root = ROOTS[real_old] if rng.random() < 0.6 else rand_hash(rng)  # type: ignore[index]
    new_root = ROOTS[real_new] if rng.random() < 0.6 else rand_hash(rng)  # type: ignore[index]
    try:
        verify_consistency(old, new, old_root, new_root, proof)  # type: ignore[arg-type]
    except ConsistencyProofError:
        return
    assert is_int(old) and is_int(new) and 0 < old <= new  # type: ignore[operator]
    if old == new:
        assert proof == [] and old_root == new_root
    elif new <= N and old_root == ROOTS[old] and new_root == ROOTS[new]:  # type: ignore[operator]
        assert proof == TREE.consistency_proof(old, new)  # type: ignore[arg-type]
