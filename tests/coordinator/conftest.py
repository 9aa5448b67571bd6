"""A tiny consortium on loopback: a coordinator state, enrolled site keys, a TLS server."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coordinator.admin import SERVE_RECORD, enroll_site, init_state, serve
from protocols.bundle import ReferenceBundle, bundle_from_bytes, write_bundle
from protocols.keys import generate_private_key, save_public_key
from protocols.registry_client import RegistryClient
from tests.coordinator.synth import synthetic_diff, synthetic_reference

ORIGIN = "test.scarches-fl.local/ledger"


@dataclass
class Site:
    site_id: str
    key: object
    sequence: int = 0

    def next_seq(self) -> int:
        self.sequence += 1
        return self.sequence


@dataclass
class Consortium:
    state: Path
    trust_path: Path
    reference: ReferenceBundle
    sites: dict[str, Site] = field(default_factory=dict)

    @property
    def trust(self) -> dict:
        return json.loads(self.trust_path.read_bytes())

    def add_site(self, site_id: str, tmp: Path) -> Site:
        key = generate_private_key()
        pub = tmp / f"{site_id}.pub"
        save_public_key(key, pub)
        enroll_site(self.state, site_id=site_id, public_key=pub)
        site = Site(site_id, key)
        self.sites[site_id] = site
        return site


def make_consortium(
    tmp: Path, *, sites: tuple[str, ...] = ("site-a", "site-b"), **ref_kw
) -> Consortium:
    ref = synthetic_reference(**ref_kw)
    write_bundle(tmp / "reference", ref)
    init_state(tmp / "state", reference=tmp / "reference", origin=ORIGIN)
    c = Consortium(tmp / "state", tmp / "state" / "trust.json", ref)
    for s in sites:
        c.add_site(s, tmp)
    return c


@pytest.fixture
def consortium(tmp_path: Path) -> Consortium:
    return make_consortium(tmp_path)


@dataclass
class RunningServer:
    address: str
    thread: threading.Thread
    stop: threading.Event

    def client(self, consortium: Consortium, **kw) -> RegistryClient:
        return RegistryClient(self.address, trust=consortium.trust, timeout=30, **kw)


@contextlib.contextmanager
def running_server(state_dir: Path, *, name: str = "test-serve") -> Iterator[RunningServer]:
    """The real registry server (TLS on) of ``state_dir`` in a thread of this process, on a free
    loopback port; stopped (and joined, 30 s at most) on exit."""
    ready, stop = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve(state_dir, listen="127.0.0.1:0", ready=ready, stop=stop)
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)
            ready.set()

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    assert ready.wait(30), "server did not start"
    if errors:
        raise errors[0]
    record = json.loads((Path(state_dir) / SERVE_RECORD).read_text())
    try:
        yield RunningServer(record["address"], t, stop)
    finally:
        stop.set()
        t.join(timeout=30)


@pytest.fixture
def server(consortium: Consortium) -> Iterator[RunningServer]:
    """The real registry server (TLS on) in a thread of this process."""
    with running_server(consortium.state) as running:
        yield running


def fetch_base(
    client: RegistryClient, consortium: Consortium
) -> tuple[int, bytes, ReferenceBundle]:
    """What a site does before mapping: verified checkpoint, reference at that size."""
    from protocols.checkpoint import verify_checkpoint

    cp_info = client.get_checkpoint()
    cp = verify_checkpoint(
        cp_info.signed_note,
        origin=consortium.trust["origin"],
        log_verifier=consortium.trust["log_public_key"],
    )
    ref = client.get_reference(cp.size)
    bundle = bundle_from_bytes(ref.manifest_bytes, ref.safetensors_bytes)
    assert bundle.digest == ref.header.digest
    return cp.size, cp.root_hash, bundle


def make_site_update(
    site: Site,
    base: tuple[int, bytes, ReferenceBundle],
    *,
    m: int = 1,
    seed: int = 0,
    sequence: int | None = None,
    batch: str | None = None,
    diff: dict | None = None,
):
    from protocols.update import make_update

    size, root, bundle = base
    seq = sequence if sequence is not None else site.next_seq()
    names = [f"{site.site_id}/{batch or 'b'}{seq}-{i}" for i in range(m)]
    return make_update(
        origin=ORIGIN,
        site_id=site.site_id,
        site_key=site.key,
        sequence=seq,
        base_size=size,
        base_root=root,
        base_digest=bundle.digest,
        new_conditions=names,
        diff=diff if diff is not None else synthetic_diff(bundle, m, seed=seed + seq),
    )


def verify_receipt(receipt, envelope: bytes, consortium: Consortium) -> None:
    from protocols.checkpoint import verify_checkpoint
    from protocols.merkle import leaf_hash, verify_inclusion

    cp = verify_checkpoint(
        receipt.signed_note,
        origin=consortium.trust["origin"],
        log_verifier=consortium.trust["log_public_key"],
    )
    assert receipt.leaf_hash == leaf_hash(envelope)
    verify_inclusion(
        leaf_hash(envelope), receipt.leaf_index, cp.size, receipt.inclusion_proof, cp.root_hash
    )


def verify_ledger(client: RegistryClient, consortium: Consortium) -> int:
    """Recompute the root over every served entry (code) and compare it with the signed
    checkpoint; check consistency with every earlier checkpoint size on the way. Returns the size."""
    from protocols.checkpoint import verify_checkpoint
    from protocols.merkle import MerkleTree, leaf_hash, verify_consistency

    trust = consortium.trust
    cp = verify_checkpoint(
        client.get_checkpoint().signed_note,
        origin=trust["origin"],
        log_verifier=trust["log_public_key"],
    )
    entries = client.get_entries(0, cp.size)
    assert [e.index for e in entries] == list(range(cp.size))
    tree = MerkleTree([leaf_hash(e.envelope) for e in entries])
    assert tree.root() == cp.root_hash
    for old in sorted({1, max(1, cp.size // 2), cp.size}):
        proof = client.get_consistency_proof(old, cp.size)
        verify_consistency(old, cp.size, tree.root(old), cp.root_hash, proof.hashes)
    return cp.size


@contextlib.contextmanager
def accept_log_lines() -> Iterator[list[str]]:
    """The messages of the ``coordinator.accept`` logger (one line per decision) while inside."""
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    log = logging.getLogger("coordinator.accept")
    handler, old_level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def wait_for(pred, timeout: float = 10.0, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return False
