"""A network output to the step's Gaussian: the one definition (ARCHITECTURE.md section 2).

Every place that turns a diffusion network's output into p(x_{t_prev} | x_t) = N(mean, var) calls
``gaussian_step``: the float64 references of the fused kernel, the schedule's tests, the zoo trainer and the
evaluation. ``fused_expert_step`` (fused_step.py) is its fast twin, one launch for K experts, and the tests
compare the two.

For one output ``out`` (the eps / v / x0 channels after classifier-free guidance) at ``x_t``, with the step's
``StepScalars`` built on the host from the float64 schedule (``msdda.schedule.step_scalars``)::

    x0   = clamp(px * x_t + po * out, -clip, clip)          (clip = inf: no clipping)
    mean = mx * x_t + m0 * x0 + mo * out
    var  = exp(log_var_fixed)                               FIXED          (-inf: variance 0, DDIM eta = 0)
           exp(frac * lv_max + (1 - frac) * lv_min)        LEARNED_RANGE  (frac = (v + 1) / 2, IDDPM)
           v                                                LEARNED        (the channel is the variance)

where ``v`` is the variance channel (channels C..2C of a 2C-channel output).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["VarMode", "StepScalars", "StepGaussian", "apply_guidance", "gaussian_step"]


class VarMode(enum.IntEnum):
    """How a step's variance is obtained (the kernel's VAR_MODE constexpr)."""

    FIXED = 0  # log_var = log_var_fixed (DDPM fixed_small / fixed_large, DDIM sigma_t^2)
    LEARNED_RANGE = 1  # log_var interpolated between lv_min and lv_max by the variance channel (IDDPM)
    LEARNED = 2  # the variance channel is the variance


@dataclass(frozen=True)
class StepScalars:
    """One step's scalars, built on the host from the float64 schedule (``msdda.schedule.step_scalars``).

    px, po: x0 = px * x_t + po * out.  mx, m0, mo: mu = mx * x_t + m0 * clamp(x0, -clip, clip) + mo * out.
    clip: inf when clipping is off.  var_mode: VarMode.  log_var_fixed: log variance for FIXED (-inf: variance 0).
    lv_min, lv_max: the log-variance range for LEARNED_RANGE."""

    px: float
    po: float
    mx: float
    m0: float
    mo: float
    clip: float = math.inf
    var_mode: VarMode = VarMode.FIXED
    log_var_fixed: float = -math.inf
    lv_min: float = 0.0
    lv_max: float = 0.0

    def __post_init__(self):
        for name in ("px", "po", "mx", "m0", "mo", "clip", "log_var_fixed", "lv_min", "lv_max"):
            object.__setattr__(self, name, float(getattr(self, name)))  # numpy / 0-d tensor scalars -> float
        object.__setattr__(self, "var_mode", VarMode(int(self.var_mode)))
        if not self.clip > 0:
            raise ValueError(f"StepScalars.clip must be > 0 (inf: no clipping), got {self.clip}")
        for name in ("px", "po", "mx", "m0", "mo", "lv_min", "lv_max"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"StepScalars.{name} must be finite, got {getattr(self, name)}")
        if math.isnan(self.log_var_fixed) or self.log_var_fixed == math.inf:
            raise ValueError(f"StepScalars.log_var_fixed must be < inf (-inf: variance 0), got {self.log_var_fixed}")


class StepGaussian(NamedTuple):
    """N(mean, var) of one step, and the x0 prediction it was built from (clipped as the step clips it)."""

    mean: torch.Tensor  # [..., B, C, *S]
    var: torch.Tensor  # broadcastable to mean: 0-dim for FIXED, else mean's shape
    x0: torch.Tensor  # [..., B, C, *S]


def apply_guidance(raw: torch.Tensor, x_t: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance of a network output at x_t [B, C, *S].

    raw [..., 2, B, C_out, *S] (index 0 unconditional, 1 conditional) -> [..., B, C_out, *S] with
    out = u + g (c - u) on the first C channels. Learned-variance channels (C..2C) are taken from the conditional
    half, as GLIDE and unCLIP do: the variance is not guided."""
    lead = raw.dim() - x_t.dim()  # leading axes of raw; the last of them is the CFG pair
    if lead < 1 or raw.shape[lead - 1] != 2:
        raise ValueError(f"guidance needs raw [..., 2, B, C_out, *S] for x_t {tuple(x_t.shape)}, got {tuple(raw.shape)}")
    uncond, cond = raw.unbind(lead - 1)  # [..., B, C_out, *S]: the channel axis is at index `lead`
    C = x_t.shape[1]
    u, c = uncond.narrow(lead, 0, C), cond.narrow(lead, 0, C)
    out = u + guidance_scale * (c - u)
    if cond.shape[lead] > C:
        out = torch.cat([out, cond.narrow(lead, C, cond.shape[lead] - C)], dim=lead)
    return out


def gaussian_step(raw: torch.Tensor, x_t: torch.Tensor, scalars: StepScalars, *,
                  guidance_scale: float | None = None) -> StepGaussian:
    """The Gaussian p(x_{t_prev} | x_t) = N(mean, var) of one step, and its x0 (see the module docstring).

    raw: the network output at x_t, [..., B, C_out, *S] (any leading axes, e.g. K experts), or with
    ``guidance_scale`` [..., 2, B, C_out, *S] (unconditional first; see ``apply_guidance``). C_out = C, or 2C
    where channels C..2C are the variance channel (ignored when the step's var_mode is FIXED, e.g. DDIM or DDPM's
    t = 0 step of a learned-variance model). x_t: [B, C, *S].
    Returns StepGaussian(mean [..., B, C, *S], var (0-dim for FIXED, 0 where log_var_fixed = -inf; else mean's
    shape), x0 [..., B, C, *S]), computed in raw's dtype (x_t is cast to it); differentiable w.r.t. raw and x_t
    (the clamp has zero gradient where it clips). Every term is evaluated, as the kernel does, so a NaN/Inf in
    x_t or raw reaches the result.
    """
    if guidance_scale is not None:
        raw = apply_guidance(raw, x_t, guidance_scale)
    lead = raw.dim() - x_t.dim()
    if lead < 0 or raw.shape[lead] != x_t.shape[0] or raw.shape[lead + 2:] != x_t.shape[2:]:
        raise ValueError(f"raw {tuple(raw.shape)} does not match x_t {tuple(x_t.shape)} in B or S")
    C, C_out = x_t.shape[1], raw.shape[lead + 1]
    mode = VarMode(int(scalars.var_mode))
    if C_out not in (C, 2 * C) or (C_out == C and mode != VarMode.FIXED):
        want = "2C" if mode != VarMode.FIXED else "C or 2C"
        raise ValueError(f"output has {C_out} channels; {mode.name} needs {want} with C = {C}")
    out = raw.narrow(lead + 1, 0, C)
    x_t = x_t.to(raw.dtype)
    x0 = (x_t * scalars.px + out * scalars.po).clamp(-scalars.clip, scalars.clip)
    mean = x_t * scalars.mx + x0 * scalars.m0 + out * scalars.mo
    if mode == VarMode.FIXED:
        var = torch.tensor(math.exp(scalars.log_var_fixed), dtype=raw.dtype, device=raw.device)
    elif mode == VarMode.LEARNED_RANGE:
        frac = (raw.narrow(lead + 1, C, C) + 1) / 2
        var = torch.exp(frac * scalars.lv_max + (1 - frac) * scalars.lv_min)
    else:
        var = raw.narrow(lead + 1, C, C)
    return StepGaussian(mean, var, x0)
