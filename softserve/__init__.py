"""softserve: precomputed soft-label dataset service for dataset distillation."""

from importlib.metadata import PackageNotFoundError, version

from softserve.errors import SoftserveError

try:
    __version__ = version("softserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["SoftserveError", "__version__"]
