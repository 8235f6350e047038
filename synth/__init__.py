"""Synthetic-positive generation: generator loading, the split-UNet CLSP sampler, and the shard-building job.

Kept free of imports so that `import synth` is cheap; import the submodules you need (synth.models, synth.sampler).
"""

import clsp.shards  # noqa: F401  (loads pyarrow before torch; see shards/__init__.py)
