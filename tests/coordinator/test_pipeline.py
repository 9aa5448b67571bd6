"""The writer's batch: arrival order decides log order; a duplicate inside one batch is
answered with the first one's receipt; a rejection in a batch does not disturb the others."""

from __future__ import annotations

import time
from concurrent.futures import Future

from coordinator.config import load_config
from coordinator.service import Registry, _Pending
from protocols.merkle import leaf_hash
from tests.coordinator.conftest import make_site_update


def _pending(u) -> _Pending:
    return _Pending(
        u.envelope,
        u.diff_bytes,
        leaf_hash(u.envelope),
        time.perf_counter(),
        Future(),
        u.payload.site_id,
        u.payload.sequence,
    )


def _base(reg: Registry):
    size = reg.store.size
    return size, reg.store.root(size), reg.state.bundle()


def test_batch_order_duplicates_and_rejections(consortium) -> None:
    with Registry(load_config(consortium.state)) as reg:
        base = _base(reg)
        a, b = consortium.sites["site-a"], consortium.sites["site-b"]
        ua, ub = make_site_update(a, base), make_site_update(b, base)
        bad = make_site_update(a, base, sequence=1, batch="replay")  # same sequence as ua
        batch = [_pending(ub), _pending(ua), _pending(ua), _pending(bad)]
        reg._process_batch(batch)
        results = [p.future.result(timeout=5) for p in batch]
        size = base[0]
        assert results[0].receipt.leaf_index == size  # b first: it arrived first
        assert results[1].receipt.leaf_index == size + 1
        assert results[2].receipt.duplicate and results[2].receipt.leaf_index == size + 1
        assert results[3].rejection.reason_code == "E_SEQUENCE_REPLAY"
        assert reg.store.size == size + 2
        # The state followed the log: the next sequence numbers are expected.
        assert reg.state.sequences == {"site-a": 1, "site-b": 1}
        assert reg.state.root() == reg.store.root(size + 2)


def test_storage_failure_answers_every_submission_and_keeps_state(consortium, monkeypatch) -> None:
    with Registry(load_config(consortium.state)) as reg:
        reg.start_writer()
        base = _base(reg)
        size = base[0]
        u = make_site_update(consortium.sites["site-a"], base)

        def broken(*args, **kwargs):
            raise OSError("disk full")

        # Inside the transaction (before COMMIT): nothing is logged, the state is rebuilt.
        monkeypatch.setattr(reg.signer, "sign_checkpoint", broken)
        res = reg.submit(u.envelope, u.diff_bytes)
        assert res.rejection is not None and res.rejection.reason_code == "E_INTERNAL"
        assert "nothing was logged" in res.rejection.message
        assert reg.store.size == size and reg.state.size == size
        monkeypatch.undo()
        res = reg.submit(u.envelope, u.diff_bytes)  # the site resubmits: accepted now
        assert res.receipt is not None and res.receipt.leaf_index == size
        assert reg.state.size == size + 1


def test_lost_blob_copy_after_commit_is_not_a_failure(consortium, monkeypatch) -> None:
    with Registry(load_config(consortium.state)) as reg:
        reg.start_writer()
        base = _base(reg)
        u = make_site_update(consortium.sites["site-a"], base)
        blob_put = type(reg.store.blobs).put

        def broken(self, data, *, durable=None):
            if durable is False:
                raise OSError("disk full")
            return blob_put(self, data, durable=durable)

        monkeypatch.setattr(type(reg.store.blobs), "put", broken)
        res = reg.submit(u.envelope, u.diff_bytes)
        assert res.receipt is not None  # committed: acknowledged
        name = "sha256:" + __import__("hashlib").sha256(u.diff_bytes).hexdigest()
        assert not reg.store.blobs.exists(name)
    monkeypatch.undo()
    with Registry(load_config(consortium.state)) as reg:  # restart restores the file
        assert reg.store.blobs.read(name) == u.diff_bytes


def test_an_accept_verifies_the_signature_once(consortium, monkeypatch) -> None:
    """The request thread authenticates; the writer reuses that parse and signature check
    while the policy in force still holds the key (the full rules run otherwise)."""
    import protocols.update

    calls: list[int] = []
    real = protocols.update.verify_envelope

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(protocols.update, "verify_envelope", counting)
    with Registry(load_config(consortium.state)) as reg:
        reg.start_writer()
        base = _base(reg)
        for site in ("site-a", "site-b"):
            u = make_site_update(consortium.sites[site], base)
            res = reg.submit(u.envelope, u.diff_bytes)
            assert res.receipt is not None, res.rejection
        assert len(calls) == 2 and reg.state.sequences == {"site-a": 1, "site-b": 1}
