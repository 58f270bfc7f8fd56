"""The service's connection to Ray: started, watched and restarted on the main thread.

`ray.init` must run on the main thread: a runtime initialised from another thread hangs the
first call made afterwards (seen with Ray 2.60, for a first start as for a restart). So the
process's main thread owns every (re)start. `ratebench serve` and `ratebench scheduler` run
their work (uvicorn, the scheduler's polling) on other threads and keep the main thread in
`serve_main_thread`, which runs the starts other threads ask for (`start`, `recover`); a
caller on the main thread, or in a process whose main thread serves none (tests), runs them
itself.

A failed connection does not stop the API: `/health` reports it and the scheduler waits for
Ray. A setting that can never connect (token authentication without a token,
`worker.cluster.ClusterConfigError`) is refused when the runtime is made, so that
`ratebench serve` stops with one line instead of serving without its scheduler.

Recovery. A local runtime's raylet can die under a running service (killed, out of memory, or
with its dashboard agent, which it shares its fate with); Ray marks the node dead after its
missed health checks and every actor and task on it is lost. The scheduler notices through
the errors its studies stop with, and asks `recover` with the runtime generation they ran
under: when this process's node is dead, the runtime is shut down and started again (a new
local runtime, or the cluster joined again), and the generation grows; the studies then resume
from storage. Several studies asking at once restart it once.

Other threads ask Ray things (`/health`, a submit's node checks, the scheduler's watch) through
`ask`, never while a restart or the shutdown runs: Ray aborts the whole process ("The core
worker has already been shutdown") when a call meets a runtime that another thread is shutting
down. A restart first marks the runtime "restarting", so that `ask` answers None without
calling Ray, then waits (up to `_USERS_WAIT_S`) for the calls already made to return.

A local runtime started here is announced (`service.running_ray`): its address goes to the
data folder, where `ratebench run` finds it and joins it instead of starting Ray.

An API that does not run the scheduler (`RATEBENCH_RUN_SCHEDULER=false`) gets a disabled
runtime and never calls `ray.init`: a driver needs a Ray node (a raylet) on its own machine,
which an API container does not have. `/health` then reports Ray as "disabled" (not used).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from service import running_ray
from worker import cluster

__all__ = ["RayRuntime", "RayStatus"]

log = logging.getLogger(__name__)

_MAIN_LOOP_POLL_S = 0.2
# How long a restart or the shutdown waits for other threads' calls into Ray to return (a call
# that hangs on a dead runtime must not hold the restart off for good).
_USERS_WAIT_S = 10.0

T = TypeVar("T")


@dataclass
class RayStatus:
    state: str  # "disabled" | "starting" | "connected" | "restarting" | "error" | "stopped"
    address: str | None = None
    error: str | None = None
    resources: dict[str, float] = field(default_factory=dict)
    restarts: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "address": self.address,
            "error": self.error,
            "resources": self.resources,
            "restarts": self.restarts,
        }


@dataclass
class _Call:
    action: Callable[[], None]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class RayRuntime:
    """Connects to Ray (`address`, or a local runtime when None) on the main thread, and
    starts it again when its node died; `enabled=False`: never (the state stays "disabled").
    `options` go to `worker.cluster.connect` (and so to `ray.init`)."""

    def __init__(
        self,
        address: str | None,
        *,
        enabled: bool = True,
        announce_in: Path | None = None,
        **options: Any,
    ) -> None:
        if enabled:
            cluster.check_auth(address)  # ClusterConfigError: no connection could ever succeed
        self.address = address
        self.options = options
        self.announce_in = announce_in  # a local runtime's address is recorded there
        self._state = "starting" if enabled else "disabled"
        self._error: str | None = None
        self._started_here = False
        self._generation = 0  # grows with every successful (re)start
        self._restarts = 0
        self._lock = threading.Lock()  # one start or restart at a time
        self._calls: queue.SimpleQueue[_Call] | None = None  # while the main thread serves
        self._users = 0  # calls into Ray under way on other threads (`ask`)
        self._users_changed = threading.Condition()

    @property
    def connected(self) -> bool:
        return self._state == "connected"

    @property
    def generation(self) -> int:
        """Which runtime this is: 1 after the first start, one more after each restart."""
        return self._generation

    def ask(self, question: Callable[..., T], *args: Any) -> T | None:
        """`question(*args)`, a call into Ray, made only while the runtime is connected and
        never while it is shut down or restarted; None (without calling) otherwise."""
        with self._users_changed:
            if self._state != "connected":
                return None
            self._users += 1
        try:
            return question(*args)
        finally:
            with self._users_changed:
                self._users -= 1
                self._users_changed.notify_all()

    def _stop_asking(self, state: str) -> None:
        """Enter `state` (no new `ask` calls Ray), then wait for the calls under way."""
        with self._users_changed:
            self._state = state
            if not self._users_changed.wait_for(lambda: self._users == 0, _USERS_WAIT_S):
                log.warning("%d calls into Ray still under way after %g s; going on",
                            self._users, _USERS_WAIT_S)  # fmt: skip

    # -- the main thread ----------------------------------------------------------------------

    def serve_main_thread(self, until: Callable[[], bool]) -> None:
        """Run on the main thread the starts other threads ask for, until `until()`."""
        assert threading.current_thread() is threading.main_thread()
        calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._calls = calls
        try:
            while not until():
                try:
                    call = calls.get(timeout=_MAIN_LOOP_POLL_S)
                except queue.Empty:
                    continue
                self._run(call)
        finally:
            self._calls = None
            while not calls.empty():  # nobody will serve these: let their callers go on
                call = calls.get_nowait()
                call.error = RuntimeError("the process is stopping")
                call.done.set()

    @staticmethod
    def _run(call: _Call) -> None:
        try:
            call.action()
        except BaseException as exc:  # handed to the thread that asked
            call.error = exc
        finally:
            call.done.set()

    def _on_main_thread(self, action: Callable[[], None]) -> None:
        calls = self._calls
        if calls is None or threading.current_thread() is threading.main_thread():
            action()
            return
        call = _Call(action)
        calls.put(call)
        call.done.wait()
        if call.error is not None:
            raise call.error

    # -- starting and restarting --------------------------------------------------------------

    def start(self) -> None:
        """Connect (on the main thread); failures are recorded, not raised."""
        self._on_main_thread(self._start)

    def _start(self) -> None:
        with self._lock:
            if self._state != "starting":
                return
            import ray

            try:
                if not ray.is_initialized():
                    self._connect(cluster.connect)
                self._state = "connected"
                self._generation += 1
            except Exception as exc:  # Ray raises many types; the status must report any
                where = self.address or "a local runtime"
                if isinstance(exc, cluster.ClusterUnreachableError):  # its message says it all
                    log.error("could not connect to Ray at %s: %s", where, exc)
                else:
                    log.exception("could not connect to Ray at %s", where)
                self._state, self._error = "error", f"{type(exc).__name__}: {exc}"
                return
            self._announce()
        self._warm()

    def _connect(self, how: Callable[..., None]) -> None:
        # Ray replaces the SIGTERM handler with one that exits at once; keep the process's, so
        # SIGTERM still shuts the API or the scheduler down gracefully.
        previous_sigterm = signal.getsignal(signal.SIGTERM)
        how(self.address, **self.options)
        self._started_here = True
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_sigterm)

    def _announce(self) -> None:
        """Record the address of a local runtime started here (`service.running_ray`), so that
        a `ratebench run` on this machine joins it instead of starting Ray."""
        if self.announce_in is None or not self._started_here or not cluster.is_local(self.address):
            return
        import ray

        try:
            running_ray.record(self.announce_in, ray.get_runtime_context().gcs_address)
        except OSError as exc:  # only a missed shortcut for `ratebench run`
            log.warning("could not record the Ray runtime's address: %s", exc)

    @staticmethod
    def _warm() -> None:
        from worker.remote import warm_workers

        try:
            warm_workers()  # the first claimed study's trials then start without importing
        except Exception:  # only a missed head start: the trials import what they need
            log.warning("could not warm Ray's workers", exc_info=True)

    def recover(self, generation: int) -> bool:
        """After a Ray fault seen by work that ran under runtime `generation`: start Ray again
        (on the main thread) when this process's node is dead. True when Ray is usable now
        (its node alive, or restarted); a failed restart is logged and leaves it False."""
        if self._state == "disabled":
            return False
        outcome: list[bool] = []
        self._on_main_thread(lambda: outcome.append(self._recover(generation)))
        return outcome[0]

    def _recover(self, generation: int) -> bool:
        with self._lock:
            if self._generation != generation and self._state == "connected":
                return True  # another caller restarted it after that work began
            if self._state == "connected" and cluster.local_node_alive():
                return True  # an actor or an object was lost, not the runtime
            log.warning("the Ray runtime's node is gone; starting Ray again")
            self._stop_asking("restarting")
            try:
                self._connect(cluster.reconnect)
            except Exception as exc:
                log.exception("could not start Ray again")
                self._state, self._error = "error", f"{type(exc).__name__}: {exc}"
                return False
            self._state, self._error = "connected", None
            self._generation += 1
            self._restarts += 1
            self._announce()  # the new runtime listens on new ports
        self._warm()
        log.info("Ray started again (restart %d)", self._restarts)
        return True

    def status(self) -> RayStatus:
        answer = self.ask(self._connected_status)
        if answer is not None:
            return answer
        return RayStatus(self._state, self.address, self._error, restarts=self._restarts)

    def _connected_status(self) -> RayStatus:
        import ray

        if not cluster.local_node_alive():  # the scheduler starts it again
            return RayStatus("error", self.address, "this process's Ray node is not alive",
                             restarts=self._restarts)  # fmt: skip
        try:
            resources = {
                k: float(v)
                for k, v in ray.cluster_resources().items()
                if k in {"CPU", "GPU", "memory"}
            }
        except Exception as exc:  # a lost cluster shows as an error, not a 500
            return RayStatus(
                "error", self.address, f"{type(exc).__name__}: {exc}", restarts=self._restarts
            )
        return RayStatus("connected", self.address, None, resources, self._restarts)

    def shutdown(self) -> None:
        if self._started_here:
            import ray

            if self.announce_in is not None:
                running_ray.forget(self.announce_in)
            self._stop_asking("stopped")
            self._on_main_thread(ray.shutdown)
