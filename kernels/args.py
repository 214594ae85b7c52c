"""Argument checking and preparation shared by every kernel wrapper (ARCHITECTURE.md sections 1-3).

The wrappers (``compose_gaussians``, ``fused_expert_step``, their float64 references and the prepared
``FusedStepPlan``) validate here, once, and hand the kernels flattened views:

- ``check_float`` / ``check_device``: dtype and device of one tensor argument.
- ``make_seeds``, ``prepare_noise``, ``check_offset``, ``check_error_count``: the noise arguments (exactly one
  of noise / seed; sampling is always explicit) and the deferred error counter.
- ``as_coeff``, ``as_var``: the exponents c_k as [Bc, K] and the variances as [Kv, Bv, Nv].
- ``prepare_compose`` -> ``ComposeArgs`` and ``prepare_fused`` -> ``FusedArgs``: everything about one call.

Nothing here launches a kernel or computes the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .gaussian import StepScalars, VarMode

__all__ = [
    "FLOATS",
    "REF_FLOATS",
    "ComposeArgs",
    "FusedArgs",
    "as_coeff",
    "as_var",
    "check_device",
    "check_error_count",
    "check_float",
    "check_guidance",
    "check_offset",
    "make_seeds",
    "noise_mode",
    "prepare_compose",
    "prepare_fused",
    "prepare_noise",
]

FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels read (accumulating in float32)
REF_FLOATS = FLOATS + (torch.float64,)  # what the float64 references also take
MAX_ELEMENTS = 2**31 - 1  # elements per sample: the kernels index a sample with int32


def check_float(name: str, t, allowed) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def check_device(name: str, t: torch.Tensor, device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}: all inputs must be on one device")


def make_seeds(seed, batch: int, device) -> torch.Tensor:
    """Per-sample Philox seeds int64 [B]. An int seed s means seeds (s, s + 1, ..., s + B - 1); a tensor is used
    as given (it must be int64 [B])."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.shape != (batch,):
            raise ValueError(f"seed tensor must be int64 [B={batch}], got {seed.dtype} {tuple(seed.shape)}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or an int64 tensor [B], got {type(seed).__name__}")
    if not (-(2**63) <= seed and seed + batch <= 2**63):
        raise ValueError(f"seed {seed} does not fit int64")
    return torch.arange(seed, seed + batch, dtype=torch.int64, device=device)


def check_offset(offset) -> int:
    """The Philox step offset o, an int in [0, 2**32) (counter word 1)."""
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**32:
        raise ValueError(f"offset must be an int in [0, 2**32), got {offset!r}")
    return offset


def check_error_count(error_count, device) -> None:
    if error_count is None:
        return
    if not isinstance(error_count, torch.Tensor) or error_count.dtype != torch.int32 or error_count.numel() != 1:
        raise TypeError("error_count must be an int32 tensor [1]")
    check_device("error_count", error_count, device)


def check_guidance(guidance_scale) -> float | None:
    if guidance_scale is None:
        return None
    g = float(guidance_scale)
    if not math.isfinite(g):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    return g


def as_coeff(coeff, K: int, B: int, device, dtype=torch.float32) -> torch.Tensor:
    """c_k as [Bc, K] (Bc = 1: shared by every sample, or B) in ``dtype``; a python sequence is accepted."""
    if not isinstance(coeff, torch.Tensor):
        coeff = torch.tensor(coeff, dtype=torch.float64, device=device)
    if not coeff.dtype.is_floating_point:
        raise TypeError(f"coeff must be a float tensor, got {coeff.dtype}")
    check_device("coeff", coeff, device)
    if coeff.shape == (K,):
        coeff = coeff[None, :]
    elif coeff.dim() != 2 or coeff.shape[1] != K or coeff.shape[0] not in (1, B):
        raise ValueError(f"coeff must be [K={K}] or [B={B}, K={K}], got {tuple(coeff.shape)}")
    return coeff.to(dtype)


def as_var(var, mean: torch.Tensor) -> torch.Tensor:
    """var [K], [K, B] or [K, B, *S] (each axis full or 1) -> [Kv, Bv, Nv] with Nv in (1, N).

    Per-element var is reshaped to [Kv, Bv, N] (a view when S flattens, else a copy); a var broadcast over only
    some of the S axes (e.g. [K, B, C, 1, 1]) is materialised to [Kv, Bv, N]."""
    check_float("var", var, REF_FLOATS)
    check_device("var", var, mean.device)
    K, B, S = mean.shape[0], mean.shape[1], tuple(mean.shape[2:])
    if var.dim() in (1, 2):
        full = var.shape
        want = (K, B)[: var.dim()]
        var = var.reshape(*var.shape, *([1] * (2 - var.dim())))
    elif var.dim() == mean.dim():
        full, want = var.shape, mean.shape
    else:
        raise ValueError(f"var must be [K], [K, B] or [K, B, *S] for mean {tuple(mean.shape)}, got {tuple(var.shape)}")
    if any(d not in (1, w) for d, w in zip(full, want)):
        raise ValueError(f"var {tuple(full)} does not broadcast to mean {tuple(mean.shape)} (axes K, B, *S)")
    Kv, Bv, Sv = var.shape[0], var.shape[1], tuple(var.shape[2:])
    if all(d == 1 for d in Sv):
        return var.reshape(Kv, Bv, 1)
    if Sv != S:
        var = var.expand(Kv, Bv, *S)
    var = var.reshape(Kv, Bv, math.prod(S))
    return var if var.stride(2) == 1 else var.contiguous()


def prepare_noise(noise, seed, shape, device):
    """Check noise/seed for x_prev of ``shape`` [B, *S] -> (noise [B, N] with N contiguous | None,
    seeds int64 [B] | None, zero_noise). ``noise=0`` means x_prev = mu."""
    B, N = shape[0], math.prod(shape[1:])
    if noise is not None and seed is not None:
        raise ValueError("give either noise or seed, not both")
    if noise is None and seed is None:
        raise ValueError("give noise (a tensor [B, *S], or 0 for x_prev = mu) or seed: sampling is always explicit")
    if seed is not None:
        seeds = make_seeds(seed, B, device)
        check_device("seed", seeds, device)
        return None, seeds, False
    if isinstance(noise, (int, float)) and not isinstance(noise, bool) and noise == 0:
        return None, None, True
    check_float("noise", noise, REF_FLOATS)
    check_device("noise", noise, device)
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise must be [B, *S] = {tuple(shape)}, got {tuple(noise.shape)}")
    noise2 = noise.reshape(B, N)
    if N > 1 and noise2.stride(1) != 1:
        noise2 = noise2.contiguous()
    return noise2, None, False


def noise_mode(noise, seeds, zero_noise: bool) -> int:
    """The kernels' NOISE constexpr: 0 x_prev = mu, 1 z read from a tensor, 2 z drawn with Philox."""
    return 0 if zero_noise else (1 if noise is not None else 2)


@dataclass(frozen=True)
class ComposeArgs:
    """Validated, flattened inputs of ``compose_gaussians``. Shapes: mean [K, B, N]; var [Kv, Bv, Nv] (each 1 or
    full); coeff [Bc, K] float32 (float64 for the reference; Bc 1 or B); noise [B, N] or None; seeds int64 [B] or
    None. ``shape`` is x_prev's [B, *S]."""

    mean: torch.Tensor
    var: torch.Tensor
    coeff: torch.Tensor
    noise: torch.Tensor | None
    seeds: torch.Tensor | None
    offset: int
    shape: tuple
    zero_noise: bool  # noise=0 given: x_prev = mu

    @property
    def noise_mode(self) -> int:
        return noise_mode(self.noise, self.seeds, self.zero_noise)


def prepare_compose(mean, var, coeff, noise, seed, offset, error_count, ref: bool = False) -> ComposeArgs:
    """Check everything about ``compose_gaussians``' arguments (shapes, dtypes, devices) and flatten S; ``ref``
    also accepts float64 and keeps the coefficients in float64."""
    check_float("mean", mean, REF_FLOATS if ref else FLOATS)
    if mean.dim() < 2:
        raise ValueError(f"mean must be [K, B, *S], got {tuple(mean.shape)}")
    K, B, S = mean.shape[0], mean.shape[1], tuple(mean.shape[2:])
    if K < 1:
        raise ValueError("need at least one expert (K >= 1)")
    N = math.prod(S)
    if N > MAX_ELEMENTS:
        raise ValueError(f"at most 2**31 - 1 elements per sample, got {N}")
    device = mean.device
    var3 = as_var(var, mean)
    coeff2 = as_coeff(coeff, K, B, device, torch.float64 if ref else torch.float32)
    mean3 = mean.reshape(K, B, N)  # a view when S flattens: strided K and B axes are passed to the kernel
    if N > 1 and mean3.stride(2) != 1:
        mean3 = mean3.contiguous()
    noise2, seeds, zero_noise = prepare_noise(noise, seed, (B, *S), device)
    check_error_count(error_count, device)
    return ComposeArgs(mean3, var3, coeff2, noise2, seeds, check_offset(offset), (B, *S), zero_noise)


@dataclass(frozen=True)
class FusedArgs:
    """Validated, flattened inputs of ``fused_expert_step``: raw [K, G, B, C_out * prod(S)] (G = 2 under CFG,
    else 1; the last axis contiguous), x_t [B, N] (N = C * prod(S), contiguous), coeff [Bc, K] and the noise
    arguments of x_prev ``shape`` = [B, C, *S]."""

    raw: torch.Tensor
    x_t: torch.Tensor
    coeff: torch.Tensor
    scalars: StepScalars | None  # None for a prepared plan (its scalars come from the step table)
    guidance: float | None
    noise: torch.Tensor | None
    seeds: torch.Tensor | None
    offset: int
    shape: tuple
    zero_noise: bool

    @property
    def noise_mode(self) -> int:
        return noise_mode(self.noise, self.seeds, self.zero_noise)


def prepare_fused(raw, x_t, coeff, scalars, guidance_scale, noise, seed, offset, error_count, ref=False,
                  learned=None) -> FusedArgs:
    """Check everything about ``fused_expert_step``'s arguments and flatten [C_out, *S]. ``scalars`` is one
    StepScalars (or None with ``learned`` given, for a plan whose scalars live in a step table); ``ref`` also
    accepts float64 and keeps the coefficients in float64."""
    if scalars is not None and not isinstance(scalars, StepScalars):
        raise TypeError(f"scalars must be a StepScalars, got {type(scalars).__name__}")
    g = check_guidance(guidance_scale)
    if learned is None:
        learned = scalars.var_mode != VarMode.FIXED
    floats = REF_FLOATS if ref else FLOATS
    check_float("raw", raw, floats)
    check_float("x_t", x_t, floats)
    device = x_t.device
    check_device("raw", raw, device)
    if x_t.dim() < 2:
        raise ValueError(f"x_t must be [B, C, *S], got {tuple(x_t.shape)}")
    B, C, S = x_t.shape[0], x_t.shape[1], tuple(x_t.shape[2:])
    lead = 1 if g is None else 2
    if raw.dim() != x_t.dim() + lead or (g is not None and raw.shape[1] != 2):
        want = "[K, B, C_out, *S]" if g is None else "[K, 2, B, C_out, *S] (guidance_scale given)"
        raise ValueError(f"raw must be {want} for x_t {tuple(x_t.shape)}, got {tuple(raw.shape)}")
    K = raw.shape[0]
    if K < 1:
        raise ValueError("need at least one expert (K >= 1)")
    C_out = raw.shape[lead + 1]
    if raw.shape[lead] != B or tuple(raw.shape[lead + 2:]) != S:
        raise ValueError(f"raw {tuple(raw.shape)} does not match x_t {tuple(x_t.shape)} in B or S")
    if C_out != 2 * C and (learned or C_out != C):
        mode = scalars.var_mode.name if scalars is not None else "a learned-variance step"
        raise ValueError(f"raw has {C_out} channels; {mode} needs C_out = {'2C' if learned else 'C or 2C'} "
                         f"with C = {C}")
    Ns = math.prod(S)
    N = C * Ns
    if C_out * Ns > MAX_ELEMENTS:
        raise ValueError(f"at most 2**31 - 1 elements per sample, got {C_out * Ns}")
    raw4 = raw.reshape(K, lead, B, C_out * Ns)  # a view when [C_out, *S] flattens; K/G/B strides are passed
    if raw4.shape[3] > 1 and raw4.stride(3) != 1:
        raw4 = raw4.contiguous()
    xt2 = x_t.reshape(B, N)
    if N > 1 and xt2.stride(1) != 1:
        xt2 = xt2.contiguous()
    coeff2 = as_coeff(coeff, K, B, device, torch.float64 if ref else torch.float32)
    noise2, seeds, zero_noise = prepare_noise(noise, seed, (B, C, *S), device)
    check_error_count(error_count, device)
    return FusedArgs(raw4, xt2, coeff2, scalars, g, noise2, seeds, check_offset(offset), (B, C, *S), zero_noise)
