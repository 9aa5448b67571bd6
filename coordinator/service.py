"""The coordinator's registry: the accept pipeline, receipts, proofs and reference versions.

Accept pipeline (DESIGN.md "Coordinator accept"), in this order:

1. size caps before parsing (``limits.max_envelope_bytes``, ``limits.max_diff_bytes``):
   ``E_OVERSIZE``;
2. idempotency: an envelope already in the log (same leaf hash) is answered with its original
   receipt (``duplicate = true``), never appended twice;
3. authentication (:func:`protocols.update.authenticate_update`: strict parse, payload type,
   signature from an enrolled, unrevoked key, payload names its signer): bounded, linear work on
   the request thread that touches no per-site state; its refusals (``E_SIG_INVALID``,
   ``E_KEY_UNKNOWN``, ...) charge nobody and are logged with the *claimed* site id only;
4. rate limit of the authenticated site: a site whose token bucket is empty is answered
   ``E_RATE_LIMITED`` (a token is taken only here, so a forger cannot drain another site's
   budget, buckets exist only for authenticated sites, and a bucket never goes into debt);
5. on the writer thread, the pure validation of :mod:`protocols` (sequence, base checkpoint,
   namespace, diff size and sha256 against the signed ones, tensor names/dtypes/shapes,
   finiteness, norms) against the :class:`LedgerState` replayed from the log: its stable reason
   codes are passed through unchanged. It reuses step 3's parse and signature check (the
   ``AuthenticatedUpdate``) while the policy in force still holds that key as the site's active
   key, and authenticates again otherwise (ADR 0027);
6. the diff bytes, the entry and the new signed checkpoint are committed in one SQLite
   transaction (the diff's file in ``blobs/`` is a copy made after the commit); only then is
   the site answered with the receipt.

Appends are serialized on ONE writer thread that takes submissions in arrival order (group
commit: the submissions waiting when the writer is free are validated one after the other and
committed together), so two sites submitting on the same base are both accepted, in a
deterministic order, and every answer still follows a durable commit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator import ledger
from coordinator._ratelimit import TokenBucketLimiter
from coordinator.checkpoints import cosignature_lines_for, load_log_signer
from coordinator.config import CoordinatorConfig
from coordinator.references import ReferenceCache
from coordinator.server import NotFoundError, RequestError
from coordinator.storage import BlobStore, LedgerStore, StoredEntry, sha256_name
from protocols.checkpoint import append_signatures
from protocols.errors import REASON_CODES, ScarchesFLError, VerificationError
from protocols.merkle import leaf_hash
from protocols.proto.serde import (
    BlobRef,
    CheckpointInfo,
    ConsistencyProof,
    EntriesPage,
    HealthInfo,
    InclusionProof,
    LedgerEntry,
    Receipt,
    ReferenceHeader,
    Rejection,
    SiteInfo,
    SubmitResult,
)

__all__ = ["Registry", "RATE_LIMITED", "CoordinatorError"]

logger = logging.getLogger(__name__)
accept_log = logging.getLogger("coordinator.accept")

#: Reason code of a submission refused by the per-site rate limit (retry after retry_after_s).
RATE_LIMITED = "E_RATE_LIMITED"
_VERSION = "1"


class CoordinatorError(ScarchesFLError):
    """The coordinator cannot do what was asked (state, keys, configuration)."""


@dataclass
class _Pending:
    envelope: bytes
    diff: bytes
    leaf_hash: bytes
    received: float
    future: Future
    site_id: str  # authenticated before queueing
    sequence: int
    #: the request thread's AuthenticatedUpdate: the writer reuses its parse and signature check
    authenticated: Any = None


class Registry:
    """Everything the gRPC service and the CLI do with a state directory.

    ``start_writer()`` starts the single writer thread (``serve`` does; CLI commands that append
    one policy entry use :meth:`append_operator_entry` directly, serialized by SQLite's lock).
    """

    def __init__(self, cfg: CoordinatorConfig) -> None:
        self.cfg = cfg
        self.origin = cfg.origin
        self.blobs = BlobStore(cfg.path(cfg.paths.blobs), durable=cfg.durable)
        self.store = LedgerStore(cfg.path(cfg.paths.database), self.blobs, durable=cfg.durable)
        self.signer = load_log_signer(cfg.path(cfg.paths.log_key), origin=cfg.origin)
        self.limits = ledger.protocol_limits(cfg)
        self._state_lock = threading.RLock()
        self.state = ledger.replay_state(self.store, self.blobs, cfg)
        self.references = ReferenceCache(
            self.store, self.blobs, cfg.path(cfg.paths.cache), durable=cfg.durable
        )
        rl = cfg.rate_limit
        self.limiter = (
            TokenBucketLimiter(burst=rl.burst, per_second=rl.per_second) if rl.enabled else None
        )
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._stopping = threading.Event()
        self._snapshot_size = 0  # the first batch after start writes a fresh one when due
        self._snapshot_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def size(self) -> int:
        return self.store.size

    def start_writer(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._writer_loop, name="ledger-writer", daemon=True
            )
            self._writer.start()

    def close(self) -> None:
        self._stopping.set()
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=30)
            self._writer = None
        self._snapshot(wait=True)
        self.store.close()

    # ------------------------------------------------------------------ snapshots

    def _snapshot(self, *, wait: bool = False) -> None:
        """Write a snapshot of the replayed state when ``max(snapshot_every, half the size of
        the last snapshot)`` entries came since it (with ``wait``, any: at shutdown). A snapshot
        costs the size of the state, so spacing them with the size keeps its cost per entry
        constant. The cut is taken under the state lock (list copies); encoding and writing run
        in a background thread."""
        from protocols.ledger import capture_snapshot

        running = self._snapshot_thread
        if running is not None:
            if not wait and running.is_alive():
                return
            running.join(timeout=120)
            self._snapshot_thread = None
        with self._state_lock:
            size = self.state.size
            every = max(self.cfg.snapshot_every, self._snapshot_size // 2)
            due = size - self._snapshot_size >= (1 if wait else every)
            if size == 0 or not due:
                return
            cut = capture_snapshot(self.state)
        self._snapshot_size = size

        def write() -> None:
            try:
                ledger.write_snapshot(cut, self.cfg)
            except Exception:  # an optimisation: a failed snapshot costs a longer restart only
                logger.exception("could not write the ledger snapshot at size %d", size)

        if wait:
            write()
        else:
            self._snapshot_thread = threading.Thread(
                target=write, name="ledger-snapshot", daemon=True
            )
            self._snapshot_thread.start()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reads

    def _refresh(self) -> None:
        """Pick up entries appended by another process (``coordinator enroll`` while serving).
        Skipped while the writer is busy: it catches up itself, inside its transaction."""
        lock = self.store.write_lock
        if not lock.acquire(blocking=False):
            return
        try:
            new = self.store.sync()
            if new:
                with self._state_lock:
                    for e in new:
                        ledger.apply_entry(self.state, e, self.blobs)
        finally:
            lock.release()

    def checkpoint(self) -> CheckpointInfo:
        self._refresh()
        cp = self.store.latest_checkpoint()
        if cp is None:
            raise NotFoundError("the log is empty; initialise it with `coordinator init`")
        return CheckpointInfo(signed_note=cp.signed_note, size=cp.size, root_hash=cp.root_hash)

    def _resolve(self, size: int) -> int:
        """A requested tree size: 0 means the current one; beyond the log is OUT_OF_RANGE."""
        current = self.store.size
        if not 0 <= size <= current:
            from protocols.merkle import TreeRangeError

            raise TreeRangeError(f"tree size {size} asked, the log has {current} entries")
        return size or current

    def consistency_proof(self, old_size: int, new_size: int) -> ConsistencyProof:
        self._refresh()
        new_size = self._resolve(new_size)
        if old_size < 1 or old_size > new_size:
            raise RequestError(
                f"a consistency proof needs 0 < old_size <= new_size (got {old_size}, {new_size})"
            )
        hashes = self.store.consistency_proof(old_size, new_size)
        return ConsistencyProof(old_size=old_size, new_size=new_size, hashes=tuple(hashes))

    def inclusion_proof(self, leaf: int | bytes, tree_size: int) -> InclusionProof:
        self._refresh()
        tree_size = self._resolve(tree_size)
        if isinstance(leaf, bytes):
            if len(leaf) != 32:
                raise RequestError("leaf_hash must be 32 bytes (SHA-256(0x00 || envelope))")
            found = self.store.index_of_leaf_hash(leaf)
            if found is None:
                raise NotFoundError("no entry with that leaf hash")
            index = found
        else:
            index = int(leaf)
        if not 0 <= index < tree_size:
            raise RequestError(f"leaf index {index} is not inside a tree of size {tree_size}")
        hashes = self.store.inclusion_proof(index, tree_size)
        return InclusionProof(leaf_index=index, tree_size=tree_size, hashes=tuple(hashes))

    def entries_page(self, start: int, end: int) -> EntriesPage:
        self._refresh()
        size = self.store.size
        end = end or size
        if end > size:
            from protocols.merkle import TreeRangeError

            raise TreeRangeError(f"entries up to {end} asked, the log has {size}")
        if start > end:
            raise RequestError(f"start {start} is after end {end}")
        stop = min(end, start + self.cfg.limits.max_entries_per_page)
        entries = tuple(_to_wire_entry(e) for e in self.store.entries(start, stop))
        return EntriesPage(entries=entries, next_start=stop, tree_size=size)

    def blob_chunks(self, sha256: str) -> Iterator[tuple[int, int, bytes]]:
        try:
            exists = self.blobs.exists(sha256)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        if not exists:
            raise NotFoundError(f"no blob {sha256}")
        return self.blobs.iter_chunks(sha256, self.cfg.limits.chunk_bytes)

    def reference_stream(
        self, tree_size: int
    ) -> tuple[ReferenceHeader, Iterator[tuple[str, int, bytes]]]:
        self._refresh()
        size = self._resolve(tree_size)
        if not 1 <= size <= self.store.size:
            from protocols.merkle import TreeRangeError

            raise TreeRangeError(f"reference version {size} asked, the log has {self.store.size}")
        for attempt in range(3):
            ref = self.references.materialize(size)
            try:
                # Open both files now: a cache pruning later cannot pull them from under us.
                handles = [
                    ("manifest", ref.manifest_path.open("rb")),
                    ("safetensors", ref.safetensors_path.open("rb")),
                ]
                break
            except FileNotFoundError:  # pruned between materialize and open: again
                if attempt == 2:
                    raise
        with self._state_lock:
            expected = self.state.digest_at(size)
        if expected is not None and ref.digest != expected:
            for _n, fh in handles:
                fh.close()
            # Never serve a model that is not the replay of the ledger.
            raise CoordinatorError(
                f"reference version {size} materialized to {ref.digest}, the ledger says "
                f"{expected}; delete {self.references.root} and retry"
            )
        header = ReferenceHeader(
            tree_size=size,
            digest=ref.digest,
            manifest_size=os.fstat(handles[0][1].fileno()).st_size,
            safetensors_size=os.fstat(handles[1][1].fileno()).st_size,
            manifest_sha256=ref.manifest_sha256,
            safetensors_sha256=ref.safetensors_sha256,
        )
        chunk = self.cfg.limits.chunk_bytes

        def parts() -> Iterator[tuple[str, int, bytes]]:
            try:
                for name, fh in handles:
                    offset = 0
                    while data := fh.read(chunk):
                        yield name, offset, data
                        offset += len(data)
            finally:
                for _name, fh in handles:
                    fh.close()

        return header, parts()

    def site_info(self, site_id: str) -> SiteInfo:
        self._refresh()
        with self._state_lock:
            info = ledger.site_status(self.state, site_id)
        contributions = self.store.site_contributions().get(site_id, (0, 0))[0]
        return SiteInfo(site_id=site_id, contributions=contributions, **info)

    def cosigned_note(self, tree_size: int) -> tuple[int, bytes]:
        self._refresh()
        size = self._resolve(tree_size)
        cp = self.store.checkpoint(size)
        if cp is None:
            raise NotFoundError(f"no checkpoint of size {size}")
        lines = self.store.cosignature_lines(size)
        return size, append_signatures(cp.signed_note, lines) if lines else cp.signed_note

    def add_cosignature(self, cosigned_note: bytes) -> tuple[bool, int, str]:
        if len(cosigned_note) > self.cfg.limits.max_note_bytes:
            return False, 0, f"note larger than {self.cfg.limits.max_note_bytes} bytes"
        try:
            size, lines = cosignature_lines_for(
                self.store, self.signer, cosigned_note, tuple(self.state.trust.witness_keys)
            )
        except VerificationError as exc:
            return False, 0, str(exc)
        added = self.store.add_cosignatures(size, lines)
        logger.info("cosignature: size=%d lines=%d new=%d", size, len(lines), added)
        return True, added, f"stored {added} new cosignature line(s) for size {size}"

    def health(self) -> HealthInfo:
        return HealthInfo(
            status="serving", tree_size=self.store.size, origin=self.origin, version=_VERSION
        )

    # ------------------------------------------------------------------ receipts

    def receipt(self, index: int, *, duplicate: bool = False) -> Receipt:
        """The receipt of entry ``index``: the checkpoint signed when it was appended and the
        inclusion proof against it (the same bytes every time it is asked)."""
        entry = self.store.entry(index)
        cp = self.store.checkpoint(index + 1)
        if entry is None or cp is None:
            raise NotFoundError(f"no entry {index}")
        return Receipt(
            leaf_index=index,
            leaf_hash=entry.leaf_hash,
            signed_note=cp.signed_note,
            inclusion_proof=tuple(self.store.inclusion_proof(index, cp.size)),
            duplicate=duplicate,
        )

    # ------------------------------------------------------------------ submissions

    def _reject(self, code: str, message: str, *, retry_after: float = 0.0) -> SubmitResult:
        return SubmitResult(
            rejection=Rejection(reason_code=code, message=message, retry_after_s=retry_after)
        )

    def _log(self, event: str, **fields: Any) -> None:
        accept_log.info("%s %s", event, json.dumps(fields, sort_keys=True, default=str))

    def submit(self, envelope: bytes, diff: bytes, *, wait_s: float | None = None) -> SubmitResult:
        """Run the accept pipeline for one submission; blocks until it is durably answered, at
        most ``limits.request_deadline_s`` (or ``wait_s``, the caller's remaining deadline, when
        that is shorter)."""
        t0 = time.perf_counter()
        lim = self.cfg.limits
        if len(envelope) > lim.max_envelope_bytes or len(diff) > lim.max_diff_bytes:
            what = "envelope" if len(envelope) > lim.max_envelope_bytes else "diff"
            cap = lim.max_envelope_bytes if what == "envelope" else lim.max_diff_bytes
            size = len(envelope) if what == "envelope" else len(diff)
            result = self._reject(
                "E_OVERSIZE",
                f"the {what} is {size} bytes, over this coordinator's limit of {cap} bytes "
                f"(limits.max_{what}_bytes); a site update carries only the new condition "
                "columns, so check that the diff holds nothing else",
            )
            claimed = ledger.claimed_update(envelope, self.limits)
            self._log_result(result, None, None, t0, claimed=claimed)
            return result
        lh = leaf_hash(envelope)
        existing = self.store.index_of_leaf_hash(lh)
        if existing is not None:
            result = SubmitResult(receipt=self.receipt(existing, duplicate=True))
            self._log_result(result, *ledger.claimed_update(envelope, self.limits), t0)
            return result
        # One attribute read, without the state lock (the writer holds it through each group
        # commit): the policy it reaches is replaced on change, never mutated. The writer checks
        # again against the policy in force when the update is appended.
        state = self.state
        try:
            auth = ledger.authenticate_submission(state, envelope, self.limits)
        except VerificationError as exc:
            code = exc.reason_code if exc.reason_code in REASON_CODES else "E_ENVELOPE_MALFORMED"
            result = self._reject(code, exc.message)
            claimed = ledger.claimed_update(envelope, self.limits)
            self._log_result(result, None, None, t0, claimed=claimed)
            return result
        if self.limiter is not None:
            wait = self.limiter.take(auth.site_id)
            if wait > 0:
                result = self._reject(
                    RATE_LIMITED,
                    f"site {auth.site_id} is over its submission rate "
                    f"({self.cfg.rate_limit.per_second}/s, burst {self.cfg.rate_limit.burst}); "
                    f"retry in {wait:.2f} s",
                    retry_after=wait,
                )
                self._log_result(result, auth.site_id, auth.payload.sequence, t0)
                return result
        if self._writer is None:
            raise CoordinatorError("the ledger writer is not running (call start_writer())")
        fut: Future = Future()
        self._queue.put(
            _Pending(envelope, diff, lh, t0, fut, auth.site_id, auth.payload.sequence, auth)
        )
        wait = lim.request_deadline_s if wait_s is None else min(wait_s, lim.request_deadline_s)
        try:
            result = fut.result(timeout=max(0.0, wait))
        except TimeoutError:
            # The writer may still commit it: the site resubmits and gets the receipt.
            result = self._reject(
                "E_INTERNAL",
                f"the coordinator did not finish within {wait:.1f} s; resubmit the same "
                "envelope (resubmission is idempotent)",
                retry_after=1.0,
            )
        return result

    def _log_result(
        self,
        result: SubmitResult,
        site: str | None,
        seq: int | None,
        t0: float,
        *,
        claimed: tuple[str | None, int | None] | None = None,
    ) -> None:
        """One log line per decision. ``site`` / ``seq`` only once the signature verified;
        ``claimed`` is what an unauthenticated submission says about itself."""
        latency_ms = round((time.perf_counter() - t0) * 1000.0, 2)
        extra = {} if claimed is None else {"claimed_site": claimed[0], "claimed_seq": claimed[1]}
        if result.receipt is not None:
            self._log(
                "accept",
                site=site,
                seq=seq,
                index=result.receipt.leaf_index,
                duplicate=result.receipt.duplicate,
                latency_ms=latency_ms,
                **extra,
            )
        else:
            assert result.rejection is not None
            self._log(
                "reject",
                site=site,
                seq=seq,
                reason=result.rejection.reason_code,
                latency_ms=latency_ms,
                **extra,
            )

    def _writer_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < 64:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                self._process_batch(batch)
            except Exception as exc:  # a storage failure: nothing of the batch was committed
                logger.exception("ledger write failed; rebuilding state from the database")
                with contextlib.suppress(Exception):
                    self._rebuild_state()
                for p in batch:
                    if not p.future.done():
                        p.future.set_result(
                            self._reject(
                                "E_INTERNAL",
                                f"the coordinator could not store the update ({type(exc).__name__});"
                                " nothing was logged; resubmit later",
                                retry_after=1.0,
                            )
                        )
            self._snapshot()
            if stop:
                return

    def _rebuild_state(self) -> None:
        with self._state_lock:
            self.state = ledger.replay_state(self.store, self.blobs, self.cfg)

    def _process_batch(self, batch: list[_Pending]) -> None:
        outcomes: list[tuple[_Pending, Any, str | None, int | None]] = []
        with self.store.writer() as w, self._state_lock:
            for e in w.caught_up:
                ledger.apply_entry(self.state, e, self.blobs)
            seen: dict[bytes, int] = {}
            for p in batch:
                existing = seen.get(p.leaf_hash)
                if existing is None:
                    existing = self.store.index_of_leaf_hash(p.leaf_hash)
                if existing is not None:
                    outcomes.append((p, ("dup", existing), None, None))
                    continue
                try:
                    update = ledger.check_and_apply_site_update(
                        self.state, p.envelope, p.diff, self.limits, authenticated=p.authenticated
                    )
                except VerificationError as exc:
                    code = getattr(exc, "reason_code", "E_INTERNAL")
                    message = getattr(exc, "message", "") or str(exc)
                    outcomes.append((p, ("reject", code, message), p.site_id, p.sequence))
                    continue
                name = sha256_name(p.diff)
                with_diff = update.kind == "site_update"
                entry, _cp = w.append(
                    p.envelope,
                    kind=update.kind,
                    site_id=update.site_id,
                    sequence=update.sequence,
                    blobs=[BlobRef(role="diff", sha256=name, size=len(p.diff))] if with_diff else [],
                    inline={name: p.diff} if with_diff else {},
                    sign_checkpoint=self.signer.sign_checkpoint,
                )
                seen[p.leaf_hash] = entry.index
                outcomes.append((p, ("accept", entry.index), update.site_id, update.sequence))
        # Committed (the context manager returned): answer every submission of the batch.
        for p, outcome, site, seq in outcomes:
            kind = outcome[0]
            if kind in ("accept", "dup"):
                try:
                    result = SubmitResult(receipt=self.receipt(outcome[1], duplicate=kind == "dup"))
                except Exception:  # committed, but the receipt could not be read back
                    logger.exception("could not build the receipt of entry %s", outcome[1])
                    result = self._reject(
                        "E_INTERNAL",
                        "the update was logged but its receipt could not be read; resubmit the "
                        "same envelope to get it",
                        retry_after=1.0,
                    )
            else:
                retry = outcome[3] if len(outcome) > 3 else 0.0
                code = outcome[1]
                if code not in REASON_CODES:
                    code = "E_INTERNAL"
                result = self._reject(code, outcome[2], retry_after=retry)
            self._log_result(result, site, seq, p.received)
            p.future.set_result(result)

    # ------------------------------------------------------------------ operator entries

    def append_operator_entry(self, build: Any) -> StoredEntry:
        """Append an operator-signed entry built by ``build(state, writer_size) -> (envelope,
        kind, blobs)`` under the write lock (used by ``enroll`` / ``revoke``)."""
        with self.store.writer() as w, self._state_lock:
            for e in w.caught_up:
                ledger.apply_entry(self.state, e, self.blobs)
            envelope, kind, blobs = build(self.state, w.size)
            entry, _cp = w.append(
                envelope, kind=kind, blobs=blobs, sign_checkpoint=self.signer.sign_checkpoint
            )
            ledger.apply_entry(self.state, entry, self.blobs)
        return entry

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        self._refresh()
        cp = self.store.latest_checkpoint()
        sites = {}
        contributions = self.store.site_contributions()
        with self._state_lock:
            for site_id in sorted(self.state.policy.sites):
                info = ledger.site_status(self.state, site_id)
                n, last = contributions.get(site_id, (0, 0))
                sites[site_id] = {
                    **info,
                    "contributions": n,
                    "last_sequence": max(last, info.get("last_sequence", 0)),
                }
        n_blobs, blob_bytes = self.blobs.usage()
        referenced = self.store.referenced_blobs()
        orphans = sum(1 for b in self.blobs.iter_names() if b not in referenced)
        db = self.store.db_path
        db_bytes = sum(
            p.stat().st_size
            for p in (db, Path(str(db) + "-wal"), Path(str(db) + "-shm"))
            if p.exists()
        )
        cache_bytes = (
            sum(
                p.stat().st_size
                for p in self.cfg.path(self.cfg.paths.cache).rglob("*")
                if p.is_file()
            )
            if self.cfg.path(self.cfg.paths.cache).exists()
            else 0
        )
        return {
            "origin": self.origin,
            "tree_size": self.store.size,
            "checkpoint": {
                "size": cp.size if cp else 0,
                "root_hash": cp.root_hash.hex() if cp else "",
                "note": cp.signed_note.decode("utf-8", "replace") if cp else "",
                "signed_at": self.store.checkpoint_time(cp.size) if cp else None,
            },
            "sites": sites,
            "blobs": {"count": n_blobs, "bytes": blob_bytes, "orphans": orphans},
            "disk": {
                "database_bytes": db_bytes,
                "blob_bytes": blob_bytes,
                "cache_bytes": cache_bytes,
            },
        }


def _to_wire_entry(e: StoredEntry) -> LedgerEntry:
    return LedgerEntry(index=e.index, envelope=e.envelope, kind=e.kind, blobs=e.blobs)
