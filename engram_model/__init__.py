"""engram_model: the Engram-MoE language model, its tokenizer, training and generation.

    engram-train --config small                     # train on the Python stdlib (a few minutes on CPU)
    engram-generate --checkpoint runs/small/ckpt --prompt "def main():"
    engram-serve --checkpoint runs/small/ckpt       # OpenAI-compatible API; --replicas N on Ray Serve

The map: config.py (ModelConfig, EngramConfig, TrainConfig; sizes in configs/*.json),
tokenizer.py (byte-level BPE + compression), hashing.py (NgramHasher, reference-compatible),
rows.py (RowSource: where Engram table rows come from; LocalRows in-process), engram.py (the
Engram module), attention.py, moe.py, model.py (EngramModel), data.py (the stdlib corpus),
documents.py (the user's files for --data), train.py, generate.py, checkpoint.py; serving:
engine.py (continuous batching) with batch_cache.py, openai_api.py (FastAPI app), serve.py (the
CLI), deployment.py (Ray Serve). Ray and gRPC are needed only by cluster_rows.py, deployment.py
and serve.py's --memory and --replicas paths.
"""
