"""`ratebench serve`: the API (and, by default, the scheduler) on the embedded defaults."""

from __future__ import annotations

import argparse
import logging

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
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.config import get_settings

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
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level)
    return 0
