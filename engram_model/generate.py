"""engram-generate: continue text with a trained model, prefill then KV-cache decode.

    engram-generate --checkpoint runs/small/ckpt --prompt "def read_config(path):" --max-new-tokens 80
    engram-generate --checkpoint runs/small/ckpt --prompt "import os" --temperature 0.8 --top-k 50 --top-p 0.95
    engram-generate --checkpoint runs/demo/ckpt --memory local --prompt "class Stack:"   # rows from the cluster

    from engram_model.generate import generate
    texts = generate(model, tok, ["class Queue:"], max_new_tokens=64, temperature=0.0)

Each prompt is encoded as EOS + text, the way every training file follows an EOS. The prompt is
run through the model once (prefill), then one token at a time with the KV cache; each new token's
n-gram rows are hashed from it and the previous max_n - 1 tokens kept in the cache. Greedy when
temperature is 0; otherwise temperature, then top-k, then top-p (nucleus) filtering, then a draw.

Prompts of different token lengths are decoded together as one batch, left-padded to the longest:

    EOS a  b  c  d        n_pad = [0, 2]: row 1's first two positions are padding; every new token
    PAD PAD EOS x  y      is appended on the right, where all rows stay aligned

The model is told n_pad (see model.py) and keeps padding out of everything a real token sees, so
each row decodes as it would alone: greedy tokens are equal, logits equal up to float summation
order. Sampling draws one token per row from a shared generator, so with a seed a batch is
reproducible, though not draw for draw the same as running its prompts one at a time. Only prompts
so long that the context limit cuts their output short are batched apart (by how many tokens they
get), so each prompt still gets exactly as many tokens as alone.
"""

from __future__ import annotations

import argparse
import json

import torch

from engram_model.model import EngramModel
from engram_model.tokenizer import CompressedTokenizer


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                       # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_tokens(model: EngramModel, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                    generator: torch.Generator | None = None, n_pad: torch.Tensor | None = None) -> torch.Tensor:
    """prompt int64 [B, T0] -> new tokens [B, n], n <= max_new_tokens (stops early once all rows hit EOS).

    n_pad int64 [B]: left padding, row b's prompt is prompt[b, n_pad[b]:] (the pad ids themselves
    never matter). The context is capped at model.cfg.max_seq_len: decoding stops when the longest
    prompt's context is full.
    """
    B, T0 = prompt.shape
    if n_pad is not None and (n_pad.shape != (B,) or int(n_pad.min()) < 0 or int(n_pad.max()) >= T0):
        raise ValueError(f"n_pad must be [{B}] with values in [0, {T0}): every row needs a real token")
    longest = T0 - (int(n_pad.min()) if n_pad is not None else 0)
    if longest < 1 or longest > model.cfg.max_seq_len:
        raise ValueError(f"prompt length {longest} must be in [1, max_seq_len={model.cfg.max_seq_len}]")
    n = min(max_new_tokens, model.cfg.max_seq_len - longest + 1)   # the last token drawn is never fed back
    if n <= 0:
        return prompt.new_zeros(B, 0)
    was_training = model.training
    model.eval()
    cache = model.new_cache(B, max_len=T0 + n - 1)
    logits, _ = model(prompt, cache=cache, n_pad=n_pad)                        # prefill: [B, T0, V]
    out, done = [], torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for i in range(n):
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # [B]
        if eos_id is not None:
            nxt = nxt.masked_fill(done, eos_id)
            done |= nxt == eos_id
        out.append(nxt)
        if i + 1 == n or (eos_id is not None and bool(done.all())):
            break
        logits, _ = model(nxt[:, None], cache=cache)                           # decode: [B, 1, V]
    model.train(was_training)
    return torch.stack(out, dim=1) if out else prompt.new_zeros(B, 0)


def generate(model: EngramModel, tokenizer: CompressedTokenizer, prompts: list[str], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop_at_eos: bool = True) -> list[str]:
    """Completions (new text only) for each prompt, in order; prompts share one left-padded batch."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()                     # non-deterministic, without touching torch's global RNG
    encoded = [[tokenizer.eos_id] + tokenizer.encode(p) for p in prompts]
    results: list[str | None] = [None] * len(prompts)
    # Batch by how many tokens each prompt may get: all of max_new_tokens unless its context fills first.
    by_budget: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_budget.setdefault(min(max_new_tokens, model.cfg.max_seq_len - len(ids) + 1), []).append(i)
    for _, idx in sorted(by_budget.items()):
        lengths = [len(encoded[i]) for i in idx]
        T0 = max(lengths)
        prompt = torch.full((len(idx), T0), tokenizer.pad_id, dtype=torch.int64)                  # [B, T0]
        for row, (i, length) in enumerate(zip(idx, lengths)):
            prompt[row, T0 - length:] = torch.tensor(encoded[i])                                # right-aligned
        n_pad = torch.tensor([T0 - length for length in lengths], dtype=torch.int64)            # [B]
        new = generate_tokens(model, prompt.to(device), max_new_tokens, temperature, top_k, top_p,
                              eos_id=tokenizer.eos_id if stop_at_eos else None, generator=generator,
                              n_pad=n_pad.to(device))
        for row, i in enumerate(idx):
            ids = new[row].tolist()
            if stop_at_eos and tokenizer.eos_id in ids:
                ids = ids[:ids.index(tokenizer.eos_id)]
            results[i] = tokenizer.decode(ids)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="engram-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by engram-train (…/ckpt)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--memory", default=None, metavar="RAY_ADDRESS",
                   help="read the Engram rows from the memory cluster at this Ray address ('local': the one "
                        "`engram-mem up` started), as an inference worker with a hot-row cache")
    p.add_argument("--memory-name", default="engram-mem")
    p.add_argument("--cache-mb", type=int, default=64, help="with --memory: hot-row cache per table")
    p.add_argument("--import-tables", action="store_true",
                   help="with --memory: first write the checkpoint's own tables into the cluster")
    p.add_argument("--record-ids", metavar="PATH.npz", help="save the Engram row ids read (for engram-mem plan --trace)")
    args = p.parse_args(argv)
    from pathlib import Path

    from engram_model.checkpoint import load_model

    mem = None
    if args.memory:
        import engram_mem
        from engram_model.cluster_rows import load_for_inference
        from engram_model.train_cli import _resolve_memory

        mem = engram_mem.connect(_resolve_memory(args.memory, args.memory_name), name=args.memory_name,
                                 read_only=not args.import_tables)  # inference only reads rows
        model, tok = load_for_inference(args.checkpoint, mem, device=args.device, cache_bytes=args.cache_mb << 20,
                                        import_tables=args.import_tables)
    else:
        if not (Path(args.checkpoint) / "tables.safetensors").exists() and \
                json.loads((Path(args.checkpoint) / "config.json").read_text())["model"].get("engram"):
            raise SystemExit(f"engram-generate: {args.checkpoint} has no tables.safetensors: its Engram tables live in "
                             f"a memory cluster; pass --memory RAY_ADDRESS (or 'local')")
        model, tok = load_model(args.checkpoint, device=args.device)
    if args.record_ids and model.rows is not None:
        from engram_model.trace import IdRecorder

        model.rows = IdRecorder(model.rows, args.record_ids)
    texts = generate(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    if args.record_ids and model.rows is not None:
        print(f"row ids saved to {model.rows.save()}")
    for prompt, text in zip(args.prompt, texts):
        print(f"--- {prompt!r}\n{prompt}{text}")
    if mem is not None:
        model.rows.close()
        mem.close()


if __name__ == "__main__":
    main()
