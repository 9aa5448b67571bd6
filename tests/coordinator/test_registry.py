"""The registry over real gRPC on loopback, TLS on: accept, receipts, proofs, references, blobs,
cosignatures, idempotency, revocation while serving, rate limiting."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from coordinator.admin import revoke_site
from protocols.bundle import bundle_from_bytes
from protocols.diff import apply_condition_diff, diff_from_bytes
from protocols.errors import ConfigError
from protocols.registry_client import (
    BlobIntegrityError,
    RegistryClient,
    RegistryNotFoundError,
    RegistryRequestError,
    RegistryUnavailableError,
)
from tests.coordinator.conftest import (
    fetch_base,
    make_site_update,
    verify_ledger,
    verify_receipt,
)

pytestmark = pytest.mark.network


def test_two_sites_on_the_same_base_are_both_accepted(consortium, server) -> None:
    with server.client(consortium) as c:
        base = fetch_base(c, consortium)
        size0 = base[0]
        a, b = consortium.sites["site-a"], consortium.sites["site-b"]
        ua, ub = make_site_update(a, base, m=2), make_site_update(b, base, m=1)
        results: dict[str, object] = {}

        def submit(name, u):
            results[name] = c.submit_update(u.envelope, u.diff_bytes)

        threads = [
            threading.Thread(target=submit, args=("a", ua)),
            threading.Thread(target=submit, args=("b", ub)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        ra, rb = results["a"].raise_for_rejection(), results["b"].raise_for_rejection()
        assert {ra.leaf_index, rb.leaf_index} == {size0, size0 + 1}
        verify_receipt(ra, ua.envelope, consortium)
        verify_receipt(rb, ub.envelope, consortium)
        assert verify_ledger(c, consortium) == size0 + 2

        # The served reference after both = base + both diffs, in ledger order (numpy replay).
        first, second = sorted([(ra.leaf_index, ua), (rb.leaf_index, ub)], key=lambda x: x[0])
        expect = base[2]
        for _, u in (first, second):
            expect = apply_condition_diff(
                expect, diff_from_bytes(u.diff_bytes), list(u.payload.new_conditions)
            )
        ref = c.get_reference()
        served = bundle_from_bytes(ref.manifest_bytes, ref.safetensors_bytes)
        assert served.digest == expect.digest == ref.header.digest
        assert ref.header.tree_size == size0 + 2
        # Older versions stay available, bit for bit.
        old = c.get_reference(size0)
        assert bundle_from_bytes(old.manifest_bytes, old.safetensors_bytes).digest == base[2].digest

        info = c.get_site_info("site-a")
        assert info.enrolled and not info.revoked and info.last_sequence == 1
        assert info.contributions == 1
        assert c.health().tree_size == size0 + 2


def test_resubmission_returns_the_original_receipt(consortium, server) -> None:
    with server.client(consortium) as c:
        base = fetch_base(c, consortium)
        u = make_site_update(consortium.sites["site-a"], base)
        first = c.submit_update(u.envelope, u.diff_bytes).raise_for_rejection()
        again = c.submit_update(u.envelope, u.diff_bytes).raise_for_rejection()
        assert again.duplicate and not first.duplicate
        assert (again.leaf_index, again.signed_note, again.inclusion_proof) == (
            first.leaf_index,
            first.signed_note,
            first.inclusion_proof,
        )
        assert c.get_checkpoint().size == first.leaf_index + 1


def test_entries_blobs_and_proofs(consortium, server) -> None:
    with server.client(consortium) as c:
        base = fetch_base(c, consortium)
        u = make_site_update(consortium.sites["site-b"], base, m=3)
        r = c.submit_update(u.envelope, u.diff_bytes).raise_for_rejection()
        entries = c.get_entries()
        assert [e.kind for e in entries][:1] == ["genesis"]
        assert entries[r.leaf_index].envelope == u.envelope
        (diff_ref,) = entries[r.leaf_index].blobs
        assert diff_ref.role == "diff" and c.get_blob(diff_ref.sha256) == u.diff_bytes
        genesis_roles = {b.role for b in entries[0].blobs}
        assert genesis_roles == {"manifest", "safetensors"}
        proof = c.get_inclusion_proof(leaf_hash=r.leaf_hash)
        assert proof.leaf_index == r.leaf_index
        with pytest.raises(RegistryNotFoundError):
            c.get_blob("sha256:" + "0" * 64)
        with pytest.raises(RegistryRequestError):
            c.get_consistency_proof(5, 2)
        with pytest.raises(RegistryRequestError):
            c.get_entries_page(0, 10_000)
        with pytest.raises(RegistryNotFoundError):
            c.get_inclusion_proof(leaf_hash=b"\x00" * 32)


def test_paging(tmp_path: Path) -> None:
    """Entries come in pages of limits.max_entries_per_page; the client follows them."""
    import yaml

    from tests.coordinator.conftest import make_consortium

    cons = make_consortium(tmp_path, sites=tuple(f"s{i}" for i in range(5)))
    cfg_path = cons.state / "coordinator.yaml"
    doc = yaml.safe_load(cfg_path.read_text())
    doc["limits"]["max_entries_per_page"] = 2
    cfg_path.write_text(yaml.safe_dump(doc))
    from coordinator.config import load_config
    from coordinator.service import Registry

    with Registry(load_config(cons.state)) as reg:
        page = reg.entries_page(0, 0)
        assert len(page.entries) == 2 and page.next_start == 2 and page.tree_size == 6


def test_witness_cosignature_round_trip(consortium, server, tmp_path: Path) -> None:
    from protocols.checkpoint import (
        cosign_checkpoint,
        generate_signer,
        verify_cosigned_checkpoint,
    )

    trust = consortium.trust
    witness = generate_signer("witness.example").as_cosigner()
    with server.client(consortium) as c:
        cp = c.get_checkpoint()
        _, cosigned = cosign_checkpoint(
            cp.signed_note,
            origin=trust["origin"],
            log_verifier=trust["log_public_key"],
            witness=witness,
            timestamp=1_700_000_000,
        )
        assert c.add_cosignature(cosigned) == 1
        assert c.add_cosignature(cosigned) == 0  # stored once
        size, note = c.get_cosignatures(cp.size)
        assert size == cp.size
        verify_cosigned_checkpoint(
            note,
            origin=trust["origin"],
            log_verifier=trust["log_public_key"],
            witnesses=[witness.verifier],
            threshold=1,
        )
        # A note the log never issued is refused.
        with pytest.raises(RegistryRequestError, match="refused"):
            c.add_cosignature(b"not a note\n\n")


def test_revocation_while_serving_takes_effect(consortium, server) -> None:
    with server.client(consortium) as c:
        base = fetch_base(c, consortium)
        site = consortium.sites["site-b"]
        ok = make_site_update(site, base)
        c.submit_update(ok.envelope, ok.diff_bytes).raise_for_rejection()
        revoke_site(consortium.state, site_id="site-b")  # another "process": the CLI path
        size_before = c.get_checkpoint().size
        late = make_site_update(site, base)
        res = c.submit_update(late.envelope, late.diff_bytes)
        assert res.rejection is not None and res.rejection.reason_code == "E_KEY_REVOKED"
        assert c.get_checkpoint().size == size_before
        info = c.get_site_info("site-b")
        assert info.enrolled and info.revoked
        verify_ledger(c, consortium)


def test_rate_limit_rejects_with_retry_after(tmp_path: Path) -> None:
    import yaml

    from coordinator.admin import serve
    from tests.coordinator.conftest import make_consortium

    cons = make_consortium(tmp_path, sites=("site-a",))
    cfg_path = cons.state / "coordinator.yaml"
    doc = yaml.safe_load(cfg_path.read_text())
    doc["rate_limit"] = {"enabled": True, "burst": 2, "per_second": 0.01}
    cfg_path.write_text(yaml.safe_dump(doc))
    ready, stop = threading.Event(), threading.Event()
    t = threading.Thread(
        target=serve,
        args=(cons.state,),
        kwargs={"listen": "127.0.0.1:0", "ready": ready, "stop": stop},
        daemon=True,
    )
    t.start()
    try:
        assert ready.wait(30)
        import json

        addr = json.loads((cons.state / "serve.json").read_text())["address"]
        with RegistryClient(addr, trust=cons.trust) as c:
            base = fetch_base(c, cons)
            site = cons.sites["site-a"]
            codes = []
            for _ in range(4):
                u = make_site_update(site, base)
                res = c.submit_update(u.envelope, u.diff_bytes)
                codes.append(res.rejection.reason_code if res.rejection else "ok")
                if res.rejection:
                    assert res.rejection.retry_after_s > 0
                    assert "retry in" in res.rejection.message
                    site.sequence -= 1  # not accepted: the site reuses the number
            assert codes == ["ok", "ok", "E_RATE_LIMITED", "E_RATE_LIMITED"]
    finally:
        stop.set()
        t.join(30)


def test_tls_is_pinned(consortium, server, tmp_path: Path) -> None:
    from coordinator._tls import make_self_signed

    other = make_self_signed(tmp_path / "o.crt", tmp_path / "o.key")
    with RegistryClient(server.address, trust=other, timeout=5, retries=0) as c:
        with pytest.raises(RegistryUnavailableError):
            c.health()


def test_insecure_only_on_loopback() -> None:
    from coordinator.server import check_listen_address

    check_listen_address("127.0.0.1:0", insecure=True)
    check_listen_address("[::1]:7443", insecure=True)
    check_listen_address("0.0.0.0:7443", insecure=False)
    with pytest.raises(ConfigError, match="non-loopback"):
        check_listen_address("0.0.0.0:7443", insecure=True)
    with pytest.raises(ConfigError, match="loopback development only"):
        RegistryClient("10.1.2.3:7443", insecure=True)


def test_insecure_server_on_loopback(consortium) -> None:
    from coordinator.admin import serve

    ready, stop = threading.Event(), threading.Event()
    t = threading.Thread(
        target=serve,
        args=(consortium.state,),
        kwargs={"listen": "127.0.0.1:0", "insecure": True, "ready": ready, "stop": stop},
        daemon=True,
    )
    t.start()
    try:
        assert ready.wait(30)
        import json

        addr = json.loads((consortium.state / "serve.json").read_text())["address"]
        with RegistryClient(addr, insecure=True) as c:
            assert c.health().status == "serving"
    finally:
        stop.set()
        t.join(30)


def test_client_checks_blob_hashes() -> None:
    """A blob that does not hash to its name never reaches the caller."""
    from unittest import mock

    from protocols.proto import registry_pb2 as pb

    client = RegistryClient("127.0.0.1:1", insecure=True, retries=0)
    name = "sha256:" + "ab" * 32
    with (
        mock.patch.object(
            client._stub,
            "GetBlob",
            return_value=iter([pb.BlobChunk(total_size=3, offset=0, data=b"abc")]),
        ),
        pytest.raises(BlobIntegrityError),
    ):
        client.get_blob(name)
    client.close()


def test_every_reference_version_is_the_ledger_replay(consortium, server) -> None:
    """Versions at every size equal LedgerState replay of the served entries (what an
    auditor computes), also after a restart of the cache (cold materialization)."""
    import shutil

    from protocols.ledger import replay
    from protocols.policy import read_trust

    with server.client(consortium) as c:
        base = fetch_base(c, consortium)
        for i in range(4):
            site = consortium.sites["site-a" if i % 2 else "site-b"]
            u = make_site_update(site, base, m=1 + i % 2)
            c.submit_update(u.envelope, u.diff_bytes).raise_for_rejection()
        entries = c.get_entries()
        blobs = {}
        for e in entries:
            for b in e.blobs:
                blobs[b.sha256[7:]] = c.get_blob(b.sha256)
        state = replay(read_trust(consortium.trust_path), [e.envelope for e in entries], blobs.get)
        shutil.rmtree(consortium.state / "cache", ignore_errors=True)
        for size in range(1, len(entries) + 1):
            ref = c.get_reference(size)
            assert ref.header.digest == state.digest_at(size), size
            served = bundle_from_bytes(ref.manifest_bytes, ref.safetensors_bytes)
            assert served.digest == state.digest_at(size)
    # Cold: a fresh registry (no memory cache, no disk cache) materializes the latest version
    # from the genesis and every diff in one joined application.
    from coordinator.config import load_config
    from coordinator.service import Registry

    shutil.rmtree(consortium.state / "cache", ignore_errors=True)
    with Registry(load_config(consortium.state)) as reg:
        ref = reg.references.materialize(len(entries))
        assert ref.digest == state.digest_at(len(entries))
        assert ref.model_index == len(entries) - 1


def test_client_maps_grpc_statuses() -> None:
    import grpc

    from protocols.registry_client import MessageTooLargeError, RegistryTimeoutError

    class FakeRpcError(grpc.RpcError):
        def __init__(self, code, details):
            self._code, self._details = code, details

        def code(self):
            return self._code

        def details(self):
            return self._details

    client = RegistryClient("127.0.0.1:1", insecure=True, retries=0)
    cases = [
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Received message larger than max (9 vs. 8)",
            MessageTooLargeError,
        ),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Concurrent RPC limit exceeded!",
            RegistryUnavailableError,
        ),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", RegistryTimeoutError),
        (grpc.StatusCode.NOT_FOUND, "no blob", RegistryNotFoundError),
        (grpc.StatusCode.OUT_OF_RANGE, "beyond", RegistryRequestError),
    ]
    for code, details, cls in cases:

        def boom(code=code, details=details):
            raise FakeRpcError(code, details)

        with pytest.raises(cls) as err:
            client._call("test", boom)
        assert err.value.status == code.name and details in str(err.value)
    client.close()


def test_federated_round_replaces_the_model(consortium, server) -> None:
    import numpy as np

    from coordinator.admin import publish_federated_round
    from protocols.bundle import make_bundle

    with server.client(consortium) as c:
        base = fetch_base(c, consortium)
        u = make_site_update(consortium.sites["site-a"], base)
        c.submit_update(u.envelope, u.diff_bytes).raise_for_rejection()
        size, _root, _ = base_now = fetch_base(c, consortium)
        current = base_now[2]
        tensors = dict(current.tensors)
        tensors["encoder.0.bias"] = tensors["encoder.0.bias"] + np.float32(
            0.01
        )  # shared weights moved
        manifest = {k: v for k, v in current.manifest.items() if k != "digest"}
        aggregate = make_bundle(manifest, tensors)
        entry = publish_federated_round(
            consortium.state,
            aggregate=aggregate,
            round_number=1,
            base_size=size,
            base_digest=current.digest,
            contributors=[("site-a", "sha256:" + "ab" * 32)],
        )
        assert entry.kind == "federated_round"
        ref = c.get_reference()
        assert ref.header.digest == aggregate.digest and ref.header.tree_size == entry.index + 1
        # An update mapped on the version before the round is stale now.
        stale = make_site_update(consortium.sites["site-b"], base)
        res = c.submit_update(stale.envelope, stale.diff_bytes)
        assert res.rejection is not None and res.rejection.reason_code == "E_BASE_STALE"
        fresh = make_site_update(consortium.sites["site-b"], fetch_base(c, consortium))
        c.submit_update(fresh.envelope, fresh.diff_bytes).raise_for_rejection()
        verify_ledger(c, consortium)


def test_unpinned_cosignatures_cannot_crowd_out_pinned_witnesses(tmp_path: Path) -> None:
    """Junk from unknown keys is capped per checkpoint; a pinned witness always gets in, and a
    pinned witness's line must verify."""
    from coordinator.admin import init_state
    from coordinator.checkpoints import MAX_UNPINNED_COSIGNATURES
    from coordinator.config import load_config
    from coordinator.service import Registry
    from protocols.bundle import write_bundle
    from protocols.checkpoint import cosign_checkpoint, generate_signer
    from tests.coordinator.synth import synthetic_reference

    pinned = generate_signer("pinned.witness").as_cosigner()
    write_bundle(tmp_path / "ref", synthetic_reference())
    init_state(
        tmp_path / "s",
        reference=tmp_path / "ref",
        origin="w.example/log",
        witness_keys=(pinned.verifier.vkey,),
        witnesses_required=1,
    )
    with Registry(load_config(tmp_path / "s")) as reg:
        note = reg.checkpoint().signed_note
        trust = {"origin": "w.example/log", "log_public_key": reg.signer.vkey}

        def cosigned(witness, ts=1_700_000_000):
            return cosign_checkpoint(
                note,
                origin=trust["origin"],
                log_verifier=trust["log_public_key"],
                witness=witness,
                timestamp=ts,
            )[1]

        for i in range(MAX_UNPINNED_COSIGNATURES):
            ok, added, _ = reg.add_cosignature(cosigned(generate_signer(f"junk{i}").as_cosigner()))
            assert ok and added == 1
        ok, _, msg = reg.add_cosignature(cosigned(generate_signer("one.more").as_cosigner()))
        assert not ok and "does not pin" in msg
        ok, added, _ = reg.add_cosignature(cosigned(pinned))
        assert ok and added == 1
        # A forged line under the pinned witness's name and key id is refused.
        good = cosigned(pinned, ts=1_700_000_001)
        head, sigs = good.rsplit(b"\n\n", 1)
        lines = sigs.decode().splitlines()
        import base64

        blob = bytearray(base64.b64decode(lines[-1].split(" ")[-1]))
        blob[-1] ^= 1
        lines[-1] = lines[-1].rsplit(" ", 1)[0] + " " + base64.b64encode(bytes(blob)).decode()
        forged = head + b"\n\n" + ("\n".join(lines) + "\n").encode()
        ok, _, msg = reg.add_cosignature(forged)
        assert not ok and "does not verify" in msg


def test_reference_cache_is_bounded(consortium, server) -> None:
    """Asking for every old version cannot fill the disk: the cache keeps a bounded number."""
    from coordinator.config import load_config
    from coordinator.service import Registry

    with server.client(consortium) as c:
        base = fetch_base(c, consortium)
        for _ in range(5):
            u = make_site_update(consortium.sites["site-a"], base)
            c.submit_update(u.envelope, u.diff_bytes).raise_for_rejection()
    with Registry(load_config(consortium.state)) as reg:
        reg.references.max_on_disk = 3
        digests = set()
        for size in range(base[0], reg.store.size + 1):
            header, parts = reg.reference_stream(size)
            data = b"".join(d for _n, _o, d in parts)
            assert len(data) == header.manifest_size + header.safetensors_size
            digests.add(header.digest)
        assert len(digests) == 6
        assert len(list(reg.references.root.glob("v*"))) <= 3
