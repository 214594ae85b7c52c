"""Triton device functions shared by the two kernels (compose.py, fused_step.py): the tile, one expert into the
running product of Gaussians, the Philox noise, and the sample's store with its bad-element count.

A program handles BLOCK consecutive elements of one sample as a [BLOCK // W, W] tile, W elements per row = one
16-byte vector of the narrowest input (W = 4 for float32, 8 for float16/bfloat16), so each thread's row is one
vector load and the rows of a warp are contiguous. The Philox noise follows the same rows: one Philox4x32-10 call
gives the four normals of four consecutive elements (ARCHITECTURE.md section 3), computed where they are used.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["accumulate_expert", "philox_normal_tile", "product_sample", "reciprocal", "sample_and_store",
           "start_product", "tile"]


@triton.jit
def tile(pid, N, BLOCK: tl.constexpr, W: tl.constexpr):
    """Rows [R] and flat element indices [R, W] (e = row * W + column) of block ``pid``, and their mask e < N."""
    rows = pid * (BLOCK // W) + tl.arange(0, BLOCK // W)
    offs = rows[:, None] * W + tl.arange(0, W)[None, :]
    return rows, offs, offs < N


@triton.jit
def start_product(PER_ELEMENT: tl.constexpr, BLOCK: tl.constexpr, W: tl.constexpr):
    """The running sums of one tile: (P, sum c mu / var, sum of c over zero-variance experts, sum of c mu over
    them, min var). P, the c sum and min var are scalars when every expert's variance is one number per (k, b)
    (PER_ELEMENT False): the reciprocals then happen once per program, not per element."""
    wsum = tl.zeros([BLOCK // W, W], dtype=tl.float32)
    mzero = tl.zeros([BLOCK // W, W], dtype=tl.float32)
    if PER_ELEMENT:
        prec = tl.zeros([BLOCK // W, W], dtype=tl.float32)
        czero = tl.zeros([BLOCK // W, W], dtype=tl.float32)
        vmin = tl.full([BLOCK // W, W], float("inf"), tl.float32)
    else:
        prec = tl.full((), 0.0, tl.float32)
        czero = tl.full((), 0.0, tl.float32)
        vmin = tl.full((), float("inf"), tl.float32)
    return prec, wsum, czero, mzero, vmin


@triton.jit
def reciprocal(x):
    """1 / x for x > 0 (callers select away x <= 0) as rsqrt(x)^2 refined by one Newton step: one MUFU and four
    multiply-adds, within about an ulp, where an IEEE-style division costs about ten instructions (range
    checks). x = Inf gives NaN (an infinite variance is flagged anyway)."""
    r = tl.rsqrt(x)
    inv = r * r
    return inv + inv * (1.0 - x * inv)


@triton.jit
def accumulate_expert(prec, wsum, czero, mzero, vmin, m, v, c, FIRST: tl.constexpr):
    """Add expert k (mean tile m, variance v (a tile or a scalar), exponent c; float32) to the running sums
    (FIRST: the first expert of an unrolled loop sets them, so the zero-initialised sums compile away).

    A negative, NaN or infinite variance makes P NaN (``reciprocal``); a NaN/Inf mean makes the weighted sums
    NaN/Inf (0 * Inf is NaN): ``product_sample`` flags both, so there are no per-expert validity flags."""
    zero = v == 0.0
    w = tl.where(zero, 0.0, c * reciprocal(tl.where(zero, 1.0, v)))  # c_k / var_k, 0 where var_k == 0
    cz = tl.where(zero, c, 0.0)
    wsum += w * m  # sum_k c_k mu_k / var_k
    if FIRST:
        prec = w
        czero = cz
        mzero = cz * m
        vmin = v
    else:
        prec += w  # P
        czero += cz  # sum of c over zero-variance experts
        mzero += cz * m  # sum of c mu over zero-variance experts
        vmin = tl.minimum(vmin, v)  # 0: some expert has variance 0 (the limit applies)
    return prec, wsum, czero, mzero, vmin


@triton.jit
def product_sample(prec, wsum, czero, mzero, vmin, z, HAS_Z: tl.constexpr):
    """x_prev = mu + z / sqrt(P), or the zero-variance limit (the c-weighted mean of the zero-variance experts'
    means, no noise) where some var_k == 0, and the per-element validity flag: P > 0 (or, in the limit, their
    sum of c > 0), every mean and variance finite (through the sums) and x_prev finite."""
    has0 = vmin == 0.0
    # the selects keep the discarded branch free of rsqrt(<= 0) (bad elements are flagged below anyway)
    p = tl.where(prec > 0.0, prec, 1.0)
    mu = tl.where(has0, mzero * reciprocal(tl.where(czero > 0.0, czero, 1.0)), wsum * reciprocal(p))
    good = (tl.abs(prec) < float("inf")) & tl.where(has0, czero > 0.0, prec > 0.0)
    if HAS_Z:
        x = mu + tl.where(has0, 0.0, tl.rsqrt(p)) * z  # + z / sqrt(P), nothing in the limit
    else:
        x = mu
    # a where, not an &: ``good`` may be a scalar, and the interpreter cannot & a scalar bool with a tile
    ok = tl.where(good, (tl.abs(x) < float("inf")) & (tl.abs(wsum) < float("inf")), False)
    return x, ok


@triton.jit
def philox_normal_tile(seed, rows, offset, W: tl.constexpr):
    """z [R, W] for the elements e = row * W + j of one sample: normal number e % 4 of
    ``tl.randn4x(seed, e // 4 + offset * 2**32)``, i.e. Philox4x32-10 at counter (e // 4, offset, 0, 0) with key
    seed, its four words as two Box-Muller pairs (ARCHITECTURE.md section 3). W is 4 or 8 (one or two counters per
    row); the selects pick per column, so each thread computes exactly the normals of its own row."""
    col = tl.arange(0, W)[None, :]
    counter = rows.to(tl.int64) * (W // 4) + (offset.to(tl.int64) << 32)
    a0, a1, a2, a3 = tl.randn4x(seed, counter)
    z = tl.where(col == 0, a0[:, None], tl.where(col == 1, a1[:, None], tl.where(col == 2, a2[:, None], a3[:, None])))
    if W == 8:
        b0, b1, b2, b3 = tl.randn4x(seed, counter + 1)
        z = tl.where(col == 4, b0[:, None], tl.where(col == 5, b1[:, None],
                     tl.where(col == 6, b2[:, None], tl.where(col == 7, b3[:, None], z))))
    return z


@triton.jit
def sample_and_store(prec, wsum, czero, mzero, vmin, noise_ptr, seed_ptr, b, rows, offs, mask, offset,
                     out_ptr, err_ptr, NOISE: tl.constexpr, CHECK: tl.constexpr, W: tl.constexpr):
    """The shared epilogue: draw z (NOISE 1: loaded from noise_ptr, which points at sample b; 2: Philox keyed by
    seed_ptr[b] at step offset ``offset``), x_prev = mu + z/sqrt(P), store it at out_ptr (sample b), and add the
    number of bad elements into err_ptr when CHECK: summed along each row inside its thread, then one atomic per
    row that has any (none at all on valid inputs: no reduction across threads, no barrier)."""
    if NOISE == 1:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    elif NOISE == 2:
        z = philox_normal_tile(tl.load(seed_ptr + b), rows, offset, W)
    else:
        z = wsum  # unused
    x, ok = product_sample(prec, wsum, czero, mzero, vmin, z, NOISE != 0)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)
    if CHECK:
        row_bad = tl.sum((mask & (ok == 0)).to(tl.int32), axis=1)
        tl.atomic_add(err_ptr + rows * 0, row_bad, mask=row_bad > 0, sem="relaxed")
