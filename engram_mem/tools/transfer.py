"""`engram-mem import`, `export` and `verify`: tables between safetensors files and a running cluster.

    engram-mem import /models/DeepSeek-V4.1-Flash/ [--sha256 SUMS] [--journal F] [--max-gbps X] [--replace]
    engram-mem import --mapping my-mapping.json 'ckpt/model-*.safetensors'
    engram-mem export --mapping v41-flash --out DIR/ [--like /models/DeepSeek-V4.1-Flash/] [--optimizer-state]
    engram-mem verify [--table T] [--sample N]

The work is in importer.py, exporter.py and verify.py; mappings (mapping.py) are JSON files or the
names of the shipped ones in engram_mem/tools/mappings/ (`deepseek-engram-demo`, `v41-flash`). A
checkpoint directory (model.safetensors.index.json + config.json) needs no mapping.
"""

from __future__ import annotations

import json
import sys


def _client(args):
    from engram_mem.tools.attach import attach
    from engram_mem.client.api import MemoryClient

    _, ctl = attach(args)
    return MemoryClient(ctl)


def cmd_import(args) -> int:
    from engram_mem.errors import EngramMemError
    from engram_mem.tools.importer import import_tables

    with _client(args) as mem:
        try:
            r = import_tables(mem, args.mapping, args.files, sha256=args.sha256, journal=args.journal,
                              batch_bytes=args.batch_mb << 20, max_gbps=args.max_gbps, progress=not args.quiet,
                              storage=args.table_storage or "", replace=args.replace)
        except EngramMemError as e:
            sys.exit(f"engram-mem import: {e}")
    print(json.dumps(r) if args.json else
          f"imported {r['rows']:,} rows ({r['bytes'] / 1e9:.3f} GB) of {', '.join(r['tables'])} in "
          f"{r['seconds']:.1f}s, {r['gbps']:.2f} GB/s" + (f"; {r['skipped_rows']:,} rows were already imported"
                                                          if r["skipped_rows"] else ""))
    return 0


def cmd_export(args) -> int:
    from engram_mem.errors import EngramMemError
    from engram_mem.tools.exporter import export_tables

    with _client(args) as mem:
        try:
            r = export_tables(mem, args.mapping, args.out, like=args.like, optimizer_state=args.optimizer_state,
                              progress=not args.quiet)
        except EngramMemError as e:
            sys.exit(f"engram-mem export: {e}")
    print(f"exported {r['tensors']} tensors ({r['bytes'] / 1e9:.3f} GB) to {r['path']}")
    return 0


def cmd_verify(args) -> int:
    from engram_mem.errors import EngramMemError
    from engram_mem.tools.verify import verify_tables

    with _client(args) as mem:
        try:
            r = verify_tables(mem, args.table or None, sample=0 if args.full else args.sample, seed=args.seed)
        except EngramMemError as e:
            sys.exit(f"engram-mem verify: {e}")
    if args.json:
        print(json.dumps(r))
    for name, t in r.items():
        if not args.json:
            print(f"table {name}: {t['slots_checked']} of {t['slots']} slots checked, "
                  + (f"{len(t['bad_slots'])} differ: {t['first_bad']['reason']}" if t["bad_slots"] else
                     "all match the import"))
    return 1 if any(t["bad_slots"] for t in r.values()) else 0


def add_parser(sub) -> dict:
    """Add the import, export and verify subcommands; returns {name: command function}."""
    im = sub.add_parser("import", help="load tables from safetensors files into the cluster")
    im.add_argument("files", nargs="+", help="a checkpoint directory, or safetensors files, directories or globs")
    im.add_argument("--mapping", help="mapping JSON file, or a shipped mapping's name (default for a checkpoint "
                                      "directory: its config.json's tables, named as v41-flash names them)")
    im.add_argument("--replace", action="store_true",
                    help="replace tables that were imported from other tensors (else refused)")
    im.add_argument("--sha256", help="a sha256sum-format file listing every file's digest (checked first)")
    im.add_argument("--journal", help="progress journal (default: ~/.cache/engram-mem/import-<key>.jsonl); "
                                      "a killed import run again continues from it")
    im.add_argument("--batch-mb", type=int, default=64, help="rows per shard request (MB)")
    im.add_argument("--max-gbps", type=float, default=0.0, help="cap the import rate (0: no cap)")
    im.add_argument("--table-storage", help="storage of tables the import creates: shm or disk:/dir")
    im.add_argument("--quiet", action="store_true", help="no progress bar")
    im.add_argument("--json", action="store_true", help="print the figures as JSON")
    im.add_argument("--address")
    ex = sub.add_parser("export", help="write tables from the cluster to a safetensors file")
    ex.add_argument("--mapping", required=True)
    ex.add_argument("--out", required=True, help="a directory (model.safetensors + index) or a .safetensors file")
    ex.add_argument("--like", nargs="*", help="the original files: head sizes and dtypes are taken from their headers")
    ex.add_argument("--optimizer-state", action="store_true", help="also write each float table's optimizer state")
    ex.add_argument("--quiet", action="store_true")
    ex.add_argument("--address")
    ve = sub.add_parser("verify", help="check the cluster's imported rows against the digests their import recorded")
    ve.add_argument("--table", action="append", default=[], help="a table to check (repeatable; default: all imported)")
    ve.add_argument("--sample", type=int, default=64, help="slots per table, drawn at random (default %(default)s)")
    ve.add_argument("--full", action="store_true", help="check every slot")
    ve.add_argument("--seed", type=int, default=0)
    ve.add_argument("--json", action="store_true")
    ve.add_argument("--address")
    return {"import": cmd_import, "export": cmd_export, "verify": cmd_verify}
