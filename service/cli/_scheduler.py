"""`ratebench scheduler`: the study scheduler as its own process (the distributed deployment).

Run it on the Ray head (or anywhere that reaches the database and the cluster); start the API
with RATEBENCH_RUN_SCHEDULER=false. Several schedulers may share one database.
"""

from __future__ import annotations

import argparse
import signal
from types import FrameType

from service.cli._common import SubParsers, add_database_option, database_url


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "scheduler", help="claim queued studies and run them on Ray (no API)"
    )
    add_database_option(parser)
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning"], help="log verbosity"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import ray

    from service.config import get_settings
    from service.db import get_engine, migrate
    from service.logs import configure_logging
    from service.scheduler import Scheduler, SchedulerConfig
    from worker import cluster
    from worker.remote import warm_workers

    settings = get_settings()
    configure_logging(args.log_level, settings.log_format)
    url = database_url(args)
    migrate(url)
    address = args.ray_address or settings.ray_address
    cluster.connect(address)
    warm_workers()  # the first claimed study's trials then start without importing PyTorch
    scheduler = Scheduler(
        get_engine(url, settings.resolved_pool_size(), settings.db_pool_timeout),
        SchedulerConfig(
            storage_url=url,
            ray_address=address,
            lease_seconds=settings.lease_seconds,
            max_running_per_key=settings.max_running_per_key,
            max_running_studies=settings.max_running_studies,
        ),
    )

    def stop(_signum: int, _frame: FrameType | None) -> None:
        scheduler.stop(timeout=0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    scheduler.run_forever()
    ray.shutdown()
    return 0
