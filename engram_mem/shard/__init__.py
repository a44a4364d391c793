"""Shard: a store served to the network as a Ray actor.

actor (ShardActor: lifecycle, restore, snapshots), server (the gRPC servicer and its ports),
metrics (Prometheus counters and the /metrics endpoint), replication (primary -> replica feed).
"""
