"""The training loop: an Engram-MoE (or a pure MoE) on the Python standard library's source or your data.

The command line is train_cli.py:

    engram-train --config small --out runs/small                  # a few minutes on 2 CPU cores
    engram-train --config tiny --steps 50 --dtype bf16 --set lr=1e-3 --set model.dim=64
    engram-train --resume runs/small/ckpt --steps 2000             # continue a run
    engram-train --memory local --reset-tables                     # tables in the `engram-mem up` cluster
    engram-train --memory 127.0.0.2:6379 --nproc 2                 # two data-parallel workers, one cluster
    engram-train --data my_docs/ 'more/*.jsonl' data.parquet --config tiny   # your own text (documents.py)
    engram-train --data corpus.txt --tokenizer path/to/tokenizer.json        # a Hugging Face tokenizer made elsewhere

    from engram_model.train import train
    history = train(model_cfg, train_cfg, out_dir="runs/x", device="cpu")

Dense weights: AdamW with warmup + cosine decay, weight decay on matrices, global-norm gradient
clipping. Engram tables: whatever RowSource make_row_source returns (in-process LocalRows here),
stepped with row-wise Adam at table_lr_mult (5x) the dense lr of that step and no weight decay;
clipping never touches them. MoE routers are balanced with the bias update after every step.

Outputs in --out: ckpt/ (safetensors checkpoint, see checkpoint.py), history.json, loss.png.
The tokenizer is trained once on the training split and cached (runs/tokenizer/), as is the
tokenized corpus (runs/cache/). --data trains on the user's files instead of the stdlib (text,
directories/globs, JSON Lines, Parquet; see documents.py); progress shows tokens/s and the ETA.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engram_model import distributed
from engram_model.checkpoint import load_checkpoint, load_optimizer_tensors, save_checkpoint
from engram_model.config import ModelConfig, TrainConfig
from engram_model.data import Corpus, read_texts, split_files, stdlib_files
from engram_model.documents import build_data_corpus, data_fingerprint, expand_data_paths, training_texts
from engram_model.model import EngramModel, count_params
from engram_model.rows import LocalRows, RowSource, table_specs
from engram_model.tokenizer import CompressedTokenizer


DEFAULT_RUNS = Path("runs")


# ---- the pieces a run is made of ------------------------------------------------------------
def make_row_source(cfg: ModelConfig, args, device: torch.device | str) -> RowSource | None:
    """The one place training gets its Engram tables. args: the TrainConfig (or CLI namespace).

    In-process tables. With --memory the CLI gives train() a ClusterRows instead (see
    _memory_worker); it is imported lazily so that this module never imports Ray or gRPC itself.
    """
    if cfg.engram is None:
        return None
    return LocalRows(table_specs(cfg), device=device)


def default_tokenizer_path(vocab_size: int, data: list[str] | None = None) -> Path:
    if data:
        return DEFAULT_RUNS / "tokenizer" / f"data-{data_fingerprint(expand_data_paths(data))}-bpe-{vocab_size}.json"
    return DEFAULT_RUNS / "tokenizer" / f"stdlib-bpe-{vocab_size}.json"


def load_or_train_tokenizer(path: str | Path | None, vocab_size: int, val_fraction: float = 0.05,
                            log=print, data: list[str] | None = None) -> CompressedTokenizer:
    """Load a saved tokenizer (ours, or any Hugging Face tokenizer.json), or train one on the training
    split of the stdlib (data None) or of the user's --data files, and save it."""
    path = Path(path) if path is not None else default_tokenizer_path(vocab_size, data)
    if path.exists():
        return CompressedTokenizer.load(path)
    t0 = time.time()
    if data:
        train_files = expand_data_paths(data)
        tok = CompressedTokenizer.train(training_texts(train_files, val_fraction), vocab_size=vocab_size)
    else:
        train_files, _ = split_files(stdlib_files(), val_fraction)   # never fit the tokenizer on validation
        tok = CompressedTokenizer.train(read_texts(train_files), vocab_size=vocab_size)
    tok.save(path)
    log(f"tokenizer: trained {tok.vocab_size} tokens on {len(train_files)} files in {time.time() - t0:.0f}s -> {path}; "
        f"compressed vocab {tok.compressed_vocab_size} ({tok.reduction:.2%} reduction)")
    return tok


def tune_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS.

    Tensors above glibc's mmap threshold (the [B*T, V] logits, attention buffers) are otherwise
    mmapped fresh and page-faulted in on every step; on a 2-core machine that cost ~40% of a
    training step. Process-wide and harmless; a no-op where glibc is absent. Returns success.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at the last step."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, tc.steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def effective_dtype(device: torch.device, dtype: str) -> str:
    """The dtype a run computes in: bf16 autocast where the hardware has bf16 (CUDA, or a CPU with
    AVX512-BF16 or AMX); fp32 on a CPU without, where bf16 is emulated and far slower (on an AVX2
    AMD EPYC here: 9 s a step of the small config in bf16 against 0.5 s in fp32)."""
    if dtype == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "fp32"
    return dtype


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(model: EngramModel, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, aux balance loss) of next-token prediction; x, y int64 [B, T]."""
    logits, aux = model(x)                                                            # [B, T, V]
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), aux


@torch.no_grad()
def evaluate(model: EngramModel, batches, device: torch.device, dtype: str = "fp32") -> float:
    """Mean validation cross-entropy (nats/token) over fixed batches."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        with autocast(device, dtype):
            ce, _ = lm_loss(model, x.to(device), y.to(device))
        total += ce.item()
    model.train(was_training)
    return total / len(batches)


def plot_losses(curves: dict[str, tuple[list, list]], path: str | Path, title: str = "", ylabel: str = "loss") -> None:
    """One PNG with a line per curve: {label: (steps, values)}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 40 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def new_history() -> dict[str, list]:
    return {"step": [], "loss": [], "aux": [], "lr": [], "tokens": [], "elapsed": [],
            "val_step": [], "val_loss": [], "val_elapsed": []}


# ---- the loop ---------------------------------------------------------------------------------
@dataclass
class TrainResult:
    history: dict          # step, loss, aux, lr, tokens, elapsed, val_step, val_loss, val_elapsed, params, train_seconds
    model: EngramModel
    rows: RowSource | None
    tokenizer: CompressedTokenizer
    model_cfg: ModelConfig  # resolved for the tokenizer

    @property
    def final_val_loss(self) -> float:
        return self.history["val_loss"][-1]


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, *, out_dir: str | Path | None = None,
          device: torch.device | str = "cpu", tokenizer: CompressedTokenizer | None = None,
          tokenizer_path: str | Path | None = None, corpus: Corpus | None = None, rows: RowSource | None = None,
          resume: str | Path | None = None, stop_at: int | None = None, progress: bool = True,
          name: str = "train", log=None, data: list[str] | None = None,
          record_ids: str | None = None, prefetch_ahead: bool = True) -> TrainResult:
    """Train a model; the returned history is JSON-serializable (and saved as out_dir/history.json).

    tokenizer/corpus: pass them to share one across runs (the benchmark does); otherwise they are
    loaded or built and cached under runs/. rows: a RowSource to use instead of make_row_source.
    resume: a checkpoint directory to continue from (model, tables, AdamW state, step, data RNG,
    history; its tokenizer and model config win over the ones given).
    prefetch_ahead: with a prefetching RowSource (ClusterRows), the next micro-batch's rows are
    fetched while this one trains, and the next step's once this step's push is sent (the fetch
    waits for the push: read-your-writes), so they overlap the dense optimizer step. The batch is
    drawn from a copy of the data RNG; the draw itself stays where it was, so the run is unchanged.
    stop_at: end this call after that step (checkpointing there), e.g. to run a long schedule in
    chunks; the lr schedule still spans train_cfg.steps.
    out_dir: where ckpt/, history.json and loss.png go (None: nothing is written).
    data: paths/globs of the user's files to train on (documents.py) instead of the stdlib.

    Under torch.distributed (engram_model.distributed.launch), every worker calls train(): each
    draws its own batches, dense gradients and router loads are averaged/summed across workers,
    and only rank 0 logs, shows progress and writes outputs.
    """
    device = torch.device(device)
    tc = train_cfg
    rank = distributed.rank()
    if rank != 0:
        progress, out_dir, log = False, None, (lambda *a: None)
    log = log or (tqdm.write if progress else print)
    if device.type == "cpu":
        tune_cpu_allocator()
    torch.manual_seed(tc.seed)
    start, history, rng_state, opt_state = 0, new_history(), None, None
    if resume is not None:
        ckpt = load_checkpoint(resume, device=device, rows=rows)
        model, rows, tokenizer, cfg = ckpt.model, ckpt.rows, ckpt.tokenizer, ckpt.model_cfg
        start, opt_state = ckpt.step, ckpt.optimizer_state
        history = ckpt.extra.get("history", history)
        rng_state = ckpt.extra.get("data_rng")
    else:
        if tokenizer is None:
            tokenizer = load_or_train_tokenizer(tokenizer_path, tc.tokenizer_vocab, tc.val_fraction, log=log, data=data)
        cfg = model_cfg.for_tokenizer(tokenizer)
        rows = rows if rows is not None else make_row_source(cfg, tc, device)
        model = EngramModel(cfg, rows=rows, compress_lookup=tokenizer.lookup).to(device)
    if record_ids and rows is not None:  # engram_model.trace: keep the row ids each forward reads
        from engram_model.trace import IdRecorder

        model.rows = rows = IdRecorder(rows, record_ids)
    if tc.seq_len > cfg.max_seq_len:
        raise ValueError(f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    if corpus is None and data:
        corpus = build_data_corpus(tokenizer, data, tc.val_fraction, cache_dir=DEFAULT_RUNS / "cache", log=log)
    elif corpus is None:
        corpus = Corpus.build(tokenizer, tc.val_fraction, cache_dir=DEFAULT_RUNS / "cache")
    model.train()
    opt = torch.optim.AdamW(model.param_groups(tc.weight_decay), lr=tc.lr, betas=tc.betas, eps=1e-8)
    if opt_state:
        load_optimizer_tensors(model, opt, opt_state)
    # Rank 0 draws exactly the batches of a single-process run; other ranks their own.
    data_rng = np.random.default_rng(tc.seed if rank == 0 else [tc.seed, rank])
    if rng_state is not None:
        data_rng.bit_generator.state = rng_state
    eval_batches = corpus.eval_batches(tc.batch_size, tc.seq_len, tc.eval_batches)
    params = count_params(cfg)
    history["params"] = params
    log(f"[{name}] {params['total'] / 1e6:.2f}M params ({params['engram_tables'] / 1e6:.2f}M in Engram tables), "
        f"{params['activated'] / 1e6:.2f}M activated/token; {len(corpus.train) / 1e6:.2f}M train tokens; "
        f"{tc.steps} steps x {tc.tokens_per_step} tokens; {tc.dtype} on {device}")
    dtype = effective_dtype(device, tc.dtype)
    if dtype != tc.dtype:
        log(f"[{name}] this CPU has no native bf16 (AVX512-BF16 or AMX): computing in fp32, not emulated bf16")

    out = Path(out_dir) if out_dir is not None else None
    dense = [p for p in model.parameters() if p.requires_grad]
    run_t0 = time.time()
    t0 = run_t0 - (history["elapsed"][-1] if history["elapsed"] else 0.0)   # elapsed continues across resumes
    end = min(tc.steps, stop_at) if stop_at is not None else tc.steps
    bar = tqdm(total=end, initial=start, desc=name, disable=not progress, dynamic_ncols=True)
    bad_steps = 0
    ahead = prefetch_ahead and rows is not None and rows.prefetch_enabled

    def fetch_next() -> None:
        """The next micro-batch's rows on their way: the same draw, from a copy of the RNG."""
        x, _ = corpus.batch("train", tc.batch_size, tc.seq_len, copy.deepcopy(data_rng))
        model.prefetch(x.to(device))

    for step in range(start, end):
        lr = lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        if rows is not None:
            rows.zero_grad()
        loss_sum, aux_sum = 0.0, 0.0
        for micro in range(tc.grad_accum):
            x, y = corpus.batch("train", tc.batch_size, tc.seq_len, data_rng)
            if ahead and micro + 1 < tc.grad_accum:
                model.prefetch(x.to(device))   # this one's first (a no-op when it went out ahead), then the next
                fetch_next()
            with autocast(device, dtype):
                ce, aux = lm_loss(model, x.to(device), y.to(device))
            ((ce + aux) / tc.grad_accum).backward()
            loss_sum += ce.item() / tc.grad_accum
            aux_sum += aux.item() / tc.grad_accum
        if distributed.is_distributed():  # every worker sees the mean loss, so all skip or none do
            both = torch.tensor([loss_sum, aux_sum], dtype=torch.float64)
            distributed.allreduce_mean([both])
            loss_sum, aux_sum = both.tolist()
        if not math.isfinite(loss_sum):
            # Skip the update (dense and tables alike); a run that keeps diverging is stopped.
            bad_steps += 1
            if rows is not None:
                rows.zero_grad()
            log(f"[{name}] step {step + 1}: non-finite loss, update skipped")
            if bad_steps >= 5:
                raise FloatingPointError(f"[{name}] {bad_steps} non-finite losses in a row; lower the lr")
            continue
        bad_steps = 0
        if rows is not None:  # first: a remote table's push then overlaps the dense all-reduce and step
            rows.step(lr * tc.table_lr_mult, step + 1)
            if ahead and step + 1 < end:
                fetch_next()     # waits for that push, then overlaps the dense step
        distributed.sync_dense_grads(model)
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(dense, tc.grad_clip)
        opt.step()
        distributed.sync_router_load(model)
        model.update_router_bias()

        history["step"].append(step + 1)
        history["loss"].append(loss_sum)
        history["aux"].append(aux_sum)
        history["lr"].append(lr)
        history["tokens"].append((step + 1) * tc.tokens_per_step)
        history["elapsed"].append(time.time() - t0)
        bar.update(1)
        if (step + 1) % tc.log_every == 0 or step == start:
            window = history["loss"][-tc.log_every:]
            tok_s = tc.tokens_per_step * (step + 1 - start) / max(time.time() - run_t0, 1e-9)
            bar.set_postfix(loss=f"{sum(window) / len(window):.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
        last = step + 1 == end
        if (tc.eval_every and (step + 1) % tc.eval_every == 0) or last:
            val = evaluate(model, eval_batches, device, dtype)
            history["val_step"].append(step + 1)
            history["val_loss"].append(val)
            history["val_elapsed"].append(time.time() - t0)
            rate = tc.tokens_per_step * (step + 1 - start) / max(time.time() - run_t0, 1e-9)
            eta = (time.time() - run_t0) / (step + 1 - start) * (end - step - 1)
            log(f"[{name}] step {step + 1}/{tc.steps}: train {loss_sum:.4f}  val {val:.4f}  ({time.time() - t0:.0f}s, "
                f"{rate:.0f} tok/s, ETA {eta:.0f}s)")
        checkpointing = (tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0) or last
        if checkpointing and hasattr(rows, "flush") and distributed.is_distributed():
            rows.flush()  # every worker's pushes of this step are in before rank 0 takes the tables' cut
            torch.distributed.barrier()
        if out is not None and checkpointing:
            save_checkpoint(out / "ckpt", model, rows, opt, tokenizer, tc, step=step + 1,
                            extra={"history": history, "data_rng": data_rng.bit_generator.state})
    bar.close()
    if record_ids and rows is not None:
        log(f"[{name}] row ids saved to {rows.save()}")
    history["train_seconds"] = history["elapsed"][-1] if history["elapsed"] else 0.0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "history.json").write_text(json.dumps(history))
        plot_losses({"train": (history["step"], history["loss"]), "validation": (history["val_step"], history["val_loss"])},
                    out / "loss.png", title=f"{name}: {params['total'] / 1e6:.1f}M params, {tc.steps} steps",
                    ylabel="cross-entropy (nats/token)")
    return TrainResult(history, model, rows, tokenizer, cfg)


# ---- command line -----------------------------------------------------------------------------
