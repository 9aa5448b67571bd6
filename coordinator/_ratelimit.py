"""Per-site token buckets for submissions, with bounded state and no debt."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["TokenBucketLimiter"]


class TokenBucketLimiter:
    """``burst`` tokens per key, refilled at ``per_second``. Thread-safe.

    :meth:`take` spends a token when there is one and otherwise says how long until there is;
    a bucket never goes below zero, so a refusal costs the key nothing. The coordinator calls it
    only with the site id of a submission whose signature verified (ADR 0023), so keys are
    authenticated sites; on top of that at most ``max_keys`` buckets are kept (least recently
    used dropped first: a dropped bucket was idle long enough to be full again, or the map is
    full of keys that are not in use), so memory is bounded whatever the callers pass.
    """

    def __init__(
        self,
        *,
        burst: int,
        per_second: float,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or per_second <= 0 or max_keys < 1:
            raise ValueError("burst must be >= 1, per_second > 0 and max_keys >= 1")
        self.burst = float(burst)
        self.per_second = float(per_second)
        self.max_keys = int(max_keys)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, t)

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

    def take(self, key: str) -> float:
        """Spend a token: 0.0 on success, else the seconds until one is available (nothing
        spent)."""
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + max(0.0, now - last) * self.per_second)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.per_second
            self._buckets[key] = (tokens, now)  # most recently used at the end
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait
