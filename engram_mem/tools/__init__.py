"""Tools: the `engram-mem` command line and the bulk jobs it runs.

cli (the command), status (the status table), importer / exporter / transfer (tables from and
to safetensors checkpoints), mapping (+ mappings/: checkpoint layouts), synthetic (small
safetensors files in those layouts, for tests and demos).
"""
