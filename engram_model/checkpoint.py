"""Checkpoints: one directory of safetensors files plus a JSON manifest.

    save_checkpoint("runs/small/ckpt", model, rows, optimizer, tokenizer, train_cfg, step=1000)
    ckpt = load_checkpoint("runs/small/ckpt", device="cpu")     # -> Checkpoint(model, rows, tokenizer, ...)
    model, tok = load_model("runs/small/ckpt")                 # generation: read-only tables

Layout:
    config.json            {"model": ModelConfig, "train": TrainConfig, "step": int, "extra": {...}}
    model.safetensors      dense weights and buffers (router biases, compression lookup)
    tables.safetensors     the RowSource's state: rows and row-wise Adam state per table (if any)
    cluster-tables/        tables living in a memory cluster: its consistent cut (engram-mem checkpoint DIR)
    optimizer.safetensors  AdamW state flattened as "<param name>.<exp_avg|exp_avg_sq|step>"
    tokenizer.json         the BPE tokenizer (compression is recomputed from it)

A checkpoint is written to a sibling temp directory and renamed into place, so a crash mid-save
leaves the previous checkpoint intact. With a remote RowSource, tables.safetensors holds
whatever its state_dict returns, and a RowSource with `save_cut` (the memory cluster) writes a cut
of its tables beside it, taken at the same step, which `load_checkpoint(..., rows=that source)`
restores: dense model and tables come back to the same step.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model as st_load_model, save_file, save_model as st_save_model

from engram_model.config import ModelConfig, TrainConfig
from engram_model.model import EngramModel
from engram_model.rows import TABLE_OPTIMIZER, LocalRows, RowSource, table_specs
from engram_model.tokenizer import CompressedTokenizer


CLUSTER_CUT = "cluster-tables"


@dataclass
class Checkpoint:
    model: EngramModel
    rows: RowSource | None
    tokenizer: CompressedTokenizer | None
    model_cfg: ModelConfig
    train_cfg: TrainConfig | None
    step: int
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Flatten a torch optimizer's per-parameter state, keyed by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {}
    for i, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{names[id(params[i])]}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def load_optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    """Inverse of optimizer_tensors, into an optimizer built with the same parameter groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, p in enumerate(params):
        prefix = names[id(p)] + "."
        st = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if st:
            state[i] = st
    used = sum(len(s) for s in state.values())
    if used != len(flat):
        raise ValueError(f"optimizer state has {len(flat) - used} tensors that match no parameter of this model")
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)


def save_checkpoint(path: str | Path, model: EngramModel, rows: RowSource | None = None,
                    optimizer: torch.optim.Optimizer | None = None, tokenizer: CompressedTokenizer | None = None,
                    train_cfg: TrainConfig | None = None, step: int = 0, extra: dict | None = None) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest = {"model": model.cfg.to_dict(), "train": train_cfg.to_dict() if train_cfg else None,
                "step": int(step), "extra": extra or {}}
    (tmp / "config.json").write_text(json.dumps(manifest, indent=2))
    st_save_model(model, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    if rows is not None and hasattr(rows, "save_cut"):
        rows.save_cut(str((tmp / CLUSTER_CUT).resolve()))
    table_state = rows.state_dict() if rows is not None else {}
    if table_state:
        save_file({k: v.contiguous().cpu() for k, v in table_state.items()}, str(tmp / "tables.safetensors"))
    if optimizer is not None:
        save_file({k: v.contiguous().cpu() for k, v in optimizer_tensors(model, optimizer).items()},
                  str(tmp / "optimizer.safetensors"))
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer.json")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", rows: RowSource | None = None,
                    trainable: bool = True) -> Checkpoint:
    """Rebuild model, tables and tokenizer. rows: use this RowSource instead of in-process tables
    (its state is then not loaded from the checkpoint). trainable=False: read-only tables."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a checkpoint (no config.json)")
    manifest = json.loads((path / "config.json").read_text())
    cfg = ModelConfig.from_dict(manifest["model"])
    train_cfg = TrainConfig.from_dict(manifest["train"]) if manifest.get("train") else None
    tok = CompressedTokenizer.load(path / "tokenizer.json") if (path / "tokenizer.json").exists() else None
    if rows is not None and hasattr(rows, "restore_cut") and trainable and (path / CLUSTER_CUT).exists():
        rows.restore_cut(str((path / CLUSTER_CUT).resolve()))
    if rows is None and cfg.engram is not None:
        rows = LocalRows(table_specs(cfg), device=device, optimizer=TABLE_OPTIMIZER if trainable else None)
        rows.load_state_dict(load_file(str(path / "tables.safetensors"), device=str(device)))
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        lookup = f.get_tensor("compress_lookup").numpy()
    model = EngramModel(cfg, rows=rows, compress_lookup=lookup)
    st_load_model(model, str(path / "model.safetensors"), strict=True)
    model.to(device)
    if tok is not None and not torch.equal(model.compress_lookup.cpu(), torch.from_numpy(tok.lookup)):
        raise ValueError(f"{path}: tokenizer.json's compression differs from the one the model was trained with")
    opt_file = path / "optimizer.safetensors"
    opt_state = load_file(str(opt_file), device=str(device)) if opt_file.exists() else {}
    return Checkpoint(model, rows, tok, cfg, train_cfg, int(manifest["step"]), opt_state, manifest.get("extra", {}))


def load_model(path: str | Path, device: torch.device | str = "cpu", rows: RowSource | None = None
               ) -> tuple[EngramModel, CompressedTokenizer]:
    """Model (in eval mode) and tokenizer for generation; in-process tables are read-only."""
    ckpt = load_checkpoint(path, device=device, rows=rows, trainable=False)
    if ckpt.tokenizer is None:
        raise FileNotFoundError(f"{path} has no tokenizer.json")
    return ckpt.model.eval(), ckpt.tokenizer
