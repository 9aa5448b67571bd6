"""Storage: blobs are content-addressed and atomic; appends and checkpoints commit together."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from coordinator._ratelimit import TokenBucketLimiter
from coordinator.storage import BlobStore, LedgerStore, StorageError, sha256_name
from protocols.merkle import MerkleTree, leaf_hash
from protocols.proto.serde import BlobRef


def _sign(size: int, root: bytes) -> bytes:
    return f"test-note {size} {root.hex()}\n".encode()


def _store(tmp_path: Path) -> LedgerStore:
    return LedgerStore(tmp_path / "ledger.sqlite", BlobStore(tmp_path / "blobs"))


def test_blob_store_round_trip(tmp_path: Path) -> None:
    bs = BlobStore(tmp_path / "b")
    name = bs.put(b"hello")
    assert name == sha256_name(b"hello")
    assert bs.put(b"hello") == name  # idempotent
    assert bs.read(name) == b"hello"
    chunks = list(bs.iter_chunks(name, 2))
    assert [c[2] for c in chunks] == [b"he", b"ll", b"o"]
    assert {c[0] for c in chunks} == {5}
    assert bs.usage() == (1, 5)
    assert not list((tmp_path / "b").rglob(".tmp-*"))
    bs.path(name).write_bytes(b"HELLO")
    with pytest.raises(StorageError, match="corrupt"):
        bs.read(name)


def test_append_commits_entry_and_checkpoint(tmp_path: Path) -> None:
    st = _store(tmp_path)
    envs = [b"envelope-%d" % i for i in range(7)]
    for i, env in enumerate(envs):
        name = st.blobs.put(b"diff-%d" % i)
        with st.writer() as w:
            entry, cp = w.append(
                env,
                kind="site_update",
                site_id="site-a",
                sequence=i + 1,
                blobs=[BlobRef("diff", name, 6)],
                sign_checkpoint=_sign,
            )
        assert entry.index == i and cp.size == i + 1
    ref = MerkleTree([leaf_hash(e) for e in envs])
    assert st.size == 7
    assert st.latest_checkpoint().root_hash == ref.root()
    assert st.inclusion_proof(3, 7) == ref.inclusion_proof(3, 7)
    assert st.consistency_proof(2, 7) == ref.consistency_proof(2, 7)
    assert st.index_of_leaf_hash(leaf_hash(envs[4])) == 4
    assert st.site_contributions() == {"site-a": (7, 7)}
    st.close()
    # Reopen: the tree is rebuilt from the stored leaf hashes and checked against the checkpoint.
    st2 = _store(tmp_path)
    assert st2.size == 7 and st2.root(7) == ref.root()
    st2.check_integrity()


def test_rollback_leaves_nothing(tmp_path: Path) -> None:
    st = _store(tmp_path)
    with st.writer() as w:
        w.append(b"first", kind="genesis", sign_checkpoint=_sign)
    with pytest.raises(RuntimeError), st.writer() as w:
        w.append(b"second", kind="policy", sign_checkpoint=_sign)
        raise RuntimeError("crash between append and commit")
    assert st.size == 1 and st.entry(1) is None and st.checkpoint(2) is None
    with st.writer() as w:
        entry, _ = w.append(b"third", kind="policy", sign_checkpoint=_sign)
    assert entry.index == 1
    assert st.root(2) == MerkleTree([leaf_hash(b"first"), leaf_hash(b"third")]).root()


def test_same_site_sequence_twice_is_refused_by_the_database(tmp_path: Path) -> None:
    st = _store(tmp_path)
    with st.writer() as w:
        w.append(b"a", kind="site_update", site_id="s", sequence=1, sign_checkpoint=_sign)
    with pytest.raises(sqlite3.IntegrityError), st.writer() as w:
        w.append(b"b", kind="site_update", site_id="s", sequence=1, sign_checkpoint=_sign)
    assert st.size == 1


def test_entry_without_its_blob_is_refused(tmp_path: Path) -> None:
    st = _store(tmp_path)
    with pytest.raises(StorageError, match="must be stored before"), st.writer() as w:
        w.append(
            b"x",
            kind="site_update",
            blobs=[BlobRef("diff", sha256_name(b"missing"), 7)],
            sign_checkpoint=_sign,
        )
    assert st.size == 0


def test_other_process_appends_are_picked_up(tmp_path: Path) -> None:
    a = _store(tmp_path)
    b = _store(tmp_path)
    with a.writer() as w:
        w.append(b"one", kind="genesis", sign_checkpoint=_sign)
    assert b.size == 0
    new = b.sync()
    assert [e.envelope for e in new] == [b"one"] and b.size == 1
    with b.writer() as w:
        w.append(b"two", kind="policy", sign_checkpoint=_sign)
    with a.writer() as w:
        assert [e.envelope for e in w.caught_up] == [b"two"]
        w.append(b"three", kind="policy", sign_checkpoint=_sign)
    assert a.size == 3


def test_damaged_database_is_detected(tmp_path: Path) -> None:
    st = _store(tmp_path)
    for i in range(3):
        with st.writer() as w:
            w.append(b"e%d" % i, kind="policy", sign_checkpoint=_sign)
    st.close()
    conn = sqlite3.connect(tmp_path / "ledger.sqlite")
    conn.execute("UPDATE entries SET leaf_hash = ? WHERE idx = 1", (b"\x00" * 32,))
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="damaged"):
        _store(tmp_path)


def test_token_bucket() -> None:
    now = [0.0]
    tb = TokenBucketLimiter(burst=2, per_second=1.0, clock=lambda: now[0])
    assert tb.take("a") == 0.0 and tb.take("a") == 0.0
    wait = tb.take("a")
    assert wait == pytest.approx(1.0)
    assert tb.take("b") == 0.0  # buckets are per key
    now[0] += 0.5
    assert tb.take("a") == pytest.approx(0.5)
    now[0] += 0.5
    assert tb.take("a") == 0.0


def test_token_bucket_refusals_never_make_debt() -> None:
    """A key hammered while empty still gets its token after exactly 1 / per_second."""
    now = [0.0]
    tb = TokenBucketLimiter(burst=1, per_second=1.0, clock=lambda: now[0])
    assert tb.take("a") == 0.0
    for _ in range(1000):
        assert tb.take("a") > 0.0
    now[0] += 1.0
    assert tb.take("a") == 0.0


def test_token_bucket_state_is_bounded() -> None:
    """5,000 distinct keys leave at most max_keys buckets (least recently used dropped)."""
    tb = TokenBucketLimiter(burst=1, per_second=1.0, max_keys=64, clock=lambda: 0.0)
    for i in range(5000):
        tb.take(f"junk-{i}")
    assert len(tb) == 64


def test_inline_blobs_are_durable_with_the_entry_and_files_are_restored(tmp_path: Path) -> None:
    st = _store(tmp_path)
    diff = b"diff bytes of a site update"
    name = sha256_name(diff)
    with st.writer() as w:
        w.append(
            b"env",
            kind="site_update",
            site_id="s",
            sequence=1,
            blobs=[BlobRef("diff", name, len(diff))],
            inline={name: diff},
            sign_checkpoint=_sign,
        )
    assert st.blobs.read(name) == diff
    st.close()
    # Power loss before the (unsynced) file copy reached the disk: missing, or garbage.
    st.blobs.path(name).unlink()
    _store(tmp_path).close()
    assert st.blobs.read(name) == diff
    st.blobs.path(name).write_bytes(b"x" * len(diff))
    _store(tmp_path).close()
    assert st.blobs.read(name) == diff
    # An inline blob that does not match its name is refused.
    with pytest.raises(StorageError, match="does not match"), st.writer() as w:
        w.append(
            b"env2",
            kind="site_update",
            blobs=[BlobRef("diff", name, len(diff))],
            inline={name: b"other bytes"},
            sign_checkpoint=_sign,
        )
