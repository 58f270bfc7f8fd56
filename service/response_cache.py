"""Answers that rebuild a whole study (its `trials.csv`, its `export`) or read every finished
study (the profile plot), kept in memory under the version of what they are built from, so that
repeated requests (anonymous ones included) cost a cache look-up, not a rebuild.

A key names the answer (`("csv", study id, arm, form)`), the view (`"owner"` or `"public"`:
`service.privacy` strips host names from what others see) and the version of its source: a
study's status and finish time, and while it runs its trials' version
(`service.optuna_tables.trials_version`: a new trial or result changes it); the profile's, the
count and the newest id of the leaderboard rows. A changed source is a new key; old entries
leave by age (least recently used first) once the entries pass `MAX_BYTES` or `MAX_ENTRIES`.
Concurrent first requests for one key wait for one build (a lock per key, from a fixed set of
stripes). The answers say which they were (`X-Cache: miss` when this request built it, `hit`
otherwise)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

__all__ = ["MAX_BYTES", "MAX_ENTRIES", "ResponseCache", "cache"]

MAX_BYTES = 64 * 2**20
MAX_ENTRIES = 512
_STRIPES = 32


class ResponseCache:
    """Bytes by key, least recently used out first; thread-safe."""

    def __init__(self, max_bytes: int = MAX_BYTES, max_entries: int = MAX_ENTRIES) -> None:
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._entries: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]

    def _get(self, key: Hashable) -> bytes | None:
        with self._lock:
            content = self._entries.get(key)
            if content is not None:
                self._entries.move_to_end(key)
            return content

    def _put(self, key: Hashable, content: bytes) -> None:
        if len(content) > self.max_bytes:
            return  # larger than the whole cache: served, not kept
        with self._lock:
            old = self._entries.pop(key, None)
            self._bytes += len(content) - (len(old) if old is not None else 0)
            self._entries[key] = content
            while self._bytes > self.max_bytes or len(self._entries) > self.max_entries:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= len(dropped)

    def get_or_make(self, key: Hashable, make: Callable[[], bytes]) -> tuple[bytes, bool]:
        """The cached bytes for `key`, or `make()`'s (then kept); True when made now."""
        content = self._get(key)
        if content is not None:
            return content, False
        with self._stripes[hash(key) % _STRIPES]:
            content = self._get(key)
            if content is not None:
                return content, False
            content = make()
            self._put(key, content)
        return content, True


cache = ResponseCache()  # the process's: every app in it shares it (keys name the database)
