"""Benchmark of the composed step x_prev = mu + z / sqrt(P) over K experts (float32, noise given).

    pytest bench/bench_compose.py --benchmark-enable [-k 8x4x64x64]

Implementations: ``torch_path`` (kernels.compose._compose_torch with validation: what compose_gaussians runs on
CPU), ``naive`` (the obvious separate-torch-ops expression), ``compile`` (torch.compile of naive; skipped where
inductor cannot build), ``triton`` (the kernel with validate=False + error_count, i.e. no host sync; on CUDA, or
interpreted on the small size), ``copy`` (torch copy_ of the same number of bytes: the bandwidth ceiling).
extra_info: bytes moved (mean + var + noise read and x_prev written, once each), GB/s (from the mean time) and the
fraction of the measured copy bandwidth. Variances are per expert ("k", a fixed schedule) or per element ("elem",
learned). No test here asserts a time. MSDDA_BENCH_THREADS=n sets
torch.set_num_threads(n) (useful on a shared machine, where 2 threads contending with other work are erratic).
"""
import functools
import os
import time

import pytest
import torch

from msdda.kernels import compose

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SIZES = {"8x4x64x64": (8, 4, 64, 64), "8x3x512x512": (8, 3, 512, 512)}
KS = [2, 3, 4, 8]
IMPLS = ["torch_path", "naive", "compile", "triton", "copy"]
if os.environ.get("MSDDA_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["MSDDA_BENCH_THREADS"]))


def naive(mean, var, coeff, noise):
    """The plain expression: mean [K, B, *S], var broadcastable [K, 1.. or B, *S], coeff [K], noise [B, *S]."""
    w = coeff.view(-1, *([1] * (mean.dim() - 1))) / var
    P = w.sum(0)
    return (w * mean).sum(0) / P + noise / P.sqrt()


@functools.lru_cache(maxsize=1)
def _inputs(size, K, var_kind):
    shape = SIZES[size]
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(K, *shape, generator=g).to(DEVICE)
    var = (0.5 + torch.rand(K, generator=g) if var_kind == "k" else 0.5 + torch.rand(K, *shape, generator=g)).to(DEVICE)
    coeff = (0.1 + torch.rand(K, generator=g)).to(DEVICE)
    noise = torch.randn(*shape, generator=g).to(DEVICE)
    return mean, var, coeff, noise


def _nbytes(mean, var, noise):
    return (mean.numel() + var.numel() + 2 * noise.numel()) * 4  # read mean, var, noise; write x_prev


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def _copy_bandwidth(nbytes):
    """Bytes per second of dst.copy_(src) moving nbytes in total (nbytes/2 read + nbytes/2 written)."""
    src = torch.empty(nbytes // 8, dtype=torch.float32, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        _sync()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


_COMPILED = {}


def _fn(impl, mean, var, coeff, noise):
    K = mean.shape[0]
    var_b = var.view(K, *([1] * (mean.dim() - 1))) if var.dim() == 1 else var
    if impl == "naive":
        return lambda: naive(mean, var_b, coeff, noise)
    if impl == "compile":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(naive, dynamic=True)
        f = _COMPILED["fn"]
        try:
            f(mean, var_b, coeff, noise)  # compile outside the timing
        except Exception as e:  # no C++ toolchain, unsupported platform, ...
            pytest.skip(f"torch.compile unavailable here: {type(e).__name__}: {str(e)[:200]}")
        return lambda: f(mean, var_b, coeff, noise)
    if impl == "copy":
        src = torch.empty(_nbytes(mean, var, noise) // 8, dtype=torch.float32, device=DEVICE).normal_()
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    args = compose._prepare(mean, var, coeff, noise, None, 0, None)
    if impl == "torch_path":  # validated, as the CPU runtime calls it
        return lambda: compose._compose_torch(args)
    count = torch.zeros(1, dtype=torch.int32, device=DEVICE)  # the hot-loop mode: deferred check, no host sync
    return lambda: compose._compose_triton(args, validate=False, error_count=count)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("var_kind", ["k", "elem"])
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("size", list(SIZES))
def test_compose(benchmark, size, K, var_kind, impl):
    if INTERPRET and size != "8x4x64x64":
        pytest.skip("the big size is too slow under TRITON_INTERPRET")
    if impl == "triton" and not (CUDA or INTERPRET):
        pytest.skip("the Triton kernel needs CUDA (or TRITON_INTERPRET=1)")
    mean, var, coeff, noise = _inputs(size, K, var_kind)
    fn = _fn(impl, mean, var, coeff, noise)
    if impl != "copy":
        ref = compose.compose_gaussians_ref(mean.cpu(), var.cpu(), coeff.cpu(), noise=noise.cpu(), validate=False)
        assert torch.allclose(fn().cpu(), ref, rtol=1e-4, atol=1e-4)

    def run():
        fn()
        _sync()

    benchmark.group = f"{size} K={K} var={var_kind}"
    benchmark(run)
    nbytes = _nbytes(mean, var, noise)
    benchmark.extra_info["bytes"] = nbytes
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        bw = nbytes / stats.stats.mean
        benchmark.extra_info["GB/s"] = round(bw / 1e9, 3)
        benchmark.extra_info["frac_of_copy_bw"] = round(bw / _copy_bandwidth(nbytes), 3)
