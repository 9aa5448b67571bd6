"""Reference versions on the coordinator: version N is the model after replaying entries
[0, N), built from the nearest cached ancestor with :func:`protocols.diff.apply_condition_diff`
(numpy only) and cached on disk and in memory.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.storage import BlobStore, LedgerStore, StoredEntry, sha256_name
from protocols.bundle import atomic_write
from protocols.errors import VerificationError
from protocols.proto.serde import BlobRef

if TYPE_CHECKING:
    from protocols.bundle import ReferenceBundle

__all__ = ["MaterializedReference", "ReferenceCache"]


@dataclass(frozen=True)
class MaterializedReference:
    """Reference version at ``tree_size``: files in the cache directory."""

    tree_size: int
    model_index: int  # index of the last model-changing entry below tree_size
    digest: str
    manifest_path: Path
    safetensors_path: Path
    manifest_sha256: str
    safetensors_sha256: str


class ReferenceCache:
    """Reference version N = the model after replaying entries [0, N). Built on demand from the
    nearest cached ancestor (genesis bundle, then ``apply_condition_diff`` per site update),
    cached on disk under ``cache/v<index>/`` (written atomically, at most ``max_on_disk``
    versions, least recently used pruned first, never the current one) and in memory (bundles,
    least recently used dropped first once they hold more than ``max_memory_bytes``).

    The current version and old versions are built under two different locks: asking for any
    number of old versions (each a rebuild of up to a second) never makes a fetch of the current
    version wait for them. A build of the same version by two threads at once writes the same
    bytes atomically; the second rename wins, harmlessly."""

    def __init__(
        self,
        store: LedgerStore,
        blobs: BlobStore,
        root: Path,
        *,
        durable: bool = True,
        max_memory_bytes: int = 256 * 1024 * 1024,
        max_on_disk: int = 16,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.root = Path(root)
        self.durable = durable
        self.max_memory_bytes = int(max_memory_bytes)
        self.max_on_disk = max_on_disk
        self._current_lock = threading.Lock()  # builds of the current version
        self._old_lock = threading.Lock()  # builds of every other version
        self._mem_lock = threading.Lock()  # the in-memory LRU and its byte count (never held long)
        self._bundles: OrderedDict[int, tuple[ReferenceBundle, int]] = (
            OrderedDict()
        )  # index -> (bundle, bytes)
        self._memory_bytes = 0
        self._current_index = -1

    @property
    def memory_bytes(self) -> int:
        """Bytes of tensors held by the in-memory LRU (at most ``max_memory_bytes``, or one
        bundle when a single one is larger)."""
        with self._mem_lock:
            return self._memory_bytes

    def _model_index(self, tree_size: int) -> int:
        """Index of the last entry below ``tree_size`` that changes the model."""
        row = (
            self.store._conn()
            .execute(
                "SELECT MAX(idx) FROM entries WHERE idx < ? AND kind IN "
                "('genesis', 'site_update', 'federated_round', 'federated_labels')",
                (tree_size,),
            )
            .fetchone()
        )
        if row is None or row[0] is None:
            raise VerificationError(
                f"no model below tree size {tree_size}", reason_code="E_LEDGER_ORDER"
            )
        return int(row[0])

    def _dir(self, model_index: int) -> Path:
        return self.root / f"v{model_index}"

    def _load_cached(self, model_index: int) -> MaterializedReference | None:
        d = self._dir(model_index)
        m, s, meta = d / "manifest.json", d / "model.safetensors", d / "digest"
        if not (m.is_file() and s.is_file() and meta.is_file()):
            return None
        parts = meta.read_text().split()
        if len(parts) != 3:
            return None
        return MaterializedReference(0, model_index, parts[0], m, s, parts[1], parts[2])

    def _remembered(self, model_index: int) -> ReferenceBundle | None:
        with self._mem_lock:
            hit = self._bundles.get(model_index)
            if hit is None:
                return None
            self._bundles.move_to_end(model_index)
            return hit[0]

    def _remember(self, model_index: int, bundle: ReferenceBundle) -> ReferenceBundle:
        size = sum(int(a.nbytes) for a in bundle.tensors.values())
        with self._mem_lock:
            old = self._bundles.pop(model_index, None)
            if old is not None:
                self._memory_bytes -= old[1]
            self._bundles[model_index] = (bundle, size)
            self._memory_bytes += size
            while self._memory_bytes > self.max_memory_bytes and len(self._bundles) > 1:
                _idx, (_b, n) = self._bundles.popitem(last=False)
                self._memory_bytes -= n
        return bundle

    def _bundle_at(self, model_index: int) -> ReferenceBundle:
        """The ReferenceBundle after entry ``model_index`` (a model-changing entry): from the
        nearest cached version or full bundle (genesis, federated round, a round's aggregate
        with the label knowledge of a ``federated_labels`` entry) below it, plus every
        site diff since, concatenated and applied in one ``apply_condition_diff`` (the apply
        rule is concatenation, so one application of the joined diffs equals applying them one
        by one, at the cost of one digest instead of one per update)."""
        import numpy as np

        from protocols.bundle import bundle_from_bytes, read_bundle
        from protocols.diff import apply_condition_diff, diff_from_bytes

        hit = self._remembered(model_index)
        if hit is not None:
            return hit
        chain: list[tuple[StoredEntry, BlobRef]] = []
        idx = model_index
        while True:
            base = self._remembered(idx)
            if base is not None:
                break
            cached = self._load_cached(idx)
            if cached is not None:
                base = read_bundle(cached.manifest_path.parent)
                break
            entry = self.store.entry(idx)
            if entry is None:
                raise VerificationError(f"entry {idx} missing", reason_code="E_LEDGER_ORDER")
            roles = {b.role: b for b in entry.blobs}
            if "manifest" in roles and "safetensors" in roles:
                base = bundle_from_bytes(
                    self.blobs.read(roles["manifest"].sha256),
                    self.blobs.read(roles["safetensors"].sha256),
                )
                break
            if "labels" in roles and "label_tensors" in roles:  # federated_labels (ADR 0049)
                from protocols.ledger import apply_federated_labels

                base = apply_federated_labels(
                    self._bundle_at(self._model_index(idx)),
                    self.blobs.read(roles["labels"].sha256),
                    self.blobs.read(roles["label_tensors"].sha256),
                )
                break
            if "diff" not in roles:
                raise VerificationError(
                    f"entry {idx} ({entry.kind}) names no model blobs",
                    reason_code="E_BLOB_MISSING",
                )
            chain.append((entry, roles["diff"]))
            idx = self._model_index(idx)
        if not chain:
            return self._remember(model_index, base)
        chain.reverse()
        names: list[str] = []
        parts: dict[str, list[Any]] = {}
        for entry, ref in chain:
            data = self.blobs.read(ref.sha256)
            diff = diff_from_bytes(data, max_bytes=len(data))
            names += _new_conditions(entry.envelope)
            for name, arr in diff.items():
                parts.setdefault(name, []).append(arr)
        specs = base.manifest["tensors"]
        merged = {
            name: np.concatenate(arrs, axis=int(specs[name]["axis"])) if name in specs else arrs[0]
            for name, arrs in parts.items()
        }
        bundle = apply_condition_diff(base, merged, names)
        return self._remember(model_index, bundle)

    def _build(self, model_index: int) -> MaterializedReference:
        """Write version ``model_index`` into the disk cache (atomically) and return it."""
        from protocols.bundle import bundle_to_bytes

        bundle = self._bundle_at(model_index)
        manifest_bytes, model_bytes = bundle_to_bytes(bundle)
        d = self._dir(model_index)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / "model.safetensors", model_bytes, durable=self.durable)
        atomic_write(d / "manifest.json", manifest_bytes, durable=self.durable)
        atomic_write(
            d / "digest",
            f"{bundle.digest} {sha256_name(manifest_bytes)} {sha256_name(model_bytes)}\n".encode(),
            durable=self.durable,
        )
        cached = self._load_cached(model_index)
        assert cached is not None
        self._prune(keep=model_index)
        return cached

    def materialize(self, tree_size: int) -> MaterializedReference:
        model_index = self._model_index(tree_size)
        current = self._model_index(self.store.size)
        self._current_index = max(self._current_index, current)
        cached = self._load_cached(model_index)
        if cached is None:
            lock = self._current_lock if model_index >= current else self._old_lock
            with lock:
                cached = self._load_cached(model_index)  # built while we waited?
                if cached is None:
                    cached = self._build(model_index)
        else:
            with contextlib.suppress(OSError):
                os.utime(self._dir(model_index) / "digest")  # most recently used
        return MaterializedReference(
            tree_size,
            model_index,
            cached.digest,
            cached.manifest_path,
            cached.safetensors_path,
            cached.manifest_sha256,
            cached.safetensors_sha256,
        )

    def _prune(self, *, keep: int) -> None:
        """Keep at most ``max_on_disk`` versions on disk (least recently used go first, never
        ``keep`` nor the current version), so that asking for every old version cannot fill the
        disk."""
        import shutil

        dirs = []
        for d in self.root.glob("v*"):
            try:
                dirs.append(((d / "digest").stat().st_mtime, d))
            except OSError:
                dirs.append((0.0, d))
        dirs.sort()
        excess = len(dirs) - self.max_on_disk
        protected = {f"v{keep}", f"v{self._current_index}"}
        for _mtime, d in dirs:
            if excess <= 0:
                break
            if d.name in protected:
                continue
            shutil.rmtree(d, ignore_errors=True)
            excess -= 1

    def clear(self) -> None:
        import shutil

        with self._current_lock, self._old_lock, self._mem_lock:
            self._bundles.clear()
            self._memory_bytes = 0
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.root)


def _new_conditions(envelope: bytes) -> list[str]:
    from protocols.ledger import entry_payload

    _kind, obj = entry_payload(envelope)
    return list(obj["new_conditions"])
