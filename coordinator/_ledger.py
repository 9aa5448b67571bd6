"""The coordinator's seam to the protocols core: every call into formats, validation and
ledger state and into checkpoints goes through here, so the rest of ``coordinator`` sees
a handful of functions. Nothing here re-implements a rule of ``protocols``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.storage import BlobStore, LedgerStore, StoredEntry, sha256_name
from protocols.bundle import atomic_write
from protocols.errors import ConfigError, VerificationError
from protocols.proto.serde import BlobRef

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from coordinator.config import CoordinatorConfig
    from protocols.bundle import ReferenceBundle
    from protocols.checkpoint import Checkpoint, NoteSigner, NoteVerifier
    from protocols.labels import AuthenticatedContribution
    from protocols.ledger import AppliedEntry, BlobLookup, ConditionCap, LedgerState, StateSnapshot
    from protocols.limits import Limits
    from protocols.policy import TrustPolicy
    from protocols.update import AuthenticatedUpdate

__all__ = [
    "LogSigner",
    "load_log_signer",
    "new_log_key",
    "check_origin",
    "leaf_hash",
    "blob_ref",
    "append_signature_lines",
    "cosignature_lines_for",
    "verify_checkpoint_note",
    "ReferenceCache",
    "MaterializedReference",
    "new_private_key",
    "load_key",
    "read_public_key",
    "key_id_of",
    "trust_json",
    "read_trust_policy",
    "tls_server_name",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# checkpoints and notes


class LogSigner:
    """The log's checkpoint key (a C2SP note signer named after the origin)."""

    def __init__(self, signer: NoteSigner, origin: str) -> None:
        self._signer = signer
        self.origin = origin

    @property
    def verifier(self) -> NoteVerifier:
        return self._signer.verifier

    @property
    def vkey(self) -> str:
        return str(self._signer.verifier.vkey)

    def sign_checkpoint(self, size: int, root_hash: bytes) -> bytes:
        from protocols.checkpoint import Checkpoint, sign_checkpoint

        return sign_checkpoint(Checkpoint(self.origin, size, root_hash), self._signer)


def new_log_key(path: Path, origin: str) -> LogSigner:
    """Generate the log key (C2SP signer key string, mode 0600)."""
    from protocols.checkpoint import generate_signer

    signer = generate_signer(origin)
    atomic_write(path, (signer.skey + "\n").encode(), mode=0o600)
    return LogSigner(signer, origin)


def load_log_signer(path: Path, *, origin: str) -> LogSigner:
    from protocols.checkpoint import parse_signer_key

    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the log key {path}: {exc}; restore it from the backup of the state "
            "directory (paths.log_key in coordinator.yaml)"
        ) from exc
    signer = parse_signer_key(text)
    if signer.name != origin:
        raise ConfigError(
            f"{path}: the log key is named {signer.name!r} but coordinator.yaml says origin "
            f"{origin!r}; the origin is fixed at init -- restore the original coordinator.yaml"
        )
    return LogSigner(signer, origin)


def check_origin(origin: str) -> None:
    from protocols.checkpoint import Checkpoint, NoteSigner
    from protocols.merkle import EMPTY_ROOT

    try:
        Checkpoint(origin, 0, EMPTY_ROOT)
        NoteSigner(origin, b"\0" * 32)
    except (VerificationError, ValueError) as exc:
        raise ConfigError(
            f"--origin {origin!r}: not usable as a log origin ({exc}); use a single line without "
            "spaces or '+', e.g. consortium.example/ledger"
        ) from exc


def leaf_hash(envelope: bytes) -> bytes:
    from protocols.merkle import leaf_hash as _lh

    return _lh(envelope)


def blob_ref(role: str, sha256: str, size: int) -> BlobRef:
    return BlobRef(role=role, sha256=sha256, size=size)


def append_signature_lines(note: bytes, lines: list[str]) -> bytes:
    if not lines:
        return note
    from protocols.checkpoint import append_signatures

    return append_signatures(note, lines)


def verify_checkpoint_note(signer: LogSigner, note: bytes) -> Checkpoint:
    from protocols.checkpoint import verify_checkpoint

    return verify_checkpoint(note, origin=signer.origin, log_verifier=signer.verifier)


#: Cosignature lines from keys trust.json does not pin, kept per checkpoint (pinned witnesses'
#: lines are always kept: junk from unknown keys can never crowd them out).
MAX_UNPINNED_COSIGNATURES = 8


def cosignature_lines_for(
    store: LedgerStore,
    signer: LogSigner,
    cosigned_note: bytes,
    witness_keys: tuple[str, ...] = (),
) -> tuple[int, list[str]]:
    """Check a witness's cosigned note and return (size, its cosignature lines to store).

    The note must be one of this log's checkpoints (our signature verifies and its text is the
    stored checkpoint of that size). Every other line must be a well-formed ``cosignature/v1``
    line; a line from a witness pinned in trust.json must verify (``open_note``), and lines
    from unpinned keys are kept only up to :data:`MAX_UNPINNED_COSIGNATURES` per checkpoint.
    Which witnesses count is decided by each verifier against its own trust.json."""
    from protocols.checkpoint import (
        KEY_TYPE_COSIGNATURE_V1,
        NoteSignatureError,
        UntrustedNoteError,
        open_note,
        parse_note,
        parse_verifier_key,
    )

    cp = verify_checkpoint_note(signer, cosigned_note)
    stored = store.checkpoint(cp.size)
    if stored is None or parse_note(stored.signed_note).text != parse_note(cosigned_note).text:
        raise VerificationError(
            f"the cosigned checkpoint of size {cp.size} is not one this log issued",
            reason_code="E_CHECKPOINT_INVALID",
        )
    note = parse_note(cosigned_note)
    pinned = [parse_verifier_key(k) for k in witness_keys]
    pinned_ids = {(v.name, v.key_id) for v in pinned}
    if pinned:
        try:
            open_note(cosigned_note, pinned)  # every line of a pinned witness must verify
        except UntrustedNoteError:
            pass  # no pinned witness in this note
        except NoteSignatureError as exc:
            raise VerificationError(
                f"a pinned witness's cosignature does not verify: {exc}",
                reason_code="E_CHECKPOINT_INVALID",
            ) from exc
    own = (signer.verifier.name, signer.verifier.key_id)
    lines: list[str] = []
    unpinned: list[str] = []
    for sig in note.signatures:
        if (sig.name, sig.key_id) == own:
            continue
        if sig.timestamp is None:
            raise VerificationError(
                f"signature line of {sig.name!r} is not a cosignature/v1 line (type "
                f"{KEY_TYPE_COSIGNATURE_V1:#x}: 8-byte timestamp + Ed25519 signature)",
                reason_code="E_CHECKPOINT_INVALID",
            )
        line = sig.line.rstrip("\n")
        (lines if (sig.name, sig.key_id) in pinned_ids else unpinned).append(line)
    if not lines and not unpinned:
        raise VerificationError(
            "the note carries no cosignature besides the log's own",
            reason_code="E_CHECKPOINT_INVALID",
        )
    if unpinned:
        have = store.cosignature_lines(cp.size)
        stored_unpinned = [ln for ln in have if _line_id(ln) not in pinned_ids]
        room = MAX_UNPINNED_COSIGNATURES - len(stored_unpinned)
        new = [ln for ln in unpinned if ln not in have]
        if len(new) > room:
            raise VerificationError(
                f"checkpoint {cp.size} already has {len(stored_unpinned)} cosignatures from "
                "witnesses trust.json does not pin (the limit); ask the operator to pin your "
                "witness key (`coordinator init --witness`)",
                reason_code="E_OVERSIZE",
            )
        lines += unpinned
    return cp.size, lines


def _line_id(line: str) -> tuple[str, int]:
    from protocols.checkpoint import parse_note

    sig = parse_note(b"x\n\n" + (line + "\n").encode()).signatures[0]
    return sig.name, sig.key_id


# --------------------------------------------------------------------------------------------
# Reference versions (bundles and diffs, numpy only)


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
        self._bundles: OrderedDict[int, tuple[ReferenceBundle, int]] = OrderedDict()  # index -> (bundle, bytes)
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
                "('genesis', 'site_update', 'federated_round')",
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
        nearest cached version or full bundle (genesis, federated round) below it, plus every
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
            names += entry_new_conditions(entry.envelope)
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


# --------------------------------------------------------------------------------------------
# keys and the trust policy


def new_private_key(path: Path) -> Ed25519PrivateKey:
    """A fresh Ed25519 key saved as PEM PKCS#8 (mode 0600) via :mod:`protocols.keys`."""
    from protocols.keys import generate_private_key, save_private_key

    key = generate_private_key()
    save_private_key(key, path)
    return key


def load_key(path: Path) -> Ed25519PrivateKey:
    from protocols.keys import load_private_key

    return load_private_key(path)


def read_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    from protocols.keys import load_public_key

    return load_public_key(path)


def key_id_of(key: LogSigner | Ed25519PublicKey | Ed25519PrivateKey) -> str:
    if isinstance(key, LogSigner):
        return key.vkey
    from protocols.keys import key_id

    return key_id(key)


def trust_json(
    *,
    origin: str,
    log_key: LogSigner,
    operator_keys: list[Ed25519PrivateKey] | list[Ed25519PublicKey],
    tls_root_pem: bytes,
    witness_keys: tuple[str, ...] = (),
    witnesses_required: int = 0,
) -> bytes:
    """The initial trust policy (no sites yet) as canonical JSON: what sites and auditors pin."""
    from protocols.errors import PolicyError
    from protocols.policy import build_trust

    try:
        policy = build_trust(
            origin=origin,
            log_public_key=log_key.vkey,
            operator_keys=[
                k.public_key() if hasattr(k, "public_key") else k for k in operator_keys
            ],
            tls_root_pem=tls_root_pem.decode("ascii"),
            witness_keys=witness_keys,
            witnesses_required=witnesses_required,
        )
    except PolicyError as exc:
        raise ConfigError(
            f"--witness / --witnesses-required: {exc.message}; pass verifier keys from "
            "`scarches-fl audit witness-keygen` and a count between 0 and their number"
        ) from exc
    return bytes(policy.to_json())


def read_trust_policy(path: Path) -> TrustPolicy:
    from protocols.policy import read_trust

    return read_trust(path)


def tls_server_name(trust: object, address: str) -> str | None:
    """The name to check the server certificate against when ``address``'s host is not one of
    the certificate's names (e.g. ``127.0.0.1`` for a certificate made for ``coordinator``)."""
    pem = trust.get("tls_root_pem") if isinstance(trust, dict) else None
    if not pem:
        return None
    import ipaddress

    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    ips = [str(i) for i in san.get_values_for_type(x509.IPAddress)]
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in names or host in ips:
        return None
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
    return names[0] if names else (ips[0] if ips else None)


# --------------------------------------------------------------------------------------------
# the ledger state and entries


def protocol_limits(cfg: CoordinatorConfig) -> Limits:
    """:class:`protocols.limits.Limits` with this coordinator's envelope and diff caps."""
    import dataclasses

    from protocols.limits import DEFAULT_LIMITS

    return dataclasses.replace(
        DEFAULT_LIMITS,
        max_envelope_bytes=cfg.limits.max_envelope_bytes,
        max_diff_bytes=cfg.limits.max_diff_bytes,
    )


def condition_cap(cfg: CoordinatorConfig) -> ConditionCap:
    """The operator's :class:`protocols.ledger.ConditionCap` from ``limits`` in the config."""
    from protocols.ledger import ConditionCap

    return ConditionCap(
        per_site=cfg.limits.max_conditions_per_site,
        per_reference=cfg.limits.max_conditions_per_reference,
    )


def _hex(name: str) -> str:
    return name[7:] if name.startswith("sha256:") else name


def blob_lookup(blobs: BlobStore, extra: dict[str, bytes] | None = None) -> BlobLookup:
    """``BlobLookup`` (hex sha256 -> bytes or None) over the blob store (+ ``extra``)."""

    def lookup(hexname: str) -> bytes | None:
        if extra and hexname in extra:
            return extra[hexname]
        name = "sha256:" + hexname
        if not blobs.exists(name):
            return None
        return blobs.read(name, verify=False)  # the ledger checks the hash itself

    return lookup


SNAPSHOT_META = "ledger-state.json"


def write_snapshot(snapshot: StateSnapshot, cfg: CoordinatorConfig) -> Path:
    """Write a :class:`protocols.ledger.StateSnapshot` under ``paths.snapshot``: the tensors
    file (named by its SHA-256) first, then the JSON that names it, each atomically; older
    tensor files go last. A crash at any point leaves the previous snapshot or the new one."""
    meta, tensors = snapshot.encode()
    d = cfg.path(cfg.paths.snapshot)
    d.mkdir(parents=True, exist_ok=True)
    name = f"ledger-state-{hashlib.sha256(tensors).hexdigest()}.safetensors"
    atomic_write(d / name, tensors, durable=cfg.durable)
    atomic_write(d / SNAPSHOT_META, meta, durable=cfg.durable)
    for old in d.glob("ledger-state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return d / SNAPSHOT_META


def _restore_snapshot(
    store: LedgerStore, trust: TrustPolicy, cfg: CoordinatorConfig
) -> LedgerState | None:
    """The state a snapshot recorded, checked against the log; None (with a warning) when there
    is none that holds."""
    import json

    from protocols.ledger import restore_state

    path = cfg.path(cfg.paths.snapshot) / SNAPSHOT_META
    if not path.is_file():
        return None
    try:
        meta = path.read_bytes()
        sha = json.loads(meta)["body"]["tensors_sha256"]
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ValueError("tensors_sha256 is not 64 hex digits")
        tensors = (path.parent / f"ledger-state-{sha}.safetensors").read_bytes()
        return restore_state(
            trust,
            meta,
            tensors,
            store.leaf_hashes(),
            limits=protocol_limits(cfg),
            condition_cap=condition_cap(cfg),
        )
    except (OSError, ValueError, KeyError, TypeError, VerificationError) as exc:
        logger.warning("%s: not used (%s); replaying the whole log", path, exc)
        return None


def replay_state(store: LedgerStore, blobs: BlobStore, cfg: CoordinatorConfig) -> LedgerState:
    """The :class:`protocols.ledger.LedgerState` of every stored entry: from the snapshot when
    one matches the log (then only the entries after it are applied), else replayed from the
    pinned roots of trust.json. Refuses to start on a broken log."""
    from protocols.ledger import LedgerState

    trust = read_trust_policy(cfg.path(cfg.paths.trust))
    state = _restore_snapshot(store, trust, cfg)
    if state is not None:
        try:
            _apply_stored(state, store, blobs, state.size)
            return state
        except Exception as exc:  # noqa: BLE001 - the full replay below names a real break
            logger.warning(
                "entries after the snapshot do not apply (%s); replaying the whole log", exc
            )
    state = LedgerState(trust, limits=protocol_limits(cfg), condition_cap=condition_cap(cfg))
    _apply_stored(state, store, blobs, 0)
    return state


def _apply_stored(state: LedgerState, store: LedgerStore, blobs: BlobStore, start: int) -> None:
    lookup = blob_lookup(blobs)
    for e in store.entries(start, store.size):
        try:
            state.apply(e.envelope, lookup)
        except VerificationError as exc:
            from coordinator.storage import StorageError

            raise StorageError(
                f"{store.db_path}: entry {e.index} does not replay ({exc}); the ledger or its "
                "blobs are damaged, restore the state directory from a backup"
            ) from exc


def apply_entry(
    state: LedgerState, entry: StoredEntry, blobs: BlobStore, cfg: CoordinatorConfig
) -> AppliedEntry:
    """Apply a stored entry (appended by this or another process) to the state."""
    return state.apply(entry.envelope, blob_lookup(blobs))


@dataclass(frozen=True)
class CheckedUpdate:
    site_id: str
    sequence: int
    new_conditions: tuple[str, ...]
    kind: str = "site_update"


def _checked_update(applied: AppliedEntry) -> CheckedUpdate:
    from protocols.update import AcceptedUpdate

    acc = applied.accepted_update
    if not isinstance(acc, AcceptedUpdate):  # pragma: no cover - only site updates reach here
        raise VerificationError(
            "the ledger applied an entry that is not a site update", reason_code="E_INTERNAL"
        )
    return CheckedUpdate(acc.site_id, acc.sequence, tuple(acc.new_conditions))


def check_and_apply_site_update(
    state: LedgerState,
    envelope: bytes,
    diff: bytes,
    limits: Limits,
    *,
    authenticated: AuthenticatedUpdate | AuthenticatedContribution | None = None,
) -> CheckedUpdate:
    """Run validation of a submitted site update or label contribution against ``state`` and
    apply it (the state is unchanged when it raises). Only these two site-signed kinds are
    accepted here; a label contribution comes with an empty ``diff``.

    ``authenticated``: :func:`authenticate_submission`'s result for these bytes (from the
    request thread): a site update's envelope is then not parsed nor its signature verified
    again while the policy in force still holds the same active key (``LedgerState.apply``)."""
    from protocols.dsse import parse_envelope
    from protocols.errors import UpdateRejectedError
    from protocols.labels import LABEL_CONTRIBUTION_TYPE, AuthenticatedContribution
    from protocols.ledger import PAYLOAD_TYPES
    from protocols.update import SITE_UPDATE_TYPE

    if (
        authenticated is not None
        and authenticated.envelope == envelope
        and not isinstance(authenticated, AuthenticatedContribution)
    ):
        # authenticate_update parsed it strictly and checked its payloadType
        applied = state.apply(
            envelope, blob_lookup_bytes({}), diff_bytes=diff, authenticated=authenticated
        )
        return _checked_update(applied)
    try:
        env = parse_envelope(envelope, limits=limits)
    except VerificationError as exc:
        code = exc.reason_code if exc.reason_code == "E_OVERSIZE" else "E_ENVELOPE_MALFORMED"
        raise UpdateRejectedError(code, exc.message or str(exc)) from exc
    if env.payload_type == LABEL_CONTRIBUTION_TYPE:
        applied = state.apply(envelope, blob_lookup_bytes({}), diff_bytes=diff)
        acc = applied.accepted_update
        if acc is None:  # pragma: no cover - the ledger records what it accepted
            raise VerificationError(
                "the ledger applied a label contribution without recording it",
                reason_code="E_INTERNAL",
            )
        return CheckedUpdate(acc.site_id, acc.sequence, (), kind="label_contribution")
    if env.payload_type != SITE_UPDATE_TYPE:
        kind = PAYLOAD_TYPES.get(env.payload_type, "unknown")
        raise UpdateRejectedError(
            "E_PAYLOAD_TYPE",
            f"SubmitUpdate takes site updates ({SITE_UPDATE_TYPE}) and label contributions "
            f"({LABEL_CONTRIBUTION_TYPE}); this envelope is a {kind} entry, which only the "
            "operator appends",
        )
    # The submitted diff is handed over as bytes: the update rules compare it with the signed
    # sha256 and size only after the signature verified (E_DIFF_*_MISMATCH), never look it up
    # under the name the unverified payload claims (which answered a forger E_BLOB_MISSING).
    applied = state.apply(envelope, blob_lookup_bytes({}), diff_bytes=diff)
    return _checked_update(applied)


def authenticate_submission(
    state: LedgerState, envelope: bytes, limits: Limits
) -> AuthenticatedUpdate | AuthenticatedContribution:
    """:func:`protocols.update.authenticate_update` against the policy in force: the
    :class:`~protocols.update.AuthenticatedUpdate` (its ``site_id`` is the signer's) or an
    :class:`~protocols.errors.UpdateRejectedError` whose code means "not authenticated"."""
    from protocols.labels import LABEL_CONTRIBUTION_TYPE, authenticate_contribution
    from protocols.update import authenticate_update

    if _payload_type(envelope) == LABEL_CONTRIBUTION_TYPE:
        return authenticate_contribution(envelope, state.policy, limits=limits)
    return authenticate_update(envelope, state.policy, limits=limits)


def _payload_type(envelope: bytes) -> str | None:
    """The payloadType an envelope claims (lenient, unverified: only picks the rules)."""
    import json

    try:
        env = json.loads(envelope)
        return env.get("payloadType") if isinstance(env, dict) else None
    except ValueError:
        return None


def blob_lookup_bytes(mapping: dict[str, bytes]) -> BlobLookup:
    return lambda hexname: mapping.get(hexname)


def claimed_update(envelope: bytes, limits: Limits) -> tuple[str | None, int | None]:
    """The (site id, sequence) a site update *claims*: unverified, for the log line of a
    submission refused before its signature was checked (logged as ``claimed_site``, never as
    ``site``), so a plain (fast, linear) JSON parse is enough."""
    import base64
    import json

    if len(envelope) > limits.max_envelope_bytes:
        return None, None
    try:
        env = json.loads(envelope)
        payload = json.loads(base64.b64decode(env["payload"], validate=True))
        if payload.get("kind") not in ("site_update", "label_contribution"):
            return None, None
        sid, seq = payload.get("site_id"), payload.get("sequence")
    except Exception:  # noqa: BLE001 - unparseable: no claim
        return None, None
    sid = sid if isinstance(sid, str) and 0 < len(sid) <= 64 else None
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
    return sid, seq


def site_status(state: LedgerState, site_id: str) -> dict[str, Any]:
    rec = state.policy.sites.get(site_id)
    if rec is None:
        return {"enrolled": False, "revoked": False, "key_ids": (), "last_sequence": 0}
    active = rec.active_key
    return {
        "enrolled": True,
        "revoked": active is None,
        "key_ids": tuple(k.key_id for k in rec.keys if k.status == "active"),
        "last_sequence": int(state.sequences.get(site_id, 0)),
    }


def known_sites(state: LedgerState) -> list[str]:
    return sorted(state.policy.sites)


def genesis_envelope(
    operator_key: Ed25519PrivateKey, *, bundle: ReferenceBundle, origin: str, blobs: list[BlobRef]
) -> bytes:
    from protocols.ledger import entry_blobs, make_genesis

    g = make_genesis(bundle, origin=origin, operator_keys=[operator_key])
    named = {(b.role, b.sha256, b.size) for b in entry_blobs(g.envelope)}
    ours = {(b.role, _hex(b.sha256), b.size) for b in blobs}
    if named != ours:  # pragma: no cover - both serialize with bundle_to_bytes
        raise VerificationError(
            "the genesis names other blobs than the ones stored", reason_code="E_INTERNAL"
        )
    return bytes(g.envelope)


def enroll_envelope(
    operator_key: Ed25519PrivateKey,
    state: LedgerState,
    *,
    site_id: str,
    public_key: Ed25519PublicKey,
    origin: str,
    log_size: int,
) -> bytes:
    from protocols.ledger import enrol_entry

    env = enrol_entry(
        origin=origin, site_id=site_id, public_key=public_key, operator_keys=[operator_key]
    )
    state.check(env, blob_lookup_bytes({}))  # the policy rules' own message when refused
    return bytes(env)


def revoke_envelope(
    operator_key: Ed25519PrivateKey, state: LedgerState, *, site_id: str, origin: str, log_size: int
) -> bytes:
    from protocols.ledger import revoke_entry

    env = revoke_entry(origin=origin, site_id=site_id, operator_keys=[operator_key])
    state.check(env, blob_lookup_bytes({}))
    return bytes(env)


def checked(state: LedgerState, envelope: bytes) -> bytes:
    """``envelope`` after the ledger rules accepted it as the next entry (no change yet)."""
    state.check(envelope, blob_lookup_bytes({}))
    return envelope


def countersign_rotation(
    operator_key: Ed25519PrivateKey, request: bytes, *, origin: str, what: str
) -> tuple[bytes, str]:
    """Check that ``request`` is a site's 'rotate' policy change for this log and add the
    operator's signature. The ledger rules (old and new site key signed it, the old key is the
    site's active one) are checked when it is appended."""
    from protocols.dsse import add_signatures
    from protocols.errors import PolicyError
    from protocols.ledger import entry_payload
    from protocols.policy import parse_policy_change

    if len(request) > 1024 * 1024:
        raise ConfigError(f"{what}: larger than 1 MiB; a rotation request is a few hundred bytes")
    try:
        kind, obj = entry_payload(request)
        if kind != "policy":
            raise PolicyError(f"it is a {kind} entry, not a policy change")
        change = parse_policy_change(obj)
    except VerificationError as exc:
        raise VerificationError(
            f"{what} is not a rotation request ({exc.message or exc}); the site makes it with "
            "its old and new key",
            reason_code=exc.reason_code,
        ) from exc
    if change.action != "rotate":
        raise VerificationError(
            f"{what} asks to {change.action!r}, not to rotate a key; use `coordinator enroll` "
            "or `coordinator revoke` for that",
            reason_code="E_POLICY_CHANGE",
        )
    if change.origin != origin:
        raise VerificationError(
            f"{what} is for log {change.origin!r}, this coordinator is {origin!r}",
            reason_code="E_ORIGIN_MISMATCH",
        )
    return bytes(add_signatures(request, [operator_key])), change.site_id


def entry_new_conditions(envelope: bytes) -> list[str]:
    from protocols.ledger import entry_payload

    _kind, obj = entry_payload(envelope)
    return list(obj["new_conditions"])


def apply_entry_diff(
    base: ReferenceBundle, entry: StoredEntry, diff_bytes: bytes
) -> ReferenceBundle:
    """Reference after a site update entry: ``apply_condition_diff`` (numpy only)."""
    from protocols.diff import apply_condition_diff, diff_from_bytes

    diff = diff_from_bytes(diff_bytes, max_bytes=len(diff_bytes))
    return apply_condition_diff(base, diff, entry_new_conditions(entry.envelope))
