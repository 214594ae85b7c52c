"""Product of K Gaussian experts, one denoising step (ARCHITECTURE.md section 1).

Each expert k proposes x_{t-1} ~ N(mu_k, var_k) per element; the composed step samples the normalised product
prod_k N(mu_k, var_k)^{c_k}, which is again Gaussian:

    P  = sum_k c_k / var_k                      (precision)
    mu = (sum_k c_k mu_k / var_k) / P
    x_prev = mu + z / sqrt(P),   z ~ N(0, 1)

The exponents c_k may be negative (a reference model with c_0 = 1 - sum_k w_k) as long as P > 0 everywhere.
Where some var_k == 0 (DDIM eta = 0) the limit is taken: mu is the c-weighted mean of the zero-variance experts'
means and no noise is added there (their sum of c must be > 0).

Side by side, Triton-tutorial style: ``compose_kernel`` (Triton, float32 accumulation), ``compose_gaussians``
(validating wrapper), ``compose_gaussians_ref`` (float64 torch: the definition) and ``compose_torch`` (the
float32 CPU path used when Triton cannot run).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import launch
from .args import ComposeArgs, prepare_compose
from .errors import check_coeff_finite, explain_bad, finish_check, product_moments_ref
from .philox import philox_normal
from .product import accumulate_expert, sample_and_store, start_product, tile

__all__ = ["compose_gaussians", "compose_gaussians_ref", "compose_kernel", "compose_torch"]

K_UNROLL_MAX = 8  # up to 8 experts the loop over K is unrolled at compile time; beyond it is a runtime loop


@triton.jit
def _load_expert(m_ptrs, v_ptrs, c_ptr, mask, VAR_PER_ELEMENT: tl.constexpr):
    """One expert's mean tile, variance (a tile, or one scalar per (k, b)) and exponent, in float32."""
    m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
    if VAR_PER_ELEMENT:
        v = tl.load(v_ptrs, mask=mask, other=1.0).to(tl.float32)
    else:
        v = tl.load(v_ptrs).to(tl.float32)
    return m, v, tl.load(c_ptr).to(tl.float32)


@triton.jit(do_not_specialize=["offset", "B"])
def compose_kernel(
    mean_ptr,  # *fp32|fp16|bf16 [K, B, N]: expert means mu_k; N = prod(S) is contiguous, K and B strided
    var_ptr,  # *float [K|1, B|1, N] or [K|1, B|1]: expert variances var_k; broadcast axes get stride 0
    coeff_ptr,  # *fp32 [B|1, K]: exponents c_k; stride_cb == 0 when all samples share them
    noise_ptr,  # *float [B, N]: z when NOISE == 1, N contiguous (unused otherwise)
    seed_ptr,  # *int64 [B]: per-sample Philox seeds when NOISE == 2 (unused otherwise)
    out_ptr,  # *mean dtype [B, N]: x_prev, contiguous
    err_ptr,  # *int32 [1]: count of bad elements (P <= 0 or non-finite), incremented when CHECK
    K,  # int: number of experts (read when K_UNROLL == 0)
    N,  # int: elements per sample, prod(S) (< 2**31)
    B,  # int: samples (the grid's second axis; a key of the launch configuration)
    offset,  # int: Philox step offset o in [0, 2**32): counter = (e // 4, o, 0, 0)
    stride_mk,  # mean stride of the K axis, in elements
    stride_mb,  # mean stride of the B axis
    stride_vk,  # var stride of the K axis (0: shared by all experts)
    stride_vb,  # var stride of the B axis (0: shared by all samples)
    stride_ck,  # coeff stride of the K axis
    stride_cb,  # coeff stride of the B axis (0: coeff [K])
    stride_nb,  # noise stride of the B axis
    K_UNROLL: tl.constexpr,  # K when K <= 8 (the loop is unrolled), 0: a runtime loop over K
    VAR_PER_ELEMENT: tl.constexpr,  # True: var has the N axis (contiguous); False: one var_k per (k, b)
    NOISE: tl.constexpr,  # 0: x_prev = mu; 1: z read from noise_ptr; 2: z = Philox normal from seed_ptr
    CHECK: tl.constexpr,  # True: count bad elements into err_ptr (an atomic per tile row with any)
    W: tl.constexpr,  # elements per tile row: one 16-byte vector of mean's dtype (4 or 8)
    BLOCK: tl.constexpr,  # elements per program, a power of 2 (a multiple of W * 32 * num_warps)
):
    b = tl.program_id(1).to(tl.int64)  # sample
    rows, offs, mask = tile(tl.program_id(0), N, BLOCK, W)
    prec, wsum, czero, mzero, vmin = start_product(VAR_PER_ELEMENT, BLOCK, W)
    # pointers advance expert by expert (64-bit pointer arithmetic: no int32 overflow of k * stride)
    m_ptrs = mean_ptr + b * stride_mb + offs
    v_ptrs = var_ptr + b * stride_vb
    if VAR_PER_ELEMENT:
        v_ptrs += offs
    c_ptr = coeff_ptr + b * stride_cb
    if K_UNROLL > 0:  # unrolled: every expert's loads can be in flight at once
        for k in tl.static_range(K_UNROLL):
            m, v, c = _load_expert(m_ptrs, v_ptrs, c_ptr, mask, VAR_PER_ELEMENT)
            prec, wsum, czero, mzero, vmin = accumulate_expert(prec, wsum, czero, mzero, vmin, m, v, c, k == 0)
            m_ptrs += stride_mk
            v_ptrs += stride_vk
            c_ptr += stride_ck
    else:
        for _k in range(K):
            m, v, c = _load_expert(m_ptrs, v_ptrs, c_ptr, mask, VAR_PER_ELEMENT)
            prec, wsum, czero, mzero, vmin = accumulate_expert(prec, wsum, czero, mzero, vmin, m, v, c, False)
            m_ptrs += stride_mk
            v_ptrs += stride_vk
            c_ptr += stride_ck
    sample_and_store(prec, wsum, czero, mzero, vmin, noise_ptr + b * stride_nb, seed_ptr, b, rows, offs,
                     mask, offset, out_ptr + b * N, err_ptr, NOISE, CHECK, W)


compose_kernel_tuned = launch.tuned(compose_kernel,
                                    key=["N", "B", "K_UNROLL", "VAR_PER_ELEMENT", "NOISE", "CHECK", "W"])


def k_unroll(K: int) -> int:
    """The K_UNROLL constexpr for K experts: K itself up to K_UNROLL_MAX, else 0 (a runtime loop)."""
    return K if K <= K_UNROLL_MAX else 0


# --------------------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------------------


def _compose_triton(a: ComposeArgs, validate: bool = True, error_count=None) -> torch.Tensor:
    """One launch of ``compose_kernel``: grid (cdiv(N, BLOCK), B)."""
    mean, var, coeff = a.mean, a.var, a.coeff
    K, B, N = mean.shape
    out = torch.empty((B, N), dtype=mean.dtype, device=mean.device)
    if out.numel() == 0:
        return out.reshape(a.shape)
    check = validate or error_count is not None
    # validate: a fresh counter read back once; else the caller's error_count is incremented in place (no sync)
    err = torch.zeros(1, dtype=torch.int32, device=mean.device) if validate else error_count
    dummy = out  # any pointer for arguments the chosen constexprs never read
    args = (mean, var, coeff, a.noise if a.noise is not None else dummy, a.seeds if a.seeds is not None else dummy,
            out, err if check else dummy, K, N, B, a.offset, mean.stride(0), mean.stride(1),
            var.stride(0) if var.shape[0] > 1 else 0, var.stride(1) if var.shape[1] > 1 else 0,
            coeff.stride(1), coeff.stride(0) if coeff.shape[0] > 1 else 0,
            a.noise.stride(0) if a.noise is not None else 0)
    meta = dict(K_UNROLL=k_unroll(K), VAR_PER_ELEMENT=var.shape[2] > 1, NOISE=a.noise_mode, CHECK=check,
                W=launch.vector_width(mean.dtype))
    launch.run(compose_kernel, compose_kernel_tuned, args, meta, N, B)
    if validate:
        finish_check(int(err.item()), True, error_count, lambda n: explain_bad("compose_gaussians", a, n))
    return out.reshape(a.shape)


def _noise_f32(a: ComposeArgs, N: int):
    if a.zero_noise:
        return None
    if a.noise is not None:
        return a.noise.to(torch.float32)
    return philox_normal(a.seeds, a.offset, (N,)).to(a.mean.device)


def _compose_torch_general(a: ComposeArgs, z):
    """float32 torch mirror of the kernel, zero-variance limit included: (x [B, N] float32, ok [B, N])."""
    mu, prec, has0, ok = product_moments_ref(a.mean, a.var, a.coeff, dtype=torch.float32)
    if z is None:
        x = mu
    else:
        std = torch.where(has0, 0.0, torch.where(prec > 0, prec, 1.0).rsqrt())
        x = mu + std * z
    return x, ok & torch.isfinite(x)


def _finite_sum(t: torch.Tensor) -> bool:
    """True when t has no NaN/Inf, by one fast reduction (a false alarm from overflowing the sum only sends the
    caller to the careful path, which decides exactly)."""
    return math.isfinite(float(t.sum()))


def compose_torch(a: ComposeArgs, validate: bool = True, error_count=None, explain=None) -> torch.Tensor:
    """float32 torch path (CPU without the interpreter): in-place accumulation, no K*N temporaries, and checks by
    cheap whole-tensor reductions. Falls back to the kernel's math vectorised over K (with the zero-variance limit
    and exact bad-element counts) when P is not finite somewhere (a zero variance) or when a check fails.
    ``explain(nbad)`` words the error (default: compose_gaussians')."""
    mean = a.mean
    K, B, N = mean.shape
    if mean.numel() == 0:
        return torch.empty(a.shape, dtype=mean.dtype, device=mean.device)
    check = validate or error_count is not None
    z = _noise_f32(a, N)
    v = a.var.to(torch.float32)  # [Kv, Bv, Nv]
    m = mean.to(torch.float32)  # no copy for float32
    if v.shape[2] == 1:  # per-(k, b) variances: mu is a weighted sum of the means with [K, B, 1] weights
        w = a.coeff.t()[:, :, None] / v  # c_k / var_k
        prec = w.sum(0)  # P [B|1, 1]
        fast = _finite_sum(prec)  # a zero variance makes P inf or NaN
        if fast:
            a_k = (w / prec).expand(K, B, 1)
            x = torch.mul(m[0], a_k[0])
            for k in range(1, K):
                x.addcmul_(m[k], a_k[k])
            if z is not None:
                x.addcmul_(z, prec.rsqrt().expand(B, 1))
    else:  # per-element variances: accumulate P and sum_k c_k mu_k / var_k in place
        prec = torch.zeros((B, N), dtype=torch.float32, device=mean.device)
        wsum = torch.zeros_like(prec)
        # one formula whether the coefficients are shared ([1, K]) or per sample ([B, K]): a sample's x_prev must
        # not depend on how many samples share the call (a one-sample call has coeff [1, K] too)
        c = a.coeff.t()[:, :, None]  # [K, B|1, 1]
        for k in range(K):
            w = torch.div(c[k], v[k])
            prec += w
            wsum.addcmul_(w, m[k])
        # checked: P > 0 everywhere (amin propagates NaN; an inf P from a zero variance makes x NaN, caught below);
        # unchecked: P finite, i.e. no zero variance
        fast = float(prec.amin()) > 0 if check else _finite_sum(prec)
        if fast:
            x = wsum.div_(prec)  # mu
            if z is not None:
                x.addcmul_(z, prec.rsqrt_())  # + z/sqrt(P); P is not needed after this
    if fast and check:  # P > 0, var >= 0 and finite, x finite (NaN/Inf in mean or noise end up in x)
        fast = ((v.shape[2] > 1 or float(prec.amin()) > 0) and float(v.amin()) >= 0 and float(v.amax()) < math.inf
                and _finite_sum(x))
    nbad = 0
    if not fast:  # zero variances, or something failed: the careful path decides and counts
        x, ok = _compose_torch_general(a, z)
        nbad = int((~ok).sum()) if check else 0
    out = x.to(mean.dtype).reshape(a.shape)
    finish_check(nbad, validate, error_count, explain or (lambda n: explain_bad("compose_gaussians", a, n)))
    return out


def compose_prepared(a: ComposeArgs, validate: bool = True, error_count=None) -> torch.Tensor:
    """x_prev from already prepared arguments (``args.prepare_compose``), on the backend chosen for their
    device: one Triton launch, or the float32 torch path."""
    check_coeff_finite("compose_gaussians", a.coeff, validate)
    impl = _compose_triton if launch.use_triton(a.mean.device) else compose_torch
    return impl(a, validate, error_count)


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def compose_gaussians(mean, var, coeff, *, noise=None, seed=None, offset=0, validate=True, error_count=None):
    """Sample the product of K Gaussian experts, prod_k N(mu_k, var_k)^{c_k}, elementwise.

    mean  mu_k: [K, B, *S] float32/float16/bfloat16 (accumulated in float32).
    var   var_k: [K], [K, B] or [K, B, *S] (any axis may be 1), float; 0 means the zero-variance limit.
    coeff c_k: [K] or [B, K] float (or a python sequence), negative allowed while P = sum_k c_k/var_k > 0.
    noise z: [B, *S] float, or 0 for x_prev = mu; or seed: int s (per-sample seeds s + b) or int64 [B], drawn
          with Philox at ``offset`` (ARCHITECTURE.md section 3). Exactly one of noise/seed.
    validate: raise ValueError (naming the coefficients and how many elements failed) if P <= 0 or any value
          is NaN/Inf; this syncs. validate=False with error_count (int32 [1] on the device) adds the number of
          bad elements into error_count instead, with no sync (see ``raise_if_bad``).
    Returns x_prev = mu + z / sqrt(P): [B, *S] in mean's dtype.

    Inputs whose S axes flatten to one stride are read in place (K and B strided); others are copied contiguous.
    """
    return compose_prepared(prepare_compose(mean, var, coeff, noise, seed, offset, error_count), validate,
                            error_count)


def compose_gaussians_ref(mean, var, coeff, *, noise=None, seed=None, offset=0, validate=True, error_count=None):
    """The definition, in float64 torch: same arguments and result as ``compose_gaussians`` (x_prev [B, *S] in
    mean's dtype; here mean may also be float64). Noise from ``seed`` is ``philox_normal``, exactly the kernel's."""
    a = prepare_compose(mean, var, coeff, noise, seed, offset, error_count, ref=True)
    check_coeff_finite("compose_gaussians_ref", a.coeff, validate)
    K, B, N = a.mean.shape
    mu, prec, has0, ok = product_moments_ref(a.mean, a.var, a.coeff)
    if a.zero_noise:
        x = mu
    else:
        z = a.noise.double() if a.noise is not None else philox_normal(a.seeds, a.offset, (N,)).double()
        x = mu + torch.where(has0, 0.0, torch.where(prec > 0, prec, 1.0).rsqrt()) * z.to(mu.device)
    ok = ok & torch.isfinite(x)
    nbad = int((~ok).sum()) if (validate or error_count is not None) else 0
    out = x.to(mean.dtype).reshape(a.shape)
    finish_check(nbad, validate, error_count, lambda n: explain_bad("compose_gaussians_ref", a, n))
    return out
