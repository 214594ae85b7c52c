"""Benchmark of the composed step x_prev = mu + z / sqrt(P) over K experts, and of the fused step from raw outputs.

    pytest bench/bench_compose.py --benchmark-enable -n 0 [-k 8x4x64x64]

``test_compose`` (float32, noise given) implementations: ``torch_path`` (kernels.compose.compose_torch with
validation: what compose_gaussians runs on CPU), ``naive`` (the obvious separate-torch-ops expression),
``compile`` (torch.compile of naive; skipped where inductor cannot build), ``triton`` (the kernel with
validate=False + error_count, i.e. no host sync; on CUDA, or interpreted on the small size), ``copy`` (torch copy_
of the same number of bytes: the bandwidth ceiling).

``test_fused_step`` (CFG, Philox noise, K experts' raw outputs to x_prev) implementations: ``wrapper``
(fused_expert_step with validate=False + error_count: every argument checked per call), ``plan`` (a
prepare_fused_step plan's launch, its cheap layout check included), ``plan_unchecked`` (launch(check=False): the
launch alone), ``naive`` (gaussian_step + the product of Gaussians as separate torch ops), ``copy``. On a CPU
without the interpreter the wrapper and the plan run the float32 torch path, so wrapper vs plan is the host cost
of the per-call checks; on CUDA it is the Triton kernel.

extra_info: bytes moved (each input read and x_prev written once), GB/s (from the mean time) and the fraction of
the measured copy bandwidth. Variances are per expert ("k" / "fixed", a fixed schedule) or per element ("elem" /
"learned_range"). No test here asserts a time. MSDDA_BENCH_THREADS=n sets torch.set_num_threads(n) (useful on a
shared machine, where 2 threads contending with other work are erratic).
"""
import functools
import math
import os
import time

import pytest
import torch

from msdda.kernels import (
    StepScalars,
    VarMode,
    compose,
    fused_expert_step,
    fused_expert_step_ref,
    gaussian_step,
    launch,
    prepare_fused_step,
)
from msdda.kernels.args import prepare_compose

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
    args = prepare_compose(mean, var, coeff, noise, None, 0, None)
    if impl == "torch_path":  # validated, as the CPU runtime calls it
        return lambda: compose.compose_torch(args)
    count = torch.zeros(1, dtype=torch.int32, device=DEVICE)  # the hot-loop mode: deferred check, no host sync
    return lambda: compose.compose_prepared(args, validate=False, error_count=count)


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


# ------------------------------------------------------------------------------------------------ fused step
FUSED_SIZES = {"1x4x64x64": (1, 4, 64, 64), "8x4x64x64": (8, 4, 64, 64)}
FUSED_IMPLS = ["wrapper", "plan", "plan_unchecked", "naive", "copy"]
GUIDANCE = 7.5


@functools.lru_cache(maxsize=1)
def _fused_inputs(size, K, var_kind):
    B, C, H, W = FUSED_SIZES[size]
    learned = var_kind == "learned_range"
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(K, 2, B, 2 * C if learned else C, H, W, generator=g)
    if learned:
        raw[:, :, :, C:] = 2 * torch.rand(K, 2, B, C, H, W, generator=g) - 1
    x_t = torch.randn(B, C, H, W, generator=g)
    coeff = 0.2 + torch.rand(B, K, generator=g)
    if learned:
        sc = StepScalars(px=1.02, po=-0.2, mx=0.6, m0=0.4, mo=0.0, var_mode=VarMode.LEARNED_RANGE, lv_min=-6.0,
                         lv_max=-4.0)
    else:
        sc = StepScalars(px=1.02, po=-0.2, mx=0.6, m0=0.4, mo=0.0, log_var_fixed=math.log(0.01))
    seeds = torch.arange(B, dtype=torch.int64)
    return raw.to(DEVICE), x_t.to(DEVICE), coeff.to(DEVICE), sc, seeds.to(DEVICE)


def _fused_nbytes(raw, x_t, learned):
    K, _, B, _, H, W = raw.shape
    n = x_t.numel()
    return (K * (3 if learned else 2) + 2) * n * raw.element_size()  # u, c (+ c's variance channel), x_t, x_prev


def _fused_fn(impl, raw, x_t, coeff, sc, seeds):
    count = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    if impl == "wrapper":
        return lambda: fused_expert_step(raw, x_t, coeff, sc, guidance_scale=GUIDANCE, seed=seeds, offset=1,
                                         validate=False, error_count=count)
    if impl in ("plan", "plan_unchecked"):
        plan = prepare_fused_step(raw, x_t, coeff, [sc], guidance_scale=GUIDANCE, seed=seeds, error_count=count)
        out = torch.empty_like(x_t)
        check = impl == "plan"
        return lambda: plan.launch(raw, x_t, out, step=0, check=check)
    if impl == "naive":
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)

        def naive():
            mean, var, _ = gaussian_step(raw, x_t, sc, guidance_scale=GUIDANCE)
            w = coeff.t().reshape(*coeff.t().shape, 1, 1, 1) / var
            P = w.sum(0)
            return (w * mean).sum(0) / P + z / P.sqrt()

        return naive
    src = torch.empty(_fused_nbytes(raw, x_t, sc.var_mode != VarMode.FIXED) // 8, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("var_kind", ["fixed", "learned_range"])
@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("size", list(FUSED_SIZES))
def test_fused_step(benchmark, size, K, var_kind, impl):
    if INTERPRET and size != "1x4x64x64":
        pytest.skip("the batch of 8 is too slow under TRITON_INTERPRET")
    raw, x_t, coeff, sc, seeds = _fused_inputs(size, K, var_kind)
    fn = _fused_fn(impl, raw, x_t, coeff, sc, seeds)
    if impl in ("wrapper", "plan", "plan_unchecked"):
        ref = fused_expert_step_ref(raw.cpu(), x_t.cpu(), coeff.cpu(), sc, guidance_scale=GUIDANCE, seed=seeds.cpu(),
                                    offset=1)
        tol = 16 * torch.finfo(torch.float32).eps * max(1.0, ref.abs().max().item())  # tests' float32 allowance
        if CUDA:  # CUDA's Box-Muller vs numpy's: tests/test_philox.py's 64 eps on normals
            tol += 64 * torch.finfo(torch.float32).eps
        assert (fn().cpu().double() - ref.double()).abs().max().item() <= tol

    def run():
        fn()
        _sync()

    backend = "triton" if launch.use_triton(DEVICE) else "torch"
    benchmark.group = f"fused {size} K={K} var={var_kind} cfg philox ({backend})"
    benchmark(run)
    nbytes = _fused_nbytes(raw, x_t, var_kind == "learned_range")
    benchmark.extra_info["bytes"] = nbytes
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        bw = nbytes / stats.stats.mean
        benchmark.extra_info["GB/s"] = round(bw / 1e9, 3)
        benchmark.extra_info["frac_of_copy_bw"] = round(bw / _copy_bandwidth(nbytes), 3)
