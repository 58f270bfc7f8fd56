"""The service's connection to Ray, and its state for `/health`.

`ray.init` must run on the main thread: a runtime initialised from another thread hangs the
first call made afterwards (seen with Ray 2.60), so the service connects during its start-up,
before it serves requests. A failed connection does not stop the API: `/health` reports it and
the scheduler waits for Ray. A setting that can never connect (token authentication without a
token, `worker.cluster.ClusterConfigError`) is refused when the runtime is made, so that
`ratebench serve` stops with one line instead of serving without its scheduler.

An API that does not run the scheduler (`RATEBENCH_RUN_SCHEDULER=false`) gets a disabled
runtime and never calls `ray.init`: a driver needs a Ray node (a raylet) on its own machine,
which an API container does not have. `/health` then reports Ray as "disabled" (not used).
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import Any

from worker import cluster

__all__ = ["RayRuntime", "RayStatus"]

log = logging.getLogger(__name__)


@dataclass
class RayStatus:
    state: str  # "disabled" | "starting" | "connected" | "error"
    address: str | None = None
    error: str | None = None
    resources: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "address": self.address,
            "error": self.error,
            "resources": self.resources,
        }


class RayRuntime:
    """Connects to Ray (`address`, or a local runtime when None) once, on the calling thread;
    `enabled=False`: never (the state stays "disabled")."""

    def __init__(self, address: str | None, *, enabled: bool = True) -> None:
        if enabled:
            cluster.check_auth(address)  # ClusterConfigError: no connection could ever succeed
        self.address = address
        self._state = "starting" if enabled else "disabled"
        self._error: str | None = None
        self._started_here = False

    @property
    def connected(self) -> bool:
        return self._state == "connected"

    def start(self) -> None:
        """Connect (call from the main thread); failures are recorded, not raised."""
        if self._state != "starting":
            return
        import ray

        # Ray replaces the SIGTERM handler with one that exits at once; keep the server's, so
        # SIGTERM still shuts the API down gracefully (and the shutdown stops Ray).
        previous_sigterm = signal.getsignal(signal.SIGTERM)
        try:
            if not ray.is_initialized():
                cluster.connect(self.address)
                self._started_here = True
            signal.signal(signal.SIGTERM, previous_sigterm)
            self._state = "connected"
        except Exception as exc:  # Ray raises many types; the status must report any of them
            log.exception("could not connect to Ray at %s", self.address or "a local runtime")
            self._state, self._error = "error", f"{type(exc).__name__}: {exc}"
            return
        from worker.remote import warm_workers

        try:
            warm_workers()  # the first claimed study's trials then start without importing
        except Exception:  # only a missed head start: the trials import what they need
            log.warning("could not warm Ray's workers", exc_info=True)

    def status(self) -> RayStatus:
        resources: dict[str, float] = {}
        if self._state == "connected":
            import ray

            try:
                resources = {
                    k: float(v)
                    for k, v in ray.cluster_resources().items()
                    if k in {"CPU", "GPU", "memory"}
                }
            except Exception as exc:  # a lost cluster shows as an error, not a 500
                return RayStatus("error", self.address, f"{type(exc).__name__}: {exc}")
        return RayStatus(self._state, self.address, self._error, resources)

    def shutdown(self) -> None:
        if self._started_here:
            import ray

            ray.shutdown()
