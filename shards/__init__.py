"""The shard contract between teams: schema, atomic writer, safe streaming reader, manifest, verify.

Imports nothing else of the project, so a team that only reads shards needs only this package.
"""
