"""Storage: one shard's rows in memory and on disk, with no networking.

store (ShardStore: tables, slot frames, gather/write/push under one lock), disk (rows in files,
page cache bounded), dedup (idempotency keys), wal (the write-ahead log), snapshot (lmdb
snapshots of slots), recovery (snapshot + log replay back into a store).
"""
