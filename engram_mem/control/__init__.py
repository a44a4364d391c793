"""Control plane: where shards run and which rows each holds.

controller (the cluster's single actor: tables, scale, checkpoint), supervisor (starting and
finding shard actors and their placement groups), placement (slot -> shard), cluster_state
(the persisted cluster file), migration (moving slots between shards), local (the embedded and
`engram-mem up` Ray clusters on this machine).
"""
