"""Resumable training checkpoints in safetensors (never pickle).

One file holds everything a stage needs to resume: model tensors (``model.<name>``), an optional EMA copy
(``ema.<name>``), the optimizer state (``optim.<param index>.<key>``; the param groups go to the metadata as
JSON) and a JSON ``meta`` dict (step, elapsed seconds, anything else). Writes are atomic (temp file + rename),
so a session killed mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["save_checkpoint", "load_checkpoint", "optimizer_to_tensors", "optimizer_from_tensors"]


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if not torch.is_tensor(v):
                v = torch.tensor(v)
            tensors[f"optim.{idx}.{k}"] = v.detach().contiguous().clone()
    return tensors, json.dumps(sd["param_groups"])


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups_json: str) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    groups = json.loads(groups_json)
    for g in groups:  # JSON turns tuples into lists; Adam wants its betas as a tuple
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, opt: torch.optim.Optimizer | None,
                    meta: dict, ema: torch.nn.Module | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().contiguous().clone() for k, v in ema.state_dict().items()})
    metadata = {"meta": json.dumps(meta)}
    if opt is not None:
        t, groups = optimizer_to_tensors(opt)
        tensors.update(t)
        metadata["param_groups"] = groups
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, opt: torch.optim.Optimizer | None,
                    ema: torch.nn.Module | None = None) -> dict | None:
    """Restore in place; returns the meta dict, or None when there is no checkpoint at ``path``."""
    path = Path(path)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    if opt is not None and "param_groups" in metadata:
        optimizer_from_tensors(opt, tensors, metadata["param_groups"])
    return json.loads(metadata["meta"])
