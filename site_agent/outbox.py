"""The outbox: every update this site built, with exactly the bytes that were (or will be) sent.

One directory per update under ``STATE/outbox/``::

    update-000007/            (a signed update; 7 is its sequence number)
      payload.json            the payload that was signed (canonical JSON)
      diff.safetensors        the diff: byte for byte what was sent
      envelope.json           the DSSE envelope: byte for byte what was sent
      summary.txt             the privacy guard's readable summary (tensors, shapes, bytes, hashes)
      summary.json            the same, for programs
      status.json             pending | delivered | rejected, and every delivery attempt
      receipt.json            after delivery: log index, tree size, inclusion proof (hex)
      receipt.note            the checkpoint (signed note) the receipt was verified against
    dry-run-20261123T221500Z/ (``--dry-run``: payload and diff as they would be sent, unsigned)

A submission sends ``envelope.json`` and ``diff.safetensors`` and nothing else, so these two files
are the complete record of what left the site.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from site_agent.state import StateError, atomic_write

__all__ = ["Outbox", "OutboxEntry", "OutboxError", "PENDING", "DELIVERED", "REJECTED", "DRAFT"]

logger = logging.getLogger(__name__)

DRAFT = "dry-run"
PENDING = "pending"
DELIVERED = "delivered"
REJECTED = "rejected"


class OutboxError(StateError):
    """An outbox entry is missing or unreadable."""


@dataclass(frozen=True)
class OutboxEntry:
    """One update in the outbox (a directory)."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    def _read(self, name: str) -> bytes:
        try:
            return (self.path / name).read_bytes()
        except OSError as exc:
            raise OutboxError(
                f"outbox entry {self.id} has no readable {name} ({exc.strerror or exc}); the "
                "entry is incomplete"
            ) from exc

    @property
    def payload_bytes(self) -> bytes:
        return self._read("payload.json")

    @property
    def diff_bytes(self) -> bytes:
        return self._read("diff.safetensors")

    @property
    def envelope_bytes(self) -> bytes | None:
        p = self.path / "envelope.json"
        return p.read_bytes() if p.exists() else None

    @property
    def summary_text(self) -> str:
        return self._read("summary.txt").decode("utf-8")

    def summary(self) -> dict[str, Any]:
        return json.loads(self._read("summary.json"))

    def status(self) -> dict[str, Any]:
        p = self.path / "status.json"
        if not p.exists():
            return {"state": DRAFT if self.id.startswith("dry-run") else PENDING, "attempts": []}
        return json.loads(p.read_text())

    @property
    def state(self) -> str:
        return str(self.status().get("state"))

    @property
    def sequence(self) -> int | None:
        seq = self.status().get("sequence")
        return int(seq) if seq is not None else None

    def receipt(self) -> dict[str, Any] | None:
        p = self.path / "receipt.json"
        return json.loads(p.read_text()) if p.exists() else None

    # -- writers --

    def _write_status(self, doc: dict[str, Any]) -> None:
        atomic_write(self.path / "status.json", json.dumps(doc, indent=2, sort_keys=True).encode())

    def write_envelope(self, envelope: bytes) -> None:
        if (self.path / "envelope.json").exists():
            raise OutboxError(f"outbox entry {self.id} is already signed; never sign twice")
        atomic_write(self.path / "envelope.json", envelope)

    def record_attempt(self, outcome: str, detail: str = "") -> None:
        doc = self.status()
        doc.setdefault("attempts", []).append(
            {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "outcome": outcome,
             "detail": detail[:2000]}
        )
        self._write_status(doc)

    def set_state(self, state: str, **extra: Any) -> None:
        doc = self.status()
        doc["state"] = state
        doc.update(extra)
        self._write_status(doc)

    def store_receipt(self, receipt: dict[str, Any], note: bytes) -> None:
        atomic_write(self.path / "receipt.note", note)
        atomic_write(
            self.path / "receipt.json", json.dumps(receipt, indent=2, sort_keys=True).encode()
        )

    def describe(self) -> str:
        st = self.status()
        summ = self.summary() if (self.path / "summary.json").exists() else {}
        conds = ", ".join(summ.get("new_conditions", []))
        if summ.get("kind") == "label_contribution":
            conds = "label prototypes: " + ", ".join(
                f"{p.get('name')} ({p.get('count')})" for p in summ.get("prototypes", [])
            )
        size = sum(
            (self.path / n).stat().st_size
            for n in ("envelope.json", "diff.safetensors")
            if (self.path / n).exists()
        )
        extra = ""
        rec = self.receipt()
        if rec:
            extra = f"  log index {rec.get('leaf_index')} in tree {rec.get('tree_size')}"
        return f"{self.id:<28} {st.get('state', '?'):<10} {size:>9,} B  {conds}{extra}"


class Outbox:
    """The outbox directory of a site's state."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _new_dir(self, name: str) -> OutboxEntry:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = self.path / name
        if final.exists():
            raise OutboxError(
                f"outbox entry {name} exists already; a sequence number is never reused. The "
                "state directory's 'sequence' file is behind its outbox: set it to the highest "
                "update-NNNNNN in the outbox"
            )
        final.mkdir(mode=0o700)
        return OutboxEntry(final)

    def create(
        self, *, sequence: int | None, payload_bytes: bytes, diff_bytes: bytes,
        summary: dict[str, Any], summary_text: str,
    ) -> OutboxEntry:
        """A new entry: ``sequence=None`` for a dry run (unsigned draft)."""
        if sequence is None:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            name = f"dry-run-{stamp}"
            n = 1
            while (self.path / name).exists():
                n += 1
                name = f"dry-run-{stamp}-{n}"
        else:
            name = f"update-{int(sequence):06d}"
        entry = self._new_dir(name)
        atomic_write(entry.path / "diff.safetensors", diff_bytes)
        atomic_write(entry.path / "payload.json", payload_bytes)
        atomic_write(entry.path / "summary.json", json.dumps(summary, indent=2).encode())
        atomic_write(entry.path / "summary.txt", summary_text.encode("utf-8"))
        entry._write_status(
            {"state": DRAFT if sequence is None else PENDING, "sequence": sequence,
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "attempts": []}
        )
        return entry

    def entries(self) -> list[OutboxEntry]:
        if not self.path.is_dir():
            return []
        return [OutboxEntry(p) for p in sorted(self.path.iterdir()) if p.is_dir()]

    def __iter__(self) -> Iterator[OutboxEntry]:
        return iter(self.entries())

    def get(self, entry_id: str) -> OutboxEntry:
        cand = [entry_id]
        if entry_id.isdigit():
            cand.append(f"update-{int(entry_id):06d}")
        for c in cand:
            p = self.path / c
            if "/" not in c and p.is_dir():
                return OutboxEntry(p)
        known = ", ".join(e.id for e in self.entries()) or "(empty)"
        raise OutboxError(f"no outbox entry {entry_id!r}; the outbox holds: {known}")

    def pending(self) -> list[OutboxEntry]:
        return [e for e in self.entries() if e.state == PENDING and e.envelope_bytes is not None]
