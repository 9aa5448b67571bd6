"""Per-site token buckets for submissions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["TokenBucketLimiter"]


class TokenBucketLimiter:
    """``burst`` tokens per key, refilled at ``per_second``. Thread-safe.

    :meth:`peek` says whether a key has a token (without taking it) and how long until it has
    one; :meth:`take` spends one if there is one; :meth:`spend` spends one regardless. The
    coordinator peeks with the site id an envelope claims and spends only after the signature
    verified, so a forger cannot drain another site's budget.
    """

    def __init__(
        self, *, burst: int, per_second: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if burst < 1 or per_second <= 0:
            raise ValueError("burst must be >= 1 and per_second > 0")
        self.burst = float(burst)
        self.per_second = float(per_second)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    def _refill(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.per_second)
        self._buckets[key] = (tokens, now)
        return tokens

    def peek(self, key: str) -> float:
        """0.0 when ``key`` has a token now, else the seconds until it will."""
        with self._lock:
            tokens = self._refill(key, self._clock())
            return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.per_second

    def spend(self, key: str) -> None:
        """Spend a token even if none is left (the bucket goes into debt, so the next
        :meth:`peek` waits longer). Used once a submission was authenticated."""
        with self._lock:
            now = self._clock()
            tokens = self._refill(key, now)
            self._buckets[key] = (tokens - 1.0, now)

    def take(self, key: str) -> float:
        """Spend a token: 0.0 on success, else the seconds until one is available (nothing
        spent)."""
        with self._lock:
            now = self._clock()
            tokens = self._refill(key, now)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            return (1.0 - tokens) / self.per_second
