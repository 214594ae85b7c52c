"""Product of K Gaussian experts, one denoising step (ARCHITECTURE.md section 1).

Each expert k proposes x_{t-1} ~ N(mu_k, var_k) per element; the composed step samples the normalised product
prod_k N(mu_k, var_k)^{c_k}, which is again Gaussian:

    P  = sum_k c_k / var_k                      (precision)
    mu = (sum_k c_k mu_k / var_k) / P
    x_prev = mu + z / sqrt(P),   z ~ N(0, 1)

The exponents c_k may be negative (a reference model with c_0 = 1 - sum_k w_k) as long as P > 0 everywhere.
Where some var_k == 0 (DDIM eta = 0) the limit is taken: mu is the c-weighted mean of the zero-variance experts'
means and no noise is added there (their sum of c must be > 0).

Side by side, Triton-tutorial style: ``_compose_kernel`` (Triton, fp32 accumulation), ``compose_gaussians``
(validating wrapper), ``compose_gaussians_ref`` (float64 torch: the definition) and ``_compose_torch`` (the
float32 CPU path used when Triton cannot run).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .philox import philox_normal

__all__ = ["compose_gaussians", "compose_gaussians_ref", "raise_if_bad"]

# Backend choice, made once: Triton for CUDA tensors, and for every tensor under the Triton interpreter;
# otherwise the float32 torch path.
_TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_GPU = 1024
_BLOCK_INTERPRET_MAX = 4096  # the interpreter pays per program, not per element: fewer, wider programs


# The Triton interpreter patches triton.language module-wide for each launch, so concurrent launches from several
# threads break it; interpreted launches are serialised. Compiled launches need no lock.
_LAUNCH_LOCK = threading.Lock() if _TRITON_ON_CPU else contextlib.nullcontext()


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or _TRITON_ON_CPU


def _block_size(n: int) -> int:
    if _TRITON_ON_CPU:
        return max(16, min(_BLOCK_INTERPRET_MAX, triton.next_power_of_2(n)))
    return _BLOCK_GPU


# --------------------------------------------------------------------------------------------------------------
# Triton: shared per-element pieces (also used by fused_step._fused_step_kernel)
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _expert_accumulate(prec, wsum, czero, mzero, nzero, ok, m, v, c):
    """Add expert k (mean m, variance v, exponent c) to the running sums of one block (all float32)."""
    zero = v == 0.0
    w = tl.where(zero, 0.0, c / tl.where(zero, 1.0, v))  # c_k / var_k, 0 where var_k == 0
    prec += w  # P
    wsum += w * m  # sum_k c_k mu_k / var_k
    czero += tl.where(zero, c, 0.0)  # sum of c over zero-variance experts
    mzero += tl.where(zero, c * m, 0.0)  # sum of c mu over zero-variance experts
    nzero += zero.to(tl.int32)
    ok = ok & (tl.abs(m) < float("inf")) & (v >= 0.0) & (v < float("inf"))  # NaN fails every comparison
    return prec, wsum, czero, mzero, nzero, ok


@triton.jit
def _product_sample(prec, wsum, czero, mzero, nzero, ok, z, HAS_Z: tl.constexpr):
    """x_prev = mu + z / sqrt(P) (or the zero-variance limit) and the per-element validity flag."""
    has0 = nzero > 0
    # the selects keep the discarded branch free of 0/0 (the bad elements are flagged through ok anyway)
    mu = tl.where(has0, mzero / tl.where(czero != 0.0, czero, 1.0), wsum / tl.where(prec != 0.0, prec, 1.0))
    ok = ok & tl.where(has0, czero > 0.0, prec > 0.0)
    if HAS_Z:
        std = tl.where(has0, 0.0, 1.0 / tl.sqrt(tl.where(prec > 0.0, prec, 1.0)))  # 1/sqrt(P), 0 in the limit
        x = mu + std * z
    else:
        x = mu
    ok = ok & (tl.abs(x) < float("inf"))
    return x, ok


@triton.jit
def _draw_z(noise_ptr, seed_ptr, b, offs, mask, offset, NOISE: tl.constexpr):
    """z for elements offs of sample b: loaded (NOISE == 1) or tl.randn(seed_b, e + offset * 2**32) (NOISE == 2)."""
    if NOISE == 1:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        seed = tl.load(seed_ptr + b)
        z = tl.randn(seed, offs.to(tl.int64) + (offset.to(tl.int64) << 32))
    return z


@triton.jit
def _sample_and_store(prec, wsum, czero, mzero, nzero, ok, noise_ptr, seed_ptr, b, offs, mask, offset, out_ptr,
                      err_ptr, NOISE: tl.constexpr, CHECK: tl.constexpr):
    """The shared epilogue: draw z, x_prev = mu + z/sqrt(P), store it for sample b (noise_ptr and out_ptr already
    point at sample b), and count the bad elements into err_ptr when CHECK."""
    if NOISE == 0:
        z = prec  # unused
    else:
        z = _draw_z(noise_ptr, seed_ptr, b, offs, mask, offset, NOISE)
    x, ok = _product_sample(prec, wsum, czero, mzero, nzero, ok, z, NOISE != 0)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)
    if CHECK:
        tl.atomic_add(err_ptr, tl.sum((mask & (ok == 0)).to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["offset"])
def _compose_kernel(
    mean_ptr,  # *fp32|fp16|bf16 [K, B, N]: expert means mu_k; N = prod(S) is contiguous, K and B strided
    var_ptr,  # *float [K|1, B|1, N] or [K|1, B|1]: expert variances var_k; broadcast axes get stride 0
    coeff_ptr,  # *fp32 [B|1, K]: exponents c_k; stride_cb == 0 when all samples share them
    noise_ptr,  # *float [B, N]: z when NOISE == 1, N contiguous (unused otherwise)
    seed_ptr,  # *int64 [B]: per-sample Philox seeds when NOISE == 2 (unused otherwise)
    out_ptr,  # *mean dtype [B, N]: x_prev, contiguous
    err_ptr,  # *int32 [1]: count of bad elements (P <= 0 or non-finite), incremented when CHECK
    K,  # int: number of experts
    N,  # int: elements per sample, prod(S) (< 2**31)
    offset,  # int: Philox step offset o in [0, 2**32): counter = (e, o, 0, 0)
    stride_mk,  # mean stride of the K axis, in elements
    stride_mb,  # mean stride of the B axis
    stride_vk,  # var stride of the K axis (0: shared by all experts)
    stride_vb,  # var stride of the B axis (0: shared by all samples)
    stride_ck,  # coeff stride of the K axis
    stride_cb,  # coeff stride of the B axis (0: coeff [K])
    stride_nb,  # noise stride of the B axis
    VAR_PER_ELEMENT: tl.constexpr,  # True: var has the N axis (contiguous); False: one var_k per (k, b)
    NOISE: tl.constexpr,  # 0: x_prev = mu; 1: z read from noise_ptr; 2: z = Philox normal from seed_ptr
    CHECK: tl.constexpr,  # True: count bad elements into err_ptr (one atomic per program)
    BLOCK: tl.constexpr,  # elements per program, a power of 2
):
    pid_n = tl.program_id(0)  # block of elements within a sample
    b = tl.program_id(1).to(tl.int64)  # sample
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)  # flat element index e within the sample
    mask = offs < N

    prec = tl.zeros([BLOCK], dtype=tl.float32)
    wsum = tl.zeros([BLOCK], dtype=tl.float32)
    czero = tl.zeros([BLOCK], dtype=tl.float32)
    mzero = tl.zeros([BLOCK], dtype=tl.float32)
    nzero = tl.zeros([BLOCK], dtype=tl.int32)
    ok = offs >= 0  # all True
    m_ptrs = mean_ptr + b * stride_mb + offs
    v_ptrs = var_ptr + b * stride_vb
    if VAR_PER_ELEMENT:
        v_ptrs += offs
    c_ptr = coeff_ptr + b * stride_cb
    for _k in range(K):
        m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
        if VAR_PER_ELEMENT:
            v = tl.load(v_ptrs, mask=mask, other=1.0).to(tl.float32)
        else:
            v = tl.zeros([BLOCK], dtype=tl.float32) + tl.load(v_ptrs).to(tl.float32)  # one load per (k, b)
        c = tl.load(c_ptr).to(tl.float32)
        prec, wsum, czero, mzero, nzero, ok = _expert_accumulate(prec, wsum, czero, mzero, nzero, ok, m, v, c)
        m_ptrs += stride_mk
        v_ptrs += stride_vk
        c_ptr += stride_ck

    _sample_and_store(prec, wsum, czero, mzero, nzero, ok, noise_ptr + b * stride_nb, seed_ptr, b, offs, mask,
                      offset, out_ptr + b * N, err_ptr, NOISE, CHECK)


# --------------------------------------------------------------------------------------------------------------
# Argument checking shared by the wrappers
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Args:
    """Validated, flattened inputs. Shapes: mean [K, B, N]; var [Kv, Bv, Nv] (each 1 or full); coeff [Bc, K]
    float32 (Bc 1 or B); noise [B, N] or None; seeds int64 [B] or None. ``shape`` is x_prev's [B, *S]."""

    mean: torch.Tensor
    var: torch.Tensor
    coeff: torch.Tensor
    noise: torch.Tensor | None
    seeds: torch.Tensor | None
    offset: int
    shape: tuple
    zero_noise: bool  # noise=0 given: x_prev = mu


def _check_float(name, t, allowed):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def _check_device(name, t, device):
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but mean is on {device}: all inputs must be on one device")


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


def _as_coeff(coeff, K: int, B: int, device, dtype=torch.float32) -> torch.Tensor:
    if not isinstance(coeff, torch.Tensor):
        coeff = torch.tensor(coeff, dtype=torch.float64, device=device)
    if not coeff.dtype.is_floating_point:
        raise TypeError(f"coeff must be a float tensor, got {coeff.dtype}")
    _check_device("coeff", coeff, device)
    if coeff.shape == (K,):
        coeff = coeff[None, :]
    elif coeff.dim() != 2 or coeff.shape[1] != K or coeff.shape[0] not in (1, B):
        raise ValueError(f"coeff must be [K={K}] or [B={B}, K={K}], got {tuple(coeff.shape)}")
    return coeff.to(dtype)


def _as_var(var, mean: torch.Tensor) -> torch.Tensor:
    """var [K], [K, B] or [K, B, *S] (each axis full or 1) -> [Kv, Bv, Nv] with Nv in (1, N).

    Per-element var is reshaped to [Kv, Bv, N] (a view when S flattens, else a copy); a var broadcast over only
    some of the S axes (e.g. [K, B, C, 1, 1]) is materialised to [Kv, Bv, N]."""
    _check_float("var", var, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    _check_device("var", var, mean.device)
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


def _prepare_noise(noise, seed, offset, error_count, shape, device):
    """Check noise/seed/offset/error_count for x_prev of ``shape`` [B, *S] -> (noise [B, N] | None,
    seeds int64 [B] | None, zero_noise)."""
    B, N = shape[0], math.prod(shape[1:])
    if noise is not None and seed is not None:
        raise ValueError("give either noise or seed, not both")
    if noise is None and seed is None:
        raise ValueError("give noise (a tensor [B, *S], or 0 for x_prev = mu) or seed: sampling is always explicit")
    noise2 = seeds = None
    zero_noise = False
    if noise is not None:
        if isinstance(noise, (int, float)) and not isinstance(noise, bool) and noise == 0:
            zero_noise = True
        else:
            _check_float("noise", noise, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
            _check_device("noise", noise, device)
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise must be [B, *S] = {tuple(shape)}, got {tuple(noise.shape)}")
            noise2 = noise.reshape(B, N)
            if N > 1 and noise2.stride(1) != 1:
                noise2 = noise2.contiguous()
    else:
        seeds = make_seeds(seed, B, device)
        _check_device("seed", seeds, device)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**32:
        raise ValueError(f"offset must be an int in [0, 2**32), got {offset!r}")
    if error_count is not None:
        if not isinstance(error_count, torch.Tensor) or error_count.dtype != torch.int32 or error_count.numel() != 1:
            raise TypeError("error_count must be an int32 tensor [1]")
        _check_device("error_count", error_count, device)
    return noise2, seeds, zero_noise


def _prepare(mean, var, coeff, noise, seed, offset, error_count, ref: bool = False) -> _Args:
    """Check everything about the arguments (shapes, dtypes, devices) and flatten S; ``ref`` keeps float64."""
    _check_float("mean", mean, _FLOATS + ((torch.float64,) if ref else ()))
    if mean.dim() < 2:
        raise ValueError(f"mean must be [K, B, *S], got {tuple(mean.shape)}")
    K, B, S = mean.shape[0], mean.shape[1], tuple(mean.shape[2:])
    if K < 1:
        raise ValueError("need at least one expert (K >= 1)")
    N = math.prod(S)
    if N >= 2**31:
        raise ValueError(f"at most 2**31 - 1 elements per sample, got {N}")
    device = mean.device
    var3 = _as_var(var, mean)
    coeff2 = _as_coeff(coeff, K, B, device, torch.float64 if ref else torch.float32)
    mean3 = mean.reshape(K, B, N)  # a view when S flattens: strided K and B axes are passed to the kernel
    if N > 1 and mean3.stride(2) != 1:
        mean3 = mean3.contiguous()
    noise2, seeds, zero_noise = _prepare_noise(noise, seed, offset, error_count, (B, *S), device)
    return _Args(mean3, var3, coeff2, noise2, seeds, int(offset), (B, *S), zero_noise)


# --------------------------------------------------------------------------------------------------------------
# Errors: counted cheaply on the device, explained on the host only when something failed
# --------------------------------------------------------------------------------------------------------------


def _fmt_coeff(coeff: torch.Tensor, samples=None) -> str:
    """'c = [1.0, -0.5]' (coeff [1, K]) or per-sample rows for coeff [B, K]; non-positive c_k are named."""
    c = coeff.detach().double().cpu()
    rows = range(c.shape[0]) if c.shape[0] > 1 else [0]
    if samples is not None and c.shape[0] > 1:
        rows = samples
    parts = []
    for i, b in enumerate(rows):
        if i == 4:
            parts.append("...")
            break
        vals = c[b].tolist()
        bad = ", ".join(f"c_{k}={v:.6g}" for k, v in enumerate(vals) if not v > 0)
        where = f"sample {b}: " if c.shape[0] > 1 else ""
        parts.append(f"{where}c = [{', '.join(f'{v:.6g}' for v in vals)}] (sum {sum(vals):.6g}"
                     + (f"; c_k <= 0 or NaN: {bad})" if bad else ")"))
    return "; ".join(parts)


def _moments_ref(mean, var, coeff):
    """float64 moments of the product, the definition shared by the reference and the error report.

    mean [K, B, N], var [Kv, Bv, Nv], coeff [Bc, K] -> (mu [B, N], P [B, N], has_zero [B, N], ok [B, N]) where
    has_zero marks the zero-variance limit (then mu is that limit and P is meaningless) and ok is False where the
    step is undefined (P <= 0, a zero-variance set with sum c <= 0, negative or non-finite var or mean)."""
    m = mean.double()
    v = var.double()
    c = coeff.double().t()[:, :, None]  # [K, Bc, 1]
    zero = v == 0
    w = torch.where(zero, 0.0, c / torch.where(zero, 1.0, v))
    prec = w.sum(0) + torch.zeros_like(m[0])
    mu = (w * m).sum(0) / prec
    czero = torch.where(zero, c, 0.0).sum(0) + torch.zeros_like(m[0])
    mzero = torch.where(zero, c * m, 0.0).sum(0)
    has0 = zero.any(0) & torch.ones_like(m[0], dtype=torch.bool)
    mu = torch.where(has0, mzero / czero, mu)
    good_in = (torch.isfinite(m) & torch.isfinite(v) & (v >= 0)).all(0)
    ok = good_in & torch.where(has0, czero > 0, prec > 0) & torch.isfinite(c).all(0)
    return mu, prec, has0, ok


def _explain(what: str, a: _Args, nbad: int, names=("mean", "var")) -> str:
    """One-line description of the failed elements (host, float64; called only after ``nbad`` > 0 were counted)."""
    mean, var, coeff = a.mean.cpu(), a.var.cpu(), a.coeff.cpu()
    B, N = mean.shape[1], mean.shape[2]
    total = B * N
    _, prec, has0, _ = _moments_ref(mean, var, coeff)
    m_bad = (~torch.isfinite(mean.double())).any(0)
    v_bad = (~torch.isfinite(var.double())).any(0).expand(B, N)
    v_neg = (var.double() < 0).any(0).expand(B, N)
    p_bad = torch.where(has0, torch.zeros_like(has0), ~(prec > 0)) & ~m_bad & ~v_bad & ~v_neg
    z_bad = torch.zeros(B, N, dtype=torch.bool)
    if a.noise is not None:
        z_bad = ~torch.isfinite(a.noise.cpu().double())
    zc = torch.where(var.double() == 0, coeff.double().t()[:, :, None], 0.0).sum(0).expand(B, N)
    l_bad = has0 & ~(zc > 0) & ~m_bad & ~v_bad & ~v_neg
    failed = m_bad | v_bad | v_neg | p_bad | l_bad | z_bad
    samples = sorted(set(torch.nonzero(failed)[:, 0].tolist()))
    msgs = []
    if not torch.isfinite(coeff).all():
        msgs.append("non-finite coefficients")
    for name, mask in ((f"NaN/Inf in {names[0]}", m_bad), (f"NaN/Inf in {names[1]}", v_bad),
                       (f"negative {names[1]}", v_neg),
                       ("NaN/Inf in noise", z_bad)):
        if mask.any():
            msgs.append(f"{name} at {int(mask.sum())} of {total} elements")
    if p_bad.any():
        msgs.append(f"precision P = sum_k c_k/var_k <= 0 at {int(p_bad.sum())} of {total} elements")
    if l_bad.any():
        msgs.append(f"zero-variance experts with sum of c_k <= 0 at {int(l_bad.sum())} of {total} elements")
    if not msgs:  # fine in float64, not in the float32 the step computes in
        msgs.append(f"{nbad} of {total} elements failed in float32 (P rounds to <= 0 or x_prev overflows)")
        samples = None
    where = f" (samples {samples[:8]}{'...' if len(samples) > 8 else ''})" if samples else ""
    return f"{what}: {'; '.join(msgs)}{where}; coefficients: {_fmt_coeff(coeff, samples or None)}"


def raise_if_bad(error_count: torch.Tensor, coeff, what: str = "sampling") -> None:
    """Raise ValueError if the deferred check (``validate=False, error_count=...``) counted any bad element.

    error_count: int32 tensor [1] (one host sync); coeff: the c_k used ([K] or [B, K]), named in the message."""
    n = int(error_count.item())
    if n:
        c = coeff if isinstance(coeff, torch.Tensor) else torch.tensor(coeff, dtype=torch.float64)
        c = c.reshape(-1, c.shape[-1]) if c.dim() else c.reshape(1, 1)
        raise ValueError(f"{what}: {n} elements had P = sum_k c_k/var_k <= 0 or a non-finite value; "
                         f"coefficients: {_fmt_coeff(c)}")


def _finish_check(nbad: int, validate: bool, error_count, explain) -> None:
    """Add nbad into error_count (if given); with validate raise ValueError(explain(nbad)) if nbad > 0."""
    if error_count is not None and nbad:
        error_count.add_(nbad)
    if validate and nbad:
        raise ValueError(explain(nbad))


def _coeff_host_check(what, coeff: torch.Tensor, validate: bool):
    """With validate, NaN/Inf coefficients held on the host are reported before the launch. On a GPU (no extra
    sync) and without validate, the kernel counts the elements they spoil like any other bad element."""
    if validate and coeff.device.type == "cpu" and not bool(torch.isfinite(coeff).all()):
        raise ValueError(f"{what}: non-finite coefficients; coefficients: {_fmt_coeff(coeff)}")


# --------------------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------------------


def _compose_triton(a: _Args, validate: bool = True, error_count=None) -> torch.Tensor:
    """One launch of ``_compose_kernel``: grid (cdiv(N, BLOCK), B)."""
    mean, var, coeff = a.mean, a.var, a.coeff
    K, B, N = mean.shape
    out = torch.empty((B, N), dtype=mean.dtype, device=mean.device)
    if out.numel() == 0:
        return out.reshape(a.shape)
    check = validate or error_count is not None
    # validate: a fresh counter read back once; else the caller's error_count is incremented in place (no sync)
    err = torch.zeros(1, dtype=torch.int32, device=mean.device) if validate else error_count
    noise_mode = 0 if a.zero_noise else (1 if a.noise is not None else 2)
    dummy = out  # any pointer for arguments the chosen constexprs never read
    block = _block_size(N)
    with _LAUNCH_LOCK:
        _compose_kernel[(triton.cdiv(N, block), B)](
            mean, var, coeff,
            a.noise if a.noise is not None else dummy,
            a.seeds if a.seeds is not None else dummy,
            out, err if check else dummy,
            K, N, a.offset,
            mean.stride(0), mean.stride(1),
            var.stride(0) if var.shape[0] > 1 else 0,
            var.stride(1) if var.shape[1] > 1 else 0,
            coeff.stride(1), coeff.stride(0) if coeff.shape[0] > 1 else 0,
            a.noise.stride(0) if a.noise is not None else 0,
            VAR_PER_ELEMENT=var.shape[2] > 1, NOISE=noise_mode, CHECK=check, BLOCK=block, num_warps=4,
        )
    if validate:
        _finish_check(int(err.item()), True, error_count, lambda n: _explain("compose_gaussians", a, n))
    return out.reshape(a.shape)


def _noise_f32(a: _Args, B: int, N: int):
    if a.zero_noise:
        return None
    if a.noise is not None:
        return a.noise.to(torch.float32)
    return philox_normal(a.seeds, a.offset, (N,)).to(a.mean.device)


def _compose_torch_general(a: _Args, z):
    """float32 torch mirror of the kernel, zero-variance limit included: (x [B, N] float32, ok [B, N])."""
    m = a.mean.to(torch.float32)
    v = a.var.to(torch.float32)
    c = a.coeff.t()[:, :, None]  # [K, Bc, 1]
    zero = v == 0
    w = torch.where(zero, 0.0, c / torch.where(zero, 1.0, v))
    prec = (w.sum(0) + torch.zeros_like(m[0]))
    wsum = (w * m).sum(0)
    czero = torch.where(zero, c, 0.0).sum(0) + torch.zeros_like(m[0])
    mzero = torch.where(zero, c * m, 0.0).sum(0)
    has0 = zero.any(0) & torch.ones_like(m[0], dtype=torch.bool)
    mu = torch.where(has0, mzero / czero, wsum / prec)
    ok = (torch.isfinite(m) & torch.isfinite(v) & (v >= 0)).all(0) & torch.where(has0, czero > 0, prec > 0)
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


def _compose_torch(a: _Args, validate: bool = True, error_count=None, explain=None) -> torch.Tensor:
    """float32 torch path (CPU without the interpreter): in-place accumulation, no K*N temporaries, and checks by
    cheap whole-tensor reductions. Falls back to ``_compose_torch_general`` (the kernel's math vectorised over K,
    with the zero-variance limit and exact bad-element counts) when P is not finite somewhere (a zero variance)
    or when a check fails."""
    mean = a.mean
    K, B, N = mean.shape
    if mean.numel() == 0:
        return torch.empty(a.shape, dtype=mean.dtype, device=mean.device)
    check = validate or error_count is not None
    z = _noise_f32(a, B, N)
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
        if a.coeff.shape[0] == 1:
            ones = torch.ones((), dtype=torch.float32, device=mean.device).expand(B, N)
            for k, ck in enumerate(a.coeff[0].tolist()):
                prec.addcdiv_(ones, v[k], value=ck)
                wsum.addcdiv_(m[k], v[k], value=ck)
        else:
            c = a.coeff.t()[:, :, None]  # [K, B, 1]
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
    _finish_check(nbad, validate, error_count, explain or (lambda n: _explain("compose_gaussians", a, n)))
    return out


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
    a = _prepare(mean, var, coeff, noise, seed, offset, error_count)
    _coeff_host_check("compose_gaussians", a.coeff, validate)
    impl = _compose_triton if _use_triton(a.mean.device) else _compose_torch
    return impl(a, validate, error_count)


def compose_gaussians_ref(mean, var, coeff, *, noise=None, seed=None, offset=0, validate=True, error_count=None):
    """The definition, in float64 torch: same arguments and result as ``compose_gaussians`` (x_prev [B, *S] in
    mean's dtype; here mean may also be float64). Noise from ``seed`` is ``philox_normal``, exactly the kernel's."""
    a = _prepare(mean, var, coeff, noise, seed, offset, error_count, ref=True)
    _coeff_host_check("compose_gaussians_ref", a.coeff, validate)
    K, B, N = a.mean.shape
    mu, prec, has0, ok = _moments_ref(a.mean, a.var, a.coeff)
    if a.zero_noise:
        x = mu
    else:
        z = a.noise.double() if a.noise is not None else philox_normal(a.seeds, a.offset, (N,)).double()
        x = mu + torch.where(has0, 0.0, torch.where(prec > 0, prec, 1.0).rsqrt()) * z.to(mu.device)
    ok = ok & torch.isfinite(x)
    nbad = int((~ok).sum()) if (validate or error_count is not None) else 0
    out = x.to(mean.dtype).reshape(a.shape)
    _finish_check(nbad, validate, error_count, lambda n: _explain("compose_gaussians_ref", a, n))
    return out
