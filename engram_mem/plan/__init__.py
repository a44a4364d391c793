"""engram_mem.plan: the pooled-memory planner behind `engram-mem plan` (no Ray, no gRPC imported).

tiers.py (where rows live, presets with sources), presets.py (models, devices), workload.py (batch
shapes, Zipf and traced id distributions, cache hit rates), planner.py (a plan and its predicted
penalty), simulate.py (hot shards, scaling sweeps), calibrate.py (measure this machine's tiers),
report.py (text output), cli.py (the command).
"""
