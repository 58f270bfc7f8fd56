"""Per-key request rate limits: a token bucket per API key (per client address for anonymous
requests), in each API process.

A bucket holds `burst` requests and refills at `per_minute / 60` per second; a request takes
one, and a request that finds the bucket empty is answered 429 with `Retry-After` (the seconds
until a token is back), before any of its work is done. Every endpoint that does database work
passes here (`service.api.deps.Db`), after the key is known; `/health`, `/metrics` and static
files do not. Each process counts for itself, so N API processes allow N times the rate; the
buckets of the least recently seen identities are dropped beyond `MAX_IDENTITIES` (an identity
seen again then starts with a full bucket).

Anonymous requests are counted by the client address the server sees: behind a reverse proxy
that is the proxy's, so every anonymous reader shares one bucket there (run such a deployment
with keys for reads, or give the proxy its own limits).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from fastapi import HTTPException, status

__all__ = ["MAX_IDENTITIES", "RateLimiter"]

MAX_IDENTITIES = 10_000


class RateLimiter:
    """Token buckets by identity (`key:<id>` or `address:<host>`); thread-safe."""

    def __init__(
        self, per_minute: int, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = per_minute / 60.0  # tokens per second; 0: no limit
        self.burst = float(burst)
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when
        self._lock = threading.Lock()

    def wait_s(self, identity: str) -> float:
        """Take a token for `identity`: 0 when there was one, else the seconds until one is
        back (nothing is taken)."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            tokens, then = self._buckets.pop(identity, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[identity] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > MAX_IDENTITIES:
                self._buckets.popitem(last=False)
        return wait

    def check(self, identity: str) -> None:
        """429 with `Retry-After` when `identity` has no token left."""
        wait = self.wait_s(identity)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                detail=f"too many requests from this {identity.split(':')[0]}: at most "
                f"{round(self.rate * 60)} a minute (bursts of {int(self.burst)}); "
                f"retry in {seconds} s",
                headers={"Retry-After": str(seconds)},
            )
