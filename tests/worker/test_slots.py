"""The trial gate on its own, without Ray: who gets a scarce slot, and that every slot comes
back. Its use by a real sweep is in tests/worker/test_sweep_slots.py."""

from __future__ import annotations

import threading
from collections import Counter

from tests.service.helpers import wait_for
from worker.slots import Capacity, StudySlots, TrialGate

ONE = Capacity(1.0)


def _round(seats: list[StudySlots]) -> str:
    """Every seat polls once, as the studies' drivers do; exactly one gets the slot."""
    got = [s for s in seats if s.try_acquire()]
    assert len(got) == 1, [s.study for s in got]
    return got[0].study


def test_with_room_every_request_is_granted_at_once() -> None:
    gate = TrialGate(Capacity(2.0))
    a = gate.seat("a", "key-1", Capacity(0.5))
    assert [a.try_acquire() for _ in range(5)] == [True] * 4 + [False]
    assert a.held == 4 and gate.in_use == Capacity(2.0)
    a.release()
    assert a.try_acquire() and a.held == 4


def test_scarce_slots_go_round_robin_over_keys_then_over_a_keys_studies() -> None:
    gate = TrialGate(ONE)
    x1, x2 = gate.seat("x1", "key-x", ONE), gate.seat("x2", "key-x", ONE)
    y1 = gate.seat("y1", "key-y", ONE)
    order = []
    for _ in range(12):
        winner = _round([x1, x2, y1])
        order.append(winner)
        {"x1": x1, "x2": x2, "y1": y1}[winner].release()
    # key-y's one study gets as many slots as key-x's two together, and they alternate.
    assert order == ["x1", "y1", "x2", "y1"] * 3
    assert Counter(order) == {"y1": 6, "x1": 3, "x2": 3}


def test_a_later_study_gets_the_next_slot_before_the_first_gets_another() -> None:
    """The issue's case: a long study fills the cluster; a short one submitted after it gets
    the next free slot, however many trials the long one still wants."""
    gate = TrialGate(Capacity(2.0))
    long = gate.seat("long", "key-1", Capacity(0.5))
    assert [long.try_acquire() for _ in range(4)] == [True] * 4
    short = gate.seat("short", "key-2", Capacity(0.5))
    assert not short.try_acquire() and short.waiting
    assert not long.try_acquire()  # long asks again before its trial ends...
    long.release()  # ...and the slot its trial frees goes to the short study
    assert not long.try_acquire()
    assert short.try_acquire() and short.held == 1


def test_turns_are_strict_so_a_large_request_is_not_starved() -> None:
    gate = TrialGate(Capacity(2.0))
    small = gate.seat("small", "key-1", Capacity(1.0))
    big = gate.seat("big", "key-2", Capacity(2.0))
    assert small.try_acquire()
    assert not big.try_acquire()  # needs both CPUs; one is taken
    assert not small.try_acquire()  # one CPU is free, but it is big's turn
    small.release()
    assert big.try_acquire() and gate.in_use == Capacity(2.0)
    assert not small.try_acquire()
    big.release()
    assert small.try_acquire()


def test_a_request_larger_than_the_cluster_runs_alone() -> None:
    gate = TrialGate(ONE)
    huge = gate.seat("huge", "key-1", Capacity(4.0))
    other = gate.seat("other", "key-2", Capacity(0.5))
    assert huge.try_acquire()  # nothing else of the gate runs: Ray will queue it
    assert not other.try_acquire()
    huge.release()
    assert other.try_acquire()


def test_fractional_gpus_pack_and_limit_the_slots() -> None:
    gate = TrialGate(Capacity(8.0, 1.0))
    gpu = gate.seat("gpu", "key-1", Capacity(1.0, 0.25))
    assert [gpu.try_acquire() for _ in range(5)] == [True] * 4 + [False]
    assert gate.in_use == Capacity(4.0, 1.0)


def test_the_cluster_is_read_again_so_joining_nodes_count() -> None:
    size = {"cpus": 1.0}
    gate = TrialGate(lambda: Capacity(size["cpus"]), refresh_s=0)
    a = gate.seat("a", "key-1", ONE)
    assert a.try_acquire() and not a.try_acquire()
    size["cpus"] = 2.0  # a node joined
    assert a.try_acquire() and a.held == 2


def test_withdraw_and_close_hand_every_slot_on() -> None:
    gate = TrialGate(Capacity(2.0))
    a, b, c = (gate.seat(name, name, ONE) for name in "abc")
    assert a.try_acquire() and a.try_acquire()
    assert not b.try_acquire() and not c.try_acquire()
    a.release()  # granted to b, which has not taken it yet
    assert not b.waiting and c.waiting
    b.withdraw()  # b has nothing to start after all: its slot goes to c
    assert c.try_acquire()
    assert not b.try_acquire()
    a.close()  # a still held one slot: closing gives it back, and b gets it
    assert b.try_acquire() and gate.in_use == Capacity(2.0)
    b.close()
    c.close()
    assert gate.in_use == Capacity(0.0) and gate.seats == 0
    assert not c.try_acquire()  # a closed seat gets nothing


def test_threads_never_hold_more_than_the_cluster_and_share_it() -> None:
    gate = TrialGate(Capacity(2.0))
    seats = [gate.seat(f"s{i}", f"key-{i % 2}", ONE) for i in range(4)]
    lock = threading.Lock()
    holding = {"now": 0, "most": 0}
    got: Counter[str] = Counter()
    start = threading.Barrier(len(seats))
    errors: list[BaseException] = []

    def drive(seat: StudySlots) -> None:
        try:
            start.wait()
            for _ in range(25):
                assert seat.acquire(timeout=30), f"{seat.study} waited 30 s for a slot"
                with lock:
                    holding["now"] += 1
                    holding["most"] = max(holding["most"], holding["now"])
                    got[seat.study] += 1
                with lock:
                    holding["now"] -= 1
                seat.release()
        except BaseException as exc:
            errors.append(exc)
        finally:
            seat.close()

    threads = [threading.Thread(target=drive, args=(s,)) for s in seats]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert holding["most"] <= 2
    assert got == {f"s{i}": 25 for i in range(4)}
    assert gate.in_use == Capacity(0.0) and gate.seats == 0


def test_acquire_waits_for_a_release_in_another_thread() -> None:
    gate = TrialGate(ONE)
    first, second = gate.seat("first", "key-1", ONE), gate.seat("second", "key-2", ONE)
    assert first.acquire(timeout=1)
    assert not second.acquire(timeout=0.05)  # no slot: it times out
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(second.acquire(timeout=30)))
    waiter.start()
    wait_for(lambda: second.waiting, 10, "the second study to wait in line", 0.01)
    first.release()
    waiter.join(30)
    assert result == [True] and second.held == 1
