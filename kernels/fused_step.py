"""One composed denoising step straight from the K experts' raw network outputs (ARCHITECTURE.md section 2).

Per expert k, with ``out`` the eps / v / x0 channels after classifier-free guidance (out = u + g (c - u)) and
``v`` the variance channel (channels C..2C, taken from the conditional half under CFG):

    x0    = px * x_t + po * out
    x0c   = clamp(x0, -clip, clip)
    mu_k  = mx * x_t + m0 * x0c + mo * out
    var_k = exp(log_var_fixed)                                   FIXED          (-inf -> 0: DDIM eta = 0)
            exp(frac * lv_max + (1 - frac) * lv_min), frac = (v + 1)/2   LEARNED_RANGE
            v                                                    LEARNED

and then x_prev = product of the K Gaussians with exponents c_k (``compose.py``: P, mu, zero-variance limit,
Philox noise). ``_fused_step_kernel`` does all of it in one launch; ``fused_expert_step_ref`` is the float64
definition, ``gaussian_from_output_ref`` + ``compose_gaussians_ref``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .compose import (
    _FLOATS,
    _LAUNCH_LOCK,
    _Args,
    _as_coeff,
    _block_size,
    _check_device,
    _check_float,
    _coeff_host_check,
    _compose_torch,
    _expert_accumulate,
    _explain,
    _finish_check,
    _prepare_noise,
    _sample_and_store,
    _use_triton,
    compose_gaussians_ref,
)
from .gaussian import StepScalars, VarMode, gaussian_step

__all__ = ["fused_expert_step", "fused_expert_step_ref", "gaussian_from_output_ref"]


@triton.jit(do_not_specialize=["offset"])
def _fused_step_kernel(
    raw_ptr,  # *fp32|fp16|bf16 [K, (2,) B, C_out, *S]: network outputs; each sample's [C_out, *S] contiguous
    xt_ptr,  # *fp32|fp16|bf16 [B, C, *S]: x_t; each sample's [C, *S] contiguous
    coeff_ptr,  # *fp32 [B|1, K]: exponents c_k; stride_cb == 0 when all samples share them
    noise_ptr,  # *float [B, C, *S]: z when NOISE == 1, each sample contiguous (unused otherwise)
    seed_ptr,  # *int64 [B]: per-sample Philox seeds when NOISE == 2 (unused otherwise)
    out_ptr,  # *x_t dtype [B, C, *S]: x_prev, contiguous
    err_ptr,  # *int32 [1]: count of bad elements (P <= 0 or non-finite), incremented when CHECK
    K,  # int: number of experts
    N,  # int: elements per sample of x_prev, C * prod(S) (< 2**31); the variance channel starts at +N
    offset,  # int: Philox step offset o in [0, 2**32): counter = (e, o, 0, 0)
    stride_rk,  # raw stride of the K axis, in elements
    stride_rg,  # raw stride of the CFG axis (unconditional 0 -> conditional 1); unused without CFG
    stride_rb,  # raw stride of the B axis
    stride_xb,  # x_t stride of the B axis
    stride_ck,  # coeff stride of the K axis
    stride_cb,  # coeff stride of the B axis (0: coeff [K])
    stride_nb,  # noise stride of the B axis
    guidance,  # float: guidance scale g, out = u + g (c - u) (used when CFG)
    px,  # float: x0 = px * x_t + po * out
    po,  # float
    mx,  # float: mu = mx * x_t + m0 * clamp(x0) + mo * out
    m0,  # float
    mo,  # float
    clip,  # float: x0 is clamped to [-clip, clip] (inf: off)
    var_fixed,  # float: exp(log_var_fixed), the variance when VAR_MODE == 0 (0: zero-variance limit)
    lv_min,  # float: LEARNED_RANGE log variance at v = -1
    lv_max,  # float: LEARNED_RANGE log variance at v = +1
    VAR_MODE: tl.constexpr,  # 0 FIXED, 1 LEARNED_RANGE, 2 LEARNED (see VarMode)
    CFG: tl.constexpr,  # True: raw has the [2] guidance axis
    NOISE: tl.constexpr,  # 0: x_prev = mu; 1: z read from noise_ptr; 2: z = Philox normal from seed_ptr
    CHECK: tl.constexpr,  # True: count bad elements into err_ptr (one atomic per program)
    BLOCK: tl.constexpr,  # elements per program, a power of 2
):
    pid_n = tl.program_id(0)  # block of elements within a sample
    b = tl.program_id(1).to(tl.int64)  # sample
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)  # flat element index e within the sample's [C, *S]
    mask = offs < N

    xt = tl.load(xt_ptr + b * stride_xb + offs, mask=mask, other=0.0).to(tl.float32)
    prec = tl.zeros([BLOCK], dtype=tl.float32)
    wsum = tl.zeros([BLOCK], dtype=tl.float32)
    czero = tl.zeros([BLOCK], dtype=tl.float32)
    mzero = tl.zeros([BLOCK], dtype=tl.float32)
    nzero = tl.zeros([BLOCK], dtype=tl.int32)
    ok = tl.abs(xt) < float("inf")
    r_ptrs = raw_ptr + b * stride_rb + offs
    c_ptr = coeff_ptr + b * stride_cb
    for _k in range(K):
        if CFG:
            u = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
            cond = tl.load(r_ptrs + stride_rg, mask=mask, other=0.0).to(tl.float32)
            out = u + guidance * (cond - u)
            v_ptrs = r_ptrs + stride_rg + N  # variance channel of the conditional half
        else:
            out = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
            v_ptrs = r_ptrs + N
        x0 = tl.clamp(px * xt + po * out, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
        m = mx * xt + m0 * x0 + mo * out
        if VAR_MODE == 0:
            v = tl.zeros([BLOCK], dtype=tl.float32) + var_fixed
        elif VAR_MODE == 1:
            frac = (tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32) + 1.0) * 0.5
            v = tl.exp(frac * lv_max + (1.0 - frac) * lv_min)
            ok = ok & (tl.abs(frac) < float("inf"))
        else:
            v = tl.load(v_ptrs, mask=mask, other=1.0).to(tl.float32)
        c = tl.load(c_ptr).to(tl.float32)
        prec, wsum, czero, mzero, nzero, ok = _expert_accumulate(prec, wsum, czero, mzero, nzero, ok, m, v, c)
        r_ptrs += stride_rk
        c_ptr += stride_ck

    _sample_and_store(prec, wsum, czero, mzero, nzero, ok, noise_ptr + b * stride_nb, seed_ptr, b, offs, mask,
                      offset, out_ptr + b * N, err_ptr, NOISE, CHECK)


# --------------------------------------------------------------------------------------------------------------
# Wrapper
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FusedArgs:
    """raw [K, G, B, C_out * prod(S)] (G = 2 under CFG, else 1), x_t [B, N], coeff [Bc, K] float32 and the
    noise arguments of x_prev ``shape`` = [B, C, *S], N = C * prod(S)."""

    raw: torch.Tensor
    x_t: torch.Tensor
    coeff: torch.Tensor
    scalars: StepScalars
    guidance: float | None
    noise: torch.Tensor | None
    seeds: torch.Tensor | None
    offset: int
    shape: tuple
    zero_noise: bool


def _prepare_fused(raw, x_t, coeff, scalars, guidance_scale, noise, seed, offset, error_count, ref=False):
    floats = _FLOATS + ((torch.float64,) if ref else ())
    _check_float("raw", raw, floats)
    _check_float("x_t", x_t, floats)
    if not isinstance(scalars, StepScalars):
        raise TypeError(f"scalars must be a StepScalars, got {type(scalars).__name__}")
    device = x_t.device
    _check_device("raw", raw, device)
    if x_t.dim() < 2:
        raise ValueError(f"x_t must be [B, C, *S], got {tuple(x_t.shape)}")
    B, C, S = x_t.shape[0], x_t.shape[1], tuple(x_t.shape[2:])
    cfg = guidance_scale is not None
    lead = 2 if cfg else 1
    if raw.dim() != x_t.dim() + lead or (cfg and raw.shape[1] != 2):
        want = "[K, 2, B, C_out, *S] (guidance_scale given)" if cfg else "[K, B, C_out, *S]"
        raise ValueError(f"raw must be {want} for x_t {tuple(x_t.shape)}, got {tuple(raw.shape)}")
    K = raw.shape[0]
    if K < 1:
        raise ValueError("need at least one expert (K >= 1)")
    C_out = raw.shape[lead + 1]
    if raw.shape[lead] != B or tuple(raw.shape[lead + 2:]) != S:
        raise ValueError(f"raw {tuple(raw.shape)} does not match x_t {tuple(x_t.shape)} in B or S")
    learned = scalars.var_mode != VarMode.FIXED
    if C_out != 2 * C and (learned or C_out != C):
        want = "2C" if learned else "C or 2C"
        raise ValueError(f"raw has {C_out} channels; {scalars.var_mode.name} needs C_out = {want} with C = {C}")
    Ns = math.prod(S)
    N = C * Ns
    if C_out * Ns >= 2**31:
        raise ValueError(f"at most 2**31 - 1 elements per sample, got {C_out * Ns}")
    raw4 = raw.reshape(K, lead, B, C_out * Ns)  # a view when [C_out, *S] flattens; K/G/B strides are passed
    if raw4.shape[3] > 1 and raw4.stride(3) != 1:
        raw4 = raw4.contiguous()
    xt2 = x_t.reshape(B, N)
    if N > 1 and xt2.stride(1) != 1:
        xt2 = xt2.contiguous()
    coeff2 = _as_coeff(coeff, K, B, device, torch.float64 if ref else torch.float32)
    noise2, seeds, zero_noise = _prepare_noise(noise, seed, offset, error_count, (B, C, *S), device)
    g = None if guidance_scale is None else float(guidance_scale)
    if g is not None and not math.isfinite(g):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    return _FusedArgs(raw4, xt2, coeff2, scalars, g, noise2, seeds, int(offset), (B, C, *S), zero_noise)


def _gaussian_flat(f: _FusedArgs, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """mean [K, B, N] and var ([1, 1, 1] FIXED, else [K, B, N]) of every expert, by ``gaussian_step`` in ``dtype``."""
    K, G, B, _ = f.raw.shape
    C = f.shape[1]
    N = f.x_t.shape[1]
    raw = f.raw.to(dtype).reshape(K, G, B, -1, N // C)  # [K, G, B, C_out, prod(S)]
    x_t = f.x_t.to(dtype).reshape(B, C, N // C)
    if f.guidance is None:
        raw = raw[:, 0]
    mean, var, _ = gaussian_step(raw, x_t, f.scalars, guidance_scale=f.guidance)
    var = var.reshape(1, 1, 1) if var.dim() == 0 else var.reshape(K, B, N)
    return mean.reshape(K, B, N), var


def _fused_triton(f: _FusedArgs, validate=True, error_count=None) -> torch.Tensor:
    """One launch of ``_fused_step_kernel``: grid (cdiv(N, BLOCK), B)."""
    raw, x_t, coeff, s = f.raw, f.x_t, f.coeff, f.scalars
    K, G, B, _ = raw.shape
    N = x_t.shape[1]
    out = torch.empty((B, N), dtype=x_t.dtype, device=x_t.device)
    if out.numel() == 0:
        return out.reshape(f.shape)
    check = validate or error_count is not None
    # validate: a fresh counter read back once; else the caller's error_count is incremented in place (no sync)
    err = torch.zeros(1, dtype=torch.int32, device=x_t.device) if validate else error_count
    noise_mode = 0 if f.zero_noise else (1 if f.noise is not None else 2)
    block = _block_size(N)
    with _LAUNCH_LOCK:
        _fused_step_kernel[(triton.cdiv(N, block), B)](
            raw, x_t, coeff,
            f.noise if f.noise is not None else out,
            f.seeds if f.seeds is not None else out,
            out, err if check else out,
            K, N, f.offset,
            raw.stride(0), raw.stride(1) if G > 1 else 0, raw.stride(2), x_t.stride(0),
            coeff.stride(1), coeff.stride(0) if coeff.shape[0] > 1 else 0,
            f.noise.stride(0) if f.noise is not None else 0,
            1.0 if f.guidance is None else f.guidance,
            s.px, s.po, s.mx, s.m0, s.mo, s.clip, math.exp(s.log_var_fixed), s.lv_min, s.lv_max,
            VAR_MODE=int(s.var_mode), CFG=f.guidance is not None, NOISE=noise_mode, CHECK=check, BLOCK=block,
            num_warps=4,
        )
    if validate:
        _finish_check(int(err.item()), True, error_count, lambda n: _explain_fused(f, n))
    return out.reshape(f.shape)


def _explain_fused(f: _FusedArgs, nbad: int) -> str:
    mean, var = _gaussian_flat(f, torch.float64)
    a = _Args(mean, var, f.coeff, f.noise, f.seeds, f.offset, (mean.shape[1], mean.shape[2]), f.zero_noise)
    what = "fused_expert_step"
    bad_in = [n for n, t in (("raw", f.raw), ("x_t", f.x_t)) if not bool(torch.isfinite(t).all())]
    if bad_in:
        what += f": NaN/Inf in {' and '.join(bad_in)}"
    return _explain(what, a, nbad, names=("mu_k", "var_k"))


def _fused_torch(f: _FusedArgs, validate=True, error_count=None) -> torch.Tensor:
    """float32 torch path (CPU without the interpreter): the Gaussians in torch, then ``_compose_torch``."""
    mean, var = _gaussian_flat(f, torch.float32)
    a = _Args(mean, var, f.coeff, f.noise, f.seeds, f.offset, (mean.shape[1], mean.shape[2]), f.zero_noise)
    x = _compose_torch(a, validate, error_count, explain=lambda n: _explain_fused(f, n))
    return x.to(f.x_t.dtype).reshape(f.shape)


def fused_expert_step(raw, x_t, coeff, scalars, *, guidance_scale=None, noise=None, seed=None, offset=0,
                      validate=True, error_count=None):
    """One composed step from raw network outputs, in one launch: CFG, x0 + clip, mu_k, var_k, the product of the
    K Gaussians with exponents c_k, the noise, the store.

    raw: [K, B, C_out, *S], or [K, 2, B, C_out, *S] with guidance_scale g (index 0 unconditional, 1 conditional);
         C_out = C (FIXED; 2C also accepted, the variance channels ignored) or 2C (LEARNED_RANGE, LEARNED).
    x_t: [B, C, *S]; coeff c_k: [K] or [B, K]; scalars: StepScalars of this step.
    noise / seed / offset / validate / error_count: as ``compose_gaussians`` (z has x_prev's shape [B, C, *S]).
    Returns x_prev [B, C, *S] in x_t's dtype."""
    f = _prepare_fused(raw, x_t, coeff, scalars, guidance_scale, noise, seed, offset, error_count)
    _coeff_host_check("fused_expert_step", f.coeff, validate)
    impl = _fused_triton if _use_triton(f.x_t.device) else _fused_torch
    return impl(f, validate, error_count)


# --------------------------------------------------------------------------------------------------------------
# Reference (float64)
# --------------------------------------------------------------------------------------------------------------


def gaussian_from_output_ref(raw, x_t, scalars: StepScalars, guidance_scale=None):
    """Each expert's Gaussian N(mu_k, var_k) from its raw output, in float64 (the definition).

    raw [K, (2,) B, C_out, *S], x_t [B, C, *S] -> (mean [K, B, C, *S], var [K, B, C, *S], or [K] for FIXED)."""
    f = _prepare_fused(raw, x_t, [1.0] * raw.shape[0], scalars, guidance_scale, 0, None, 0, None, ref=True)
    mean, var = _gaussian_flat(f, torch.float64)
    K, B = mean.shape[:2]
    shape = (K, *f.shape)
    if scalars.var_mode == VarMode.FIXED:
        return mean.reshape(shape), var.reshape(1).expand(K)
    return mean.reshape(shape), var.reshape(shape)


def fused_expert_step_ref(raw, x_t, coeff, scalars, *, guidance_scale=None, noise=None, seed=None, offset=0,
                          validate=True, error_count=None):
    """float64 definition of ``fused_expert_step``: ``gaussian_from_output_ref`` then ``compose_gaussians_ref``.
    Returns x_prev [B, C, *S] in x_t's dtype."""
    mean, var = gaussian_from_output_ref(raw, x_t, scalars, guidance_scale)
    x = compose_gaussians_ref(mean, var, coeff, noise=noise, seed=seed, offset=offset, validate=validate,
                              error_count=error_count)
    return x.to(x_t.dtype)
