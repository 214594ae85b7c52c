"""Composition strategies: how the per-step outputs of several networks become one step.

- ``msdda``: the exact product of the experts' Gaussians, with each expert's own variance (the paper).
- ``mpa``: average of the experts' raw outputs, then one Gaussian step (Diffusion Blend's DB-MPA).
- ``soup``: one network whose parameters are the weighted average of the experts' (rewarded soups).
- ``base``: the base model alone. ``expert:NAME``: one expert alone.

A strategy is resolved once per call into a ``Plan`` (which networks run, with which coefficients c_k), and
the per-step work is a small pure function of that plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from msdda.validation import (STRATEGIES, check_beta, check_expert_betas, check_weights,
                              normalized_weights)

__all__ = ["STRATEGIES", "Plan", "coefficient_matrix", "resolve", "mix_outputs"]


@dataclass(frozen=True)
class Plan:
    kind: str                      # "product" | "mix" | "soup" | "single"
    members: tuple[int, ...]       # indices into the backend's members, in the order raw outputs come back
    coeff: torch.Tensor            # c_k per sample: [B, len(members)], float64 on the host


def coefficient_matrix(weights: Sequence[Mapping[str, float]], members: Sequence[str], *, normalize: bool = False,
                       expert_betas: Mapping[str, float] | None = None, beta: float = 1.0) -> torch.Tensor:
    """Per-sample coefficients c [B, M] over all members (the base first), from per-sample weights.

    c_k = w_k in the paper's setting. With ``expert_betas`` (expert k's KL strength beta_k) and a shared
    ``beta``, c_k = w_k beta_k / beta and the reference (base) gets c_0 = 1 - sum_k c_k, which may be negative.
    """
    experts = list(members[1:])
    beta = check_beta(beta)
    if expert_betas is not None:
        expert_betas = check_expert_betas(expert_betas, experts)
    rows = []
    for i, w in enumerate(weights):
        checked = check_weights(w, experts)
        values = normalized_weights([checked.get(name, 0.0) for name in experts], normalize=normalize,
                                    label=f"weights for sample {i}")
        if expert_betas is not None:
            values = [v * expert_betas[n] / beta for n, v in zip(experts, values)]
            if not all(math.isfinite(v) for v in values) or not math.isfinite(sum(values)):
                raise ValueError(f"weights for sample {i} times expert_betas / beta overflow ({values})")
            rows.append([1.0 - sum(values)] + values)
        else:
            rows.append([0.0] + values)
    return torch.tensor(rows, dtype=torch.float64)


def resolve(strategy: str, members: Sequence[str], coeff: torch.Tensor) -> Plan:
    """Turn a strategy name (checked: ``msdda.validation.check_strategy``) and the full coefficient matrix
    [B, M] into a Plan."""
    batch = coeff.shape[0]
    one = torch.ones(batch, 1, dtype=torch.float64)
    if strategy == "base":
        return Plan("single", (0,), one)
    if strategy.startswith("expert:"):
        return Plan("single", (members.index(strategy.split(":", 1)[1]),), one)
    used = tuple(m for m in range(len(members)) if bool((coeff[:, m] != 0).any()))
    kind = {"msdda": "product", "mpa": "mix", "soup": "soup"}[strategy]
    return Plan(kind, used, coeff[:, list(used)])


def mix_outputs(raw: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """sum_k c_k raw_k: raw [K, (2,) B, C_out, H, W], coeff [B, K] (on raw's device) -> [1, (2,) B, C_out, H, W]."""
    batch_dim = raw.dim() - 4
    shape = [coeff.shape[1]] + [1] * (batch_dim - 1) + [coeff.shape[0], 1, 1, 1]
    return (raw * coeff.t().to(raw.dtype).reshape(shape)).sum(0, keepdim=True)
