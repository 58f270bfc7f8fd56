"""Trial slots shared fairly by the studies one process drives at once.

A scheduler that runs several studies on one Ray cluster must not let the first study's sweep
take every CPU while a later, smaller study waits behind it: a study whose
`max_concurrent_trials` exceeds the cluster keeps Ray's queue full and refills it as each of
its trials ends, so the other studies' trials would compete with its backlog for as long as it
runs. A `TrialGate` sits in front of Ray instead: each running study holds a `StudySlots` (its
seat at the gate) and asks it before it launches a trial. While the cluster's resources (Ray's
CPUs and GPUs, against each study's `cpus_per_trial` and `gpus_per_trial`) cover every request,
every request is granted at once; when they do not, the next free slot goes round-robin over
the owners (API keys), then over that owner's studies, so a key with many studies gets no more
than a key with one.

Turns are strict: when the study whose turn it is needs more than is free, later studies wait
too, so a study of large trials is not starved by a stream of small ones. A request larger than
the whole cluster is granted when nothing else of this gate runs (Ray then queues it), so a
shrunken cluster cannot deadlock the gate.

The sweep never blocks on the gate (`try_acquire`): its driver keeps harvesting results and
polling for a stop while it waits. A seat keeps its place in line between two polls, and a slot
granted meanwhile is reserved for it until it takes it. `acquire(timeout)` blocks, for callers
that have nothing else to do. The gate counts only its own studies' trials; other users of the
cluster are Ray's business. A seat asks for its study's `cpus_per_trial` and `gpus_per_trial`
for every job, so a hypergradient arm's tuning (which uses no GPU) is counted as its study's
trials are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["Capacity", "StudySlots", "TrialGate", "ray_capacity"]

T = TypeVar("T")
_EPS = 1e-9  # fractional requests (0.25 CPU) add up without rounding trouble
_REFRESH_S = 10.0  # how long the cluster's size is trusted before it is read again


@dataclass(frozen=True)
class Capacity:
    """CPUs and GPUs: the cluster's, or what one trial of a study asks for."""

    cpus: float
    gpus: float = 0.0


def ray_capacity() -> Capacity:
    """The connected Ray cluster's CPUs and GPUs (all nodes)."""
    import ray

    resources = ray.cluster_resources()
    return Capacity(float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0)))


@dataclass(eq=False)
class _Owner:
    owner: Hashable
    seats: list[StudySlots] = field(default_factory=list)
    last: StudySlots | None = None  # served last; the seat after it has the next turn


class TrialGate:
    """Grants trial slots to the studies seated at it, fairly when they are scarce.

    `capacity` is the cluster's size, or a function that reads it (default: the connected Ray
    cluster's, read when first needed and again every ten seconds, so nodes that join count).
    Thread-safe: each study's driver runs in its own thread.
    """

    def __init__(
        self,
        capacity: Capacity | Callable[[], Capacity] | None = None,
        *,
        refresh_s: float = _REFRESH_S,
    ) -> None:
        self._read = capacity if callable(capacity) else None
        if capacity is None:
            self._read = ray_capacity
        self._capacity = capacity if isinstance(capacity, Capacity) else None
        self._read_at = float("-inf")
        self._refresh_s = refresh_s
        self._owners: list[_Owner] = []  # in the order they arrived
        self._last: _Owner | None = None  # served last; the owner after it has the next turn
        self._cpus = 0.0  # held and granted
        self._gpus = 0.0
        self._changed = threading.Condition()

    def seat(self, study: str, owner: Hashable, request: Capacity) -> StudySlots:
        """A seat for `study` (one trial asks `request`), in `owner`'s turn; close it when the
        study's driver ends."""
        seat = StudySlots(self, study, owner, request)
        with self._changed:
            group = next((g for g in self._owners if g.owner == owner), None)
            if group is None:
                group = _Owner(owner)
                self._owners.append(group)
            group.seats.append(seat)
        return seat

    @property
    def in_use(self) -> Capacity:
        """What the seated studies hold, slots granted but not yet taken included."""
        with self._changed:
            return Capacity(self._cpus, self._gpus)

    @property
    def seats(self) -> int:
        with self._changed:
            return sum(len(g.seats) for g in self._owners)

    # Everything below runs with `self._changed` held.

    def _cluster(self) -> Capacity:
        now = time.monotonic()
        if self._read is not None and (
            self._capacity is None or now - self._read_at > self._refresh_s
        ):
            self._capacity, self._read_at = self._read(), now
        assert self._capacity is not None
        return self._capacity

    def _fits(self, request: Capacity) -> bool:
        if self._cpus <= _EPS and self._gpus <= _EPS:
            return True  # nothing of ours runs: even a request larger than the cluster goes
        cluster = self._cluster()
        return (
            self._cpus + request.cpus <= cluster.cpus + _EPS
            and self._gpus + request.gpus <= cluster.gpus + _EPS
        )

    def _next_waiting(self) -> tuple[_Owner, StudySlots] | None:
        """The waiting seat whose turn is next: owners round-robin from the one after the
        owner served last (a newcomer joins at the end of the round), then that owner's seats
        likewise."""
        for owner in _after(self._owners, self._last):
            for seat in _after(owner.seats, owner.last):
                if seat._waiting and not seat._granted:
                    return owner, seat
        return None

    def _dispatch(self) -> None:
        """Grant free slots to waiting seats in turn, until the next in turn does not fit."""
        granted = False
        while (found := self._next_waiting()) is not None:
            owner, seat = found
            if not self._fits(seat.request):
                break  # strict turns: the next in line waits for room, and so do the others
            self._cpus += seat.request.cpus
            self._gpus += seat.request.gpus
            seat._granted, seat._waiting = True, False
            owner.last, self._last = seat, owner
            granted = True
        if granted:
            self._changed.notify_all()

    def _give_back(self, request: Capacity) -> None:
        self._cpus -= request.cpus
        self._gpus -= request.gpus
        if self._cpus <= _EPS:  # no rounding residue left behind when the last slot returns
            self._cpus = 0.0
        if self._gpus <= _EPS:
            self._gpus = 0.0

    def _remove(self, seat: StudySlots) -> None:
        for owner in self._owners:
            if seat in owner.seats:
                owner.last = _drop(owner.seats, seat, owner.last)
                if not owner.seats:
                    self._last = _drop(self._owners, owner, self._last)
                return


def _after(items: list[T], last: T | None) -> list[T]:
    """`items` in turn order: from the one after `last` (the first when `last` is None)."""
    start = items.index(last) + 1 if last is not None and last in items else 0
    return items[start:] + items[:start]


def _drop(items: list[T], item: T, last: T | None) -> T | None:
    """Remove `item`; if it was served last, the one before it becomes `last`, so the turn
    passes to the one that followed it."""
    i = items.index(item)
    del items[i]
    if last is not item:
        return last
    return items[i - 1] if items and i > 0 else (items[-1] if items else None)


class StudySlots:
    """One study's seat at a `TrialGate`: what its sweep asks before it launches a trial.

    `try_acquire()` takes a slot if one is free and it is this study's turn, else keeps the
    study's place in line; `release()` gives a slot back when the trial ends, whatever the
    way; `withdraw()` leaves the line without leaving the gate (the sweep has nothing to
    start); `close()` gives back everything and leaves the gate.
    """

    def __init__(self, gate: TrialGate, study: str, owner: Hashable, request: Capacity) -> None:
        self.gate, self.study, self.owner, self.request = gate, study, owner, request
        self.held = 0  # slots taken and not yet released
        self._waiting = False  # asked for a slot and did not get one yet
        self._granted = False  # a slot reserved for this seat, not yet taken
        self._closed = False

    @property
    def waiting(self) -> bool:
        """In line for a slot (asked, not yet granted)."""
        with self.gate._changed:
            return self._waiting and not self._granted

    def try_acquire(self) -> bool:
        """Take one slot now if the gate grants it; otherwise stay in line and return False."""
        with self.gate._changed:
            if self._closed:
                return False
            if not self._granted:
                self._waiting = True
                self.gate._dispatch()
            return self._take()

    def acquire(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds (None: for ever) for a slot; False if none came."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.gate._changed:
            while not self._closed:
                if not self._granted:
                    self._waiting = True
                    self.gate._dispatch()
                if self._take():
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.gate._changed.wait(left)
            return False

    def release(self) -> None:
        """Give back one slot taken with `try_acquire`/`acquire` (its trial ended)."""
        with self.gate._changed:
            if self.held <= 0:
                return
            self.held -= 1
            self.gate._give_back(self.request)
            self.gate._dispatch()

    def withdraw(self) -> None:
        """Stop waiting; a slot granted but not taken goes to the next in line."""
        with self.gate._changed:
            self._waiting = False
            if self._granted:
                self._granted = False
                self.gate._give_back(self.request)
            self.gate._dispatch()

    def close(self) -> None:
        """Give back every slot this seat holds and leave the gate (the study's driver ended,
        however it ended)."""
        with self.gate._changed:
            if self._closed:
                return
            self._closed = True
            self._waiting = False
            returned = self.held + (1 if self._granted else 0)
            self.held, self._granted = 0, False
            for _ in range(returned):
                self.gate._give_back(self.request)
            self.gate._remove(self)
            self.gate._dispatch()
            self.gate._changed.notify_all()

    def __enter__(self) -> StudySlots:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take(self) -> bool:
        if not self._granted:
            return False
        self._granted, self._waiting = False, False
        self.held += 1
        return True
