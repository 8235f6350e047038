"""The shard contract between teams: schema, atomic writer, safe streaming reader, manifest, verify.

Its reading and writing modules import nothing else of the project, so a team that only reads shards needs only this
package (webdataset, which the reader uses for grouping members, imports torch). `shards/cli.py`, the `clsp shards`
commands, is the exception: it uses the project's error type and, for `sheet`, its sources.
"""
# pyarrow must be loaded before torch: with torch loaded first, a process that has read Parquet aborts at exit
# ("terminate called without an active exception", seen with torch 2.14 and pyarrow 26). Every package of the
# project imports `shards` first for this reason. The abort still came, 1 process in about 50, until its cause was
# found: see `_parquet_table` in shards/manifest.py. The import order is kept: it costs nothing.
import pyarrow  # noqa: F401
