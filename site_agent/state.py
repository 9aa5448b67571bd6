"""The site's state directory: what a site remembers between runs.

Layout (all files written atomically: temporary file, fsync, rename, fsync of the directory)::

    STATE/
      trust.json            the pinned trust policy (copied on first use; never replaced silently)
      checkpoint.note       the last checkpoint this site verified (C2SP signed note, as received)
      checkpoint.json       its size and root hash, and when it was verified
      sequence              the last sequence number allocated (allocated before signing)
      contributions.jsonl   one line per accepted update: sequence, leaf index, tree size, ...
      outbox/               every update built here, sent or waiting (see site_agent.outbox)
      lock                  held while an agent runs, so two runs never share a sequence number

Rules: a sequence number, once allocated, is never handed out again (the counter is fsynced to
disk before the update is signed, so a crash can skip a number but never repeat one); the last
verified checkpoint only moves forward, and only after a consistency proof was checked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from protocols.bundle import atomic_write
from protocols.errors import ConfigError, ScarchesFLError

__all__ = [
    "SiteState",
    "VerifiedCheckpoint",
    "StateError",
    "StateLockedError",
    "atomic_write",
]

logger = logging.getLogger(__name__)


class StateError(ScarchesFLError):
    """The state directory is unusable or inconsistent; the message says how to fix it."""

    exit_code = 2


class StateLockedError(StateError):
    """Another site agent run holds the state directory."""




@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint whose signature (and consistency with the previous one) this site checked."""

    origin: str
    size: int
    root_hex: str
    note: bytes
    verified_at: float

    @property
    def root(self) -> bytes:
        return bytes.fromhex(self.root_hex)

    def describe(self) -> str:
        return f"tree size {self.size}, root {self.root_hex[:16]}..."


class SiteState:
    """A site's state directory (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._lock_fd: int | None = None

    # -- layout --

    @property
    def trust_path(self) -> Path:
        return self.path / "trust.json"

    @property
    def outbox_path(self) -> Path:
        return self.path / "outbox"

    def ensure(self) -> SiteState:
        """Create the directory (mode 0700) if needed."""
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.outbox_path.mkdir(exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateError(
                f"cannot create the state directory {self.path}: {exc.strerror or exc}; pass a "
                "writable --state DIR"
            ) from exc
        return self

    def exists(self) -> bool:
        return self.path.is_dir()

    def require_existing(self) -> SiteState:
        if not self.exists():
            raise StateError(
                f"no state directory at {self.path}; run `scarches-fl site map --state "
                f"{self.path} ...` first (it creates it), or pass the right --state"
            )
        return self

    # -- lock --

    @contextlib.contextmanager
    def locked(self) -> Iterator[SiteState]:
        """Hold an exclusive lock on the state directory for the duration of a run."""
        import fcntl

        self.ensure()
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise StateLockedError(
                    f"another site agent is using {self.path} (it holds {self.path / 'lock'}); "
                    "wait for it to finish"
                ) from exc
            self._lock_fd = fd
            yield self
        finally:
            self._lock_fd = None
            os.close(fd)

    # -- trust --

    def pin_trust(self, trust_file: str | Path) -> bytes:
        """The pinned trust.json bytes. On first use, copy ``trust_file`` into the state
        directory; afterwards ``trust_file`` must be byte-identical to the pinned copy."""
        trust_file = Path(trust_file).expanduser()
        try:
            given = trust_file.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the trust file {trust_file}: {exc.strerror or exc}; pass the "
                "trust.json the operator handed out with --trust"
            ) from exc
        if self.trust_path.exists():
            pinned = self.trust_path.read_bytes()
            if pinned != given:
                raise StateError(
                    f"{trust_file} differs from the trust.json pinned in {self.trust_path}. A "
                    "site never replaces its pinned trust silently. If the operator really "
                    "handed out a new trust.json (check with them out of band), move the old "
                    f"state aside or delete {self.trust_path} to pin the new one"
                )
            return pinned
        self.ensure()
        atomic_write(self.trust_path, given, mode=0o644)
        logger.info("pinned %s in %s", trust_file, self.trust_path)
        return given

    def pinned_trust(self) -> bytes | None:
        return self.trust_path.read_bytes() if self.trust_path.exists() else None

    # -- checkpoint --

    def last_checkpoint(self) -> VerifiedCheckpoint | None:
        meta = self.path / "checkpoint.json"
        note = self.path / "checkpoint.note"
        if not meta.exists():
            return None
        try:
            doc = json.loads(meta.read_text())
            cp = VerifiedCheckpoint(
                origin=str(doc["origin"]),
                size=int(doc["size"]),
                root_hex=str(doc["root_hex"]),
                note=note.read_bytes(),
                verified_at=float(doc["verified_at"]),
            )
            bytes.fromhex(cp.root_hex)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(
                f"{meta} is unreadable ({exc}); the last verified checkpoint is lost. Restore it "
                "from a backup; deleting it makes the next run trust the log's current state "
                "on first use again"
            ) from exc
        return cp

    def store_checkpoint(self, *, origin: str, size: int, root: bytes, note: bytes) -> VerifiedCheckpoint:
        """Remember a checkpoint the caller has verified (signature and consistency)."""
        prev = self.last_checkpoint()
        if prev is not None and size < prev.size:  # defence in depth: callers checked already
            raise StateError(
                f"refusing to move the last verified checkpoint back from {prev.size} to {size}"
            )
        cp = VerifiedCheckpoint(
            origin=origin, size=int(size), root_hex=bytes(root).hex(), note=bytes(note),
            verified_at=time.time(),
        )
        atomic_write(self.path / "checkpoint.note", cp.note)
        doc = {k: v for k, v in asdict(cp).items() if k != "note"}
        atomic_write(self.path / "checkpoint.json", json.dumps(doc, indent=2).encode() + b"\n")
        return cp

    # -- sequence numbers --

    def last_sequence(self) -> int:
        p = self.path / "sequence"
        if not p.exists():
            return 0
        text = p.read_text().strip()
        if not text.isdigit():
            raise StateError(
                f"{p} holds {text!r}, not a number; restore it from a backup (a sequence number "
                "must never be reused) or set it above the last one the coordinator accepted "
                "(`scarches-fl site status` shows it)"
            )
        return int(text)

    def allocate_sequence(self, *, at_least: int = 0) -> int:
        """Allocate the next sequence number durably (fsynced before it is returned).
        ``at_least``: the coordinator's last accepted number, so a restored state never reuses
        one."""
        if self._lock_fd is None:
            raise StateError("allocate_sequence needs the state lock (use SiteState.locked())")
        seq = max(self.last_sequence(), int(at_least)) + 1
        atomic_write(self.path / "sequence", f"{seq}\n".encode())
        return seq

    # -- contributions --

    def record_contribution(self, record: dict[str, Any]) -> None:
        path = self.path / "contributions.jsonl"
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def contributions(self) -> list[dict[str, Any]]:
        path = self.path / "contributions.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    logger.warning("skipping an unreadable line in %s", path)
        return out

    # -- what the last run used (so `site retry` and `site status` need only --state) --

    def remember(self, **settings: Any) -> None:
        atomic_write(self.path / "agent.json",
                     json.dumps(settings, indent=2, sort_keys=True, default=str).encode())

    def remembered(self) -> dict[str, Any]:
        p = self.path / "agent.json"
        if not p.exists():
            return {}
        try:
            doc = json.loads(p.read_text())
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}
