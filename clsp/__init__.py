"""clsp: contrastive learning with synthetic positives (Zeng et al., ECCV 2024)."""
from importlib.metadata import PackageNotFoundError, version

import clsp.shards  # noqa: F401  (loads pyarrow before torch; see shards/__init__.py)

try:
    __version__ = version("clsp-positives")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
