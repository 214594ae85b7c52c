"""philox_normal reproduces Triton's tl.randn / tl.rand / tl.randint bit for bit (ARCHITECTURE.md section 3).

Under the interpreter everything is bit-exact. With MSDDA_TEST_GPU=1 (compiled kernels on CUDA) the Philox words and
uniforms must still be bit-exact, while the normals go through CUDA's float32 log/cos and are compared to a few ulp.
"""
import math
import os

import pytest
import torch
import triton
import triton.language as tl

from msdda.kernels import compose_gaussians, philox_normal
from msdda.kernels.philox import philox4x32_10, philox_uniform

GPU = os.environ.get("MSDDA_TEST_GPU") == "1"
DEV = "cuda" if GPU else "cpu"


def same_normals(a, b):
    """Bit-identical under the interpreter; within a few float32 ulp on a GPU (its own log/cos)."""
    a, b = a.cpu(), b.cpu()
    if GPU:
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@triton.jit
def _draw_kernel(seed_ptr, z_ptr, u_ptr, w_ptr, offset, N, BLOCK: tl.constexpr):
    """For sample b, element e: the three draws the kernels make at counter (e, offset, 0, 0), key seed_b."""
    b = tl.program_id(1)
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < N
    seed = tl.load(seed_ptr + b)
    off = e.to(tl.int64) + (offset.to(tl.int64) << 32)
    tl.store(z_ptr + b * N + e, tl.randn(seed, off), mask=mask)
    tl.store(u_ptr + b * N + e, tl.rand(seed, off), mask=mask)
    tl.store(w_ptr + b * N + e, tl.randint(seed, off).to(tl.int64) & 0xFFFFFFFF, mask=mask)


def _triton_draws(seeds, offset, n, block=256):
    B = seeds.shape[0]
    z = torch.empty(B, n, device=DEV)
    u = torch.empty(B, n, device=DEV)
    w = torch.empty(B, n, dtype=torch.int64, device=DEV)
    _draw_kernel[(triton.cdiv(n, block), B)](seeds.to(DEV), z, u, w, offset, n, BLOCK=block)
    return z.cpu(), u.cpu(), w.cpu()


SEEDS = torch.tensor([0, 1, 12345, 2**32 - 1, 2**32, 2**40 + 7, -5, 2**63 - 1, -(2**63)], dtype=torch.int64)


@pytest.mark.parametrize("offset", [0, 1, 7, 2**31 + 3, 2**32 - 1])
def test_bit_exact_against_triton(offset):
    n = 3 * 37  # odd, spans several blocks with a ragged tail
    z, u, w = _triton_draws(SEEDS, offset, n, block=64)
    w0, _, _, _ = philox4x32_10(torch.arange(n)[None], torch.tensor([[offset]]), torch.zeros(1, 1, dtype=torch.int64),
                                torch.zeros(1, 1, dtype=torch.int64), (SEEDS & 0xFFFFFFFF)[:, None],
                                ((SEEDS >> 32) & 0xFFFFFFFF)[:, None])
    assert torch.equal(w0, w)
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


@pytest.mark.parametrize("shape", [(4, 1024), (5, 4000)])
def test_batch_split_into_passes_matches_one_sample_at_a_time(shape):
    """The host draws several small samples per numpy pass (philox._BLOCK elements), and a large one in chunks:
    a sample's noise must not depend on which pass it fell in. 4096 elements: 4 samples a pass, so 10 samples
    take 3 passes (the last one short); 20000 elements: one sample a pass, in chunks."""
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
