"""Streaming contrastive training: backbones, batch augmentation, losses, methods and the training loop.

Submodules are imported on demand (``from clsp.train.methods import build_method``): importing the package stays cheap.
"""

import clsp.shards  # noqa: F401  (loads pyarrow before torch; see shards/__init__.py)
