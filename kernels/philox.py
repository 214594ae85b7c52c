"""Philox4x32-10 normals, bit-for-bit as msdda's kernels draw them with Triton's ``tl.randn4x`` (ARCHITECTURE.md
section 3).

The noise z for element ``e`` (flat index within one sample) of sample ``b`` at step-offset ``o`` is normal number
``e % 4`` of one Philox call at counter ``e // 4``:

    (n0, n1, n2, n3) = tl.randn4x(seed_b, e // 4 + o * 2**32)
      (w0, w1, w2, w3) = Philox4x32-10(counter=(e // 4, o, 0, 0), key=(seed_b & 0xffffffff, seed_b >> 32))
      (n0, n1) = Box-Muller(uniform(w0), uniform(w1)) = (r cos th, r sin th)
      (n2, n3) = Box-Muller(uniform(w2), uniform(w3))
    z[b, e] = n_{e % 4}

so one Philox call serves four consecutive elements (the kernels' cost per element is a quarter of a Philox call
and half a Box-Muller). ``philox_normal`` reproduces that on the host (torch tensors in and out; the arithmetic
runs in numpy, whose uint32 / uint64 ops wrap by definition and are ~30x faster here than int64 torch emulation),
so the CPU path and the Triton kernel give the same image for the same seed. What is exact and what is not:

- The Philox words and the uint -> uniform conversion are integer ops, an int -> float32 conversion and one
  float32 multiply: correctly rounded everywhere, so they are bit-identical on every device.
- Box-Muller needs float32 ``log``, ``sqrt``, ``cos``, ``sin``, which are implementation-defined. Triton's
  interpreter (TRITON_INTERPRET=1) evaluates them with numpy's float32 ufuncs, so this module evaluates them with
  the very same ufuncs and matches the interpreted kernel bit for bit. (torch's own float32 ``log``/``cos`` differ
  from numpy's by 1-4 ulp, and torch 2.13's CPU float32 ``sqrt`` is not correctly rounded, hence numpy.) A
  compiled GPU kernel uses CUDA's libdevice functions instead; its normals should agree with these to a few float32
  ulp, not bits (not measured here: no GPU). numpy's SIMD ufuncs may also differ by an ulp between CPU generations.

Every value is computed per element from (seed_b, e, o) alone, so a sample's noise never depends on the rest of
the batch, nor on the kernel's block size (blocks hold whole groups of four elements).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["philox_normal", "philox_draw", "philox4x32"]

_M32 = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)
_ROUND_A_64 = np.uint64(0xD2511F53)  # Philox multiplier M0 (Triton: PHILOX_ROUND_A)
_ROUND_B_64 = np.uint64(0xCD9E8D57)  # Philox multiplier M1 (Triton: PHILOX_ROUND_B)
_KEY_A_32 = np.uint32(0x9E3779B9)  # Weyl key increment W0 (golden ratio)
_KEY_B_32 = np.uint32(0xBB67AE85)  # Weyl key increment W1 (sqrt(3) - 1)
_UNIFORM_SCALE = np.float32(4.6566127342e-10)  # Triton's uint32 -> [0, 1) scale, (2**23 - 1)/2**23 * 2**-31
_TWO_PI = np.float32(6.283185307179586)
_U_MIN = np.float32(1.0e-7)  # Box-Muller keeps log() finite: u1 = max(1e-7, u1)


def philox4x32(c0, c1, c2, c3, k0, k1, n_rounds: int = 10):
    """Philox4x32 (Salmon et al. 2011) exactly as ``triton.language.random.philox_impl``, on numpy uint32 arrays
    (broadcastable). The 32x32 -> 64-bit products are exact in uint64; uint32 arithmetic wraps by definition."""
    c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(c, dtype=np.uint32) for c in (c0, c1, c2, c3)))
    k0 = np.atleast_1d(np.asarray(k0, dtype=np.uint32))  # arrays, not scalars: wrapping adds, no warnings
    k1 = np.atleast_1d(np.asarray(k1, dtype=np.uint32))
    for _ in range(n_rounds):
        p_b = c2.astype(np.uint64) * _ROUND_B_64  # M1 * c2
        p_a = c0.astype(np.uint64) * _ROUND_A_64  # M0 * c0
        c0 = (p_b >> _32).astype(np.uint32) ^ c1 ^ k0
        c2 = (p_a >> _32).astype(np.uint32) ^ c3 ^ k1
        c1 = p_b.astype(np.uint32)  # low word (truncation)
        c3 = p_a.astype(np.uint32)
        k0 = k0 + _KEY_A_32  # Weyl key schedule, mod 2**32
        k1 = k1 + _KEY_B_32
    return c0, c1, c2, c3


def _uint_to_uniform(w: np.ndarray) -> np.ndarray:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: bitcast to int32, fold negatives (-x - 1 == ~x), scale.

    Returns float32 in [0, 1)."""
    x = w.view(np.int32)
    x = np.where(x < 0, ~x, x)  # -x - 1, in [0, 2**31)
    return x.astype(np.float32) * _UNIFORM_SCALE  # exact int -> f32 rounding (to nearest), one f32 multiply


_CHUNK = 1 << 15  # Philox counters (four elements each) per pass over one large sample
_BLOCK = 1 << 12  # counters per pass over several small samples (their keys broadcast down the rows)


def _box_muller(wa: np.ndarray, wb: np.ndarray):
    """Triton's ``pair_uniform_to_normal`` of two Philox words, with the float32 ufuncs the interpreter uses."""
    u1 = np.maximum(_U_MIN, _uint_to_uniform(wa))
    th = _TWO_PI * _uint_to_uniform(wb)
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    return r * np.cos(th), r * np.sin(th)


def philox_draw(seeds: torch.Tensor, offset: int, shape, *, normal: bool = True) -> torch.Tensor:
    """[B, *shape] float32: element e of sample b is draw e % 4 of counter (e // 4, offset, 0, 0), key seed_b, as
    ``tl.randn4x`` (normal) or ``tl.rand4x`` (uniform: the numbers behind the normals, which the tests compare
    with Triton's bit for bit) return them."""
    if seeds.dim() != 1 or seeds.dtype != torch.int64:
        raise ValueError(f"philox: seeds must be an int64 tensor [B], got {seeds.dtype} {tuple(seeds.shape)}")
    if not 0 <= int(offset) < 2**32:
        raise ValueError(f"philox: offset must be in [0, 2**32), got {offset}")
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    if n > 2**32:
        raise ValueError(f"philox: at most 2**32 elements per sample, got {n}")
    s = seeds.detach().cpu().numpy().view(np.uint64)  # the int64 bit pattern is the 64-bit key
    if n == 0 or len(s) == 0:
        return torch.empty(len(s), *shape, device=seeds.device)
    keys_lo, keys_hi = (s & _M32).astype(np.uint32)[:, None], (s >> _32).astype(np.uint32)[:, None]
    counters = -(-n // 4)
    out = np.empty((len(s), counters, 4), dtype=np.float32)
    o = np.uint32(offset)
    # passes of [rows, counters]: several small samples per pass (keys broadcast down the rows), or one large
    # sample in chunks; either way about one cache-sized block of temporaries at a time
    rows = max(1, _BLOCK // counters)
    step = counters if rows > 1 else _CHUNK
    for r0 in range(0, len(s), rows):
        r1 = min(len(s), r0 + rows)
        for lo in range(0, counters, step):
            hi = min(counters, lo + step)
            c = np.arange(lo, hi, dtype=np.uint32)[None, :]
            w = philox4x32(c, o, np.uint32(0), np.uint32(0), keys_lo[r0:r1], keys_hi[r0:r1])
            if normal:
                (z0, z1), (z2, z3) = _box_muller(w[0], w[1]), _box_muller(w[2], w[3])
            else:
                z0, z1, z2, z3 = (_uint_to_uniform(x) for x in w)
            block = out[r0:r1, lo:hi]
            block[..., 0], block[..., 1], block[..., 2], block[..., 3] = z0, z1, z2, z3
    flat = out.reshape(len(s), 4 * counters)[:, :n]
    return torch.from_numpy(np.ascontiguousarray(flat)).reshape(len(s), *shape).to(seeds.device)


def philox_normal(seeds: torch.Tensor, offset: int, shape) -> torch.Tensor:
    """Normal number e % 4 of ``tl.randn4x(seed_b, e // 4 + offset * 2**32)`` for every sample b and flat element
    e: float32 [B, *shape] (the module docstring spells it out).

    seeds: int64 tensor [B] (any values; the int64 bit pattern is the 64-bit Philox key).
    offset: step offset o in [0, 2**32) (the runtime uses 0 for x_T and 1 + i for step i).
    shape: the per-sample shape; e runs over its row-major flat index.
    Computed on the CPU (see the module docstring for why) and returned on seeds' device."""
    return philox_draw(seeds, offset, shape, normal=True)
