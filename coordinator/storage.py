"""The coordinator's durable state: a content-addressed blob store and the ledger in SQLite.

Crash safety (an acknowledged update survives kill -9 and power loss; a half-written one never
appears) comes from three rules:

1. Large blobs (the genesis bundle) are written before the entry that names them: temp file,
   fsync, rename, fsync the directory. A crash between the blob and the entry leaves an orphan
   blob, which is harmless (content-addressed, never served as part of the model) and reported
   by ``status``. Small blobs of the hot path (site diffs, kilobytes) are written *inside* the
   entry's transaction (table ``blob_data``), which makes them exactly as durable as the entry
   at the cost of no extra fsync; their file in ``blobs/`` is a copy written after the commit
   and restored from the database on start if a crash lost it.
2. The entry row and the checkpoint that covers it are inserted in ONE SQLite transaction
   (WAL mode, ``synchronous=FULL`` when durable): after a crash either both are there or neither.
   The site is answered only after the commit returned.
3. The in-memory Merkle tree (``protocols.merkle.MerkleTree``) is rebuilt from the stored leaf
   hashes on start and checked against the last stored checkpoint's root. Readers only ever
   see the committed size; a rolled-back transaction rebuilds the tree from the database.

Appends are serialized: :meth:`LedgerStore.writer` takes a process-wide lock and SQLite's write
lock (``BEGIN IMMEDIATE``), so ``coordinator enroll`` run from a shell while ``serve`` is running
is ordered with the server's appends; the writer first catches up with entries other processes
appended.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.bundle import atomic_write
from protocols.errors import ScarchesFLError
from protocols.proto.serde import BlobRef

__all__ = [
    "BlobStore",
    "LedgerStore",
    "LedgerWriter",
    "StoredEntry",
    "StoredCheckpoint",
    "StorageError",
    "sha256_name",
]

logger = logging.getLogger(__name__)


class StorageError(ScarchesFLError):
    """The state directory is damaged or not what it should be."""

    exit_code = 5


def sha256_name(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hex_of(name: str) -> str:
    if not name.startswith("sha256:") or len(name) != 71:
        raise ValueError(f"not a blob name: {name!r}")
    hexpart = name[7:]
    int(hexpart, 16)
    return hexpart


class BlobStore:
    """Content-addressed files under ``root/ab/abcdef...`` (sha256 of the bytes)."""

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = Path(root)
        self.durable = durable
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        h = _hex_of(name)
        return self.root / h[:2] / h

    def exists(self, name: str) -> bool:
        try:
            return self.path(name).is_file()
        except ValueError:
            return False

    def size(self, name: str) -> int:
        return self.path(name).stat().st_size

    def put(self, data: bytes, *, durable: bool | None = None) -> str:
        """Store ``data`` (durably unless ``durable=False``); returns its name. Idempotent."""
        durable = self.durable if durable is None else durable
        name = sha256_name(data)
        target = self.path(name)
        if target.is_file() and target.stat().st_size == len(data):
            return name
        atomic_write(target, data, durable=durable)
        return name

    def read(self, name: str, *, verify: bool = True) -> bytes:
        data = self.path(name).read_bytes()
        if verify and sha256_name(data) != name:
            raise StorageError(
                f"blob {name} in {self.root} is corrupt (its bytes hash differently); restore it "
                "from a backup"
            )
        return data

    def iter_chunks(self, name: str, chunk_bytes: int) -> Iterator[tuple[int, int, bytes]]:
        """(total size, offset, chunk) for the blob's bytes."""
        path = self.path(name)
        total = path.stat().st_size
        with path.open("rb") as fh:
            offset = 0
            while True:
                data = fh.read(chunk_bytes)
                if not data:
                    if offset == 0:
                        yield total, 0, b""
                    return
                yield total, offset, data
                offset += len(data)

    def iter_names(self) -> Iterator[str]:
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for f in sorted(sub.iterdir()):
                    if len(f.name) == 64 and not f.name.startswith("."):
                        yield "sha256:" + f.name

    def usage(self) -> tuple[int, int]:
        """(number of blobs, bytes)."""
        n = total = 0
        for name in self.iter_names():
            n += 1
            total += self.path(name).stat().st_size
        return n, total


@dataclass(frozen=True)
class StoredEntry:
    index: int
    leaf_hash: bytes
    envelope: bytes
    kind: str
    site_id: str | None
    sequence: int | None
    blobs: tuple[BlobRef, ...]
    created_at: float


@dataclass(frozen=True)
class StoredCheckpoint:
    size: int
    root_hash: bytes
    signed_note: bytes


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY,
    leaf_hash BLOB NOT NULL UNIQUE,
    envelope BLOB NOT NULL,
    kind TEXT NOT NULL,
    site_id TEXT,
    sequence INTEGER,
    created_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS entries_site_seq ON entries(site_id, sequence)
    WHERE site_id IS NOT NULL AND sequence IS NOT NULL AND kind = 'site_update';
CREATE TABLE IF NOT EXISTS entry_blobs (
    idx INTEGER NOT NULL REFERENCES entries(idx),
    role TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (idx, role)
);
CREATE INDEX IF NOT EXISTS entry_blobs_sha ON entry_blobs(sha256);
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,
    root_hash BLOB NOT NULL,
    note BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS blob_data (
    sha256 TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cosignatures (
    size INTEGER NOT NULL REFERENCES checkpoints(size),
    line TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (size, line)
);
"""


def leaf_hash_of(envelope: bytes) -> bytes:
    """RFC 6962 leaf hash, via ``protocols.merkle.leaf_hash``."""
    from protocols.merkle import leaf_hash

    return leaf_hash(envelope)


class LedgerWriter:
    """Handle given out by :meth:`LedgerStore.writer`: append entries inside one exclusive
    write transaction. Several appends may happen in one transaction; they commit together."""

    def __init__(self, store: LedgerStore, conn: sqlite3.Connection) -> None:
        self._store = store
        self._conn = conn
        self._pending: list[bytes] = []
        self._inline: dict[str, bytes] = {}
        #: entries other processes committed since this process last looked (applied by the
        #: caller to its ledger state before it appends)
        self.caught_up: list[StoredEntry] = []

    @property
    def size(self) -> int:
        return self._store._committed + len(self._pending)

    def append(
        self,
        envelope: bytes,
        *,
        kind: str,
        sign_checkpoint: Callable[[int, bytes], bytes],
        site_id: str | None = None,
        sequence: int | None = None,
        blobs: Sequence[BlobRef] = (),
        inline: dict[str, bytes] | None = None,
    ) -> tuple[StoredEntry, StoredCheckpoint]:
        """Insert one entry and the checkpoint of the tree that ends with it.

        Every blob named in ``blobs`` is either already in the blob store (written and fsynced)
        or given in ``inline`` (name -> bytes, for small blobs such as diffs): inline blobs are
        inserted into ``blob_data`` in this same transaction, so they are exactly as durable as
        the entry, and copied to the blob store after the commit."""
        store = self._store
        inline = inline or {}
        for b in blobs:
            data = inline.get(b.sha256)
            if data is not None:
                if sha256_name(data) != b.sha256 or len(data) != b.size:
                    raise StorageError(f"inline blob {b.sha256} does not match its bytes")
                self._conn.execute(
                    "INSERT OR IGNORE INTO blob_data(sha256, data) VALUES (?, ?)",
                    (b.sha256, data),
                )
                self._inline[b.sha256] = data
            elif not store.blobs.exists(b.sha256):
                raise StorageError(f"blob {b.sha256} must be stored before the entry naming it")
        lh = leaf_hash_of(envelope)
        index = self.size
        now = time.time()
        self._conn.execute(
            "INSERT INTO entries(idx, leaf_hash, envelope, kind, site_id, sequence, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (index, lh, envelope, kind, site_id, sequence, now),
        )
        for b in blobs:
            self._conn.execute(
                "INSERT INTO entry_blobs(idx, role, sha256, size) VALUES (?, ?, ?, ?)",
                (index, b.role, b.sha256, b.size),
            )
        self._pending.append(lh)
        with store._tree_lock:
            if store._tree.size != index:
                raise StorageError("in-memory tree out of step with the database")
            store._tree.append(lh)
            root = store._tree.root(index + 1)
        note = sign_checkpoint(index + 1, root)
        self._conn.execute(
            "INSERT INTO checkpoints(size, root_hash, note, created_at) VALUES (?, ?, ?, ?)",
            (index + 1, root, note, now),
        )
        entry = StoredEntry(index, lh, envelope, kind, site_id, sequence, tuple(blobs), now)
        return entry, StoredCheckpoint(index + 1, root, note)


class LedgerStore:
    """Entries, checkpoints and cosignatures in SQLite, the Merkle tree in memory, blobs on
    disk. Thread-safe: readers use one SQLite connection per thread, writers are serialized."""

    def __init__(self, db_path: Path, blobs: BlobStore, *, durable: bool = True) -> None:
        from protocols.merkle import MerkleTree

        self.db_path = Path(db_path)
        self.blobs = blobs
        self.durable = durable
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._tree_lock = threading.RLock()
        self._tree = MerkleTree()
        self._committed = 0  # size readers may see (last committed checkpoint)
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        conn = self._conn()
        with conn:
            conn.executescript(_SCHEMA)
        self._load_tree()
        self._restore_blob_files()

    def _restore_blob_files(self) -> None:
        """Rewrite blob files whose durable copy is in ``blob_data`` but whose file is missing
        or damaged (a crash or power loss between the commit and the file copy, which is not
        fsynced). Checks every such file's hash: they are small."""
        for name, size in (
            self._conn().execute("SELECT sha256, length(data) FROM blob_data").fetchall()
        ):
            path = self.blobs.path(name)
            try:
                if path.stat().st_size == size and sha256_name(path.read_bytes()) == name:
                    continue
            except FileNotFoundError:
                pass
            (data,) = (
                self._conn()
                .execute("SELECT data FROM blob_data WHERE sha256 = ?", (name,))
                .fetchone()
            )
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # put() keeps an existing file of the right size
            self.blobs.put(bytes(data))
            logger.warning("restored blob file %s from the database", name)

    # -- connections --

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'OFF'}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        with self._conns_lock:
            for c in self._conns:
                with contextlib.suppress(Exception):
                    c.close()
            self._conns.clear()
        self._local = threading.local()

    # -- tree --

    def _rebuild_tree(self) -> None:
        from protocols.merkle import MerkleTree

        with self._tree_lock:
            self._tree = MerkleTree()
            self._committed = 0
            self._load_tree()

    def _load_tree(self) -> None:
        conn = self._conn()
        own_txn = not conn.in_transaction
        with self._tree_lock:
            if own_txn:
                conn.execute("BEGIN")  # one read snapshot for entries and checkpoint
            try:
                start = int(self._tree.size)
                rows = conn.execute(
                    "SELECT idx, leaf_hash FROM entries WHERE idx >= ? ORDER BY idx", (start,)
                ).fetchall()
                cp = self.latest_checkpoint()
            finally:
                if own_txn:
                    conn.execute("COMMIT")
            for idx, lh in rows:
                if idx != self._tree.size:
                    raise StorageError(
                        f"{self.db_path}: entry {self._tree.size} is missing (found {idx}); the "
                        "ledger database is damaged, restore it from a backup"
                    )
                self._tree.append(bytes(lh))
            size = int(self._tree.size)
            if (cp.size if cp else 0) != size:
                raise StorageError(
                    f"{self.db_path}: {size} entries but the last checkpoint has size "
                    f"{cp.size if cp else 0}; the ledger database is damaged, restore it from a "
                    "backup"
                )
            if cp is not None and rows and self._tree.root(size) != cp.root_hash:
                raise StorageError(
                    f"{self.db_path}: the entries do not hash to the last checkpoint's root; "
                    "the ledger database is damaged, restore it from a backup"
                )
            self._committed = size

    @property
    def write_lock(self) -> threading.RLock:
        """Held by :meth:`writer` for a whole transaction; hold it around :meth:`sync` when
        the caller must apply the returned entries before the next writer runs."""
        return self._write_lock

    def sync(self) -> list[StoredEntry]:
        """Catch up with entries appended by another process; returns them. Call it with
        :attr:`write_lock` held (the tree holds uncommitted leaves while a writer runs)."""
        with self._write_lock, self._tree_lock:
            before = self._committed
            self._load_tree()
            if self._committed == before:
                return []
            return self.entries(before, self._committed)

    @property
    def size(self) -> int:
        """The committed tree size."""
        return self._committed

    # -- writing --

    @contextlib.contextmanager
    def writer(self) -> Iterator[LedgerWriter]:
        """Exclusive write transaction; commits on exit, rolls back on an exception. Entries
        committed by other processes are loaded before the body runs (see ``writer.caught_up``)."""
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            w: LedgerWriter | None = None
            try:
                caught_up = self.sync()
                w = LedgerWriter(self, conn)
                w.caught_up = caught_up
                yield w
            except BaseException:
                conn.execute("ROLLBACK")
                if w is not None and w._pending:
                    self._rebuild_tree()
                raise
            else:
                try:
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(Exception):
                        conn.execute("ROLLBACK")
                    self._rebuild_tree()
                    raise
                with self._tree_lock:
                    self._committed += len(w._pending)
                for name, data in w._inline.items():
                    # A copy for readers of blobs/; the durable copy is blob_data (committed),
                    # so a failure here loses nothing: the file is restored at the next start.
                    try:
                        self.blobs.put(data, durable=False)
                    except OSError as exc:
                        logger.warning(
                            "could not copy blob %s to %s: %s", name, self.blobs.root, exc
                        )

    def add_cosignatures(self, size: int, lines: Sequence[str]) -> int:
        """Store witness signature lines for checkpoint ``size``; returns how many were new."""
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                added = 0
                for line in lines:
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO cosignatures(size, line, created_at) VALUES (?,?,?)",
                        (size, line, time.time()),
                    )
                    added += cur.rowcount
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return added

    # -- reading --

    def _entry_from_row(self, row: Any) -> StoredEntry:
        idx, lh, env, kind, site, seq, created = row
        blobs = tuple(
            BlobRef(role=r, sha256=s, size=n)
            for r, s, n in self._conn().execute(
                "SELECT role, sha256, size FROM entry_blobs WHERE idx = ? ORDER BY role", (idx,)
            )
        )
        return StoredEntry(idx, bytes(lh), bytes(env), kind, site, seq, blobs, created)

    _ENTRY_COLS = "idx, leaf_hash, envelope, kind, site_id, sequence, created_at"

    def entry(self, index: int) -> StoredEntry | None:
        row = (
            self._conn()
            .execute(f"SELECT {self._ENTRY_COLS} FROM entries WHERE idx = ?", (index,))
            .fetchone()
        )
        return self._entry_from_row(row) if row else None

    def entries(self, start: int, end: int) -> list[StoredEntry]:
        rows = (
            self._conn()
            .execute(
                f"SELECT {self._ENTRY_COLS} FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                (start, end),
            )
            .fetchall()
        )
        return [self._entry_from_row(r) for r in rows]

    def index_of_leaf_hash(self, leaf_hash: bytes) -> int | None:
        row = (
            self._conn()
            .execute("SELECT idx FROM entries WHERE leaf_hash = ?", (leaf_hash,))
            .fetchone()
        )
        return int(row[0]) if row else None

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        row = (
            self._conn()
            .execute("SELECT size, root_hash, note FROM checkpoints ORDER BY size DESC LIMIT 1")
            .fetchone()
        )
        return StoredCheckpoint(int(row[0]), bytes(row[1]), bytes(row[2])) if row else None

    def checkpoint(self, size: int) -> StoredCheckpoint | None:
        row = (
            self._conn()
            .execute("SELECT size, root_hash, note FROM checkpoints WHERE size = ?", (size,))
            .fetchone()
        )
        return StoredCheckpoint(int(row[0]), bytes(row[1]), bytes(row[2])) if row else None

    def checkpoint_time(self, size: int) -> float | None:
        """When the checkpoint of ``size`` was signed (POSIX seconds)."""
        row = (
            self._conn()
            .execute("SELECT created_at FROM checkpoints WHERE size = ?", (size,))
            .fetchone()
        )
        return float(row[0]) if row else None

    def cosignature_lines(self, size: int) -> list[str]:
        rows = self._conn().execute(
            "SELECT line FROM cosignatures WHERE size = ? ORDER BY created_at, line", (size,)
        )
        return [r[0] for r in rows]

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self._committed:
            from protocols.merkle import TreeRangeError

            raise TreeRangeError(
                f"tree size {size} is not available: the log has {self._committed} entries"
            )

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        self._check_size(size)
        with self._tree_lock:
            return list(self._tree.inclusion_proof(index, size))

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        self._check_size(new_size)
        with self._tree_lock:
            return list(self._tree.consistency_proof(old_size, new_size))

    def leaf_hashes(self) -> list[bytes]:
        """The leaf hash of every committed entry, in order (checked against the last
        checkpoint when the database was opened)."""
        with self._tree_lock:
            return self._tree.leaf_hashes()[: self._committed]

    def root(self, size: int) -> bytes:
        self._check_size(size)
        with self._tree_lock:
            return bytes(self._tree.root(size))

    def site_contributions(self) -> dict[str, tuple[int, int]]:
        """site id -> (accepted site_update entries, highest sequence)."""
        rows = self._conn().execute(
            "SELECT site_id, COUNT(*), MAX(sequence) FROM entries "
            "WHERE kind = 'site_update' AND site_id IS NOT NULL GROUP BY site_id"
        )
        return {r[0]: (int(r[1]), int(r[2] or 0)) for r in rows}

    def referenced_blobs(self) -> set[str]:
        return {r[0] for r in self._conn().execute("SELECT DISTINCT sha256 FROM entry_blobs")}

    def check_integrity(self) -> None:
        """Recompute every leaf hash from its envelope and compare with the tree (for status)."""
        for e in self.entries(0, self.size):
            if leaf_hash_of(e.envelope) != e.leaf_hash:
                raise StorageError(
                    f"{self.db_path}: entry {e.index}: the stored leaf hash does not match its "
                    "envelope; the database is damaged, restore it from a backup"
                )
