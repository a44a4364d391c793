"""engram-train: the command line of the training loop (train.py).

    engram-train --config small --memory local --reset-tables          # tables in a memory cluster
    engram-train --config small --memory 127.0.0.2:6379 --nproc 2      # two data-parallel workers
    engram-train --config tiny --data 'corpus/**/*.jsonl' --set lr=1e-3 # your own data, overrides

Parses the flags and `--set key=value` overrides into the configs, resolves `--memory`, starts
`--nproc` worker processes where asked, and prints the run's figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from engram_model import distributed
from engram_model.config import ModelConfig, TrainConfig, load_config
from engram_model.data import Corpus
from engram_model.documents import build_data_corpus
from engram_model.rows import table_specs
from engram_model.tokenizer import CompressedTokenizer
from engram_model.train import DEFAULT_RUNS, TrainResult, default_tokenizer_path, load_or_train_tokenizer, train


def _apply_overrides(model_cfg: ModelConfig, train_cfg: TrainConfig, sets: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """--set key=value (train fields), model.key=value, model.engram.key=value; values are JSON."""
    md, td = model_cfg.to_dict(), train_cfg.to_dict()
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        parts = key.split(".")
        target = td
        if parts[0] == "model":
            target, parts = md, parts[1:]
            if parts and parts[0] == "engram" and len(parts) > 1:
                if md["engram"] is None:
                    raise ValueError("this config has no engram section to --set")
                target, parts = md["engram"], parts[1:]
        elif parts[0] == "train":
            parts = parts[1:]
        if len(parts) != 1:
            raise ValueError(f"--set: cannot resolve {key!r}")
        target[parts[0]] = value
    return ModelConfig.from_dict(md), TrainConfig.from_dict(td)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engram-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", help="config name in engram_model/configs or a JSON path (default: small)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<config name>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use or create (default: runs/tokenizer/...); "
                   "any Hugging Face tokenizer.json works")
    p.add_argument("--data", nargs="+", action="extend", default=None, metavar="PATH",
                   help="train on these text files, directories, glob patterns, .jsonl ({'text': ...} per line) "
                        "and .parquet ('text' column) instead of the Python standard library")
    p.add_argument("--resume", default=None, help="checkpoint directory to continue from")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--dtype", choices=["fp32", "bf16"])
    p.add_argument("--eval-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-engram", action="store_true", help="drop the Engram layers (pure MoE)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field: lr=1e-3, model.dim=128, model.engram.head_dim=16")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--memory", default=None, metavar="RAY_ADDRESS",
                   help="keep the Engram tables in the memory cluster at this Ray address ('local': the one "
                        "`engram-mem up` started on this machine)")
    p.add_argument("--memory-name", default="engram-mem", help="memory cluster name (default: %(default)s)")
    p.add_argument("--reset-tables", action="store_true",
                   help="with --memory: drop the model's tables first, so they start from their initial rows")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel training workers on this machine (needs --memory: they share its tables)")
    p.add_argument("--record-ids", metavar="PATH.npz", help="save the Engram row ids read (for engram-mem plan --trace)")
    return p


def _resolve_memory(address: str, name: str) -> str:
    if address != "local":
        return address
    from engram_mem.control import local

    state = local.read_state(name)
    if state is None:
        raise SystemExit(f"engram-train: no local memory cluster {name!r} is running; start one with `engram-mem up`")
    return state["ray_address"]


def _memory_worker(rank: int, world: int, model_cfg: ModelConfig, train_cfg: TrainConfig, opts: dict) -> None:
    """One training worker attached to the memory cluster (rank 0 alone when --nproc 1)."""
    import engram_mem
    from engram_model.cluster_rows import ClusterRows

    with engram_mem.connect(opts["memory"], name=opts["memory_name"]) as mem:
        tok = CompressedTokenizer.load(opts["tokenizer"])
        cfg = model_cfg.for_tokenizer(tok) if model_cfg.engram is not None else None
        rows = None
        if cfg is not None:
            rows = ClusterRows(mem, table_specs(cfg), device=opts["device"], grad_scale=1.0 / world)
        try:
            res = train(model_cfg, train_cfg, out_dir=opts["out"], device=opts["device"], tokenizer=tok, rows=rows,
                        resume=opts["resume"], progress=opts["progress"], name=opts["name"], data=opts.get("data"),
                        record_ids=opts.get("record_ids") if rank == 0 else None)
        finally:
            if rows is not None:
                rows.close()
        if rank == 0:
            _report(res, opts["out"])


def _report(res: "TrainResult", out) -> None:
    h = res.history
    if h["val_loss"]:
        print(f"final validation loss {h['val_loss'][-1]:.4f} after {h['step'][-1]} steps, "
              f"{h['train_seconds']:.0f}s; checkpoint, history.json and loss.png in {out}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.resume:   # continue with the run's own configs; flags and --set still override train fields
        manifest = json.loads((Path(args.resume) / "config.json").read_text())
        model_cfg, train_cfg = ModelConfig.from_dict(manifest["model"]), TrainConfig.from_dict(manifest["train"])
    else:
        model_cfg, train_cfg = load_config(args.config)
    sets = list(args.set)
    for flag, field_name in (("steps", "steps"), ("batch_size", "batch_size"), ("seq_len", "seq_len"), ("lr", "lr"),
                             ("dtype", "dtype"), ("eval_every", "eval_every"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            sets.append(f"{field_name}={json.dumps(getattr(args, flag))}")
    model_cfg, train_cfg = _apply_overrides(model_cfg, train_cfg, sets)
    if args.no_engram:
        model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), "engram": None})
    if args.out:
        out = Path(args.out)
    else:
        out = Path(args.resume).parent if args.resume else DEFAULT_RUNS / Path(args.config).stem
    if args.nproc < 1:
        raise SystemExit(f"engram-train: --nproc must be >= 1, got {args.nproc}")
    if args.memory is None:
        if args.nproc > 1:
            raise SystemExit("engram-train: --nproc > 1 needs --memory: data-parallel workers share the Engram "
                             "tables through a memory cluster (start one with `engram-mem up`)")
        res = train(model_cfg, train_cfg, out_dir=out, device=args.device, tokenizer_path=args.tokenizer,
                    resume=args.resume, progress=not args.no_progress, name=Path(args.config).stem, data=args.data,
                    record_ids=args.record_ids)
        _report(res, out)
        return
    # Tables in the memory cluster: the tokenizer is made once here, then each worker attaches.
    address = _resolve_memory(args.memory, args.memory_name)
    if args.resume:
        tok_path = str(Path(args.resume) / "tokenizer.json")
    else:
        tok = load_or_train_tokenizer(args.tokenizer, train_cfg.tokenizer_vocab, train_cfg.val_fraction, data=args.data)
        tok_path = str(Path(args.tokenizer) if args.tokenizer else
                       default_tokenizer_path(train_cfg.tokenizer_vocab, args.data))
        if args.data:   # tokenized once, cached
            build_data_corpus(tok, args.data, train_cfg.val_fraction, cache_dir=DEFAULT_RUNS / "cache")
        else:
            Corpus.build(tok, train_cfg.val_fraction, cache_dir=DEFAULT_RUNS / "cache")
        if args.reset_tables and model_cfg.engram is not None:
            import engram_mem

            with engram_mem.connect(address, name=args.memory_name) as mem:
                for spec in table_specs(model_cfg.for_tokenizer(tok)).values():
                    if spec.name in mem.tables():
                        mem.drop_table(spec.name)
    opts = {"memory": address, "memory_name": args.memory_name, "tokenizer": tok_path, "device": args.device,
            "out": str(out), "resume": args.resume, "progress": not args.no_progress, "name": Path(args.config).stem,
            "data": args.data, "record_ids": args.record_ids}
    if args.nproc == 1:
        _memory_worker(0, 1, model_cfg, train_cfg, opts)
    else:
        distributed.launch(_memory_worker, args.nproc, model_cfg, train_cfg, opts)


if __name__ == "__main__":
    main()
