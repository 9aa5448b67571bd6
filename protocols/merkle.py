"""RFC 6962 / RFC 9162 Merkle trees: hashing, proofs, and an append-only tree for the log.

The ledger of scarches-fl is an append-only Merkle log whose hashing is exactly that of
Certificate Transparency (RFC 6962 section 2.1, restated in RFC 9162 section 2.1), so that any
existing transparency-log tool can check it.

Hashing (SHA-256 throughout; ``||`` is concatenation)::

    leaf_hash(d)    = SHA-256(0x00 || d)
    node_hash(l, r) = SHA-256(0x01 || l || r)
    MTH({})         = SHA-256("")                   (the empty tree)
    MTH({d0})       = leaf_hash(d0)
    MTH(D[n])       = node_hash(MTH(D[0:k]), MTH(D[k:n]))  k = largest power of two < n

Verification rules enforced by :func:`verify_inclusion` and :func:`verify_consistency` (pure
functions of their arguments: no I/O, no clock, no state):

1. **Sizes and roots come from signed checkpoints only.** ``tree_size``, ``old_size``,
   ``new_size``, ``root``, ``old_root`` and ``new_root`` MUST be taken from checkpoints whose
   signature the caller has verified (:func:`protocols.checkpoint.verify_checkpoint`), never from
   unsigned fields that travel beside a proof. A proof only says "this leaf / this older tree is
   part of *that* tree"; which tree is the trusted one is the checkpoint's job.
2. Every hash (leaf hash, proof node, root compared against a computed value) is exactly 32
   bytes; sizes and indexes are ``int`` (not ``bool``) in ``[0, 2**64)``.
3. An inclusion proof needs ``0 <= index < tree_size`` and has exactly the length RFC 9162
   implies for that index and size: no missing, extra, or reordered nodes are tolerated.
4. A consistency proof needs ``0 < old_size <= new_size``. Equal sizes need an empty proof and
   equal roots. A proof from the empty tree (``old_size == 0``) is refused: it proves nothing
   (every tree extends the empty tree), so callers that hold no previous tree, or an empty one,
   decide that case themselves (see :func:`protocols.checkpoint.check_checkpoint_advance`).
5. Failure is always an exception: :class:`InclusionProofError` or
   :class:`ConsistencyProofError` (both :class:`protocols.errors.VerificationError`). The
   functions never return ``False``. Root comparison is constant-time.

:class:`MerkleTree` is the producer side (the coordinator): an append-only tree that keeps the
hash of every complete, aligned power-of-two subtree, so that appending is amortised O(1) and
worst case O(log n), and the root at any earlier size, an inclusion proof and a consistency
proof each cost O(log n) hash computations.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable, Sequence

from protocols.errors import ProofError, ScarchesFLError

__all__ = [
    "HASH_SIZE",
    "EMPTY_ROOT",
    "MAX_TREE_SIZE",
    "leaf_hash",
    "node_hash",
    "root",
    "inclusion_proof",
    "consistency_proof",
    "verify_inclusion",
    "verify_consistency",
    "MerkleTree",
    "ProofError",
    "InclusionProofError",
    "ConsistencyProofError",
    "TreeRangeError",
]

logger = logging.getLogger(__name__)

HASH_SIZE = 32
"""Bytes in every hash of the tree (SHA-256)."""

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""Root hash of the empty tree: SHA-256 of the empty string."""

MAX_TREE_SIZE = 2**64 - 1
"""Largest tree size (and index bound) accepted anywhere: sizes are uint64 in RFC 9162."""

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"



class InclusionProofError(ProofError):
    """An inclusion proof does not show the leaf in the tree of the signed checkpoint."""


class ConsistencyProofError(ProofError):
    """A consistency proof does not show that the older tree is a prefix of the newer one."""


class TreeRangeError(ScarchesFLError, ValueError):
    """A proof or root was asked of a :class:`MerkleTree` for an index or size it does not have
    (for example a size beyond the current tree). A request error, not a verification failure."""

    exit_code = 2


# --------------------------------------------------------------------------------------------
# Hashing


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the RFC 6962 hash of one log entry."""
    return hashlib.sha256(_LEAF_PREFIX + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the RFC 6962 hash of an interior node."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """Merkle tree hash (RFC 6962 ``MTH``) of a list of *leaf hashes* (already
    :func:`leaf_hash`-ed). The empty list gives :data:`EMPTY_ROOT`."""
    return MerkleTree(leaf_hashes).root()


def inclusion_proof(
    leaf_hashes: Sequence[bytes], index: int, tree_size: int | None = None
) -> list[bytes]:
    """RFC 9162 inclusion proof of leaf ``index`` in the tree of the first ``tree_size`` leaf
    hashes (all of them when ``tree_size`` is None)."""
    return MerkleTree(leaf_hashes).inclusion_proof(index, tree_size)


def consistency_proof(
    leaf_hashes: Sequence[bytes], old_size: int, new_size: int | None = None
) -> list[bytes]:
    """RFC 9162 consistency proof between the trees of the first ``old_size`` and the first
    ``new_size`` leaf hashes (all of them when ``new_size`` is None)."""
    return MerkleTree(leaf_hashes).consistency_proof(old_size, new_size)


# --------------------------------------------------------------------------------------------
# Verification (pure)


def _check_size(value: object, what: str, error: type[ProofError]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(
            f"{what} must be an integer, got {type(value).__name__}; pass the number from a verified checkpoint"
        )
    if value < 0 or value > MAX_TREE_SIZE:
        raise error(
            f"{what} {value} is outside [0, 2**64); pass the number from a verified checkpoint"
        )
    return value


def _check_hash(value: object, what: str, error: type[ProofError]) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise error(f"{what} must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) != HASH_SIZE:
        raise error(
            f"{what} is {len(value)} bytes, a SHA-256 hash is {HASH_SIZE}; the proof or "
            "checkpoint is malformed: refetch it, and report the log if it persists"
        )
    return value


def _check_proof(proof: object, error: type[ProofError]) -> list[bytes]:
    if isinstance(proof, bytes | bytearray | memoryview | str) or not isinstance(proof, Sequence):
        raise error(f"a proof must be a sequence of 32-byte hashes, got {type(proof).__name__}")
    if len(proof) > 2 * 64:
        raise error(
            f"proof has {len(proof)} hashes; no proof in a tree of at most 2**64 leaves has more than 128"
        )
    return [_check_hash(p, f"proof node {i}", error) for i, p in enumerate(proof)]


def _inclusion_proof_length(index: int, size: int) -> int:
    # Below the level where the paths to ``index`` and ``size - 1`` meet, every level has a
    # sibling; above it, only the levels where ``index`` is a right child do.
    inner = (index ^ (size - 1)).bit_length()
    return inner + bin(index >> inner).count("1")


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf number ``index`` of the tree of size ``tree_size`` whose
    root is ``root`` (RFC 9162 section 2.1.3.2). Returns None; raises
    :class:`InclusionProofError` on any failure.

    ``tree_size`` and ``root`` MUST come from a checkpoint whose signature was verified, never from
    fields sent beside the proof.
    """
    err = InclusionProofError
    leaf = _check_hash(leaf_hash, "leaf hash", err)
    index = _check_size(index, "leaf index", err)
    size = _check_size(tree_size, "tree size", err)
    expected_root = _check_hash(root, "root hash", err)
    nodes = _check_proof(proof, err)
    if index >= size:
        raise err(
            f"leaf index {index} is not inside a tree of size {size}; the entry is not covered by "
            "this checkpoint: fetch a newer checkpoint and a proof against it"
        )
    want = _inclusion_proof_length(index, size)
    if len(nodes) != want:
        raise err(
            f"inclusion proof for index {index} in a tree of size {size} must have {want} hashes, "
            f"got {len(nodes)}; the proof is malformed: refetch it"
        )
    fn, sn, r = index, size - 1, leaf
    for p in nodes:
        if sn == 0:  # unreachable after the length check; kept as the RFC states it
            raise err("inclusion proof is longer than the tree is high")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0 or not hmac.compare_digest(r, expected_root):
        raise err(
            f"inclusion proof for leaf {index} does not lead to the root of the signed checkpoint "
            f"of size {size}: the entry is not in that tree as claimed. Do not trust the entry; "
            "report the log to its operator or an auditor"
        )


def _consistency_proof_length(old_size: int, new_size: int) -> int:
    shift = (old_size & -old_size).bit_length() - 1  # trailing zeros of old_size
    inner = ((old_size - 1) ^ (new_size - 1)).bit_length()
    border = bin((old_size - 1) >> inner).count("1")
    start = 0 if old_size == 1 << shift else 1
    return start + (inner - shift) + border


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of size ``old_size`` with root ``old_root`` is a prefix of the tree of
    size ``new_size`` with root ``new_root`` (RFC 9162 section 2.1.4.2). Returns None; raises
    :class:`ConsistencyProofError` on any failure.

    Sizes and roots MUST come from two checkpoints whose signatures were verified.
    ``old_size == 0`` is refused (see rule 4 of the module docstring).
    """
    err = ConsistencyProofError
    m = _check_size(old_size, "old tree size", err)
    n = _check_size(new_size, "new tree size", err)
    nodes = _check_proof(proof, err)
    for value, what in ((old_root, "old root"), (new_root, "new root")):
        if not isinstance(value, bytes | bytearray | memoryview):
            raise err(f"{what} must be bytes, got {type(value).__name__}")
    if n < m:
        raise err(
            f"new tree size {n} is smaller than old tree size {m}: a log never shrinks. "
            "Keep the old checkpoint and report the log (possible rollback)"
        )
    if m == 0:
        raise err(
            "a consistency proof from the empty tree proves nothing; callers holding no "
            "(or an empty) previous checkpoint accept the new one on its signature alone"
        )
    if m == n:
        if nodes:
            raise err(
                f"trees of equal size {m} need an empty consistency proof, got {len(nodes)} hashes"
            )
        if not hmac.compare_digest(bytes(old_root), bytes(new_root)):
            raise err(
                f"two signed roots for the same tree size {m} differ: the log has forked. Keep "
                "both checkpoints as evidence and report them to the operator and auditors"
            )
        return
    r1 = _check_hash(old_root, "old root", err)
    r2 = _check_hash(new_root, "new root", err)
    want = _consistency_proof_length(m, n)
    if len(nodes) != want:
        raise err(
            f"consistency proof from size {m} to size {n} must have {want} hashes, got "
            f"{len(nodes)}; the proof is malformed: refetch it"
        )
    if m & (m - 1) == 0:  # old_size is a power of two: its root is the first node of the path
        nodes = [r1, *nodes]
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = nodes[0]
    for c in nodes[1:]:
        if sn == 0:  # unreachable after the length check; kept as the RFC states it
            raise err("consistency proof is longer than the tree is high")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    ok_old = hmac.compare_digest(fr, r1)
    ok_new = hmac.compare_digest(sr, r2)
    if sn != 0 or not (ok_old and ok_new):
        which = "old" if not ok_old else "new"
        raise err(
            f"consistency proof from size {m} to size {n} does not reproduce the {which} signed "
            "root: the newer tree does not extend the older one (a fork, or a corrupt proof). "
            "Keep the old checkpoint, refetch the proof, and report the log if it persists"
        )


# --------------------------------------------------------------------------------------------
# The append-only tree (producer side)


class MerkleTree:
    """An append-only RFC 6962 tree over leaf hashes, with roots and proofs at any past size.

    ``_levels[k][i]`` is the hash of the complete subtree of ``2**k`` leaves that starts at leaf
    ``i * 2**k``; only complete subtrees are stored (about ``2n`` hashes in all). Any range that
    RFC 6962's recursion visits is a complete aligned subtree, or a suffix ``[s, size)`` whose
    hash is one :func:`node_hash` of a complete subtree and a shorter suffix: so each root or
    proof costs O(log n) hashes.

    Restore a tree from storage with ``MerkleTree(leaf_hashes)``.
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = [[]]
        self.extend(leaf_hashes)

    # -- growth -------------------------------------------------------------------------------

    def append(self, leaf_hash: bytes) -> int:
        """Append one leaf hash (``leaf_hash(entry_bytes)``); return its index."""
        if not isinstance(leaf_hash, bytes | bytearray | memoryview):
            raise TypeError(f"leaf hash must be bytes, got {type(leaf_hash).__name__}")
        h = bytes(leaf_hash)
        if len(h) != HASH_SIZE:
            raise ValueError(
                f"leaf hash must be {HASH_SIZE} bytes, got {len(h)}; pass leaf_hash(entry)"
            )
        levels = self._levels
        index = len(levels[0])
        levels[0].append(h)
        level, i = 0, index
        while i & 1:  # this node completed a pair: store the parent
            parent = node_hash(levels[level][i - 1], levels[level][i])
            level += 1
            if level == len(levels):
                levels.append([])
            levels[level].append(parent)
            i >>= 1
        return index

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Append several leaf hashes in order."""
        for h in leaf_hashes:
            self.append(h)

    # -- reading ------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of leaves."""
        return len(self._levels[0])

    def __len__(self) -> int:
        return self.size

    def leaf_hash(self, index: int) -> bytes:
        """The stored hash of leaf ``index``."""
        self._check_index(index, self.size)
        return self._levels[0][index]

    def leaf_hashes(self) -> list[bytes]:
        """A copy of all leaf hashes, in order (what to persist to restore the tree)."""
        return list(self._levels[0])

    def root(self, size: int | None = None) -> bytes:
        """Root hash of the tree of the first ``size`` leaves (default: all)."""
        size = self._resolve_size(size)
        if size == 0:
            return EMPTY_ROOT
        return self._hash(0, size, size, {})

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 inclusion proof (audit path) of leaf ``index`` in the tree of ``size`` leaves."""
        size = self._resolve_size(size)
        self._check_index(index, size)
        memo: dict[int, bytes] = {}
        proof: list[bytes] = []
        start, end, m = 0, size, index
        while end - start > 1:  # walk down, collecting siblings top first
            k = _split(end - start)
            if m < k:
                proof.append(self._hash(start + k, end, size, memo))
                end = start + k
            else:
                proof.append(self._hash(start, start + k, size, memo))
                start, m = start + k, m - k
        proof.reverse()
        return proof

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 9162 consistency proof from the tree of ``old_size`` leaves to that of ``new_size``
        (default: all). Empty when the sizes are equal; ``old_size`` must be at least 1."""
        new_size = self._resolve_size(new_size)
        if (
            isinstance(old_size, bool)
            or not isinstance(old_size, int)
            or not 0 < old_size <= new_size
        ):
            raise TreeRangeError(
                f"a consistency proof needs 0 < old_size <= new_size, got old_size={old_size!r}, "
                f"new_size={new_size}"
            )
        memo: dict[int, bytes] = {}
        proof: list[bytes] = []
        start, end, m, complete = 0, new_size, old_size, True
        while m != end - start:  # RFC 6962 SUBPROOF, iteratively; siblings top first
            n = end - start
            k = _split(n)
            if m <= k:
                proof.append(self._hash(start + k, end, new_size, memo))
                end = start + k
            else:
                proof.append(self._hash(start, start + k, new_size, memo))
                start, m, complete = start + k, m - k, False
        if not complete:
            proof.append(self._hash(start, end, new_size, memo))
        proof.reverse()
        return proof

    # -- internals ----------------------------------------------------------------------------

    def _resolve_size(self, size: int | None) -> int:
        if size is None:
            return self.size
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= self.size:
            raise TreeRangeError(
                f"tree size {size!r} is not available: this tree has {self.size} leaves"
            )
        return size

    @staticmethod
    def _check_index(index: int, size: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
            raise TreeRangeError(f"leaf index {index!r} is not inside a tree of size {size}")

    def _hash(self, start: int, end: int, size: int, memo: dict[int, bytes]) -> bytes:
        """MTH of leaves ``[start, end)`` where the range is either a complete aligned subtree or
        a suffix ending at ``size`` whose start RFC 6962's recursion can reach. ``memo`` caches
        suffix hashes (keyed by start) for one root/proof computation."""
        n = end - start
        if n & (n - 1) == 0 and start % n == 0:
            return self._levels[n.bit_length() - 1][start // n]
        if end != size:  # pragma: no cover - the recursion never asks for such a range
            raise AssertionError(
                f"range [{start}, {end}) is neither complete nor a suffix of {size}"
            )
        cached = memo.get(start)
        if cached is not None:
            return cached
        # Peel complete subtrees off the left; the remaining suffix chain is hashed bottom-up.
        parts: list[tuple[int, bytes]] = []
        s = start
        while end - s > 0:
            n = end - s
            if n & (n - 1) == 0:
                parts.append((s, self._levels[n.bit_length() - 1][s // n]))
                break
            k = _split(n)
            parts.append((s, self._levels[k.bit_length() - 1][s // k]))
            s += k
        h = parts[-1][1]
        memo[parts[-1][0]] = h
        for s_i, left in reversed(parts[:-1]):
            h = node_hash(left, h)
            memo[s_i] = h
        return h
