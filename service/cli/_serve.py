"""`ratebench serve`: the API (and, by default, the scheduler) on the embedded defaults."""

from __future__ import annotations

import argparse

from service.cli._common import SubParsers, add_database_option


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
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=args.log_level, log_config=log_config
    )
    return 0
