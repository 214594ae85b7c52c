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
Philox noise). ``fused_step_kernel`` does all of it in one launch; ``fused_expert_step_ref`` is the float64
definition, ``gaussian_from_output_ref`` + ``compose_gaussians_ref``; the math itself is ``gaussian_step``.

The kernel takes the step's scalars either by value (``fused_expert_step``) or, with TABLE, from a float32 step
table on the device, row ``step + step_ptr[0]`` (``FusedStepPlan``, plan.py): one compiled kernel then serves
every step of a schedule, and a CUDA graph that captured it serves every step too.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import launch
from .args import ComposeArgs, FusedArgs, prepare_fused
from .compose import compose_gaussians_ref, compose_torch, k_unroll
from .errors import check_coeff_finite, explain_bad, finish_check
from .gaussian import StepScalars, VarMode, gaussian_step
from .product import accumulate_expert, sample_and_store, start_product, tile

__all__ = ["STEP_TABLE_COLUMNS", "expert_gaussians", "explain_fused", "fused_expert_step", "fused_expert_step_ref",
           "fused_step_kernel", "fused_torch", "gaussian_from_output_ref", "step_table_row"]

# The columns of one row of the float32 step table (TABLE mode), in order.
STEP_TABLE_COLUMNS = ("guidance", "px", "po", "mx", "m0", "mo", "clip", "var_mode", "var_fixed", "lr_a", "lr_b")
assert len(STEP_TABLE_COLUMNS) == 11  # the kernel's row stride


def step_table_row(scalars: StepScalars, guidance: float | None) -> list[float]:
    """One step's row of the step table (STEP_TABLE_COLUMNS): exactly the values the by-value launch passes, so
    both round them to float32 alike. var_fixed = exp(log_var_fixed); LEARNED_RANGE's log-variance interpolation
    exp(frac lv_max + (1 - frac) lv_min), frac = (v + 1) / 2, is 2^(lr_a + lr_b v) with lr_a = log2(e) (lv_max +
    lv_min) / 2 and lr_b = log2(e) (lv_max - lv_min) / 2 (computed here in float64)."""
    return [1.0 if guidance is None else guidance, scalars.px, scalars.po, scalars.mx, scalars.m0, scalars.mo,
            scalars.clip, float(int(scalars.var_mode)), math.exp(scalars.log_var_fixed),
            _LOG2E * (scalars.lv_max + scalars.lv_min) / 2, _LOG2E * (scalars.lv_max - scalars.lv_min) / 2]


_LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _expert_gaussian(r_ptrs, xt, mask, N, stride_rg, guidance, px, po, mx, m0, mo, clip, var_fixed, lr_a, lr_b,
                     var_mode, VAR_MODE: tl.constexpr, CFG: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr,
                     W: tl.constexpr):
    """One expert's Gaussian on a tile: (mu_k, var_k), var_k a scalar for the FIXED constexpr mode."""
    if CFG:
        u = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        cond = tl.load(r_ptrs + stride_rg, mask=mask, other=0.0).to(tl.float32)
        out = u + guidance * (cond - u)
        v_ptrs = r_ptrs + stride_rg + N  # variance channel of the conditional half
    else:
        out = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        v_ptrs = r_ptrs + N
    x0 = px * xt + po * out
    if CLIP:  # clamp(x0, -inf, inf) is x0 itself: without clipping the clamp is left out
        x0 = tl.clamp(x0, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
    m = mx * xt + m0 * x0 + mo * out
    # LEARNED_RANGE: exp(frac lv_max + (1 - frac) lv_min) with frac = (v + 1) / 2 is 2^(lr_a + lr_b v), one FMA
    # and one exp2; + v * 0 leaves it unchanged for a finite channel and makes it NaN (flagged) otherwise
    if VAR_MODE == 0:
        var = var_fixed
    elif VAR_MODE == 1:
        v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
        var = tl.exp2(lr_a + lr_b * v) + v * 0.0
    elif VAR_MODE == 2:
        var = tl.load(v_ptrs, mask=mask, other=1.0).to(tl.float32)
    else:  # the step's mode is read from the step table: a uniform branch, no variance-channel load when FIXED
        if var_mode == 0:
            var = tl.zeros([BLOCK // W, W], dtype=tl.float32) + var_fixed
        else:
            v = tl.load(v_ptrs, mask=mask, other=1.0).to(tl.float32)
            var = tl.where(var_mode == 1, tl.exp2(lr_a + lr_b * v) + v * 0.0, v)
    return m, var


@triton.jit(do_not_specialize=["offset", "step", "B"])
def fused_step_kernel(
    raw_ptr,  # *fp32|fp16|bf16 [K, (2,) B, C_out, *S]: network outputs; each sample's [C_out, *S] contiguous
    xt_ptr,  # *fp32|fp16|bf16 [B, C, *S]: x_t; each sample's [C, *S] contiguous
    coeff_ptr,  # *fp32 [B|1, K]: exponents c_k; stride_cb == 0 when all samples share them
    noise_ptr,  # *float [(steps,) B, C, *S]: z when NOISE == 1, each sample contiguous (unused otherwise)
    seed_ptr,  # *int64 [B]: per-sample Philox seeds when NOISE == 2 (unused otherwise)
    out_ptr,  # *x_t dtype [B, C, *S]: x_prev, contiguous
    err_ptr,  # *int32 [1]: count of bad elements (P <= 0 or non-finite), incremented when CHECK
    table_ptr,  # *fp32 [steps, 11]: the step table (STEP_TABLE_COLUMNS) when TABLE (unused otherwise)
    step_ptr,  # *int64 [1]: added to ``step`` to pick the table row when TABLE (unused otherwise)
    K,  # int: number of experts (read when K_UNROLL == 0)
    N,  # int: elements per sample of x_prev, C * prod(S) (< 2**31); the variance channel starts at +N
    B,  # int: samples (the grid's second axis; a key of the launch configuration)
    offset,  # int: Philox step offset o in [0, 2**32): counter = (e // 4, o, 0, 0); TABLE: o = offset + step index
    step,  # int: TABLE: the step index is step + step_ptr[0]
    n_steps,  # int: TABLE: rows of the step table (an index outside [0, n_steps) counts every element as bad)
    stride_rk,  # raw stride of the K axis, in elements
    stride_rg,  # raw stride of the CFG axis (unconditional 0 -> conditional 1); unused without CFG
    stride_rb,  # raw stride of the B axis
    stride_xb,  # x_t stride of the B axis
    stride_ck,  # coeff stride of the K axis
    stride_cb,  # coeff stride of the B axis (0: coeff [K])
    stride_nb,  # noise stride of the B axis
    stride_ns,  # noise stride of the step axis (TABLE with NOISE == 1: noise [steps, B, C, *S])
    guidance,  # float: guidance scale g, out = u + g (c - u) (used when CFG)
    px,  # float: x0 = px * x_t + po * out
    po,  # float
    mx,  # float: mu = mx * x_t + m0 * clamp(x0) + mo * out
    m0,  # float
    mo,  # float
    clip,  # float: x0 is clamped to [-clip, clip] (inf: off)
    var_fixed,  # float: exp(log_var_fixed), the variance when FIXED (0: zero-variance limit)
    lr_a,  # float: LEARNED_RANGE var = 2^(lr_a + lr_b v): lr_a = log2(e) (lv_max + lv_min) / 2
    lr_b,  # float: lr_b = log2(e) (lv_max - lv_min) / 2
    K_UNROLL: tl.constexpr,  # K when K <= 8 (the loop is unrolled), 0: a runtime loop over K
    VAR_MODE: tl.constexpr,  # 0 FIXED, 1 LEARNED_RANGE, 2 LEARNED (see VarMode); -1: per step, from the table
    CFG: tl.constexpr,  # True: raw has the [2] guidance axis
    CLIP: tl.constexpr,  # True: x0 is clamped to [-clip, clip]; False: clip is inf (for every step)
    NOISE: tl.constexpr,  # 0: x_prev = mu; 1: z read from noise_ptr; 2: z = Philox normal from seed_ptr
    CHECK: tl.constexpr,  # True: count bad elements into err_ptr (an atomic per tile row with any)
    TABLE: tl.constexpr,  # True: the scalars above (guidance .. lr_b) come from the step table
    W: tl.constexpr,  # elements per tile row: one 16-byte vector of raw's dtype (4 or 8)
    BLOCK: tl.constexpr,  # elements per program, a power of 2 (a multiple of W * 32 * num_warps)
):
    b = tl.program_id(1).to(tl.int64)  # sample
    rows, offs, mask = tile(tl.program_id(0), N, BLOCK, W)
    var_mode = 0
    step_ok = True
    if TABLE:
        i = step + tl.load(step_ptr)  # the step index, read on the device: a graph replay needs no new arguments
        step_ok = (i >= 0) & (i < n_steps)
        i = tl.where(step_ok, i, 0)  # never read outside the table
        row = table_ptr + i * 11  # 11 = len(STEP_TABLE_COLUMNS)
        guidance = tl.load(row + 0)
        px = tl.load(row + 1)
        po = tl.load(row + 2)
        mx = tl.load(row + 3)
        m0 = tl.load(row + 4)
        mo = tl.load(row + 5)
        clip = tl.load(row + 6)
        var_mode = tl.load(row + 7).to(tl.int32)
        var_fixed = tl.load(row + 8)
        lr_a = tl.load(row + 9)
        lr_b = tl.load(row + 10)
        offset = offset + i
        noise_ptr += i * stride_ns

    xt = tl.load(xt_ptr + b * stride_xb + offs, mask=mask, other=0.0).to(tl.float32)
    prec, wsum, czero, mzero, vmin = start_product(VAR_MODE != 0, BLOCK, W)
    wsum = xt * 0.0  # NaN/Inf in x_t reaches the weighted sum, which is checked, even where no mu_k reads x_t
    r_ptrs = raw_ptr + b * stride_rb + offs  # advanced expert by expert (64-bit pointer arithmetic)
    c_ptr = coeff_ptr + b * stride_cb
    if K_UNROLL > 0:  # unrolled: every expert's loads can be in flight at once
        for k in tl.static_range(K_UNROLL):
            m, v = _expert_gaussian(r_ptrs, xt, mask, N, stride_rg, guidance, px, po, mx, m0, mo, clip, var_fixed,
                                    lr_a, lr_b, var_mode, VAR_MODE, CFG, CLIP, BLOCK, W)
            c = tl.load(c_ptr).to(tl.float32)
            prec, wsum, czero, mzero, vmin = accumulate_expert(prec, wsum, czero, mzero, vmin, m, v, c, k == 0)
            r_ptrs += stride_rk
            c_ptr += stride_ck
    else:
        for _k in range(K):
            m, v = _expert_gaussian(r_ptrs, xt, mask, N, stride_rg, guidance, px, po, mx, m0, mo, clip, var_fixed,
                                    lr_a, lr_b, var_mode, VAR_MODE, CFG, CLIP, BLOCK, W)
            c = tl.load(c_ptr).to(tl.float32)
            prec, wsum, czero, mzero, vmin = accumulate_expert(prec, wsum, czero, mzero, vmin, m, v, c, False)
            r_ptrs += stride_rk
            c_ptr += stride_ck

    if TABLE:  # an index outside the table: every element is bad
        prec = tl.where(step_ok, prec, float("nan"))
    sample_and_store(prec, wsum, czero, mzero, vmin, noise_ptr + b * stride_nb, seed_ptr, b, rows, offs,
                     mask, offset, out_ptr + b * N, err_ptr, NOISE, CHECK, W)


fused_step_kernel_tuned = launch.tuned(
    fused_step_kernel, key=["N", "B", "K_UNROLL", "VAR_MODE", "CFG", "CLIP", "NOISE", "CHECK", "TABLE", "W"])


def kernel_arguments(f: FusedArgs, out, err, noise=None, table=None, step_ptr=None, stride_ns=0, n_steps=0):
    """``fused_step_kernel``'s runtime arguments (everything but the constexprs) for prepared arguments ``f``:
    the step's scalars by value from ``f.scalars``, or (``f.scalars`` None) from ``table``. ``noise``: the noise
    tensor to pass (default ``f.noise``; a plan's [steps, B, N]). Pointers the chosen constexprs never read get
    ``out`` (any valid pointer)."""
    raw, x_t, coeff = f.raw, f.x_t, f.coeff
    K, G, B, _ = raw.shape
    N = x_t.shape[1]
    noise = f.noise if noise is None else noise
    if f.scalars is None:  # a table plan: the by-value scalars are never read
        values = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, math.inf, 0.0, 0.0, 0.0)
    else:
        row = step_table_row(f.scalars, f.guidance)
        values = (*row[:7], *row[8:])  # all but var_mode, which is the VAR_MODE constexpr here
    return (raw, x_t, coeff, out if noise is None else noise, out if f.seeds is None else f.seeds, out, err,
            out if table is None else table, out if step_ptr is None else step_ptr,
            K, N, B, f.offset, 0, n_steps,
            raw.stride(0), raw.stride(1) if G > 1 else 0, raw.stride(2), x_t.stride(0),
            coeff.stride(1), coeff.stride(0) if coeff.shape[0] > 1 else 0,
            noise.stride(-2) if noise is not None else 0, stride_ns, *values)


def kernel_constexprs(f: FusedArgs, var_mode: int, check: bool, table: bool, clip: bool) -> dict:
    return dict(K_UNROLL=k_unroll(f.raw.shape[0]), VAR_MODE=var_mode, CFG=f.guidance is not None, CLIP=clip,
                NOISE=f.noise_mode, CHECK=check, TABLE=table, W=launch.vector_width(f.raw.dtype))


def _fused_triton(f: FusedArgs, validate=True, error_count=None) -> torch.Tensor:
    """One launch of ``fused_step_kernel`` with the step's scalars by value: grid (cdiv(N, BLOCK), B)."""
    B, N = f.x_t.shape
    out = torch.empty((B, N), dtype=f.x_t.dtype, device=f.x_t.device)
    if out.numel() == 0:
        return out.reshape(f.shape)
    check = validate or error_count is not None
    # validate: a fresh counter read back once; else the caller's error_count is incremented in place (no sync)
    err = torch.zeros(1, dtype=torch.int32, device=out.device) if validate else error_count
    args = kernel_arguments(f, out, err if check else out)
    meta = kernel_constexprs(f, int(f.scalars.var_mode), check, False, f.scalars.clip < math.inf)
    launch.run(fused_step_kernel, fused_step_kernel_tuned, args, meta, N, B)
    if validate:
        finish_check(int(err.item()), True, error_count, lambda n: explain_fused(f, n))
    return out.reshape(f.shape)


def expert_gaussians(f: FusedArgs, dtype):
    """mean [K, B, N] and var ([1, 1, 1] FIXED, else [K, B, N]) of every expert, by ``gaussian_step`` in
    ``dtype``."""
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


def _as_compose(f: FusedArgs, mean, var) -> ComposeArgs:
    return ComposeArgs(mean, var, f.coeff, f.noise, f.seeds, f.offset, (mean.shape[1], mean.shape[2]), f.zero_noise)


def explain_fused(f: FusedArgs, nbad: int) -> str:
    """The one-line error of a fused step whose kernel counted ``nbad`` bad elements."""
    mean, var = expert_gaussians(f, torch.float64)
    what = "fused_expert_step"
    bad_in = [n for n, t in (("raw", f.raw), ("x_t", f.x_t)) if not bool(torch.isfinite(t).all())]
    if bad_in:
        what += f": NaN/Inf in {' and '.join(bad_in)}"
    return explain_bad(what, _as_compose(f, mean, var), nbad, names=("mu_k", "var_k"))


def fused_torch(f: FusedArgs, validate=True, error_count=None) -> torch.Tensor:
    """float32 torch path (CPU without the interpreter): the Gaussians in torch, then ``compose_torch``."""
    mean, var = expert_gaussians(f, torch.float32)
    x = compose_torch(_as_compose(f, mean, var), validate, error_count, explain=lambda n: explain_fused(f, n))
    return x.to(f.x_t.dtype).reshape(f.shape)


def fused_expert_step(raw, x_t, coeff, scalars, *, guidance_scale=None, noise=None, seed=None, offset=0,
                      validate=True, error_count=None):
    """One composed step from raw network outputs, in one launch: CFG, x0 + clip, mu_k, var_k, the product of the
    K Gaussians with exponents c_k, the noise, the store.

    raw: [K, B, C_out, *S], or [K, 2, B, C_out, *S] with guidance_scale g (index 0 unconditional, 1 conditional);
         C_out = C (FIXED; 2C also accepted, the variance channels ignored) or 2C (LEARNED_RANGE, LEARNED).
    x_t: [B, C, *S]; coeff c_k: [K] or [B, K]; scalars: StepScalars of this step.
    noise / seed / offset / validate / error_count: as ``compose_gaussians`` (z has x_prev's shape [B, C, *S]).
    Returns x_prev [B, C, *S] in x_t's dtype. A loop over many steps with fixed shapes is cheaper on the host
    through ``prepare_fused_step`` (plan.py), which checks all of this once."""
    f = prepare_fused(raw, x_t, coeff, scalars, guidance_scale, noise, seed, offset, error_count)
    check_coeff_finite("fused_expert_step", f.coeff, validate)
    impl = _fused_triton if launch.use_triton(f.x_t.device) else fused_torch
    return impl(f, validate, error_count)


# --------------------------------------------------------------------------------------------------------------
# Reference (float64)
# --------------------------------------------------------------------------------------------------------------


def gaussian_from_output_ref(raw, x_t, scalars: StepScalars, guidance_scale=None):
    """Each expert's Gaussian N(mu_k, var_k) from its raw output, in float64 (the definition).

    raw [K, (2,) B, C_out, *S], x_t [B, C, *S] -> (mean [K, B, C, *S], var [K, B, C, *S], or [K] for FIXED)."""
    f = prepare_fused(raw, x_t, [1.0] * raw.shape[0], scalars, guidance_scale, 0, None, 0, None, ref=True)
    mean, var = expert_gaussians(f, torch.float64)
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
