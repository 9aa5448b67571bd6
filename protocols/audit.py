"""The ledger audit: verify a coordinator's whole ledger and its served model, trusting only
``trust.json`` and what this auditor verified before.

Rules, checked in this order (the first that fails decides the exit code, see
:data:`AUDIT_EXIT_CODES`; every finding is reported, with the entry it concerns):

1. **Checkpoint.** The latest checkpoint is a C2SP signed note, signed by the log key pinned in
   ``trust.json`` for the pinned origin (:mod:`protocols.checkpoint`).
2. **Log integrity.** Every entry ``0 .. size-1`` is present, in order, and the RFC 6962 root of
   their leaf hashes (``SHA-256(0x00 || envelope)``) equals the checkpoint's root. When it does
   not, the first bad entry is found by bisection over the coordinator's signed checkpoints at
   smaller sizes.
3. **No rollback, no fork.** The checkpoint is consistent with the last one this auditor stored
   (its state directory keeps the checkpoint note and the leaf hashes it verified): the tree
   never shrinks, and its root at the stored size is the stored root. Only then is the new
   checkpoint stored.
4. **Entries.** Replayed from the genesis in log order with :class:`protocols.ledger.LedgerState`
   (shared with the coordinator): every envelope's signatures against the policy in force at
   that position (enrolments, revocations, rotations applied in order), per-site sequence
   numbers, base checkpoints, condition names and namespaces; every blob an entry names is
   present and hashes to its name and to the sha256 the signed payload names.
5. **Replay.** Every diff is applied to the genesis bundle by the same
   :meth:`protocols.ledger.LedgerState.apply` (numpy only, linear time: versions are prefixes
   of appended slices, hashed when named); every content digest the ledger states (genesis, the
   base digest of each update, federated round aggregates) equals the replayed version's.
6. **Served model.** The reference the coordinator serves at the checkpoint size has the
   replayed content digest, bit for bit (the full bundle is rebuilt and compared tensor by
   tensor, so a differing tensor is named).
7. **Witnesses.** When ``trust.json`` requires ``k`` witness cosignatures, at least ``k``
   distinct trusted witnesses cosigned the checkpoint.

The engine does no network or file I/O of its own: it reads through a
:class:`protocols._audit_sources.LedgerSource` and an :class:`AuditorState`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from protocols.bundle import atomic_write
from protocols.errors import ConfigError, ScarchesFLError, VerificationError

__all__ = [
    "AuditExitCode",
    "AUDIT_EXIT_CODES",
    "AUDIT_OK",
    "failure_class_for",
    "Finding",
    "EntryRecord",
    "SiteSummary",
    "AuditResult",
    "AuditorState",
    "AuditStateError",
    "default_state_dir",
    "run_audit",
    "read_ledger",
    "verified_ledger_state",
]

logger = logging.getLogger(__name__)


# --- exit codes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditExitCode:
    """One entry of the audit exit code registry."""

    name: str
    code: int
    help: str
    retired: bool = False


def _codes(*items: AuditExitCode) -> dict[str, AuditExitCode]:
    out: dict[str, AuditExitCode] = {}
    seen: set[int] = set()
    for it in items:
        if it.name in out or it.code in seen:  # pragma: no cover - guarded by a test
            raise RuntimeError(f"audit exit code {it.name}/{it.code} registered twice")
        out[it.name] = it
        seen.add(it.code)
    return out


# Append only; never renumber or reuse a code (retire it instead). 0-9 are shared with the
# rest of the CLI (2 usage/configuration, 4 transport); 10-29 belong to the audit.
AUDIT_EXIT_CODES: dict[str, AuditExitCode] = _codes(
    AuditExitCode("OK", 0, "Everything verified: the served model is the replay of the signed ledger."),
    AuditExitCode("INTERNAL", 1, "A bug in the auditor (not a finding about the ledger); report it."),
    AuditExitCode("USAGE", 2, "Wrong flags, or an unreadable trust.json / state directory; see the message."),
    AuditExitCode("TRANSPORT", 4, "The coordinator could not be reached or a download broke; retry."),
    AuditExitCode("CHECKPOINT_INVALID", 10, "The latest checkpoint is malformed or not signed by the log key pinned in trust.json for its origin."),
    AuditExitCode("LOG_MISMATCH", 11, "The entries do not hash to the signed checkpoint root: an entry is missing, changed, inserted or reordered."),
    AuditExitCode("LOG_FORK", 12, "The log is not an extension of the checkpoint this auditor verified before: rollback or fork (split view)."),
    AuditExitCode("SIGNATURE", 13, "An entry's signature does not verify, or its key was not authorised at that position (unknown, revoked, rotated out)."),
    AuditExitCode("LEDGER_RULES", 14, "An entry breaks a ledger rule: malformed payload, sequence number, base checkpoint, condition name or namespace, entry order."),
    AuditExitCode("BLOB", 15, "A blob an entry names is missing, or its bytes differ from the sha256 it is named by / the signed payload names."),
    AuditExitCode("REPLAY_MISMATCH", 16, "A content digest stated in the ledger differs from the replay of the signed updates."),
    AuditExitCode("SERVED_MODEL", 17, "The model the coordinator serves is not the replay of the signed ledger."),
    AuditExitCode("WITNESS_QUORUM", 18, "Fewer distinct trusted witnesses cosigned the checkpoint than trust.json requires."),
    AuditExitCode("AUDITOR_STATE", 19, "This auditor's own state directory is damaged or belongs to another log; repair or move it."),
)
AUDIT_OK = 0

_REASON_CLASS: dict[str, str] = {}
for _rc in ("E_SIG_INVALID", "E_SIG_THRESHOLD", "E_KEY_UNKNOWN", "E_KEY_REVOKED",
            "E_KEY_ROTATED", "E_SITE_MISMATCH", "E_SITE_NOT_ENROLLED", "E_ROTATION_SIGNATURES",
            "E_KEY_MALFORMED"):
    _REASON_CLASS[_rc] = "SIGNATURE"
for _rc in ("E_BLOB_MISSING", "E_BLOB_MISMATCH", "E_DIFF_SHA256_MISMATCH", "E_DIFF_SIZE_MISMATCH"):
    _REASON_CLASS[_rc] = "BLOB"
for _rc in ("E_DIGEST_MISMATCH", "E_BASE_DIGEST_MISMATCH"):
    _REASON_CLASS[_rc] = "REPLAY_MISMATCH"
_REASON_CLASS["E_CHECKPOINT_INVALID"] = "CHECKPOINT_INVALID"
_REASON_CLASS["E_CHECKPOINT_ROLLBACK"] = "LOG_FORK"
_REASON_CLASS["E_PROOF_INVALID"] = "LOG_FORK"


def failure_class_for(reason_code: str) -> str:
    """The audit failure class of a reason code (``LEDGER_RULES`` unless listed)."""
    return _REASON_CLASS.get(reason_code, "LEDGER_RULES")


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    failure_class: str
    entry_index: int | None
    reason_code: str
    message: str

    @property
    def exit_code(self) -> int:
        return AUDIT_EXIT_CODES[self.failure_class].code

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["exit_code"] = self.exit_code
        return d


@dataclass
class EntryRecord:
    """One entry as the audit saw it (also what ``scarches-fl ledger show`` prints)."""

    index: int
    kind: str
    leaf_hash: str
    timestamp: float | None = None
    site_id: str | None = None
    key_ids: list[str] = field(default_factory=list)
    sequence: int | None = None
    base_size: int | None = None
    base_digest: str | None = None
    conditions: list[str] = field(default_factory=list)
    diff_sha256: str | None = None
    diff_size: int | None = None
    tensors: dict[str, list[int]] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    version_digest: str | None = None
    status: str = "ok"

    def to_json(self) -> dict[str, Any]:
        from protocols._audit_report import format_time

        d = asdict(self)
        d["time"] = format_time(self.timestamp) if self.timestamp is not None else None
        return d


@dataclass
class SiteSummary:
    site_id: str
    key_ids: list[str] = field(default_factory=list)
    revoked: bool = False
    updates: int = 0
    last_sequence: int = 0
    conditions: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AuditResult:
    source: str
    origin: str = ""
    tree_size: int = 0
    root_hex: str = ""
    checkpoint_note: str = ""
    previous_checkpoint_size: int | None = None
    entries: list[EntryRecord] = field(default_factory=list)
    sites: list[SiteSummary] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    replay_digest: str | None = None
    served_digest: str | None = None
    witnesses: list[str] = field(default_factory=list)
    witness_threshold: int = 0
    cosigned_by: str | None = None
    audited_at: float = 0.0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def first_failure(self) -> Finding | None:
        if not self.findings:
            return None
        order = {name: i for i, name in enumerate(_CLASS_ORDER)}
        return min(
            self.findings,
            key=lambda f: (
                order.get(f.failure_class, 99),
                f.entry_index if f.entry_index is not None else -1,
            ),
        )

    @property
    def exit_code(self) -> int:
        first = self.first_failure
        return AUDIT_OK if first is None else first.exit_code

    @property
    def kind_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.kind] = out.get(e.kind, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        first = self.first_failure
        return {
            "verdict": "verified" if self.ok else "failed",
            "exit_code": self.exit_code,
            "failure_class": first.failure_class if first else None,
            "first_failing_entry": first.entry_index if first else None,
            "source": self.source,
            "origin": self.origin,
            "tree_size": self.tree_size,
            "root": self.root_hex,
            "checkpoint": self.checkpoint_note,
            "previous_checkpoint_size": self.previous_checkpoint_size,
            "replay_digest": self.replay_digest,
            "served_digest": self.served_digest,
            "witnesses": self.witnesses,
            "witness_threshold": self.witness_threshold,
            "cosigned_by": self.cosigned_by,
            "audited_at": self.audited_at,
            "seconds": round(self.seconds, 4),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "kinds": self.kind_counts,
            "findings": [f.to_json() for f in self.findings],
            "sites": [s.to_json() for s in self.sites],
            "entries": [e.to_json() for e in self.entries],
        }


# Pipeline order: an earlier class explains later ones (a missing entry breaks the replay too).
_CLASS_ORDER = (
    "AUDITOR_STATE",
    "CHECKPOINT_INVALID",
    "LOG_MISMATCH",
    "LOG_FORK",
    "SIGNATURE",
    "LEDGER_RULES",
    "BLOB",
    "REPLAY_MISMATCH",
    "SERVED_MODEL",
    "WITNESS_QUORUM",
)


class _Stop(Exception):
    """Internal: a finding after which nothing further can be checked."""


# --- the auditor's own state -------------------------------------------------------------------


class AuditStateError(ScarchesFLError):
    """The auditor's state directory is damaged or belongs to another log."""

    exit_code = AUDIT_EXIT_CODES["AUDITOR_STATE"].code


_ORIGIN_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def default_state_dir(origin: str) -> Path:
    """``~/.scarches-fl/auditor/<origin, with unsafe characters as '_'>``."""
    return Path.home() / ".scarches-fl" / "auditor" / (_ORIGIN_SAFE.sub("_", origin) or "_")


class AuditorState:
    """What this auditor verified before, in its own directory (never the coordinator's):

    * ``checkpoint.note`` -- the last checkpoint note it verified (log-signed, as served);
    * ``leaves.bin`` -- the leaf hashes of that tree, 32 bytes each, so that a later fork names
      the first entry that differs;
    * ``origin`` -- the log this directory belongs to;
    * ``history.jsonl`` -- one line per audit: time, size, root, verdict, exit code;
    * ``cosigned.note`` -- the last checkpoint note this auditor cosigned as a witness.

    Files are replaced atomically (temp file + rename)."""

    def __init__(self, directory: str | Path, origin: str) -> None:
        self.dir = Path(directory)
        self.origin = origin
        self.dir.mkdir(parents=True, exist_ok=True)
        origin_file = self.dir / "origin"
        if origin_file.is_file():
            stored = origin_file.read_text(encoding="utf-8").strip()
            if stored != origin:
                raise AuditStateError(
                    f"the auditor state {self.dir} belongs to log {stored!r}, not {origin!r}; "
                    "pass --state DIR for this log"
                )
        else:
            self._write(origin_file, (origin + "\n").encode())

    def _write(self, path: Path, data: bytes) -> None:
        atomic_write(path, data)

    def previous(self) -> tuple[bytes, list[bytes]] | None:
        """(checkpoint note, leaf hashes) of the last verified tree, or None."""
        note_file, leaves_file = self.dir / "checkpoint.note", self.dir / "leaves.bin"
        if not note_file.is_file():
            return None
        note = note_file.read_bytes()
        raw = leaves_file.read_bytes() if leaves_file.is_file() else b""
        if len(raw) % 32:
            raise AuditStateError(
                f"{leaves_file} is damaged (its length is not a multiple of 32); restore it or "
                "start a new --state directory"
            )
        return note, [raw[i : i + 32] for i in range(0, len(raw), 32)]

    def store(self, note: bytes, leaves: list[bytes]) -> None:
        self._write(self.dir / "leaves.bin", b"".join(leaves))
        self._write(self.dir / "checkpoint.note", note)

    def store_cosigned(self, note: bytes) -> None:
        self._write(self.dir / "cosigned.note", note)

    def verified_views(self) -> list[tuple[int, str]]:
        """(tree size, root hex) of every checkpoint an earlier audit verified the log of."""
        path = self.dir / "history.jsonl"
        if not path.is_file():
            return []
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise AuditStateError(
                    f"{path} line {n} is damaged; repair or remove that line"
                ) from exc
            if rec.get("log_verified") and isinstance(rec.get("tree_size"), int):
                out.append((int(rec["tree_size"]), str(rec.get("root", ""))))
        return out

    def append_history(self, record: Mapping[str, Any]) -> None:
        with open(self.dir / "history.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(dict(record), sort_keys=True) + "\n")


# --- trust -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustAnchors:
    """What the audit trusts: :class:`protocols.policy.TrustPolicy` from trust.json (its
    roots: operator keys and thresholds; sites come from the ledger's policy entries), the
    pinned origin and log key, and the witness policy."""

    policy: Any  # protocols.policy.TrustPolicy
    origin: str
    log_verifiers: tuple[Any, ...]
    witnesses: Any  # protocols.witness.WitnessPolicy


def trust_from_policy(policy: Any) -> TrustAnchors:
    from protocols.checkpoint import parse_verifier_key
    from protocols.witness import WitnessPolicy

    witnesses = WitnessPolicy(
        tuple(parse_verifier_key(k) for k in policy.witness_keys), int(policy.witnesses_required)
    )
    return TrustAnchors(
        policy, policy.origin, (parse_verifier_key(policy.log_public_key),), witnesses
    )


def load_trust_file(path: str | Path) -> TrustAnchors:
    """Read ``trust.json`` with strict reader (:func:`protocols.policy.read_trust`)."""
    from protocols.errors import PolicyError
    from protocols.policy import read_trust

    try:
        policy = read_trust(path)
    except PolicyError as exc:
        raise ConfigError(f"--trust: {exc.message}") from exc
    return trust_from_policy(policy)


def parse_iso_time(text: str, flag: str) -> float:
    """ISO 8601 date or date-time (UTC unless it says otherwise) -> UNIX seconds."""
    from datetime import UTC, datetime

    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(
            f"{flag} {text!r}: not an ISO 8601 time; write e.g. 2026-11-23 or 2026-11-23T18:00Z"
        ) from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# --- the audit -------------------------------------------------------------------------------


def _verify_note(note: bytes, trust: TrustAnchors) -> Any:
    from protocols.checkpoint import verify_checkpoint

    return verify_checkpoint(note, origin=trust.origin, log_verifier=list(trust.log_verifiers))


def _locate_first_mismatch(source: Any, tree: Any, have: int, trust: TrustAnchors) -> int | None:
    """Smallest entry index whose inclusion changes our root away from the coordinator's signed
    checkpoint of that size (bisection: once the histories differ, every larger tree differs).
    None when the signed checkpoints needed are not available."""
    lo, hi = 0, have  # invariant: our root at size lo matches (or lo == 0); at hi it does not
    cache: dict[int, bool | None] = {}

    def matches(size: int) -> bool | None:
        if size not in cache:
            note = source.checkpoint_note(size)
            if note is None:
                cache[size] = None
            else:
                try:
                    cp = _verify_note(note, trust)
                except (VerificationError, ConfigError):
                    cache[size] = None
                else:
                    cache[size] = cp.size == size and cp.root_hash == tree.root(size)
        return cache[size]

    if have == 0:
        return 0
    last = matches(have)
    if last is None:
        return None
    if last:
        return have  # the first `have` entries are right: the trouble starts at entry `have`
    while hi - lo > 1:
        mid = (lo + hi) // 2
        m = matches(mid)
        if m is None:
            return None
        if m:
            lo = mid
        else:
            hi = mid
    return hi - 1


def run_audit(
    source: Any,
    trust: TrustAnchors,
    *,
    state_dir: str | Path | None = None,
    witness: Any = None,
    check_served: bool = True,
    store_state: bool = True,
    progress: bool = False,
    now: Callable[[], float] = time.time,
) -> AuditResult:
    """Audit the ledger ``source`` serves (module docstring); never raises for a finding, only
    for usage, transport and auditor-state problems."""
    from protocols.checkpoint import ForkError, RollbackError, check_checkpoint_advance
    from protocols.merkle import MerkleTree, leaf_hash

    t_start = time.perf_counter()
    res = AuditResult(source=source.description, origin=trust.origin, audited_at=now())
    findings = res.findings
    timings = res.timings

    def finish() -> AuditResult:
        res.seconds = time.perf_counter() - t_start
        return res

    # 1. the checkpoint
    t = time.perf_counter()
    note = source.latest_checkpoint()
    res.checkpoint_note = note.decode("utf-8", errors="replace")
    try:
        cp = _verify_note(note, trust)
    except (VerificationError, ConfigError) as exc:
        findings.append(
            Finding("CHECKPOINT_INVALID", None, getattr(exc, "reason_code", "E_CHECKPOINT_INVALID"), str(exc))
        )
        return finish()
    res.tree_size, res.root_hex = cp.size, cp.root_hash.hex()
    state = AuditorState(state_dir or default_state_dir(trust.origin), trust.origin)
    timings["checkpoint"] = time.perf_counter() - t

    # 2. every entry, and the root they hash to
    t = time.perf_counter()
    entries: list[Any] = []
    leaves: list[bytes] = []
    for e in source.iter_entries(cp.size):
        if e.index != len(entries):
            findings.append(
                Finding(
                    "LOG_MISMATCH",
                    len(entries),
                    "E_LEDGER_ORDER",
                    f"entry {len(entries)} is missing (the source went on with entry {e.index})",
                )
            )
            break
        entries.append(e)
        leaves.append(leaf_hash(e.envelope))
    tree = MerkleTree(leaves)
    if not findings and (len(entries) != cp.size or tree.root() != cp.root_hash):
        where = _locate_first_mismatch(source, tree, len(entries), trust)
        short = len(entries) < cp.size
        findings.append(
            Finding(
                "LOG_MISMATCH",
                where,
                "E_PROOF_INVALID",
                (
                    f"the checkpoint covers {cp.size} entries but {len(entries)} are there; "
                    if short
                    else "the entries do not hash to the signed checkpoint root; "
                )
                + (
                    f"entry {where} is not the one the log signed (changed, inserted, deleted "
                    "or moved)"
                    if where is not None
                    else "an entry was changed, inserted, deleted or moved"
                ),
            )
        )
    log_ok = not findings
    timings["log"] = time.perf_counter() - t

    # 3. consistency with what this auditor verified before
    prev = state.previous()
    if prev is not None:
        prev_note, prev_leaves = prev
        try:
            prev_cp = _verify_note(prev_note, trust)
        except (VerificationError, ConfigError) as exc:
            raise AuditStateError(
                f"the checkpoint stored in {state.dir} does not verify under trust.json ({exc}); "
                "the state belongs to another log or key: use another --state directory"
            ) from exc
        res.previous_checkpoint_size = prev_cp.size
        if log_ok:
            try:
                proof = (
                    tree.consistency_proof(prev_cp.size, cp.size)
                    if 0 < prev_cp.size < cp.size
                    else []
                )
                check_checkpoint_advance(prev_cp, cp, proof)
            except (RollbackError, ForkError) as exc:
                first = next(
                    (i for i, (a, b) in enumerate(zip(prev_leaves, leaves, strict=False)) if a != b),
                    None,
                )
                if first is None and len(prev_leaves) > len(leaves):
                    first = len(leaves)
                findings.append(
                    Finding(
                        "LOG_FORK",
                        first,
                        "E_CHECKPOINT_ROLLBACK",
                        f"not consistent with the size-{prev_cp.size} checkpoint this auditor "
                        f"verified before: {exc}"
                        + (f" (entry {first} differs from the one verified then)" if first is not None else ""),
                    )
                )
    # and with every checkpoint an earlier audit verified (each was checked against its
    # predecessor too; this also covers a state directory whose last note was lost)
    if log_ok and not findings:
        for size, root_hex in state.verified_views():
            bad = size > cp.size or (size > 0 and tree.root(size).hex() != root_hex)
            if bad:
                findings.append(
                    Finding(
                        "LOG_FORK",
                        None,
                        "E_CHECKPOINT_ROLLBACK",
                        f"not consistent with the size-{size} checkpoint (root "
                        f"{root_hex[:16]}...) an earlier audit verified",
                    )
                )
                break
    log_consistent = not findings

    # 4 + 5. entries, policy, blobs, replay
    t = time.perf_counter()
    replay = None
    if log_ok:
        replay = _check_entries(entries, source, trust, res, progress=progress)
    timings["entries_and_replay"] = time.perf_counter() - t

    # 6. the served model
    t = time.perf_counter()
    if replay is not None and not findings and cp.size > 0:
        res.replay_digest = replay.digest
        if check_served:
            _check_served(source, replay, cp.size, res)
    timings["served"] = time.perf_counter() - t

    # witness mode: cosign what verified (before counting cosignatures: its own counts too)
    own: bytes | None = None
    if witness is not None and not findings:
        own = _cosign(source, note, cp, prev, tree, trust, witness, state, res, now)

    # 7. witnesses
    _check_witnesses(source, note, cp, trust, res, own)

    # the new checkpoint becomes this auditor's view only when the log itself verified
    if store_state and log_ok and log_consistent:
        state.store(note, leaves)
    res.seconds = time.perf_counter() - t_start
    state.append_history(
        {
            "audited_at": res.audited_at,
            "source": res.source,
            "tree_size": res.tree_size,
            "root": res.root_hex,
            "verdict": "verified" if res.ok else "failed",
            "exit_code": res.exit_code,
            "first_failing_entry": res.first_failure.entry_index if res.first_failure else None,
            "seconds": round(res.seconds, 3),
            "log_verified": log_ok and log_consistent,
        }
    )
    return res


def _check_served(source: Any, replay: Any, size: int, res: AuditResult) -> None:
    """Rule 6: the served reference at ``size`` is the replay, bit for bit."""
    import numpy as np

    from protocols.bundle import bundle_from_bytes

    served = source.served_reference(size)
    if served is None:
        if source.online:
            res.findings.append(
                Finding(
                    "SERVED_MODEL",
                    None,
                    "E_BLOB_MISSING",
                    f"the coordinator does not serve reference version {size}",
                )
            )
        else:
            logger.info(
                "the state directory copy holds no materialised reference for size %d; "
                "the served-model check needs --coordinator",
                size,
            )
        return
    expected = replay.bundle()  # the full bundle, its digest re-checked against the lazy one
    try:
        got = bundle_from_bytes(served.manifest_bytes, served.safetensors_bytes, verify=False)
    except VerificationError as exc:
        res.findings.append(
            Finding("SERVED_MODEL", None, exc.reason_code, f"the served reference is malformed: {exc}")
        )
        return
    res.served_digest = got.digest
    problems: list[str] = []
    if served.claimed_digest and served.claimed_digest != got.digest:
        problems.append(
            f"it claims digest {served.claimed_digest} but its contents hash to {got.digest}"
        )
    if got.digest != expected.digest:
        names = sorted(set(got.tensors) | set(expected.tensors))
        differing = [
            n
            for n in names
            if n not in got.tensors
            or n not in expected.tensors
            or got.tensors[n].dtype != expected.tensors[n].dtype
            or got.tensors[n].shape != expected.tensors[n].shape
            or not np.array_equal(
                got.tensors[n].view(np.uint8), expected.tensors[n].view(np.uint8)
            )
        ]
        man_diff = sorted(
            k
            for k in set(got.manifest) | set(expected.manifest)
            if k != "digest" and got.manifest.get(k) != expected.manifest.get(k)
        )
        detail = []
        if differing:
            detail.append(f"tensor(s) {', '.join(differing[:5])} differ")
        if man_diff:
            detail.append(f"manifest field(s) {', '.join(man_diff[:5])} differ")
        problems.append(
            f"its digest {got.digest} is not the replay's {expected.digest}"
            + (f" ({'; '.join(detail)})" if detail else "")
        )
    if problems:
        res.findings.append(
            Finding(
                "SERVED_MODEL",
                None,
                "E_DIGEST_MISMATCH",
                f"the served reference version {size}: " + "; ".join(problems),
            )
        )


def _check_witnesses(
    source: Any, note: bytes, cp: Any, trust: TrustAnchors, res: AuditResult, own: bytes | None
) -> None:
    """Rule 7, and which trusted witnesses cosigned (for the report). ``own``: the note this
    auditor just cosigned (its line counts when its key is a trusted witness)."""
    from protocols.checkpoint import append_signatures, parse_note
    from protocols.witness import trusted_cosigners

    policy = trust.witnesses
    res.witness_threshold = policy.threshold
    if not policy.witnesses:
        return
    try:
        cosigned = source.cosigned_note(cp.size) or note
        if own is not None:
            cosigned = append_signatures(cosigned, parse_note(own).signatures)
        if parse_note(cosigned).text != parse_note(note).text:
            raise VerificationError(
                "the cosigned note is for another checkpoint text", reason_code="E_CHECKPOINT_INVALID"
            )
        res.witnesses = trusted_cosigners(cosigned, list(policy.witnesses))
    except (VerificationError, ConfigError) as exc:
        res.findings.append(
            Finding("WITNESS_QUORUM", None, getattr(exc, "reason_code", "E_SIG_INVALID"), str(exc))
        )
        return
    if len(res.witnesses) < policy.threshold:
        res.findings.append(
            Finding(
                "WITNESS_QUORUM",
                None,
                "E_SIG_THRESHOLD",
                f"{len(res.witnesses)} of the {policy.threshold} required trusted witnesses "
                f"cosigned checkpoint {cp.size}",
            )
        )


def _cosign(
    source: Any,
    note: bytes,
    cp: Any,
    prev: tuple[bytes, list[bytes]] | None,
    tree: Any,
    trust: TrustAnchors,
    witness: Any,
    state: AuditorState,
    res: AuditResult,
    now: Callable[[], float],
) -> bytes:
    """Witness mode: cosign the checkpoint just verified and hand it to the coordinator;
    returns the cosigned note."""
    from protocols.witness import cosign

    prev_cp = _verify_note(prev[0], trust) if prev is not None else None
    proof = (
        tree.consistency_proof(prev_cp.size, cp.size)
        if prev_cp is not None and 0 < prev_cp.size < cp.size
        else []
    )
    cosigned = cosign(
        note,
        origin=trust.origin,
        log_verifiers=list(trust.log_verifiers),
        witness=witness,
        previous=prev_cp,
        consistency_proof=proof,
        timestamp=int(now()),
    )
    state.store_cosigned(cosigned)
    res.cosigned_by = witness.name
    add = getattr(source, "add_cosignature", None)
    if add is not None:
        added = add(cosigned)
        logger.info("coordinator stored %d new cosignature line(s)", added)
    else:
        logger.info(
            "offline audit: the cosigned checkpoint is in %s/cosigned.note; hand it to the "
            "operator (AddCosignature)",
            state.dir,
        )
    return cosigned


# --- entries: the ledger's own replay ------------------------------------------------------


def _record(e: Any, applied: Any, verified: bool) -> EntryRecord:
    """The display record of one entry (from the verified payload when ``applied`` is given)."""
    from protocols.dsse import parse_envelope
    from protocols.ledger import entry_payload

    rec = EntryRecord(index=e.index, kind=e.kind, leaf_hash="", timestamp=e.created_at)
    try:
        if applied is not None:  # verified strictly by the replay: read it cheaply
            kind, obj = applied.kind, applied.payload
            rec.key_ids = [s["keyid"] for s in json.loads(e.envelope)["signatures"]]
        else:
            kind, obj = entry_payload(e.envelope)
            rec.key_ids = list(parse_envelope(e.envelope).keyids)
        rec.kind = kind
    except VerificationError as exc:
        rec.status = f"unreadable: {exc.reason_code}"
        return rec
    if kind == "site_update":
        rec.site_id = obj.get("site_id")
        rec.sequence = obj.get("sequence")
        base = obj.get("base") or {}
        rec.base_size, rec.base_digest = base.get("size"), base.get("digest")
        rec.conditions = list(obj.get("new_conditions") or [])
        d = obj.get("diff") or {}
        rec.diff_sha256 = f"sha256:{d.get('sha256')}" if d.get("sha256") else None
        rec.diff_size = d.get("size")
        rec.tensors = {n: list(t.get("shape", [])) for n, t in (d.get("tensors") or {}).items()}
    elif kind == "label_contribution":
        rec.site_id = obj.get("site_id")
        rec.sequence = obj.get("sequence")
        base = obj.get("base") or {}
        rec.base_size, rec.base_digest = base.get("size"), base.get("digest")
        protos = obj.get("prototypes") or []
        rec.detail = {
            "label_key": obj.get("label_key"),
            "types": ", ".join(f"{p.get('name')} ({p.get('count')})" for p in protos),
            "privacy": (obj.get("privacy") or {}).get("mechanism"),
        }
    elif kind == "label_policy":
        rec.detail = {"action": obj.get("action")}
        for f in ("label_key", "name", "as", "to"):
            if obj.get(f) is not None:
                rec.detail[f] = obj.get(f)
        if obj.get("settings") is not None:
            rec.detail["settings"] = json.dumps(obj.get("settings"), sort_keys=True)
    elif kind == "policy":
        rec.site_id = obj.get("site_id")
        rec.detail = {"action": obj.get("action")}
        if obj.get("public_key"):
            rec.detail["public_key"] = obj.get("public_key")
        if obj.get("note"):
            rec.detail["note"] = obj.get("note")
    elif kind == "genesis":
        b = obj.get("bundle") or {}
        rec.detail = {"bundle_digest": b.get("digest")}
        if obj.get("note"):
            rec.detail["note"] = obj.get("note")
        rec.base_digest = b.get("digest")
    elif kind == "federated_round":
        base = obj.get("base") or {}
        rec.base_size, rec.base_digest = base.get("size"), base.get("digest")
        rec.detail = {
            "round": obj.get("round"),
            "contributors": ", ".join(c.get("site_id", "?") for c in obj.get("contributors") or []),
            "aggregate_digest": (obj.get("aggregate") or {}).get("digest"),
        }
    elif kind == "federated_labels":
        base = obj.get("base") or {}
        rec.base_size, rec.base_digest = base.get("size"), base.get("digest")
        labels = obj.get("labels") or {}
        rec.detail = {
            "round": obj.get("round"),
            "labels_record": obj.get("labels_record"),
            "labelled_digest": obj.get("digest"),
            "label_blobs": ", ".join(
                f"sha256:{(labels.get(r) or {}).get('sha256')}" for r in ("json", "safetensors")
            ),
        }
    if not verified:
        rec.status = "not verified"
    return rec


def _check_entries(
    entries: list[Any],
    source: Any,
    trust: TrustAnchors,
    res: AuditResult,
    *,
    progress: bool = False,
) -> Any:
    """Rules 4 and 5 over ``entries`` (whose root already matched the checkpoint), with
    :meth:`protocols.ledger.LedgerState.apply` itself: the one implementation of the ledger's
    rules, which the coordinator runs too. Linear in the ledger: an update appends its slices,
    and a version's digest is computed only when an entry names it as its base (and for the
    last version, by the caller). Fills ``res.entries``, ``res.sites`` and findings; returns
    the replayed :class:`~protocols.ledger.LedgerState` (or None)."""
    from protocols.ledger import LedgerState
    from protocols.merkle import leaf_hash

    state = LedgerState(trust.policy)

    def lookup(hexname: str) -> bytes:
        return source.blob("sha256:" + hexname)

    failed_at: int | None = None
    sites: dict[str, SiteSummary] = {}
    step = max(1, len(entries) // 20)
    for e in entries:
        if progress and e.index % step == 0:
            print(f"\r  replaying entry {e.index}/{len(entries)}", end="", file=__import__("sys").stderr)
        if failed_at is not None:
            rec = _record(e, None, False)
            rec.leaf_hash = leaf_hash(e.envelope).hex()
            res.entries.append(rec)
            continue
        try:
            applied = state.apply(e.envelope, lookup)
        except VerificationError as exc:
            failed_at = e.index
            code = exc.reason_code
            res.findings.append(Finding(failure_class_for(code), e.index, code, f"entry {e.index}: {exc.message or exc}"))
            rec = _record(e, None, False)
            rec.status = f"FAILED: {code}"
            rec.leaf_hash = leaf_hash(e.envelope).hex()
            res.entries.append(rec)
            continue
        rec = _record(e, applied, True)
        rec.leaf_hash = applied.leaf_hash.hex()
        res.entries.append(rec)
        if applied.kind == "site_update" and rec.site_id:
            s = sites.setdefault(rec.site_id, SiteSummary(rec.site_id))
            s.updates += 1
            s.last_sequence = max(s.last_sequence, rec.sequence or 0)
            s.conditions.extend(rec.conditions)
        elif applied.kind == "policy" and rec.site_id:
            sites.setdefault(rec.site_id, SiteSummary(rec.site_id))
    if progress:
        print("\r" + " " * 40 + "\r", end="", file=__import__("sys").stderr)
    policy = state.policy
    for sid, rec_site in policy.sites.items():
        s = sites.setdefault(sid, SiteSummary(sid))
        s.key_ids = [k.key_id for k in rec_site.keys if k.status == "active"]
        s.revoked = rec_site.active_key is None
    res.sites = sorted(sites.values(), key=lambda s: s.site_id)
    if failed_at is not None or state.size == 0:
        return None
    # the digests the replay computed (bases, genesis, rounds): shown per entry in the report
    for rec in res.entries:
        rec.version_digest = state.known_digest_at(rec.index + 1)
    return state


def read_ledger(source: Any, trust: TrustAnchors) -> AuditResult:
    """What ``scarches-fl ledger show`` lists: the checkpoint and Merkle root verified, every
    entry checked against the policy in force at its position (with the model replay; no
    auditor state is read or written, the served model is not fetched)."""
    return _read_ledger(source, trust)[0]


def verified_ledger_state(source: Any, trust: TrustAnchors) -> Any:
    """The :class:`~protocols.ledger.LedgerState` a ledger replays to, after the checks of
    :func:`read_ledger` (signed checkpoint, Merkle root, every entry under the policy in force
    at its position) all passed; the first finding otherwise, as a :class:`VerificationError`
    with its reason code. What a federated run's records are verified against (its site keys
    and operator keys: ``federate verify --ledger``)."""
    res, state = _read_ledger(source, trust)
    if res.findings or state is None:
        first = res.findings[0] if res.findings else None
        raise VerificationError(
            "the ledger does not verify against the pinned trust.json: "
            + (first.message if first else "it holds no entry"),
            reason_code=first.reason_code if first else "E_LEDGER_ORDER",
        )
    return state


def _read_ledger(source: Any, trust: TrustAnchors) -> tuple[AuditResult, Any]:
    from protocols.merkle import MerkleTree, leaf_hash

    t0 = time.perf_counter()
    res = AuditResult(source=source.description, origin=trust.origin, audited_at=time.time())
    note = source.latest_checkpoint()
    res.checkpoint_note = note.decode("utf-8", errors="replace")
    try:
        cp = _verify_note(note, trust)
    except (VerificationError, ConfigError) as exc:
        res.findings.append(Finding("CHECKPOINT_INVALID", None, getattr(exc, "reason_code", "E_CHECKPOINT_INVALID"), str(exc)))
        return res, None
    res.tree_size, res.root_hex = cp.size, cp.root_hash.hex()
    entries = list(source.iter_entries(cp.size))
    contiguous = all(e.index == i for i, e in enumerate(entries)) and len(entries) == cp.size
    if not contiguous or MerkleTree([leaf_hash(e.envelope) for e in entries]).root() != cp.root_hash:
        res.findings.append(
            Finding("LOG_MISMATCH", None, "E_PROOF_INVALID", "the entries do not hash to the signed checkpoint root; run `scarches-fl audit` to locate the entry")
        )
        for e in entries:
            rec = _record(e, None, False)
            res.entries.append(rec)
        return res, None
    replay = _check_entries(entries, source, trust, res)
    if replay is not None:
        res.replay_digest = replay.digest
    res.seconds = time.perf_counter() - t0
    return res, replay
