"""Synthetic-positive generation: generator loading, the split-UNet CLSP sampler, and the shard-building job.

Kept light: it imports only clsp.shards (pyarrow before torch); import the submodules you need (clsp.synth.models,
clsp.synth.sampler).
"""

import clsp.shards  # noqa: F401  (loads pyarrow before torch; see shards/__init__.py)
