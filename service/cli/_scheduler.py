"""`ratebench scheduler`: the study scheduler as its own process (the distributed deployment).

Run it on the Ray head (or anywhere that reaches the database and the cluster); start the API
with RATEBENCH_RUN_SCHEDULER=false. Several schedulers may share one database.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from types import FrameType

from service.cli._common import CliError, SubParsers, add_database_option, database_url


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
    from service.app import scheduler_config
    from service.cli._serve import serve_beside_ray
    from service.config import get_settings
    from service.db import get_engine, migrate
    from service.logs import configure_logging
    from service.ray_runtime import RayRuntime
    from service.scheduler import Scheduler

    settings = get_settings()
    configure_logging(args.log_level, settings.log_format)
    url = database_url(args)
    migrate(url)
    address = args.ray_address or settings.ray_address
    ray = RayRuntime(address)  # a missing Ray token: ClusterConfigError, printed as one line
    ray.start()
    if not ray.connected:
        where = f"join Ray at {address}" if address else "start a local Ray runtime"
        error = (ray.status().error or "").strip().splitlines() or ["unknown error"]
        raise CliError(f"could not {where}: {error[0]}")
    config = replace(scheduler_config(settings, url), ray_address=address)
    engine = get_engine(url, settings.resolved_pool_size(), settings.db_pool_timeout)
    scheduler = Scheduler(engine, config, ray=ray)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        scheduler.stop(timeout=0)

    serve_beside_ray(scheduler.run_forever, ray, stop)
    ray.shutdown()
    return 0
