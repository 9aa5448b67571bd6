"""Reference versions: old ones are rebuilt without ever blocking a fetch of the current one,
and the in-memory cache is bounded in bytes."""

from __future__ import annotations

import threading

from coordinator.config import load_config
from coordinator.service import Registry
from tests.coordinator.conftest import fetch_base, make_site_update


def _grow(consortium, server, n: int) -> int:
    with server.client(consortium) as c:
        base = fetch_base(c, consortium)
        for _ in range(n):
            u = make_site_update(consortium.sites["site-a"], base)
            c.submit_update(u.envelope, u.diff_bytes).raise_for_rejection()
        return base[0]


def test_a_slow_old_version_never_blocks_the_current_one(consortium, server) -> None:
    first = _grow(consortium, server, 3)
    with Registry(load_config(consortium.state)) as reg:
        cache = reg.references
        cache.clear()  # nothing on disk: both versions must be built
        current = cache._model_index(reg.size)
        entered, release = threading.Event(), threading.Event()
        build = cache._bundle_at

        def slow_for_old(model_index: int):
            if model_index < current:  # an old version: as slow as we like
                entered.set()
                release.wait(30)
            return build(model_index)

        cache._bundle_at = slow_for_old  # type: ignore[method-assign]
        old = threading.Thread(target=reg.reference_stream, args=(first,), daemon=True)
        old.start()
        try:
            assert entered.wait(30)
            header, parts = reg.reference_stream(0)  # the current version, built now
            data = b"".join(d for _n, _o, d in parts)
            assert len(data) == header.manifest_size + header.safetensors_size
            assert header.tree_size == reg.size
            assert old.is_alive()  # the old build was still holding its lock meanwhile
        finally:
            release.set()
            old.join(30)
        assert not old.is_alive()


def test_memory_cache_is_bounded_in_bytes(consortium, server) -> None:
    first = _grow(consortium, server, 4)
    with Registry(load_config(consortium.state)) as reg:
        cache = reg.references
        bundle = cache._bundle_at(cache._model_index(first))
        one = sum(a.nbytes for a in bundle.tensors.values())
        cache.clear()
        cache.max_memory_bytes = 2 * one + one // 2  # room for two versions
        for size in range(first, reg.size + 1):
            header, parts = reg.reference_stream(size)
            for _part in parts:
                pass
            assert cache.memory_bytes <= cache.max_memory_bytes
        assert len(cache._bundles) <= 2
