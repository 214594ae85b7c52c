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

STRATEGIES = ("msdda", "mpa", "soup", "base", "expert:NAME")


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
    rows = []
    for i, w in enumerate(weights):
        unknown = sorted(set(w) - set(experts))
        if unknown:
            raise ValueError(f"unknown expert {unknown[0]!r} in weights; experts are: {', '.join(experts) or 'none'}")
        values = [float(w.get(name, 0.0)) for name in experts]
        bad = [n for n, v in zip(experts, values) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"weight for {bad[0]!r} is not a finite number ({w[bad[0]]})")
        neg = [n for n, v in zip(experts, values) if v < 0]
        if neg:
            raise ValueError(f"weight for {neg[0]!r} is negative ({w[neg[0]]}); weights must be >= 0")
        total = sum(values)
        if total <= 0:
            raise ValueError(f"weights for sample {i} are all zero; give at least one expert a positive weight")
        if normalize:
            values = [v / total for v in values]
        elif abs(total - 1.0) > 1e-6:
            raise ValueError(f"weights for sample {i} sum to {total:g}, not 1 (pass normalize=True / --normalize)")
        if expert_betas is not None:
            missing = [n for n in experts if n not in expert_betas]
            if missing:
                raise ValueError(f"expert_betas has no KL strength for {missing[0]!r}")
            values = [v * float(expert_betas[n]) / beta for n, v in zip(experts, values)]
            rows.append([1.0 - sum(values)] + values)
        else:
            rows.append([0.0] + values)
    return torch.tensor(rows, dtype=torch.float64)


def resolve(strategy: str, members: Sequence[str], coeff: torch.Tensor) -> Plan:
    """Turn a strategy name and the full coefficient matrix [B, M] into a Plan."""
    batch = coeff.shape[0]
    one = torch.ones(batch, 1, dtype=torch.float64)
    if strategy == "base":
        return Plan("single", (0,), one)
    if strategy.startswith("expert:"):
        name = strategy.split(":", 1)[1]
        if name not in members[1:]:
            raise ValueError(f"unknown expert {name!r} in strategy; experts are: {', '.join(members[1:]) or 'none'}")
        return Plan("single", (members.index(name),), one)
    if strategy not in ("msdda", "mpa", "soup"):
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    used = tuple(m for m in range(len(members)) if bool((coeff[:, m] != 0).any()))
    kind = {"msdda": "product", "mpa": "mix", "soup": "soup"}[strategy]
    return Plan(kind, used, coeff[:, list(used)])


def mix_outputs(raw: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """sum_k c_k raw_k: raw [K, (2,) B, C_out, H, W], coeff [B, K] (on raw's device) -> [1, (2,) B, C_out, H, W]."""
    batch_dim = raw.dim() - 4
    shape = [coeff.shape[1]] + [1] * (batch_dim - 1) + [coeff.shape[0], 1, 1, 1]
    return (raw * coeff.t().to(raw.dtype).reshape(shape)).sum(0, keepdim=True)
