"""`ratebench serve`: the API (and, by default, the scheduler) on the embedded defaults."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from service.cli._common import SubParsers, add_database_option

if TYPE_CHECKING:
    from service.ray_runtime import RayRuntime


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the REST API (and the study scheduler) with uvicorn",
        description="Serve the REST API. Defaults: RATEBENCH_HOST/RATEBENCH_PORT "
        "(127.0.0.1:8000), a SQLite file in RATEBENCH_DATA_DIR, a local Ray runtime.",
    )
    parser.add_argument("--host", help="bind address (default RATEBENCH_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default RATEBENCH_PORT or 8000)")
    add_database_option(parser)
    parser.add_argument("--ray-address", help="Ray cluster to join (default: start a local one)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning"], help="log verbosity"
    )
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.config import get_settings
    from service.logs import configure_logging

    overrides = {
        key: value
        for key, value in {
            "host": args.host,
            "port": args.port,
            "database_url": args.database_url,
            "ray_address": args.ray_address,
        }.items()
        if value is not None
    }
    settings = get_settings().model_copy(update=overrides)
    configure_logging(args.log_level, settings.log_format)
    app = create_app(settings)
    # JSON logs: uvicorn's own loggers pass their records to the root logger's JSON handler.
    log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=args.log_level,
            log_config=log_config,
        )
    )
    serve_beside_ray(server.run, app.state.ray, server.handle_exit)
    return 0


def serve_beside_ray(
    work: Callable[[], None],
    ray: RayRuntime,
    on_signal: Callable[[int, FrameType | None], None],
) -> None:
    """Run `work` on a thread of its own while the main thread serves Ray's starts and
    restarts (`RayRuntime.serve_main_thread`), which must happen on the main thread; SIGTERM
    and SIGINT go to `on_signal` (the work's graceful stop), whatever Ray installs."""
    thread = threading.Thread(target=work, name="work")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    thread.start()
    try:
        ray.serve_main_thread(until=lambda: not thread.is_alive())
    finally:
        thread.join()
