"""RFC 6962 / 9162 Merkle tree: known answers, the transparency-dev vectors, and an exhaustive
self-check of every proof in every tree of 1..64 leaves against a naive recursive reference."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from functools import cache
from pathlib import Path

import pytest

from protocols import merkle
from protocols.errors import VerificationError
from protocols.merkle import (
    EMPTY_ROOT,
    ConsistencyProofError,
    InclusionProofError,
    MerkleTree,
    TreeRangeError,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

# --------------------------------------------------------------------------------------------
# A deliberately naive reference: RFC 6962 section 2.1 written as recursion over lists.


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return d[0]
    k = _k(len(d))
    return node_hash(ref_mth(d[:k]), ref_mth(d[k:]))


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) <= 1:
        return []
    k = _k(len(d))
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = _k(n)
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


MAX_N = 64
LEAVES = [leaf_hash(f"entry-{i}".encode()) for i in range(2 * MAX_N + 2)]
TREE = MerkleTree(LEAVES)


@cache
def root_at(n: int) -> bytes:
    return TREE.root(n)


# --------------------------------------------------------------------------------------------
# Known answers

# The eight-entry example tree of Certificate Transparency's test suites.
RFC6962_EXAMPLE_DATA = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]


def test_known_answer_hashes() -> None:
    # From transparency-dev/merkle rfc6962_test.go (see testvectors/merkle/README.md).
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert merkle.root([]) == EMPTY_ROOT
    assert (
        leaf_hash(b"").hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert (
        node_hash(b"L" * 32, b"R" * 32) == hashlib.sha256(b"\x01" + b"L" * 32 + b"R" * 32).digest()
    )


def test_known_roots_of_the_rfc6962_example_tree() -> None:
    # The eight-leaf example tree of Certificate Transparency's test suites and its roots.
    data = RFC6962_EXAMPLE_DATA
    roots = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
    tree = MerkleTree(leaf_hash(x) for x in data)
    for n in range(1, 9):
        assert tree.root(n).hex() == roots[n - 1]
        assert merkle.root([leaf_hash(x) for x in data[:n]]).hex() == roots[n - 1]


# --------------------------------------------------------------------------------------------
# transparency-dev/merkle vectors


def _b(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


def _cases(testvectors: Path, kind: str) -> list[tuple[str, dict]]:
    folder = testvectors / "merkle" / kind
    files = sorted(folder.rglob("*.json"))
    assert files, f"no vectors under {folder}"
    return [(str(f.relative_to(folder)), json.loads(f.read_text())) for f in files]


def test_inclusion_vectors(testvectors: Path) -> None:
    cases = _cases(testvectors, "inclusion")
    n_valid = n_invalid = 0
    for _name, c in cases:
        args = (
            _b(c["leafHash"]),
            c["leafIdx"],
            c["treeSize"],
            [_b(p) for p in c["proof"] or []],
            _b(c["root"]),
        )
        if c["wantErr"]:
            with pytest.raises(InclusionProofError):
                verify_inclusion(*args)
            n_invalid += 1
        else:
            verify_inclusion(*args)
            n_valid += 1
    assert n_valid >= 5 and n_invalid >= 50, (n_valid, n_invalid)


def test_consistency_vectors(testvectors: Path) -> None:
    cases = _cases(testvectors, "consistency")
    n_valid = n_invalid = 0
    for _name, c in cases:
        args = (
            c["size1"],
            c["size2"],
            _b(c["root1"]),
            _b(c["root2"]),
            [_b(p) for p in c["proof"] or []],
        )
        if c["wantErr"]:
            with pytest.raises(ConsistencyProofError):
                verify_consistency(*args)
            n_invalid += 1
        else:
            verify_consistency(*args)
            n_valid += 1
    assert n_valid >= 5 and n_invalid >= 50, (n_valid, n_invalid)


def test_vectors_valid_proofs_are_what_the_tree_produces(testvectors: Path) -> None:
    # The valid vectors use the RFC 6962 example tree: our producer must emit the same proofs.
    data = RFC6962_EXAMPLE_DATA
    tree = MerkleTree(leaf_hash(x) for x in data)
    checked = 0
    for _, c in _cases(testvectors, "inclusion"):
        if not c["wantErr"] and c["treeSize"] <= 8 and c["proof"]:
            assert tree.inclusion_proof(c["leafIdx"], c["treeSize"]) == [_b(p) for p in c["proof"]]
            checked += 1
    for _, c in _cases(testvectors, "consistency"):
        if not c["wantErr"] and c["size2"] <= 8 and c["proof"]:
            assert tree.consistency_proof(c["size1"], c["size2"]) == [_b(p) for p in c["proof"]]
            checked += 1
    assert checked >= 8


# --------------------------------------------------------------------------------------------
# Exhaustive self-check, sizes 1..64


def _flip(h: bytes, bit: int) -> bytes:
    b = bytearray(h)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def test_tree_matches_reference_for_every_size() -> None:
    for n in range(0, MAX_N + 1):
        assert TREE.root(n) == ref_mth(LEAVES[:n]), n


def test_every_inclusion_proof_verifies_and_every_mutation_fails() -> None:
    for n in range(1, MAX_N + 1):
        r = root_at(n)
        for i in range(n):
            proof = TREE.inclusion_proof(i, n)
            assert proof == ref_path(i, LEAVES[:n]), (i, n)
            verify_inclusion(LEAVES[i], i, n, proof, r)

            bad: list[tuple] = []
            for j in range(len(proof)):  # a flipped bit in each node (first and last bit)
                for bit in (0, 255):
                    p = list(proof)
                    p[j] = _flip(p[j], bit)
                    bad.append((LEAVES[i], i, n, p, r))
            bad.append((_flip(LEAVES[i], 7), i, n, proof, r))  # flipped leaf
            bad.append((LEAVES[i], i, n, proof, _flip(r, 100)))  # flipped root
            if proof:
                bad.append((LEAVES[i], i, n, proof[:-1], r))  # truncated
                bad.append((LEAVES[i], i, n, proof[1:], r))  # first node dropped
            bad.append((LEAVES[i], i, n, [*proof, r], r))  # extended
            bad.append((LEAVES[i], i, n, [r, *proof], r))  # prepended
            bad.append((LEAVES[i], i, n, [*proof, b""], r))  # garbage
            for wrong_i in {i - 1, i + 1, i ^ 2, n}:  # wrong index (another leaf's slot)
                if wrong_i != i and wrong_i >= 0:
                    bad.append((LEAVES[i], wrong_i, n, proof, r))
            for wrong_n in {n - 1, n + 1, 2 * n, n // 2}:
                # wrong size, checked against the genuine root of that size (as a verifier with a
                # signed checkpoint of that size would): it must fail unless the two proofs
                # happen to coincide, which is then a genuine proof for that size too.
                if wrong_n != n and wrong_n > i and proof != TREE.inclusion_proof(i, wrong_n):
                    bad.append((LEAVES[i], i, wrong_n, proof, root_at(wrong_n)))
            for args in bad:
                with pytest.raises(InclusionProofError):
                    verify_inclusion(*args)


def test_every_consistency_proof_verifies_and_every_mutation_fails() -> None:
    for n in range(1, MAX_N + 1):
        rn = root_at(n)
        for m in range(1, n + 1):
            rm = root_at(m)
            proof = TREE.consistency_proof(m, n)
            assert proof == ref_subproof(m, LEAVES[:n], True), (m, n)
            verify_consistency(m, n, rm, rn, proof)
            if m == n:
                assert proof == []
                with pytest.raises(ConsistencyProofError):
                    verify_consistency(m, n, rm, _flip(rn, 3), proof)
                with pytest.raises(ConsistencyProofError):
                    verify_consistency(m, n, rm, rn, [rn])
                continue
            bad: list[tuple] = []
            for j in range(len(proof)):
                for bit in (0, 255):
                    p = list(proof)
                    p[j] = _flip(p[j], bit)
                    bad.append((m, n, rm, rn, p))
            bad += [
                (m, n, rm, rn, proof[:-1]),  # truncated
                (m, n, rm, rn, proof[1:]),
                (m, n, rm, rn, [*proof, rn]),  # extended
                (m, n, rm, rn, [proof[0], *proof]),
                (m, n, rm, rn, [b"", *proof]),
                (m, n, rm, rn, []),
                (m, n, rn, rm, proof),  # swapped roots
                (m, n, _flip(rm, 9), rn, proof),
                (m, n, rm, _flip(rn, 9), proof),
                (n, m, rn, rm, proof),  # sizes swapped (rollback)
                (0, n, EMPTY_ROOT, rn, proof),
            ]
            for wm in {m - 1, m + 1, m ^ 2}:
                if 0 < wm < n and wm != m and proof != TREE.consistency_proof(wm, n):
                    bad.append((wm, n, root_at(wm), rn, proof))
            for wn in {n - 1, n + 1, 2 * n}:
                if wn > m and wn != n and proof != TREE.consistency_proof(m, wn):
                    bad.append((m, wn, rm, root_at(wn), proof))
            for args in bad:
                with pytest.raises(ConsistencyProofError):
                    verify_consistency(*args)


# --------------------------------------------------------------------------------------------
# Edges, types, and errors


def test_errors_are_verification_errors() -> None:
    assert issubclass(InclusionProofError, VerificationError)
    assert issubclass(ConsistencyProofError, VerificationError)


@pytest.mark.parametrize(
    "args",
    [
        (b"\x00" * 32, 0, 0, [], EMPTY_ROOT),  # empty tree has no leaves
        (b"\x00" * 32, -1, 4, [], EMPTY_ROOT),
        (b"\x00" * 32, True, 4, [], EMPTY_ROOT),  # bool is not an index
        (b"\x00" * 32, 0, 2**64, [], EMPTY_ROOT),
        ("00" * 32, 0, 1, [], EMPTY_ROOT),  # str is not bytes
        (b"\x00" * 32, 0, 1, b"\x00" * 32, EMPTY_ROOT),  # bytes is not a proof list
        (b"\x00" * 32, 0, 2, [None], EMPTY_ROOT),
        (b"\x00" * 32, 0, 2, [b"\x00" * 32] * 200, EMPTY_ROOT),
        (b"\x00" * 32, 0, 1, [], b"\x00" * 31),
        (b"\x00" * 32, 0, 1.0, [], EMPTY_ROOT),
    ],
)
def test_inclusion_rejects_malformed_arguments(args: tuple) -> None:
    with pytest.raises(InclusionProofError):
        verify_inclusion(*args)


def test_inclusion_single_leaf_tree() -> None:
    h = leaf_hash(b"data")
    verify_inclusion(h, 0, 1, [], h)
    with pytest.raises(InclusionProofError):
        verify_inclusion(h, 0, 1, [], leaf_hash(b"other"))


def test_consistency_edges() -> None:
    verify_consistency(5, 5, root_at(5), root_at(5), [])
    with pytest.raises(ConsistencyProofError, match="empty tree"):
        verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    with pytest.raises(ConsistencyProofError, match="never shrinks"):
        verify_consistency(6, 5, root_at(6), root_at(5), [])
    with pytest.raises(ConsistencyProofError, match="forked"):
        verify_consistency(5, 5, root_at(5), root_at(6), [])
    with pytest.raises(ConsistencyProofError):
        verify_consistency(1, 2, "x", root_at(2), [])


def test_tree_range_errors() -> None:
    t = MerkleTree(LEAVES[:5])
    assert t.root(0) == EMPTY_ROOT
    for bad in (-1, 6, True, "3"):
        with pytest.raises(TreeRangeError):
            t.root(bad)  # type: ignore[arg-type]
    with pytest.raises(TreeRangeError):
        t.inclusion_proof(5)
    with pytest.raises(TreeRangeError):
        t.inclusion_proof(0, 0)
    with pytest.raises(TreeRangeError):
        t.consistency_proof(0, 5)
    with pytest.raises(TreeRangeError):
        t.consistency_proof(4, 6)
    with pytest.raises(ValueError):
        t.append(b"short")
    with pytest.raises(TypeError):
        t.append("00" * 32)  # type: ignore[arg-type]
    assert t.size == len(t) == 5


def test_append_returns_indexes_and_restore_round_trips() -> None:
    t = MerkleTree()
    assert [t.append(h) for h in LEAVES[:10]] == list(range(10))
    assert t.leaf_hash(3) == LEAVES[3]
    restored = MerkleTree(t.leaf_hashes())
    assert restored.root() == t.root() == ref_mth(LEAVES[:10])
    for n in range(1, 11):
        assert restored.root(n) == t.root(n)


def test_module_level_helpers() -> None:
    hs = LEAVES[:13]
    assert merkle.root(hs) == ref_mth(hs)
    assert merkle.inclusion_proof(hs, 4) == ref_path(4, hs)
    assert merkle.inclusion_proof(hs, 4, 9) == ref_path(4, hs[:9])
    assert merkle.consistency_proof(hs, 6) == ref_subproof(6, hs, True)
    assert merkle.consistency_proof(hs, 6, 11) == ref_subproof(6, hs[:11], True)


def test_hundred_thousand_leaves_is_fast() -> None:
    start = time.perf_counter()
    big = MerkleTree(leaf_hash(i.to_bytes(8, "big")) for i in range(100_000))
    r = big.root()
    for i in range(0, 100_000, 1_009):
        verify_inclusion(big.leaf_hash(i), i, 100_000, big.inclusion_proof(i), r)
        m = i + 1
        verify_consistency(m, 100_000, big.root(m), r, big.consistency_proof(m))
    elapsed = time.perf_counter() - start
    assert elapsed < 15.0, f"100k-leaf tree with 200 proofs took {elapsed:.1f}s"
    # Proof sizes are logarithmic.
    assert len(big.inclusion_proof(12_345)) <= 17
    assert len(big.consistency_proof(12_345)) <= 2 * 17
