"""What the operator's commands do: init, enroll, revoke, serve, status, health.

``init`` builds the whole state directory under a temporary name beside the target and renames
it into place at the end, so a failed or interrupted init never leaves a half-made state
directory. ``enroll`` and ``revoke`` append one operator-signed policy entry, ordered with a
running server's appends by SQLite's write lock (the server picks the entry up on its next
request).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from coordinator import ledger
from coordinator._tls import DEFAULT_TLS_NAMES, make_self_signed, tls_server_name
from coordinator.checkpoints import LogSigner, check_origin, load_log_signer, new_log_key
from coordinator.config import CoordinatorConfig, load_config, write_config
from coordinator.storage import StoredEntry
from protocols.bundle import atomic_write, fsync_dir
from protocols.errors import ConfigError
from protocols.keys import (
    generate_private_key,
    load_private_key,
    load_public_key,
    save_private_key,
)
from protocols.proto.serde import BlobRef

__all__ = [
    "InitResult",
    "init_state",
    "enroll_site",
    "revoke_site",
    "serve",
    "print_status",
    "check_health",
    "backup_state",
    "publish_federated_round",
    "publish_federated_labels",
    "rotate_site_key",
    "SERVE_RECORD",
    "listen_addresses",
]

logger = logging.getLogger(__name__)

#: Written by ``serve`` into the state directory: where it listens (for ``health``).
SERVE_RECORD = "serve.json"


@dataclass(frozen=True)
class InitResult:
    state_dir: Path
    origin: str
    digest: str
    n_genes: int
    n_conditions: int
    log_key_id: str
    tls_names: tuple[str, ...]
    trust_path: Path


def init_state(
    state_dir: str | os.PathLike[str],
    *,
    reference: str | os.PathLike[str],
    origin: str | None = None,
    tls_names: tuple[str, ...] | None = None,
    listen: str = "127.0.0.1:7443",
    durable: bool = True,
    witness_keys: tuple[str, ...] = (),
    witnesses_required: int = 0,
) -> InitResult:
    """Create a coordinator state directory publishing the bundle at ``reference``."""
    from coordinator.config import parse_listen
    from coordinator.storage import BlobStore, LedgerStore
    from protocols.bundle import bundle_to_bytes, read_bundle

    target = Path(state_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(
            f"--dir {target}: already exists and is not empty; a coordinator state directory "
            "is created once. Pick a new directory (or remove this one if it is a failed try)"
        )
    parse_listen(listen, where="--listen")
    bundle = read_bundle(reference)
    # The origin names the log: an auditor keeps what it verified per origin, so two ledgers
    # must not share one. Without --origin, the directory's name plus a random id recorded in
    # trust.json and coordinator.yaml (two `coord-state` directories get different names).
    origin = origin or f"scarches-fl.local/{target.resolve().name}-{secrets.token_hex(4)}"
    check_origin(origin)
    names = tuple(tls_names) if tls_names else DEFAULT_TLS_NAMES
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.init-", dir=target.parent))
    try:
        os.chmod(tmp, 0o750)
        cfg = CoordinatorConfig(origin=origin, listen=listen, durable=durable, state_dir=tmp)
        (tmp / "keys").mkdir(mode=0o700)
        log_key = new_log_key(cfg.path(cfg.paths.log_key), origin)
        operator_key = generate_private_key()
        save_private_key(operator_key, cfg.path(cfg.paths.operator_key))
        cert_pem = make_self_signed(
            cfg.path(cfg.tls.certificate), cfg.path(cfg.tls.private_key), names=names
        )
        write_config(cfg)
        blobs = BlobStore(cfg.path(cfg.paths.blobs), durable=durable)
        manifest_bytes, model_bytes = bundle_to_bytes(bundle)
        refs = [
            BlobRef(role="manifest", sha256=blobs.put(manifest_bytes), size=len(manifest_bytes)),
            BlobRef(role="safetensors", sha256=blobs.put(model_bytes), size=len(model_bytes)),
        ]
        signer = load_log_signer(cfg.path(cfg.paths.log_key), origin=origin)
        envelope = ledger.genesis_envelope(operator_key, bundle=bundle, origin=origin, blobs=refs)
        store = LedgerStore(cfg.path(cfg.paths.database), blobs, durable=durable)
        try:
            with store.writer() as w:
                w.append(
                    envelope,
                    kind="genesis",
                    blobs=refs,
                    sign_checkpoint=signer.sign_checkpoint,
                )
        finally:
            store.close()
        trust_bytes = _trust_json(
            origin=origin,
            log_key=log_key,
            operator_keys=[operator_key],
            tls_root_pem=cert_pem,
            witness_keys=witness_keys,
            witnesses_required=witnesses_required,
        )
        atomic_write(cfg.path(cfg.paths.trust), trust_bytes, durable=durable)
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
        if durable:
            fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return InitResult(
        state_dir=target,
        origin=origin,
        digest=bundle.digest,
        n_genes=len(bundle.genes),
        n_conditions=len(bundle.conditions),
        log_key_id=log_key.vkey,
        tls_names=names,
        trust_path=target / cfg.paths.trust,
    )


def _open(state_dir: str | os.PathLike[str]) -> Any:
    from coordinator.service import Registry

    return Registry(load_config(state_dir))


def enroll_site(
    state_dir: str | os.PathLike[str],
    *,
    site_id: str,
    public_key: str | os.PathLike[str] | Ed25519PublicKey,
) -> StoredEntry:
    """Append an operator-signed policy entry enrolling ``site_id`` with ``public_key`` (a key,
    or the path of a public key file)."""
    pub = (
        public_key
        if isinstance(public_key, Ed25519PublicKey)
        else load_public_key(public_key)
    )
    cfg = load_config(state_dir)
    operator_key = load_private_key(cfg.path(cfg.paths.operator_key))
    with _open(state_dir) as reg:
        return reg.append_operator_entry(
            lambda state, size: (
                ledger.enroll_envelope(
                    operator_key,
                    state,
                    site_id=site_id,
                    public_key=pub,
                    origin=cfg.origin,
                    log_size=size,
                ),
                "policy",
                [],
            )
        )


def revoke_site(state_dir: str | os.PathLike[str], *, site_id: str) -> StoredEntry:
    """Append an operator-signed policy entry revoking every key of ``site_id``."""
    cfg = load_config(state_dir)
    operator_key = load_private_key(cfg.path(cfg.paths.operator_key))
    with _open(state_dir) as reg:
        return reg.append_operator_entry(
            lambda state, size: (
                ledger.revoke_envelope(
                    operator_key, state, site_id=site_id, origin=cfg.origin, log_size=size
                ),
                "policy",
                [],
            )
        )


def label_policy(
    state_dir: str | os.PathLike[str],
    *,
    action: str,
    k: int | None = None,
    count_bucket: int | None = None,
    max_types: int | None = None,
    dp_epsilon: float | None = None,
    dp_delta: float | None = None,
    dp_clip_norm: float | None = None,
    no_dp: bool = False,
    label_key: str | None = None,
    name: str | None = None,
    target: str | None = None,
) -> tuple[StoredEntry, Any]:
    """Append an operator-signed ``label_policy`` entry (:mod:`protocols.labels`).

    ``settings``: the given fields replace those of the policy in force (the rest stay);
    ``dp_*`` set a Gaussian mechanism requirement (all three, or all from the policy in
    force), ``no_dp`` drops it. ``accept``: ``name`` (``<site>:<type>``) joins the vocabulary of
    ``label_key`` as ``target``. ``map``: ``name`` becomes the existing type ``target``.
    Returns the entry and the label policy in force after it."""
    from dataclasses import replace

    from protocols.errors import VerificationError
    from protocols.labels import DPRequirement, LabelPolicyChange, label_policy_entry

    cfg = load_config(state_dir)
    operator_key = load_private_key(cfg.path(cfg.paths.operator_key))

    def build(state: Any, _size: int) -> tuple[bytes, str, list]:
        if action == "settings":
            cur = state.labels.policy
            dp = None if no_dp else cur.dp
            if not no_dp and any(v is not None for v in (dp_epsilon, dp_delta, dp_clip_norm)):
                base = dp or DPRequirement(clip_norm=float("nan"), epsilon=float("nan"),
                                           delta=float("nan"))
                dp = DPRequirement(
                    clip_norm=base.clip_norm if dp_clip_norm is None else float(dp_clip_norm),
                    epsilon=base.epsilon if dp_epsilon is None else float(dp_epsilon),
                    delta=base.delta if dp_delta is None else float(dp_delta),
                )
                if any(v != v for v in (dp.clip_norm, dp.epsilon, dp.delta)):  # NaN: not given
                    raise ConfigError(
                        "a DP requirement needs --dp-epsilon, --dp-delta and --dp-clip-norm "
                        "(the policy in force has none to keep)"
                    )
            new = replace(
                cur,
                k=cur.k if k is None else int(k),
                count_bucket=cur.count_bucket if count_bucket is None else int(count_bucket),
                max_types=cur.max_types if max_types is None else int(max_types),
                dp=dp,
            )
            change = LabelPolicyChange("settings", cfg.origin, settings=new)
        else:
            if not (label_key and name and target):
                raise ConfigError(f"label-policy {action} needs --label-key, --name and "
                                  + ("--as" if action == "accept" else "--to"))
            change = LabelPolicyChange(action, cfg.origin, label_key=label_key, name=name,
                                       target=target)
        envelope = label_policy_entry(change, [operator_key])
        try:
            return ledger.checked(state, envelope), "label_policy", []
        except VerificationError as exc:
            raise ConfigError(f"label-policy {action}: {exc.message} [{exc.reason_code}]") from exc

    with _open(state_dir) as reg:
        entry = reg.append_operator_entry(build)
        return entry, reg.state.labels.policy


def label_state(state_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The label policy, vocabulary decisions and contributions in force (JSON-ready), and
    ``pending``: per label level, the site types (``<site>:<name>``) that contributions brought
    and no ``accept`` or ``map`` decided yet, the only names those actions take (ADR 0046)."""
    with _open(state_dir) as reg:
        labels = reg.state.labels
        levels = sorted({c.label_key for c in labels.contributions})
        pending = {lvl: labels.pending_names(lvl) for lvl in levels}
        return {**labels.to_json_obj(), "pending": {k: v for k, v in pending.items() if v}}


def rotate_site_key(
    state_dir: str | os.PathLike[str], *, request: str | os.PathLike[str]
) -> tuple[StoredEntry, str]:
    """Countersign a site's key rotation request (signed by its old and new key) with the
    operator key and append it. Returns (entry, site id)."""
    cfg = load_config(state_dir)
    operator_key = load_private_key(cfg.path(cfg.paths.operator_key))
    path = Path(request)
    try:
        with path.open("rb") as fh:
            data = fh.read(ledger.MAX_ROTATION_REQUEST_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"--request {path}: cannot read it: {exc.strerror}") from exc
    envelope, site_id = ledger.countersign_rotation(
        operator_key, data, origin=cfg.origin, what=str(path)
    )
    with _open(state_dir) as reg:
        entry = reg.append_operator_entry(
            lambda state, _size: (ledger.checked(state, envelope), "policy", [])
        )
    return entry, site_id


def serve(
    state_dir: str | os.PathLike[str],
    *,
    listen: str | None = None,
    insecure: bool = False,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM (or ``stop`` is set). Returns the exit code."""
    from coordinator.server import RegistryServer, check_listen_address
    from coordinator.service import Registry

    cfg = load_config(state_dir)
    address = listen or cfg.listen
    check_listen_address(address, insecure=insecure)
    lock = _serve_lock(Path(state_dir))
    try:
        registry = Registry(cfg)
    except BaseException:
        lock.close()
        raise
    stop = stop or threading.Event()
    server = RegistryServer(registry, cfg, listen=address, insecure=insecure)
    try:
        registry.start_writer()
        port = server.start()
        listening, dial = listen_addresses(address, port)
        record = {
            "pid": os.getpid(),
            "state_dir": str(Path(state_dir).resolve()),
            "listen": address,
            "port": port,
            "address": dial,
            "insecure": insecure,
        }
        atomic_write(Path(state_dir) / SERVE_RECORD, json.dumps(record).encode(), durable=False)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        where = (
            listening
            if listening == dial
            else f"{listening} (every interface; on this machine dial {dial})"
        )
        print(
            f"serving {cfg.origin} on {where} "
            f"({'INSECURE plain text' if insecure else 'TLS'}); tree size {registry.size}",
            file=sys.stderr,
            flush=True,
        )
        if ready is not None:
            ready.set()
        while not stop.wait(0.5):
            pass
        logger.info("stopping: draining in-flight calls")
    finally:
        server.stop(grace=5.0)
        registry.close()
        with contextlib.suppress(FileNotFoundError):
            (Path(state_dir) / SERVE_RECORD).unlink()
        lock.close()
    return 0


def listen_addresses(listen: str, port: int) -> tuple[str, str]:
    """(where the server listens, the address a client on this machine dials) for ``listen``
    (``HOST:PORT`` as given, the port possibly 0) and the port it got: a wildcard host (every
    interface) is dialled at loopback."""
    host = listen.rsplit(":", 1)[0]
    bare = host.strip("[]")
    loopback = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(bare)
    if loopback is None:
        return f"{host}:{port}", f"{host}:{port}"
    return f"{host or '0.0.0.0'}:{port}", f"{loopback}:{port}"


def _serve_lock(state_dir: Path) -> Any:
    """An exclusive lock on ``STATE/serve.lock`` for the server's lifetime: one server per
    state directory (the OS releases it when the process dies, also on kill -9)."""
    import fcntl

    fh = (state_dir / "serve.lock").open("a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        fh.close()
        raise ConfigError(
            f"--dir {state_dir}: another `coordinator serve` is already running on this state "
            "directory (serve.lock is held); stop it first, or check `coordinator health`"
        ) from exc
    return fh


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def print_status(
    state_dir: str | os.PathLike[str], *, as_json: bool = False, verify: bool = False
) -> int:
    with _open(state_dir) as reg:
        st = reg.status()
        if verify:
            reg.store.check_integrity()
            reg.signer.verify(st["checkpoint"]["note"].encode())
            st["verified"] = True
    if as_json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    cp = st["checkpoint"]
    print(f"origin        {st['origin']}")
    print(f"tree size     {st['tree_size']}")
    when = ""
    if cp.get("signed_at"):
        import datetime as _dt

        stamp = _dt.datetime.fromtimestamp(cp["signed_at"], _dt.UTC)
        when = f", signed {stamp.strftime('%Y-%m-%d %H:%M:%S')} UTC"
    print(f"checkpoint    size {cp['size']}, root {cp['root_hash']}{when}")
    if verify:
        print("verified      leaf hashes, root and checkpoint signature OK")
    print(f"sites         {len(st['sites'])}")
    for site_id, info in sorted(st["sites"].items()):
        state = "revoked" if info.get("revoked") else ("enrolled" if info.get("enrolled") else "-")
        print(
            f"  {site_id:<24} {state:<9} contributions {info['contributions']:<5} "
            f"last seq {info['last_sequence']}"
        )
    b = st["blobs"]
    print(f"blobs         {b['count']} ({_human(b['bytes'])}), {b['orphans']} orphaned")
    d = st["disk"]
    print(
        f"disk          database {_human(d['database_bytes'])}, blobs {_human(d['blob_bytes'])}, "
        f"reference cache {_human(d['cache_bytes'])}"
    )
    return 0


def check_health(
    state_dir: str | os.PathLike[str], *, address: str | None = None, timeout: float = 3.0
) -> int:
    """Exit 0 when the server answers Health with ``serving``; 1 otherwise."""
    from protocols.registry_client import RegistryClient, RegistryError

    cfg = load_config(state_dir)
    insecure = False
    if address is None:
        rec = _serve_record(Path(state_dir))
        if rec is None:
            print(
                f"not serving: no `coordinator serve` runs on {state_dir} (no live serve.json "
                "naming this directory; a backup or a copy is never served by the original's "
                "server). Pass --address HOST:PORT to ask a server at that address.",
                file=sys.stderr,
            )
            return 1
        address, insecure = rec["address"], bool(rec.get("insecure"))
    trust = json.loads(cfg.path(cfg.paths.trust).read_bytes())
    server_name = tls_server_name(trust, address)
    try:
        with RegistryClient(
            address,
            trust=None if insecure else trust,
            insecure=insecure,
            timeout=timeout,
            retries=0,
            server_name=server_name,
        ) as client:
            h = client.health()
    except RegistryError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print(f"{h.status}: {h.origin}, tree size {h.tree_size}")
    return 0 if h.status == "serving" else 1


def _serve_record(state_dir: Path) -> dict[str, Any] | None:
    """The record of the server running on ``state_dir``: None when there is none, when its
    process is gone (killed, the file left behind), or when it names another directory (a copy
    made with ``cp -r`` while the original was served)."""
    try:
        rec = json.loads((state_dir / SERVE_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("state_dir") != str(state_dir.resolve()):
        return None
    try:
        os.kill(int(rec["pid"]), 0)
    except ProcessLookupError:
        return None
    except (PermissionError, KeyError, TypeError, ValueError):
        pass  # alive under another user, or a record without a pid: let the call decide
    return rec


def backup_state(
    state_dir: str | os.PathLike[str], *, out: str | os.PathLike[str]
) -> tuple[int, int]:
    """Copy a state directory consistently, also while ``serve`` runs. Returns (tree size of
    the copy, number of blobs). Built under a temporary name, renamed into place at the end."""
    import sqlite3

    from coordinator.storage import BlobStore, LedgerStore

    src = Path(state_dir)
    cfg = load_config(src)
    target = Path(out)
    if target.exists():
        raise ConfigError(f"--out {target}: already exists; back up into a new directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.backup-", dir=target.parent))
    try:
        # Everything except the database and the cache, file by file (blobs are immutable).
        db = cfg.path(cfg.paths.database).resolve()
        cache = cfg.path(cfg.paths.cache).resolve()
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if path.resolve() in (db, Path(str(db) + "-wal"), Path(str(db) + "-shm")):
                continue
            if cache in path.resolve().parents or path.resolve() == cache:
                continue
            if rel.name in (SERVE_RECORD, "serve.lock") or rel.name.startswith("."):
                continue
            dest = tmp / rel
            if path.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
            elif path.is_file():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
        # The database through SQLite's online backup API: a consistent snapshot.
        dest_db = tmp / Path(cfg.paths.database)
        dest_db.parent.mkdir(parents=True, exist_ok=True)
        with (
            contextlib.closing(sqlite3.connect(db)) as s_conn,
            contextlib.closing(sqlite3.connect(dest_db)) as d_conn,
        ):
            s_conn.backup(d_conn)
        # Blobs of entries committed after the blob copy above are in blob_data or were fsynced
        # before their entry; check the copy opens and every named blob is there.
        copy_cfg = load_config(tmp)
        blobs = BlobStore(copy_cfg.path(copy_cfg.paths.blobs))
        store = LedgerStore(dest_db, blobs)  # checks the tree against the checkpoint
        src_blobs = BlobStore(cfg.path(cfg.paths.blobs))
        for name in store.referenced_blobs():
            if not blobs.exists(name):
                blobs.put(src_blobs.read(name))
        size = store.size
        store.close()
        n_blobs = sum(1 for _ in blobs.iter_names())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return size, n_blobs


def publish_federated_round(
    state_dir: str | os.PathLike[str],
    *,
    aggregate: Any,
    round_number: int,
    base_size: int,
    base_digest: str,
    contributors: list[tuple[str, str]],
) -> StoredEntry:
    """Append an operator-signed ``federated_round`` entry whose aggregate (a
    :class:`protocols.bundle.ReferenceBundle`) becomes the new reference: its two blobs are
    written and fsynced first, then the entry and its checkpoint commit together. For the
    Flower ServerApp at the end of a round; ``contributors`` is ``[(site_id, "sha256:<hex>"
    digest of its contribution), ...]``. Works while ``serve`` runs on the same directory."""
    from protocols.ledger import entry_blobs, make_federated_round

    cfg = load_config(state_dir)
    operator_key = load_private_key(cfg.path(cfg.paths.operator_key))
    entry = make_federated_round(
        aggregate,
        origin=cfg.origin,
        round_number=round_number,
        base_size=base_size,
        base_digest=base_digest,
        contributors=contributors,
        operator_keys=[operator_key],
    )
    with _open(state_dir) as reg:
        refs = []
        for ref in entry_blobs(entry.envelope):
            name = reg.blobs.put(entry.blobs[ref.sha256])
            refs.append(BlobRef(role=ref.role, sha256=name, size=ref.size))
        return reg.append_operator_entry(
            lambda _state, _size: (bytes(entry.envelope), "federated_round", refs)
        )


def publish_federated_labels(
    state_dir: str | os.PathLike[str],
    *,
    labelled: Any,
    tensor_names: list[str],
    round_number: int,
    labels_record: str,
) -> StoredEntry:
    """Append the operator-signed ``federated_labels`` entry that publishes a federated run's
    label knowledge (``labelled``: the run's bundle, its final aggregate plus the label
    knowledge and the tensors ``tensor_names``; ``labels_record``: ``"sha256:<hex>"`` of the
    run's signed ``rounds/labels.json``). Its base is the ledger's head when the write lock is
    held, which the ledger accepts only right after the round it labels (ADR 0049)."""
    from protocols.ledger import entry_blobs, make_federated_labels

    cfg = load_config(state_dir)
    operator_key = load_private_key(cfg.path(cfg.paths.operator_key))

    def make(size: int, digest: str) -> Any:
        return make_federated_labels(
            labelled,
            tensor_names=tensor_names,
            origin=cfg.origin,
            round_number=round_number,
            base_size=size,
            base_digest=digest,
            labels_record=labels_record,
            operator_keys=[operator_key],
        )

    with _open(state_dir) as reg:
        blobs = make(1, labelled.digest).blobs  # content-addressed: the same for every base
        names = {sha: reg.blobs.put(data) for sha, data in blobs.items()}

        def build(state: Any, size: int) -> tuple[bytes, str, list[BlobRef]]:
            entry = make(size, str(state.digest_at(size)))
            state.check(entry.envelope, entry.blobs.get)  # refused here: nothing is appended
            refs = [
                BlobRef(role=r.role, sha256=names[r.sha256], size=r.size)
                for r in entry_blobs(entry.envelope)
            ]
            return bytes(entry.envelope), "federated_labels", refs

        return reg.append_operator_entry(build)


def _trust_json(
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
