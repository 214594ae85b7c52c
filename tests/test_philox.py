"""philox_normal reproduces the kernels' noise, Triton's tl.randn4x / tl.rand4x / tl.randint4x with four draws per
Philox counter, bit for bit (ARCHITECTURE.md section 3).

Under the interpreter everything is bit-exact. With MSDDA_TEST_GPU=1 (compiled kernels on CUDA) the Philox words and
uniforms must still be bit-exact, while the normals go through CUDA's float32 log/cos/sin and are compared to a few
ulp.
"""
import math
import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from msdda.kernels import compose_gaussians, philox_normal
from msdda.kernels.philox import philox4x32, philox_draw


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on torch int64 tensors holding uint32 values: the four output words as int64 tensors."""
    arrs = [(t.detach().cpu().numpy() & 0xFFFFFFFF).astype(np.uint32) for t in (c0, c1, c2, c3, k0, k1)]
    return tuple(torch.from_numpy(w.astype(np.int64)) for w in philox4x32(*arrs))


def philox_uniform(seeds, offset, shape):
    return philox_draw(seeds, offset, shape, normal=False)

GPU = os.environ.get("MSDDA_TEST_GPU") == "1"
DEV = "cuda" if GPU else "cpu"


# GPU normals: Box-Muller's log, sqrt, cos and sin from CUDA's libdevice and numpy's float32 ufuncs each within a
# few ulp, so the normals (|z| < 6) agree within 64 float32 eps, relative and absolute.
GPU_NORMAL_TOL = 64 * torch.finfo(torch.float32).eps


def same_normals(a, b):
    """Bit-identical under the interpreter; within a few float32 ulp on a GPU (its own log/cos/sin)."""
    a, b = a.cpu(), b.cpu()
    if GPU:
        return torch.allclose(a, b, rtol=GPU_NORMAL_TOL, atol=GPU_NORMAL_TOL)
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@triton.jit
def _store4(ptr, c, mask_n, a0, a1, a2, a3):
    """Element 4c + j gets draw j."""
    tl.store(ptr + 4 * c, a0, mask=4 * c < mask_n)
    tl.store(ptr + 4 * c + 1, a1, mask=4 * c + 1 < mask_n)
    tl.store(ptr + 4 * c + 2, a2, mask=4 * c + 2 < mask_n)
    tl.store(ptr + 4 * c + 3, a3, mask=4 * c + 3 < mask_n)


@triton.jit
def _draw_kernel(seed_ptr, z_ptr, u_ptr, w_ptr, offset, N, BLOCK: tl.constexpr):
    """For sample b and counters c of one block: Triton's own four normals, uniforms and words at counter
    (c, offset, 0, 0), key seed_b, stored at elements 4c .. 4c + 3 (the layout ARCHITECTURE.md section 3 defines)."""
    b = tl.program_id(1)
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr + b)
    off = c.to(tl.int64) + (offset.to(tl.int64) << 32)
    n0, n1, n2, n3 = tl.randn4x(seed, off)
    _store4(z_ptr + b * N, c, N, n0, n1, n2, n3)
    u0, u1, u2, u3 = tl.rand4x(seed, off)
    _store4(u_ptr + b * N, c, N, u0, u1, u2, u3)
    w0, w1, w2, w3 = tl.randint4x(seed, off)
    _store4(w_ptr + b * N, c, N, w0.to(tl.int64) & 0xFFFFFFFF, w1.to(tl.int64) & 0xFFFFFFFF,
            w2.to(tl.int64) & 0xFFFFFFFF, w3.to(tl.int64) & 0xFFFFFFFF)


def _triton_draws(seeds, offset, n, block=64):
    B = seeds.shape[0]
    z = torch.empty(B, n, device=DEV)
    u = torch.empty(B, n, device=DEV)
    w = torch.empty(B, n, dtype=torch.int64, device=DEV)
    _draw_kernel[(triton.cdiv(triton.cdiv(n, 4), block), B)](seeds.to(DEV), z, u, w, offset, n, BLOCK=block)
    return z.cpu(), u.cpu(), w.cpu()


SEEDS = torch.tensor([0, 1, 12345, 2**32 - 1, 2**32, 2**40 + 7, -5, 2**63 - 1, -(2**63)], dtype=torch.int64)


@pytest.mark.parametrize("offset", [0, 1, 7, 2**31 + 3, 2**32 - 1])
def test_bit_exact_against_triton(offset):
    n = 3 * 37  # odd (not a multiple of 4), spans several blocks with a ragged tail
    z, u, w = _triton_draws(SEEDS, offset, n, block=8)
    words = philox4x32_10(torch.arange(-(-n // 4))[None], torch.tensor([[offset]]),
                          torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64),
                          (SEEDS & 0xFFFFFFFF)[:, None], ((SEEDS >> 32) & 0xFFFFFFFF)[:, None])
    assert torch.equal(torch.stack(words, -1).reshape(len(SEEDS), -1)[:, :n], w)  # element 4c + j: word j
    assert torch.equal(philox_uniform(SEEDS, offset, (3, 37)).reshape(len(SEEDS), n).view(torch.int32),
                       u.view(torch.int32))
    mine = philox_normal(SEEDS, offset, (3, 37))
    assert mine.shape == (len(SEEDS), 3, 37) and mine.dtype == torch.float32
    assert same_normals(mine.reshape(len(SEEDS), n), z)


def test_known_answers_random123():
    """Philox4x32-10 known-answer vectors from Random123's kat_vectors."""
    t = lambda *v: [torch.tensor([x], dtype=torch.int64) for x in v]  # noqa: E731
    cases = [
        (t(0, 0, 0, 0), t(0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        (t(*[0xFFFFFFFF] * 4), t(0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (t(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), t(0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in cases:
        assert tuple(int(x) for x in philox4x32_10(*ctr, *key)) == want


def test_kernel_noise_is_philox_normal():
    """K = 1, c = 1, mu = 0, var = 1: x_prev is exactly the kernel's z, which must be philox_normal's."""
    seeds = torch.tensor([3, 99, 2**45], dtype=torch.int64, device=DEV)
    x = compose_gaussians(torch.zeros(1, 3, 5, 7, device=DEV), torch.ones(1, device=DEV), torch.ones(1, device=DEV),
                          seed=seeds, offset=4)
    assert same_normals(x, philox_normal(seeds, 4, (5, 7)))


def test_per_sample_streams_and_offsets():
    seeds = torch.tensor([5, 6, 7], dtype=torch.int64)
    z = philox_normal(seeds, 2, (4, 9))
    for b in range(3):  # a sample's noise depends only on its own seed
        assert torch.equal(philox_normal(seeds[b:b + 1], 2, (4, 9))[0], z[b])
    assert torch.equal(philox_normal(seeds, 2, (36,)).reshape(3, 4, 9), z)  # only the flat index matters
    assert not torch.equal(philox_normal(seeds, 3, (4, 9)), z)  # another step, another stream
    assert not torch.equal(z[0], z[1])


@pytest.mark.parametrize("shape", [(4, 1024), (5, 4001), (2**17 + 13,)])
def test_batch_split_into_passes_matches_one_sample_at_a_time(shape):
    """The host draws several small samples per numpy pass (philox._BLOCK counters of four elements), and a large
    one in chunks (philox._CHUNK counters): a sample's noise must not depend on which pass it fell in. 4096
    elements: 4 samples a pass, so 10 samples take 3 passes (the last one short); 20004: one sample a pass;
    2**17 + 13: one sample a pass, in two chunks, the second ragged."""
    seeds = torch.arange(10, dtype=torch.int64) * 7919 - 3
    z = philox_normal(seeds, 7, shape)
    for b in range(len(seeds)):
        assert torch.equal(philox_normal(seeds[b:b + 1], 7, shape)[0], z[b]), b
    assert torch.equal(philox_uniform(seeds[3:4], 7, shape)[0], philox_uniform(seeds, 7, shape)[3])


def test_moments():
    z = philox_normal(torch.tensor([11, 12], dtype=torch.int64), 1, (50_000,)).double()
    n = z.numel()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(((z - z.mean()) ** 3).mean()) < 5 * math.sqrt(15 / n)
    assert z.abs().max() < 6.5  # Box-Muller with u1 >= 1e-7 caps |z| at sqrt(-2 log 1e-7) ~ 5.68


def test_argument_errors():
    with pytest.raises(ValueError, match="int64"):
        philox_normal(torch.tensor([1, 2], dtype=torch.int32), 0, (3,))
    with pytest.raises(ValueError, match="offset"):
        philox_normal(torch.tensor([1], dtype=torch.int64), -1, (3,))
    with pytest.raises(ValueError, match="offset"):
        philox_normal(torch.tensor([1], dtype=torch.int64), 2**32, (3,))
