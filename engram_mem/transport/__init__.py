"""Transport: how bulk rows travel between clients and shards.

connector (RowConnector: the one interface), grpc_channels (the client's gRPC channels and the
typed errors of failed calls), grpc_connector (rows over gRPC: control, fallback, TLS clusters),
protocol (the framed-TCP data plane's wire format) and tcp_connector (its client side; the
shard side is engram_mem/shard/data_server.py). A cluster's `data_plane` setting ("tcp", the
default, or "grpc") says which the shards serve and clients use.
"""
