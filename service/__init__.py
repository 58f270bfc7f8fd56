"""ratebench's HTTP face: the REST API, the durable study queue, the scheduler and the CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ratebench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
