"""Import throughput of a >= 2 GB FP8 table from safetensors (a benchmark, not a test).

    .venv/bin/python bench/bench_import.py [--rows 8200000] [--shards 2] [--dir /var/tmp]

Writes one V4.1-Flash-layout file (values F8_E4M3 [rows, 256] + scales U8 [rows, 8]: 264 B a row,
2.16 GB at the default 8.2M rows) under --dir, streamed in 64 MB pieces, then imports it with
`importer.import_tables` into a local memory cluster of `shards` shards (each shard reads its own
slots' byte ranges), twice: with the file dropped from the page cache first (cold: read from
disk) and again into a fresh table with the file cached (warm). Checks sampled rows, reports GB/s.
Appends bench/results/import.jsonl, draws bench/results/import.png. Needs ~2x the table in free
RAM + /dev/shm; the file and tables are removed at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_jsonl, bar_plot, markdown_table, print_table  # noqa: E402


def write_file(path: str, rows: int, layer: int = 1, chunk_rows: int = 1 << 18) -> None:
    """A V4.1-layout safetensors file, written piece by piece (never whole in memory)."""
    from engram_mem.tools.exporter import _header

    vname = f"model.layers.{layer}.engram.embed.weight"
    sname = f"model.layers.{layer}.engram.embed.weight_scale"
    head, infos = _header([(vname, "F8_E4M3", (rows, 256)), (sname, "U8", (rows, 8))], path)
    rng = np.random.default_rng(0)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, head)
        for a in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - a)
            v = rng.integers(0, 0x7E, (n, 256), dtype=np.uint8)   # E4M3 bit patterns without NaN (0x7F)
            s = rng.integers(119, 135, (n, 8), dtype=np.uint8)
            os.pwrite(fd, v.tobytes(), infos[vname].start + a * 256)
            os.pwrite(fd, s.tobytes(), infos[sname].start + a * 8)
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8_200_000)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--dir", default="/var/tmp")
    args = p.parse_args(argv)

    import json

    import engram_mem
    from engram_mem.tools.importer import import_tables
    from engram_mem.tools.mapping import read_header

    work = tempfile.mkdtemp(prefix="engram-bench-import-", dir=args.dir)
    path = os.path.join(work, "model-00001-of-00001.safetensors")
    mapping = os.path.join(work, "mapping.json")
    with open(mapping, "w") as f:
        json.dump({"format": "engram-mem/mapping/1", "tables": [
            {"table": "{name}", "dtype": "fp8_e4m3", "block": 32, "values": "model.layers.1.engram.embed.weight",
             "scales": "model.layers.1.engram.embed.weight_scale"}]}, f)
    results = []
    try:
        write_file(path, args.rows)
        size = os.path.getsize(path)
        info = read_header(path)
        with engram_mem.connect(shards=args.shards, name="bench-import") as mem:
            for run, cold in (("cold file cache", True), ("warm file cache", False)):
                name = "t.cold" if cold else "t.warm"
                with open(mapping) as f:
                    text = f.read().replace("{name}", name)
                mp = os.path.join(work, f"{name}.json")
                with open(mp, "w") as f:
                    f.write(text)
                if cold:
                    fd = os.open(path, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
                r = import_tables(mem, mp, [path], journal=os.path.join(work, f"{name}.journal"), progress=True)
                ids = np.random.default_rng(1).integers(0, args.rows, 2000)
                got = mem.gather(name, ids)
                vi, si = info["model.layers.1.engram.embed.weight"], info["model.layers.1.engram.embed.weight_scale"]
                with open(path, "rb") as f:
                    for k in (0, 1999):
                        f.seek(vi.start + int(ids[k]) * 256)
                        v = f.read(256)
                        f.seek(si.start + int(ids[k]) * 8)
                        assert got[k].tobytes() == v + f.read(8), "imported row differs from the file"
                results.append({"run": run, "shards": args.shards, "rows": r["rows"], "gb": round(r["bytes"] / 1e9, 3),
                                "seconds": round(r["seconds"], 2), "gbps": round(r["gbps"], 3),
                                "mrows_per_s": round(r["rows"] / r["seconds"] / 1e6, 3)})
                mem.drop_table(name)
    finally:
        for f in os.listdir(work):
            os.unlink(os.path.join(work, f))
        os.rmdir(work)
    cols = ["run", "shards", "rows", "gb", "seconds", "gbps", "mrows_per_s"]
    print_table(results, cols, title=f"\nimport of a {size / 1e9:.2f} GB FP8 table (load avg {os.getloadavg()[0]:.1f})")
    out = append_jsonl("import", {"bench": "import", "args": vars(args), "file_bytes": size, "results": results,
                                  "loadavg": os.getloadavg()})
    png = bar_plot("import", [r["run"] for r in results], [r["gbps"] for r in results], "GB/s",
                   f"engram-mem import of a {size / 1e9:.2f} GB FP8 table, {args.shards} shards")
    print(f"\nappended {out}\nplot {png}\n\n" + markdown_table(results, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
