"""Where an audit reads the ledger from: a running coordinator, or a copy of its state directory.

Both sources hand the audit engine (:mod:`protocols.audit`) the same things -- entries (the DSSE
envelope bytes exactly as logged), blobs by sha256, signed checkpoint notes, the served reference
-- and nothing they say is trusted: the engine verifies all of it against ``trust.json``.

* :class:`RegistrySource` talks to the registry gRPC service through
  :class:`protocols.registry_client.RegistryClient` (TLS by default).
* :class:`StateDirSource` reads a copy of the coordinator's state directory directly: the SQLite
  database (tables ``entries``, ``entry_blobs``, ``checkpoints``, ``cosignatures``) and the
  content-addressed blob store (``blobs/<2 hex>/<64 hex>``), with the paths named in
  ``coordinator.yaml`` when it overrides the defaults. It opens the database read-only and never
  imports the ``coordinator`` package (an auditor's install need not contain it): the schema is
  read as data, and a database whose tables do not look like that raises :class:`ConfigError`.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from protocols.errors import ConfigError, VerificationError

__all__ = [
    "SourceBlob",
    "SourceEntry",
    "ServedReference",
    "LedgerSource",
    "RegistrySource",
    "StateDirSource",
    "BlobMissingError",
    "BlobCorruptError",
    "open_source",
]

logger = logging.getLogger(__name__)


class BlobMissingError(VerificationError):
    """A blob an entry names is not in the source."""

    default_reason_code = "E_BLOB_MISSING"


class BlobCorruptError(VerificationError):
    """A blob's bytes do not hash to the sha256 that names it."""

    default_reason_code = "E_BLOB_MISMATCH"


@dataclass(frozen=True)
class SourceBlob:
    role: str
    sha256: str
    size: int


@dataclass(frozen=True)
class SourceEntry:
    """One log entry as the source holds it. ``kind`` and ``blobs`` are hints from the source
    (the engine derives the truth from the signed payload); ``created_at`` (UNIX seconds) is the
    coordinator's clock, only known offline."""

    index: int
    envelope: bytes
    kind: str
    blobs: tuple[SourceBlob, ...] = ()
    created_at: float | None = None


@dataclass(frozen=True)
class ServedReference:
    """A reference version exactly as the coordinator serves it."""

    tree_size: int
    claimed_digest: str
    manifest_bytes: bytes
    safetensors_bytes: bytes


class LedgerSource(Protocol):
    description: str
    online: bool

    def latest_checkpoint(self) -> bytes: ...

    def checkpoint_note(self, size: int) -> bytes | None: ...

    def iter_entries(self, end: int) -> Iterator[SourceEntry]: ...

    def blob(self, sha256: str) -> bytes: ...

    def served_reference(self, size: int) -> ServedReference | None: ...

    def cosigned_note(self, size: int) -> bytes | None: ...

    def close(self) -> None: ...


def _sha256_name(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- online ------------------------------------------------------------------------------------


class RegistrySource:
    """The ledger as a running coordinator serves it."""

    online = True

    def __init__(
        self, address: str, *, trust: Any = None, insecure: bool = False, timeout: float = 60.0
    ) -> None:
        from protocols.registry_client import RegistryClient

        self.description = f"coordinator {address}"
        self.client = RegistryClient(address, trust=trust, insecure=insecure, timeout=timeout)

    def latest_checkpoint(self) -> bytes:
        return self.client.get_checkpoint().signed_note

    def checkpoint_note(self, size: int) -> bytes | None:
        from protocols.registry_client import RegistryNotFoundError, RegistryRequestError

        try:
            got, note = self.client.get_cosignatures(size)
        except (RegistryNotFoundError, RegistryRequestError):
            return None
        return note if got == size else None

    def iter_entries(self, end: int) -> Iterator[SourceEntry]:
        if end == 0:
            return
        for e in self.client.iter_entries(0, end):
            yield SourceEntry(
                index=e.index,
                envelope=e.envelope,
                kind=e.kind,
                blobs=tuple(SourceBlob(b.role, b.sha256, b.size) for b in e.blobs),
            )

    def blob(self, sha256: str) -> bytes:
        from protocols.registry_client import BlobIntegrityError, RegistryNotFoundError

        try:
            return self.client.get_blob(sha256)
        except RegistryNotFoundError as exc:
            raise BlobMissingError(
                f"the coordinator has no blob {sha256}; it must serve every blob its ledger names"
            ) from exc
        except BlobIntegrityError as exc:
            raise BlobCorruptError(str(exc)) from exc

    def served_reference(self, size: int) -> ServedReference | None:
        from protocols.registry_client import RegistryNotFoundError

        try:
            ref = self.client.get_reference(size)
        except RegistryNotFoundError:
            return None
        return ServedReference(
            ref.header.tree_size, ref.header.digest, ref.manifest_bytes, ref.safetensors_bytes
        )

    def cosigned_note(self, size: int) -> bytes | None:
        return self.checkpoint_note(size)

    def add_cosignature(self, note: bytes) -> int:
        return self.client.add_cosignature(note)

    def close(self) -> None:
        self.client.close()


# --- offline -----------------------------------------------------------------------------------

_CONFIG_FILE = "coordinator.yaml"
_REQUIRED_TABLES = {"entries", "entry_blobs", "checkpoints"}


def _state_paths(state_dir: Path) -> dict[str, Path]:
    """The coordinator's file layout (``paths:`` of its ``coordinator.yaml``, else the
    defaults), read with the same reader and validator the coordinator uses."""
    from protocols.settings import StatePaths, build, read_yaml_mapping

    cfg_file = state_dir / _CONFIG_FILE
    paths = StatePaths()
    if cfg_file.is_file():
        try:
            doc = read_yaml_mapping(cfg_file)
            if doc.get("paths") is not None:
                paths = build(StatePaths, doc["paths"], source=str(cfg_file), prefix="paths.")
        except ConfigError as exc:
            raise ConfigError(
                f"{exc}; pass an intact copy of the coordinator's state directory"
            ) from exc
    return paths.resolve(state_dir)


class StateDirSource:
    """The ledger in a (copy of a) coordinator state directory, read directly and read-only."""

    online = False

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.description = f"state directory {self.state_dir}"
        if not self.state_dir.is_dir():
            raise ConfigError(
                f"--ledger {self.state_dir}: not a directory; pass a copy of the coordinator's "
                "state directory (the one `scarches-fl coordinator init --dir` made)"
            )
        self.paths = _state_paths(self.state_dir)
        db = self.paths["database"]
        if not db.is_file():
            raise ConfigError(
                f"{db} not found: {self.state_dir} is not a coordinator state directory (or its "
                "paths.database in coordinator.yaml points elsewhere)"
            )
        try:
            # read-only: an audit never changes the coordinator's state. Not immutable=1: a live
            # directory may still have a WAL file whose committed pages we must see.
            self._conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
            tables = {
                r[0]
                for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open {db} read-only as SQLite: {exc}") from exc
        missing = _REQUIRED_TABLES - tables
        if missing:
            raise ConfigError(
                f"{db} lacks the tables {sorted(missing)}: not a scarches-fl coordinator "
                "database (or from an incompatible version)"
            )
        self._has_cosignatures = "cosignatures" in tables

    def latest_checkpoint(self) -> bytes:
        row = self._conn.execute(
            "SELECT note FROM checkpoints ORDER BY size DESC LIMIT 1"
        ).fetchone()
        if row is None:
            raise ConfigError(
                f"{self.paths['database']} holds no checkpoint: the coordinator was never "
                "initialised (run `scarches-fl coordinator init`)"
            )
        return bytes(row[0])

    def checkpoint_note(self, size: int) -> bytes | None:
        row = self._conn.execute("SELECT note FROM checkpoints WHERE size = ?", (size,)).fetchone()
        return bytes(row[0]) if row else None

    def iter_entries(self, end: int) -> Iterator[SourceEntry]:
        blob_rows: dict[int, list[SourceBlob]] = {}
        for idx, role, sha, size in self._conn.execute(
            "SELECT idx, role, sha256, size FROM entry_blobs WHERE idx < ? ORDER BY idx, role",
            (end,),
        ):
            blob_rows.setdefault(int(idx), []).append(SourceBlob(role, sha, int(size)))
        cur = self._conn.execute(
            "SELECT idx, envelope, kind, created_at FROM entries WHERE idx < ? ORDER BY idx",
            (end,),
        )
        for idx, env, kind, created in cur:
            yield SourceEntry(
                index=int(idx),
                envelope=bytes(env),
                kind=str(kind),
                blobs=tuple(blob_rows.get(int(idx), ())),
                created_at=float(created) if created is not None else None,
            )

    def _blob_path(self, sha256: str) -> Path:
        hexpart = sha256[7:] if sha256.startswith("sha256:") else ""
        if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
            raise BlobMissingError(f"{sha256!r} is not a blob name (sha256:<64 hex>)")
        return self.paths["blobs"] / hexpart[:2] / hexpart

    def blob(self, sha256: str) -> bytes:
        path = self._blob_path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise BlobMissingError(
                f"blob {sha256} is not in {self.paths['blobs']}; copy the whole state directory "
                "(blobs included)"
            ) from exc
        if _sha256_name(data) != sha256:
            raise BlobCorruptError(
                f"blob {sha256} in {self.paths['blobs']} hashes to {_sha256_name(data)}: its "
                "bytes were changed after they were logged"
            )
        return data

    def served_reference(self, size: int) -> ServedReference | None:
        """The reference the coordinator would serve for ``size``: the files it materialised in
        its cache (``cache/v<i>/manifest.json`` + ``model.safetensors``, ``i`` the last entry
        below ``size`` that changes the model). None when the copy holds no such files."""
        row = self._conn.execute(
            "SELECT MAX(idx) FROM entries WHERE idx < ? AND kind IN "
            "('genesis', 'site_update', 'federated_round', 'federated_labels')",
            (size,),
        ).fetchone()
        if row is None or row[0] is None:
            return None
        d = self.paths["cache"] / f"v{int(row[0])}"
        m, s = d / "manifest.json", d / "model.safetensors"
        if not (m.is_file() and s.is_file()):
            return None
        claimed = ""
        meta = d / "digest"
        if meta.is_file():
            parts = meta.read_text(encoding="utf-8", errors="replace").split()
            claimed = parts[0] if parts else ""
        return ServedReference(size, claimed, m.read_bytes(), s.read_bytes())

    def cosigned_note(self, size: int) -> bytes | None:
        note = self.checkpoint_note(size)
        if note is None or not self._has_cosignatures:
            return note
        lines = [
            r[0]
            for r in self._conn.execute(
                "SELECT line FROM cosignatures WHERE size = ? ORDER BY created_at, line", (size,)
            )
        ]
        if not lines:
            return note
        from protocols.checkpoint import append_signatures

        return append_signatures(note, lines)

    def close(self) -> None:
        self._conn.close()


def open_source(
    *,
    coordinator: str | None = None,
    ledger: str | Path | None = None,
    trust: Any = None,
    insecure: bool = False,
) -> LedgerSource:
    """The source named by the ``--coordinator`` / ``--ledger`` flags (exactly one)."""
    if (coordinator is None) == (ledger is None):
        raise ConfigError("give exactly one of --coordinator HOST:PORT and --ledger STATE_DIR")
    if coordinator is not None:
        return RegistrySource(coordinator, trust=trust, insecure=insecure)
    return StateDirSource(ledger)  # type: ignore[arg-type]
