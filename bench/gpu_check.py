#!/usr/bin/env python3
"""Build, verify against torch, and time every GPU path of msdda in one go.

    python bench/gpu_check.py [--base PATH --expert NAME=PATH ...] [--batch 2] [--steps 20] [--aot-build DIR]
                              [--only kernels,launch,e2e,torch,ort_cuda,tensorrt,aot] [--e2e-batches 1,8]
                              [--e2e-steps 50] [--out FILE]

Runbook (a session lent an NVIDIA GPU; docs/export-and-gpu.md says what only a GPU checks). The GPU
machines have torch, Triton, transformers, CMake and nvcc but no diffusers and no network, so diffusers travels as
wheels. On the CPU machine, in the repository root (.whl/ is git-ignored, so name it in the run's carry):

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata

then one device call (carry [".whl"], timeout about 540 s; by issue 10's H200 timings the e2e section's runs add
up to about 3 minutes: an estimate, not a measurement):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && mkdir -p /tmp/pp &&
    ln -sfn $PWD/engine /tmp/pp/msdda && ln -sfn $PWD/kernels engine/kernels && ln -sfn $PWD/export engine/export &&
    PYTHONPATH=/tmp/pp:/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --only kernels,launch,e2e \
        --out $OUT/gpu-check.json

and commit the returned JSON as bench/results/gpu-<gpu>-<date>.json (the name the script prints).

On a machine with an NVIDIA GPU it runs these sections, each verified before it is timed (each is one function,
``section_<name>(rec, ctx)``, filling its record):
  kernels     compose_gaussians and fused_expert_step (through its prepared plan) at K=3 8x3x512x512 and K=2
              8x4x128x128, float32 and float16, per-element and per-expert (fixed) variances, given and Philox
              noise: each verified against the float64 reference, then its device time per call (CUDA graph of
              back-to-back calls over enough input sets to exceed the L2 cache, so no host time and no cache hits
              inside), bytes moved, GB/s and the fraction of a device-to-device copy of the same bytes timed the
              same way in the same run
  launch      host cost per call at SD latent size (1x4x64x64, K=2, CFG): fused_expert_step (the plain wrapper)
              vs the prepared plan's launch (checked and unchecked) vs a bare Triton JIT launch of the same kernel
              vs replaying a CUDA graph that captured plan.launch(step=<device counter>); and that graph, replayed
              at every step of a DDPM learned-range schedule (variance mode changing per step), gives the eager
              by-value steps' latents
  e2e         Stable Diffusion 1.5's architecture built from its configs with random weights (860M-parameter UNets,
              CLIP text encoder, VAE, a hand-written tokenizer; fp16, 64x64 latents, 77x768 embeddings, DDIM 50
              steps, CFG 7.5), at batch 1 and 8: msdda K=2 through Engine.generate (CUDA graphs with expert
              streams, the default; graphs without streams; eager), one expert through msdda's fast path,
              diffusers' own StableDiffusionPipeline with one UNet (eager, as users run it), and a
              Diffusion-Blend-style loop (each UNet, CFG, average, DDIMScheduler.step); wall time and peak memory
              of each; the per-step split (one UNet eager and graphed, one msdda step eager and replayed with and
              without streams, one loop step, prompt encoding, VAE decode); the Engines' parameter memory vs the
              networks' own; checks: graph latents == eager latents bit for bit (streams on and off), and msdda's
              one-expert path vs diffusers' pipeline from the same x_T (DDIM eta 0; informational); the issue's
              target ratios, met or not
  torch       the torch backend (loop and vmap) vs the modules themselves
  ort_cuda    the ONNX Runtime backend on the CUDA execution provider (when onnxruntime-gpu is installed)
  tensorrt    TensorRT engines (fp16): build time, refit time per expert, forward vs torch, refittable vs
              non-refittable speed, and a CUDA-graph step loop vs the eager loop (same seeds: same x_0)
  aot         libmsdda_step (the C library, built with cmake when --aot-build has none) through ctypes vs
              fused_expert_step: identical output, launch cost
It prints a short table and writes the full record to bench/results/gpu-<gpu>-<date>.json (or --out).

Without a CUDA GPU it prints why and exits 0, doing nothing. The kernels and launch sections also run on the CPU
under the Triton interpreter at tiny sizes (``run_kernel_sections(device="cpu", quick=True)``), and so does the e2e
section on tiny models (``run_e2e_section(device="cpu", quick=True)``: CUDA graphs through their eager seam);
tests/test_gpu_check.py runs both, so their logic is tested before a GPU ever runs them.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def no_gpu_reason() -> str | None:
    try:
        import torch
    except Exception as exc:  # pragma: no cover - torch is a hard dependency
        return f"torch cannot be imported ({exc})"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


# ------------------------------------------------------------------------------------------------ timing
def cuda_time(fn, *, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of fn() on the current stream, by CUDA events (host time included when fn is
    host-bound: use device_ms for kernels)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def count_launches(fn) -> int | None:
    """CUDA kernels + memcpy/memset launched by one fn() call (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:
        return None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_ms(fns, device, *, calls: int = 24, replays: int = 5) -> tuple[float, str]:
    """Milliseconds of device time per call of fns (called in turn, e.g. one per input set).

    CUDA: ``calls`` calls captured in one CUDA graph, replayed ``replays`` times between two events: the kernels
    run back to back with no host time between them. If capture fails, the same calls eagerly between events
    (host time may then be included: the method says which). CPU: wall time of the calls."""
    import torch

    for f in fns:  # compile, autotune, allocate outside the timing (and outside any capture)
        f()
    _sync(device)
    if device.type != "cuda":
        n = max(len(fns), 2)
        t0 = time.perf_counter()
        for i in range(n):
            fns[i % len(fns)]()
        return (time.perf_counter() - t0) / n * 1e3, "wall"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fns[i % len(fns)]()
        graph.replay()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            graph.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / (replays * calls), "cuda_graph"
    except Exception:
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(calls):
            fns[i % len(fns)]()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / calls, "events_eager"


def host_us(fn, device, *, calls: int = 300) -> float:
    """Microseconds of host time per fn() call, in a loop with no sync: for a small kernel the host is the
    bottleneck, so this is the call's host overhead."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = time.perf_counter() - t0
    _sync(device)
    return t / calls * 1e6


def input_sets(nbytes: int, device, quick: bool) -> int:
    """How many input sets a timing cycles through so that one pass over them exceeds 2.5x the L2 cache (every
    call then reads DRAM, as the copy it is compared with does); 1 on a CPU or in quick runs."""
    import torch

    if quick or device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(16, math.ceil(2.5 * l2 / max(nbytes, 1))))


def copy_ms(nbytes: int, device, sets: int) -> tuple[float, str]:
    """Device time of dst.copy_(src) moving nbytes in total (nbytes/2 read, nbytes/2 written), timed like the
    kernels (same number of input sets)."""
    import torch

    n = max(1, nbytes // 8)  # float32 elements read (and written)
    pairs = [(torch.empty(n, device=device).normal_(), torch.empty(n, device=device)) for _ in range(sets)]
    return device_ms([lambda s=s, d=d: d.copy_(s) for s, d in pairs], device)


# ------------------------------------------------------------------------------------------------ kernels
F32_FLOOR = 16  # float32 eps of allowance relative to max |x_prev| (tests/test_compose.py FLOOR_EPS)
GPU_NORMAL = 64  # float32 eps between CUDA's and numpy's Box-Muller normals (tests/test_philox.py)

KERNEL_SIZES = {"K=3 8x3x512x512": (3, (8, 3, 512, 512)), "K=2 8x4x128x128": (2, (8, 4, 128, 128))}
QUICK_SIZES = {"K=2 2x4x8x8": (2, (2, 4, 8, 8))}


def kernel_cases(quick: bool = False):
    """The roofline table's rows: (kernel, size label, K, shape, dtype, variance kind, noise). ``quick``: tiny
    sizes, and only enough rows to take every code path once (each dtype, variance kind and noise)."""
    sizes = QUICK_SIZES if quick else KERNEL_SIZES
    for kernel, variances, noises in (("compose", ("elem", "k"), ("given", "philox")),
                                      ("fused_step", ("learned_range", "fixed"), ("philox",))):
        for label, (K, shape) in sizes.items():
            for dtype in ("float32", "float16"):
                for var in variances:
                    for noise in noises:
                        odd = ((var == variances[0]) + (noise == noises[0]) + (dtype == "float32")) % 2
                        if quick and not odd:  # a half of the rows that still has each value of each column
                            continue
                        yield dict(kernel=kernel, size=label, K=K, shape=list(shape), dtype=dtype, var=var,
                                   noise=noise)


def _tolerance(dtype, philox: bool, device) -> float:
    import torch

    eps32 = torch.finfo(torch.float32).eps
    floor = F32_FLOOR * eps32 if dtype == torch.float32 else torch.finfo(dtype).eps
    return floor + (GPU_NORMAL * eps32 if philox and device.type == "cuda" else 0.0)


def _compose_case(case, device, quick):
    """(inputs per set, call(set) -> x_prev, bytes per call, check() -> (err, tol))."""
    import torch

    from msdda.kernels import compose_gaussians, compose_gaussians_ref

    K, (B, C, H, W) = case["K"], case["shape"]
    dt = getattr(torch, case["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    elem, philox = case["var"] == "elem", case["noise"] == "philox"
    seeds = torch.arange(B, dtype=torch.int64, device=device) + 1234
    coeff = torch.softmax(torch.randn(K, device=device, generator=g), 0)
    err_count = torch.zeros(1, dtype=torch.int32, device=device)

    def make():
        mean = torch.randn(K, B, C, H, W, device=device, generator=g).to(dt)
        var = (torch.rand(K, B, C, H, W, device=device, generator=g) + 0.1).to(dt) if elem else \
            torch.rand(K, B, device=device, generator=g) + 0.1
        noise = None if philox else torch.randn(B, C, H, W, device=device, generator=g).to(dt)
        return mean, var, noise

    first = make()
    esize = torch.finfo(dt).bits // 8
    n = B * C * H * W
    nbytes = K * n * esize + first[1].numel() * first[1].element_size() + (0 if philox else n * esize) + n * esize

    def call(inputs):
        mean, var, noise = inputs
        z = dict(seed=seeds, offset=3) if philox else dict(noise=noise)
        return compose_gaussians(mean, var, coeff, validate=False, error_count=err_count, **z)

    def check():
        mean, var, noise = first
        z = dict(seed=seeds[:1], offset=3) if philox else dict(noise=noise[:1].cpu())
        ref = compose_gaussians_ref(mean[:, :1].cpu(), var[:, :1].cpu(), coeff.cpu(), **z)
        got = call(first)[:1].cpu()
        err = (got.double() - ref.double()).abs().max().item()
        return err, _tolerance(dt, philox, device) * max(1.0, ref.double().abs().max().item()), int(err_count.item())

    sets = [first] + [make() for _ in range(input_sets(nbytes, device, quick) - 1)]
    return sets, call, nbytes, check, None


def _fused_case(case, device, quick):
    """As _compose_case, for fused_expert_step through its prepared plan (and the plain wrapper's call)."""
    import torch

    from msdda.kernels import StepScalars, VarMode, fused_expert_step, fused_expert_step_ref, prepare_fused_step

    K, (B, C, H, W) = case["K"], case["shape"]
    dt = getattr(torch, case["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    learned = case["var"] == "learned_range"
    if learned:
        sc = StepScalars(px=1.02, po=-0.2, mx=0.6, m0=0.4, mo=0.0, var_mode=VarMode.LEARNED_RANGE, lv_min=-6.0,
                         lv_max=-4.0)
    else:
        sc = StepScalars(px=1.02, po=-0.2, mx=0.6, m0=0.4, mo=0.0, var_mode=VarMode.FIXED,
                         log_var_fixed=math.log(0.01))
    C_out = 2 * C if learned else C
    seeds = torch.arange(B, dtype=torch.int64, device=device) + 1234
    coeff = torch.softmax(torch.randn(B, K, device=device, generator=g), -1)
    gs = 5.0

    def make():
        raw = torch.randn(K, 2, B, C_out, H, W, device=device, generator=g)
        if learned:
            raw[:, :, :, C:] = 2 * torch.rand(K, 2, B, C, H, W, device=device, generator=g) - 1
        return raw.to(dt), torch.randn(B, C, H, W, device=device, generator=g).to(dt), \
            torch.empty(B, C, H, W, device=device, dtype=dt)

    first = make()
    plan = prepare_fused_step(first[0], first[1], coeff, [sc], guidance_scale=gs, seed=seeds, offset=7)
    esize = torch.finfo(dt).bits // 8
    n = B * C * H * W
    nbytes = K * (3 if learned else 2) * n * esize + 2 * n * esize  # u, c (+ c's variance channel); x_t; x_prev

    def call(inputs):
        raw, x_t, out = inputs
        return plan.launch(raw, x_t, out, step=0, check=False)

    def wrapper(inputs):
        raw, x_t, _ = inputs
        return fused_expert_step(raw, x_t, coeff, sc, guidance_scale=gs, seed=seeds, offset=7, validate=False,
                                 error_count=plan.error_count)

    def check():
        raw, x_t, _ = first
        ref = fused_expert_step_ref(raw[:, :, :1].cpu(), x_t[:1].cpu(), coeff[:1].cpu(), sc, guidance_scale=gs,
                                    seed=seeds[:1].cpu(), offset=7)
        got = call(first)[:1].cpu()
        by_value = wrapper(first)[:1].cpu()
        err = (got.double() - ref.double()).abs().max().item()
        tol = _tolerance(dt, True, device) * max(1.0, ref.double().abs().max().item())
        same = bool(torch.equal(got, by_value))  # the plan's table launch and the by-value launch: same bits
        return err, tol if same else -1.0, int(plan.error_count.item())

    sets = [first] + [make() for _ in range(input_sets(nbytes, device, quick) - 1)]
    return sets, call, nbytes, check, wrapper


def section_kernels(rec: dict, ctx) -> None:
    """The roofline table: every kernel case verified, then timed against a copy of the same bytes."""
    rows = []
    copies = {}
    for case in kernel_cases(ctx.quick):
        build = _compose_case if case["kernel"] == "compose" else _fused_case
        row = dict(case)
        try:
            sets, call, nbytes, check, wrapper = build(case, ctx.device, ctx.quick)
            err, tol, bad = check()
            row.update(max_err_vs_ref_f64=err, tolerance=tol, bad_elements=bad, ok=0 <= err <= tol and bad == 0,
                       bytes=nbytes, input_sets=len(sets))
            ms, how = device_ms([lambda s=s: call(s) for s in sets], ctx.device)
            key = (nbytes, len(sets))
            if key not in copies:
                copies[key] = copy_ms(nbytes, ctx.device, len(sets))
            cms, _ = copies[key]
            gbps, copy_gbps = nbytes / ms / 1e6, nbytes / cms / 1e6
            row.update(ms=ms, timing=how, gbps=gbps, copy_ms=cms, copy_gbps=copy_gbps, frac_of_copy=gbps / copy_gbps)
            if wrapper is not None:  # the plain wrapper's kernel (scalars by value): the same work
                wms, _ = device_ms([lambda s=s: wrapper(s) for s in sets], ctx.device)
                row.update(wrapper_ms=wms, wrapper_frac_of_copy=nbytes / wms / 1e6 / copy_gbps)
        except Exception as exc:
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-1500:])
        rows.append(row)
        print(f"    {_case_label(row)}: {_fmt(row.get('ms'), ' ms')} {_fmt(row.get('gbps'))} GB/s "
              f"{_fmt(100 * row['frac_of_copy'] if 'frac_of_copy' in row else None)}% of copy "
              f"{'ok' if row.get('ok') else 'FAILED'}", flush=True)
    target = [r.get("frac_of_copy", 0.0) for r in rows]
    rec.update(cases=rows, ok=all(r.get("ok") for r in rows), min_frac_of_copy=min(target) if target else None,
               target_frac_of_copy=0.85)


def _case_label(r) -> str:
    return f"{r['kernel']} {r['size']} {r['dtype']} var={r['var']} noise={r['noise']}"


def _fmt(v, unit=""):
    return "-" if v is None else (f"{v:.3g}{unit}" if isinstance(v, float) else f"{v}{unit}")


# ------------------------------------------------------------------------------------------------ launch
def section_launch(rec: dict, ctx) -> None:
    """Host cost per call at SD latent size, and one CUDA graph serving every step of a schedule."""
    import torch

    from msdda import schedule as sch
    from msdda.kernels import fused_expert_step, prepare_fused_step

    device = ctx.device
    B, C, H, W = (1, 4, 8, 8) if ctx.quick else (1, 4, 64, 64)
    K, gs, steps = 2, 7.5, (4 if ctx.quick else 50)
    g = torch.Generator(device=device).manual_seed(0)
    params = sch.schedule_from_diffusers_config({"num_train_timesteps": 1000, "clip_sample": False})
    scalars = sch.step_plan(params, steps, kind="ddim", eta=0.0)[1]
    raw = torch.randn(K, 2, B, C, H, W, device=device, generator=g)
    x_t = torch.randn(B, C, H, W, device=device, generator=g)
    out = torch.empty_like(x_t)
    coeff = torch.full((B, K), 1.0 / K, device=device)
    seeds = torch.arange(B, dtype=torch.int64, device=device)
    ec = torch.zeros(1, dtype=torch.int32, device=device)
    plan = prepare_fused_step(raw, x_t, coeff, scalars, guidance_scale=gs, seed=seeds, error_count=ec)
    calls = 3 if ctx.quick or device.type != "cuda" else 300
    i = [0]

    def step():
        i[0] = (i[0] + 1) % steps
        return i[0]

    res = dict(shape=[B, C, H, W], K=K, cfg=True)
    res["plain_us"] = host_us(lambda: fused_expert_step(raw, x_t, coeff, scalars[step()], guidance_scale=gs,
                                                        seed=seeds, offset=1 + i[0], validate=False,
                                                        error_count=ec), device, calls=calls)
    res["plan_us"] = host_us(lambda: plan.launch(raw, x_t, out, step=step()), device, calls=calls)
    res["plan_unchecked_us"] = host_us(lambda: plan.launch(raw, x_t, out, step=step(), check=False), device,
                                       calls=calls)
    p = plan.prepared
    if p is not None:
        zero = torch.zeros(1, dtype=torch.int64, device=device)
        bare = lambda: p.kernel[p.grid](*p.arguments((raw, x_t, out, zero, step())),  # noqa: E731
                                        num_warps=p.num_warps, num_stages=p.num_stages)
        res["bare_jit_us"] = host_us(bare, device, calls=calls)
        res["fast_launcher"] = p.compiled is not None
        res["config"] = dict(BLOCK=p.block, num_warps=p.num_warps)
    res["plan_speedup_vs_plain"] = res["plain_us"] / res["plan_unchecked_us"]
    if device.type == "cuda":
        res.update(_graph_check(ctx))
        counter = torch.zeros(1, dtype=torch.int64, device=device)
        graph = torch.cuda.CUDAGraph()
        plan.launch(raw, x_t, out, step=counter)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            plan.launch(raw, x_t, out, step=counter, check=False)
            counter.add_(1)
        counter.zero_()  # host_us replays steps - 1 times (one warm-up + steps - 2): the counter stays in the table
        res["graph_replay_us"] = host_us(graph.replay, device, calls=steps - 2)
        res["plan_device_us"] = device_ms([lambda: plan.launch(raw, x_t, out, step=0, check=False)], device)[0] * 1e3
    else:
        res["graph"] = "skipped: no CUDA graphs without a GPU"
    rec.update(res, ok=res.get("graph_same_as_eager", True) and int(ec.item()) == 0)
    print(f"    host us/call: plain {res['plain_us']:.1f}, plan {res['plan_us']:.1f}, unchecked "
          f"{res['plan_unchecked_us']:.1f}, bare jit {_fmt(res.get('bare_jit_us'))}, graph replay "
          f"{_fmt(res.get('graph_replay_us'))}", flush=True)


def _graph_check(ctx) -> dict:
    """Capture plan.launch(step=<device counter>) + counter += 1 once; replayed at every step of a DDPM
    learned-range schedule with CFG (LEARNED_RANGE steps, then a FIXED noise-free one), it must give the eager
    by-value steps' latents."""
    import torch

    from msdda import schedule as sch
    from msdda.kernels import fused_expert_step, prepare_fused_step

    device = ctx.device
    params = sch.schedule_from_diffusers_config({"num_train_timesteps": 1000, "variance_type": "learned_range"})
    scalars = sch.step_plan(params, 10, kind="ddpm")[1]
    K, B, C, H, W = 2, 2, 4, 64, 64
    g = torch.Generator(device=device).manual_seed(1)
    raws = []
    for _ in scalars:
        r = torch.randn(K, 2, B, 2 * C, H, W, device=device, generator=g)
        r[:, :, :, C:] = 2 * torch.rand(K, 2, B, C, H, W, device=device, generator=g) - 1
        raws.append(r)
    x0 = torch.randn(B, C, H, W, device=device, generator=g)
    coeff = torch.softmax(torch.randn(B, K, device=device, generator=g), -1)
    seeds = torch.arange(B, dtype=torch.int64, device=device) + 11
    x = x0
    eager = []
    for i, sc in enumerate(scalars):
        x = fused_expert_step(raws[i], x, coeff, sc, guidance_scale=4.0, seed=seeds, offset=1 + i)
        eager.append(x)
    s_raw, s_x, s_out = raws[0].clone(), x0.clone(), torch.empty_like(x0)
    counter = torch.zeros(1, dtype=torch.int64, device=device)
    plan = prepare_fused_step(s_raw, s_x, coeff, scalars, guidance_scale=4.0, seed=seeds)
    plan.launch(s_raw, s_x, s_out, step=counter)  # warm (compiled and tuned before capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.launch(s_raw, s_x, s_out, step=counter, check=False)
        counter.add_(1)
    counter.zero_()
    diffs = []
    x = x0
    for i in range(len(scalars)):
        s_raw.copy_(raws[i])
        s_x.copy_(x)
        graph.replay()
        x = s_out.clone()
        diffs.append((x - eager[i]).abs().max().item())
    torch.cuda.synchronize()
    return dict(graph_steps=len(scalars), graph_modes=sorted({int(s.var_mode) for s in scalars}),
                graph_max_diff_vs_eager=max(diffs), graph_same_as_eager=max(diffs) == 0.0,
                graph_counter_after=int(counter.item()), graph_errors=int(plan.error_count.item()))


def _step_inputs(K=3, B=4, C=4, H=64, W=64, cfg=True, seed=0):
    import torch

    from msdda.kernels import StepScalars, VarMode

    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (K, 2, B, 2 * C, H, W) if cfg else (K, B, 2 * C, H, W)
    raw = torch.randn(shape, device="cuda", generator=g)
    x_t = torch.randn(B, C, H, W, device="cuda", generator=g)
    coeff = torch.softmax(torch.randn(B, K, device="cuda", generator=g), -1)
    scalars = StepScalars(px=1.02, po=-0.2, mx=0.6, m0=0.4, mo=0.0, clip=1.0, var_mode=VarMode.LEARNED_RANGE,
                          lv_min=-6.0, lv_max=-4.0)
    seeds = torch.arange(B, dtype=torch.int64, device="cuda") + 1234
    return raw, x_t, coeff, scalars, seeds


def _models(args, tmp: Path):
    """{name: module}, spec, the base's scheduler config."""
    import torch

    from msdda.loading import load_base
    from msdda.lora import load_expert

    if args.base is None:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_models import make_tiny_unet2d, perturbed_copy

        zoo = REPO / "engine" / "zoo" / "models"
        if (zoo / "base" / "unet" / "config.json").is_file():
            from msdda.zoo import OBJECTIVES

            base_dir, experts = zoo / "base", {n: zoo / n for n in OBJECTIVES if (zoo / n / "unet").is_dir()}
        else:
            base_dir = make_tiny_unet2d(tmp / "base", learned_variance=True, num_class_embeds=11, sample_size=32,
                                        channels=3)
            experts = {f"e{i}": perturbed_copy(base_dir, tmp / f"e{i}", seed=i, scale=0.1) for i in (1, 2)}
    else:
        base_dir, experts = Path(args.base), {k: Path(v) for k, v in args.expert}
    base = load_base(base_dir)
    nets = {"base": base.unet}
    for name, p in experts.items():
        nets[name] = load_expert(name, p, base)[0]
    nets = {k: v.to("cuda", torch.float32).eval() for k, v in nets.items()}
    return nets, base


def _inputs(nets, base, batch: int):
    import torch

    from msdda.backends import Conditioning
    from msdda.export import unet_export_spec

    text_len = base.tokenizer.model_max_length if base.tokenizer is not None else None
    spec = unet_export_spec(base.unet, text_len=text_len)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, *spec["sample_shape"], device="cuda", generator=g)
    if spec["cond"] == "class":
        cond = Conditioning(class_labels=torch.arange(batch, device="cuda") % max(1, base.unet_config["num_class_embeds"]))
    elif spec["cond"] == "text":
        cond = Conditioning(encoder_hidden_states=torch.randn(batch, *spec["text_shape"], device="cuda", generator=g))
    else:
        cond = Conditioning()
    return spec, x, cond


def _reference(nets, x, t, cond):
    import torch

    from msdda.backends.torch_backend import unet_kwargs

    ts = torch.full((x.shape[0],), float(t), device=x.device)
    with torch.no_grad():
        return torch.stack([n(x, ts, **unet_kwargs(cond))[0] for n in nets.values()])


def check_torch_backend(rec, nets, base, batch):
    import torch

    from msdda.backends.torch_backend import TorchBackend

    spec, x, cond = _inputs(nets, base, batch)
    ref = _reference(nets, x, 500, cond)
    members = tuple(range(len(nets)))
    for group in ("loop", "vmap"):
        try:
            be = TorchBackend(nets, device="cuda", dtype=torch.float32, group=group)
            with torch.no_grad():
                out = be.forward(x, 500, cond, members)
                err = (out - ref).abs().max().item()
                ms = cuda_time(lambda: be.forward(x, 500, cond, members))
            rec[group] = dict(ok=err < 1e-3, max_err=err, ms=ms, launches=count_launches(
                lambda: be.forward(x, 500, cond, members)))
        except Exception as exc:
            rec[group] = dict(ok=False, error=f"{type(exc).__name__}: {exc}")
    rec.update(ok=all(v.get("ok") for v in rec.values() if isinstance(v, dict)), batch=batch, K=len(nets))


def check_ort_cuda(rec, nets, base, batch, cache):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        rec.update(skipped="onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        return
    from msdda.backend_artifacts import backend_source
    from msdda.backends.onnxruntime_backend import OnnxRuntimeBackend

    spec, x, cond = _inputs(nets, base, batch)
    ref = _reference(nets, x, 500, cond)
    members = tuple(range(len(nets)))
    onnx, opts = backend_source("onnxruntime", nets, spec=spec, options={"cache_dir": cache})
    be = OnnxRuntimeBackend(onnx, device="cuda", **opts)
    out = be.forward(x, 500, cond, members)
    err = (out - ref).abs().max().item()
    rec.update(ok=err < 1e-2, max_err=err, ms=cuda_time(lambda: be.forward(x, 500, cond, members), reps=10),
               available_providers=ort.get_available_providers())


def check_tensorrt(rec, nets, base, batch, cache, steps):
    try:
        import tensorrt as trt
    except Exception as exc:
        rec.update(skipped=f"tensorrt not importable ({type(exc).__name__}: {exc})")
        return
    import torch

    from msdda import schedule as sch
    from msdda.backend_artifacts import backend_source
    from msdda.backends.tensorrt_backend import TensorRTBackend
    from msdda.kernels import fused_expert_step

    rec["tensorrt_version"] = trt.__version__
    spec, x, cond = _inputs(nets, base, batch)
    ref = _reference(nets, x, 500, cond)
    members = tuple(range(len(nets)))
    results = {}
    for mode in ("refit", "none"):
        t0 = time.perf_counter()
        plans, opts = backend_source("tensorrt", nets, spec=spec,
                                     options={"batch": batch, "refit": mode, "cache_dir": cache})
        be = TensorRTBackend(plans, device="cuda", **opts)
        construct = time.perf_counter() - t0
        out = be.forward(x, 500, cond, members)
        err = (out - ref).abs().max().item()
        scale = ref.abs().max().item()
        results[mode] = dict(ok=err < 2e-2 * max(1.0, scale), max_err=err, ref_scale=scale,
                             construct_s=construct, build_seconds=dict(be.build_seconds),
                             scratch_bytes=be.scratch_bytes,
                             ms=cuda_time(lambda: be.forward(x, 500, cond, members)),
                             launches=count_launches(lambda: be.forward(x, 500, cond, members)))
        if mode == "refit":
            refit_backend = be
    rec.update(results)
    rec["refittable_slowdown"] = results["refit"]["ms"] / results["none"]["ms"]

    # CUDA-graph loop vs the eager loop, same seeds: the same x_0
    be = refit_backend
    params = sch.schedule_from_diffusers_config(base.scheduler_config)
    kind = "ddim" if "DDIM" in base.scheduler_config.get("_class_name", "") else "ddpm"
    timesteps, scalars = sch.step_plan(params, steps, kind=kind, eta=1.0)
    cfg = spec["cond"] != "none"
    B = batch // 2 if cfg else batch
    K = len(members)
    coeff = torch.full((B, K), 1.0 / K, device="cuda")
    seeds = torch.arange(B, dtype=torch.int64, device="cuda") + 7
    g_scale = 2.0 if cfg else None
    x_T = x[:B].clone()
    cond_n = cond
    ec = torch.zeros(1, dtype=torch.int32, device="cuda")

    def eager():
        xt = x_T.clone()
        for i, (t, sc) in enumerate(zip(timesteps, scalars)):
            raw = be.forward(torch.cat([xt, xt]) if cfg else xt, t, cond_n, members)
            if cfg:
                raw = raw.unflatten(1, (2, B))
            xt = fused_expert_step(raw, xt, coeff, sc, guidance_scale=g_scale, seed=seeds, offset=1 + i,
                                   validate=False, error_count=ec)
        return xt

    sampler = be.graphed_sampler(batch=B, cfg=cfg)
    run = lambda: sampler.run(x_T, timesteps, scalars, coeff=coeff, seeds=seeds, cond=cond_n,  # noqa: E731
                              guidance_scale=g_scale)
    x_eager = eager()
    x_graph, errors = run()
    diff = (x_graph - x_eager).abs().max().item()
    t_eager = cuda_time(eager, warmup=1, reps=5)
    t_graph = cuda_time(lambda: run(), warmup=1, reps=5)
    rec["cuda_graph"] = dict(ok=diff < 1e-3 and int(errors.item()) == 0, max_diff_vs_eager=diff, steps=steps,
                             eager_ms=t_eager, graph_ms=t_graph, speedup=t_eager / t_graph,
                             launches_eager=count_launches(eager), launches_graph=count_launches(run))
    rec["ok"] = all(v.get("ok", True) for v in rec.values() if isinstance(v, dict))


def _aot_library(build: Path) -> Path | None:
    lib = build / "libmsdda_step.so"
    if lib.exists():
        return lib
    if shutil.which("cmake") is None:
        return None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DMSDDA_PYTHON={sys.executable}"], check=True,
                   env=env, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j8"], check=True, env=env, capture_output=True)
    ctest = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], env=env,
                           capture_output=True, text=True)
    print(ctest.stdout[-1500:])
    return lib if lib.exists() else None


class _Scalars(ctypes.Structure):
    _fields_ = [(n, ctypes.c_float) for n in ("px", "po", "mx", "m0", "mo", "clip", "var_fixed", "lv_min", "lv_max")] \
        + [("var_mode", ctypes.c_int32)]


class _Args(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("reserved0", ctypes.c_uint32)] \
        + [(n, ctypes.c_uint64) for n in ("raw", "x_t", "coeff", "noise", "seeds", "x_prev", "error_count")] \
        + [("K", ctypes.c_int32), ("B", ctypes.c_int32), ("C", ctypes.c_int32), ("C_out", ctypes.c_int32),
           ("spatial", ctypes.c_int64), ("cfg", ctypes.c_int32), ("guidance_scale", ctypes.c_float),
           ("coeff_per_sample", ctypes.c_int32), ("noise_mode", ctypes.c_int32), ("seed_offset", ctypes.c_uint64),
           ("scalars", _Scalars)]


def check_aot(rec, build: Path) -> None:
    import torch

    from msdda.kernels import fused_expert_step

    lib_path = _aot_library(build)
    if lib_path is None:
        rec.update(skipped="libmsdda_step.so not built and cmake not available")
        return
    lib = ctypes.CDLL(str(lib_path))
    lib.msdda_step_status_string.restype = ctypes.c_char_p
    lib.msdda_step_launch.argtypes = [ctypes.POINTER(_Args), ctypes.c_void_p]
    raw, x_t, coeff, scalars, seeds = _step_inputs(B=8, C=3, H=512, W=512)
    K, _, B, C_out, H, W = raw.shape
    C = x_t.shape[1]
    out = torch.empty_like(x_t)
    ec = torch.zeros(1, dtype=torch.int32, device="cuda")
    a = _Args(struct_size=ctypes.sizeof(_Args), raw=raw.data_ptr(), x_t=x_t.data_ptr(), coeff=coeff.data_ptr(),
              noise=0, seeds=seeds.data_ptr(), x_prev=out.data_ptr(), error_count=ec.data_ptr(), K=K, B=B, C=C,
              C_out=C_out, spatial=H * W, cfg=1, guidance_scale=5.0, coeff_per_sample=1, noise_mode=2,
              seed_offset=7, scalars=_Scalars(px=scalars.px, po=scalars.po, mx=scalars.mx, m0=scalars.m0,
                                             mo=scalars.mo, clip=scalars.clip,
                                             var_fixed=math.exp(scalars.log_var_fixed), lv_min=scalars.lv_min,
                                             lv_max=scalars.lv_max, var_mode=int(scalars.var_mode)))
    stream = torch.cuda.current_stream().cuda_stream
    rc = lib.msdda_step_launch(ctypes.byref(a), ctypes.c_void_p(stream))
    if rc != 0:
        rec.update(ok=False, error=lib.msdda_step_status_string(rc).decode())
        return
    want = fused_expert_step(raw, x_t, coeff, scalars, guidance_scale=5.0, seed=seeds, offset=7)
    diff = (out - want).abs().max().item()
    ms_c = cuda_time(lambda: lib.msdda_step_launch(ctypes.byref(a), ctypes.c_void_p(stream)))
    ms_py = cuda_time(lambda: fused_expert_step(raw, x_t, coeff, scalars, guidance_scale=5.0, seed=seeds, offset=7,
                                                validate=False, error_count=ec))
    t0 = time.perf_counter()
    for _ in range(200):
        lib.msdda_step_launch(ctypes.byref(a), ctypes.c_void_p(stream))
    host_c = (time.perf_counter() - t0) / 200 * 1e6
    torch.cuda.synchronize()
    rec.update(ok=diff <= 1e-5 and int(ec.item()) == 0, max_diff_vs_python_kernel=diff, c_ms=ms_c, python_ms=ms_py,
               c_host_launch_us=host_c, library=str(lib_path))


# ------------------------------------------------------------------------------------------------ e2e
# Stable Diffusion 1.5's architecture (runwayml/stable-diffusion-v1-5's configs), built with random weights: the
# timings depend on the shapes, not the values, so nothing is downloaded. "tiny" is the CPU test's stand-in.
SD15 = dict(
    unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
              block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
             block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4),
)
TINY = dict(
    unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32),
)
# SD1.5's DDIM scheduler (scheduler_config.json of the same repository)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
E2E_WEIGHTS = {"e1": 0.5, "e2": 0.5}
E2E_PROMPT = "a photograph of an astronaut riding a horse"


def e2e_settings(quick: bool, device) -> SimpleNamespace:
    """The e2e section's configuration: SD1.5 at fp16, 50 DDIM steps, CFG 7.5, batch 1 and 8 on a GPU; the tiny
    models at float32, 2 steps, batch 1 and 2 for the CPU test (``quick``)."""
    import torch

    if quick:
        return SimpleNamespace(spec="tiny", batches=(1, 2), steps=2, guidance=7.5, dtype=torch.float32,
                               reps={}, warmup=0)
    half = torch.float16 if device.type == "cuda" else torch.float32
    return SimpleNamespace(spec="sd15", batches=(1, 8), steps=50, guidance=7.5, dtype=half, reps={1: 3, 8: 2},
                           warmup=1)


def sd_models(spec: str, device, dtype, tmp: Path):
    """Three UNets (base, e1, e2), a CLIP text encoder, a VAE and a DDIM scheduler config of ``spec``'s
    architecture with seeded random weights, built on ``device`` in ``dtype``; the tokenizer is the hand-written
    byte-level one of tests/tiny_models.py (77 tokens, CLIP's special tokens)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import write_tokenizer

    cfg = SD15 if spec == "sd15" else TINY
    write_tokenizer(tmp / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")

    def build(make, seed):
        torch.manual_seed(seed)
        with torch.device(device):
            module = make()
        # Module.to: diffusers' ModelMixin.to warns about fp32 modules on every network
        return torch.nn.Module.to(module, dtype).eval().requires_grad_(False)

    unets = [build(lambda: UNet2DConditionModel(**cfg["unet"]), seed) for seed in (0, 1, 2)]
    text = CLIPTextConfig(vocab_size=max(len(tokenizer), 49408 if spec == "sd15" else 0), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfg["text"])
    text_encoder = build(lambda: CLIPTextModel(text), 3)
    vae = build(lambda: AutoencoderKL(**cfg["vae"]), 4)
    scheduler = dict(DDIMScheduler(**SD_SCHEDULER).config, _class_name="DDIMScheduler")
    return SimpleNamespace(unets=unets, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, scheduler=scheduler)


def e2e_engines(m, device, dtype, tmp: Path) -> dict:
    """Engines over the same networks (the torch backend stores no copy, so they share the weights): graphs with
    expert streams (the default), graphs without streams, and eager. On a CPU the graphs go through the eager
    seam (``replay_eagerly``)."""
    from msdda import Engine
    from msdda.graphs import StepGraphCache, replay_eagerly
    from msdda.loading import BaseModel

    unet = m.unets[0]
    base = BaseModel(path=tmp, unet=unet, unet_config=dict(unet.config, _class_name=type(unet).__name__),
                     scheduler_config=m.scheduler, text_encoder=m.text_encoder, tokenizer=m.tokenizer, vae=m.vae)
    experts = {"e1": m.unets[1], "e2": m.unets[2]}
    engines = {}
    for name, graphs, streams in (("graph_streams", True, True), ("graph_no_streams", True, False),
                                  ("eager", False, True)):
        eng = Engine(base, experts, device=device, dtype=dtype, cuda_graphs=graphs,
                     backend_options={"streams": streams})
        if graphs and eng.step_graphs is None:      # CPU: the seam
            eng.step_graphs = StepGraphCache(capture=replay_eagerly)
        engines[name] = eng
    return engines


def db_loop(m, unets, weights, prompts, *, steps, guidance, generator, latents=None, eta=1.0, output_type="np"):
    """A Diffusion-Blend-style loop, as its public code runs: every UNet on the CFG pair, CFG per expert, the
    weighted average of the guided eps, then diffusers' DDIMScheduler.step; prompts encoded and images decoded as
    a pipeline does."""
    import torch
    from diffusers import DDIMScheduler

    device = unets[0].device
    ids = m.tokenizer([""] * len(prompts) + list(prompts), padding="max_length", truncation=True,
                      max_length=m.tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
    with torch.inference_mode():
        emb = m.text_encoder(ids)[0]
        sched = DDIMScheduler.from_config(m.scheduler)
        sched.set_timesteps(steps)
        shape = (len(prompts), unets[0].config.in_channels, unets[0].config.sample_size, unets[0].config.sample_size)
        lat = latents if latents is not None else \
            torch.randn(shape, generator=generator, device=device, dtype=unets[0].dtype) * sched.init_noise_sigma
        for t in sched.timesteps:
            lat = db_step(unets, weights, lat, t, emb, guidance, sched, generator, eta)
        if output_type == "latent":
            return lat
        image = m.vae.decode(lat / m.vae.config.scaling_factor, return_dict=False)[0]
        return ((image.float() / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).cpu().numpy()


def db_step(unets, weights, lat, t, emb, guidance, sched, generator, eta):
    """One step of ``db_loop``."""
    import torch

    inp = sched.scale_model_input(torch.cat([lat, lat]), t)
    eps = 0
    for w, unet in zip(weights, unets):
        u, c = unet(inp, t, encoder_hidden_states=emb, return_dict=False)[0].chunk(2)
        eps = eps + w * (u + guidance * (c - u))
    return sched.step(eps, t, lat, eta=eta, generator=generator, return_dict=False)[0]


def wall_ms(fn, device, *, warmup: int, reps: int) -> float:
    """Median wall-clock milliseconds of fn() from start to finished on the device (its result on the host)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, reps)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def timed_with_peak(fn, device, *, warmup: int, reps: int) -> tuple[float, int | None]:
    """(wall_ms of the reps, peak device memory allocated during them; None on a CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    ms = wall_ms(fn, device, warmup=0, reps=reps)
    return ms, (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)


def _allocated(device) -> int | None:
    import torch

    if device.type != "cuda":
        return None
    _sync(device)
    return torch.cuda.memory_allocated(device)


def _idle_graph(engine, kind: str, batch: int):
    """The idle step graph of ``kind`` ("product": msdda, "single": one network) at ``batch`` in an Engine's
    cache, or None."""
    for key, graph in engine.step_graphs.idle():
        if key.kind == kind and key.batch == batch:
            return graph
    return None


def section_e2e(rec: dict, ctx) -> None:
    """End to end at SD1.5's architecture: msdda K=2 (graphs with expert streams, graphs without, eager), one
    expert through msdda's fast path, diffusers' StableDiffusionPipeline with one UNet, and a Diffusion-Blend-style
    loop, at each batch; the per-step split; peak memory; the Engines' parameter memory vs the networks' own;
    graph vs eager latents; msdda's one-expert path vs diffusers' pipeline from the same x_T (DDIM eta 0)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from msdda.backends.torch_backend import storage_bytes

    device = ctx.device
    s = ctx.e2e
    tmp = Path(tempfile.mkdtemp(prefix="msdda-e2e-"))
    before_models = _allocated(device)
    m = sd_models(s.spec, device, s.dtype, tmp)
    networks = storage_bytes([t for u in m.unets for t in list(u.parameters()) + list(u.buffers())])
    before_engines = _allocated(device)
    engines = e2e_engines(m, device, s.dtype, tmp)
    after_engines = _allocated(device)
    eng = engines["graph_streams"]
    resident = eng.backend.resident_bytes()
    rec.update(spec=s.spec, dtype=str(s.dtype).removeprefix("torch."), steps=s.steps, guidance=s.guidance,
               K=2, weights=E2E_WEIGHTS, params_per_unet=sum(p.numel() for p in m.unets[0].parameters()),
               memory=dict(networks_bytes=networks, all_models_bytes=None if before_models is None else
                           before_engines - before_models, engines_extra_bytes=None if after_engines is None else
                           after_engines - before_engines, backend_resident_bytes=resident,
                           backend_resident_ratio=resident / networks,
                           engine_param_ratio=None if after_engines is None else
                           (networks + after_engines - before_engines) / networks, target_ratio=1.05))
    pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unets[1],
                                   scheduler=DDIMScheduler.from_config(m.scheduler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    checks, batches = [], {}
    for B in s.batches:
        prompts = [E2E_PROMPT] * B
        common = dict(prompt=prompts, num_images=B, steps=s.steps, guidance_scale=s.guidance, seed=0)
        msdda_kw = dict(common, weights=E2E_WEIGHTS)
        res = batches[str(B)] = {}

        # correctness first (it also captures every graph these calls use)
        with torch.inference_mode():
            eager = engines["eager"].generate(output_type="latent", **msdda_kw).latents
            for name in ("graph_streams", "graph_no_streams"):
                got = engines[name].generate(output_type="latent", **msdda_kw).latents
                diff = (got.float() - eager.float()).abs().max().item()
                row = dict(check=f"graph vs eager latents, {name}, batch {B}", max_abs_diff=diff,
                           bitwise=bool(torch.equal(got, eager)), finite=bool(torch.isfinite(got).all()),
                           captures=engines[name].step_graphs.stats["captures"],
                           failed=[k.describe() + ": " + v for k, v in engines[name].step_graphs.failed().items()])
                row["ok"] = row["finite"] and row["bitwise"] and not row["failed"]
                checks.append(row)
            if B == s.batches[0]:   # msdda's one-expert fast path vs diffusers' pipeline, same x_T, DDIM eta 0
                g = torch.Generator(device=device).manual_seed(5)
                x_T = torch.randn(B, *eng.sample_shape, generator=g, device=device, dtype=s.dtype)
                ours = eng.generate(output_type="latent", strategy="expert:e1", latents=x_T, eta=0.0,
                                    **{k: v for k, v in common.items() if k != "seed"}).latents
                theirs = pipe(prompt=prompts, num_inference_steps=s.steps, guidance_scale=s.guidance, eta=0.0,
                              latents=x_T.clone(), output_type="latent").images
                diff = (ours.float() - theirs.float()).abs().max().item()
                scale = theirs.float().abs().max().item()
                checks.append(dict(check=f"msdda expert:e1 vs diffusers StableDiffusionPipeline latents, batch {B}, "
                                         "eta 0 (informational: diffusers steps in the UNets' dtype)",
                                   max_abs_diff=diff, scale=scale, rel_diff=diff / max(scale, 1e-30),
                                   ok=bool(torch.isfinite(ours).all())))

        reps, warm = s.reps.get(B, 1), s.warmup
        gen = torch.Generator(device=device)
        methods = {
            "msdda_graph_streams": lambda: engines["graph_streams"].generate(output_type="np", **msdda_kw),
            "msdda_graph_no_streams": lambda: engines["graph_no_streams"].generate(output_type="np", **msdda_kw),
            "msdda_eager": lambda: engines["eager"].generate(output_type="np", **msdda_kw),
            "one_expert_graph": lambda: eng.generate(output_type="np", strategy="expert:e1", **common),
            "diffusers_single": lambda: pipe(prompt=prompts, num_inference_steps=s.steps, guidance_scale=s.guidance,
                                             eta=1.0, generator=gen.manual_seed(0), output_type="np"),
            "db_loop": lambda: db_loop(m, m.unets[1:], [E2E_WEIGHTS["e1"], E2E_WEIGHTS["e2"]], prompts,
                                       steps=s.steps, guidance=s.guidance, generator=gen.manual_seed(0)),
        }
        for name, fn in methods.items():
            w = 0 if name == "msdda_eager" else warm       # the eager engine was warmed by the check above
            ms, peak = timed_with_peak(fn, device, warmup=w, reps=reps)
            res[name] = dict(ms=ms, reps=reps, peak_bytes=peak)
            print(f"    batch {B} {name}: {ms:.1f} ms", flush=True)
        res["split"] = _step_split(m, engines, pipe, B, s, device)

    b1, bl = batches[str(s.batches[0])], batches[str(s.batches[-1])]
    targets = dict(
        msdda_vs_diffusers_single_b1=b1["msdda_graph_streams"]["ms"] / b1["diffusers_single"]["ms"],
        msdda_vs_one_expert_b1=b1["msdda_graph_streams"]["ms"] / b1["one_expert_graph"]["ms"],
        db_loop_vs_msdda_b1=b1["db_loop"]["ms"] / b1["msdda_graph_streams"]["ms"],
        msdda_vs_db_loop_blast=bl["msdda_graph_streams"]["ms"] / bl["db_loop"]["ms"],
        streams_speedup_b1=b1["msdda_graph_no_streams"]["ms"] / b1["msdda_graph_streams"]["ms"],
        streams_speedup_blast=bl["msdda_graph_no_streams"]["ms"] / bl["msdda_graph_streams"]["ms"],
        graph_speedup_b1=b1["msdda_eager"]["ms"] / b1["msdda_graph_streams"]["ms"],
        param_memory_ratio=rec["memory"]["engine_param_ratio"],
    )
    limits = dict(msdda_vs_diffusers_single_b1=("<=", 1.0), msdda_vs_one_expert_b1=("<=", 1.5),
                  db_loop_vs_msdda_b1=(">=", 2.5), msdda_vs_db_loop_blast=("<=", 1.0), param_memory_ratio=("<=", 1.05))
    met = {k: (None if targets[k] is None else (targets[k] <= v if op == "<=" else targets[k] >= v))
           for k, (op, v) in limits.items()}
    rec.update(batches=batches, checks=checks, targets=targets, target_limits={k: f"{op} {v}" for k, (op, v) in
                                                                                limits.items()},
               targets_met=met, ok=all(c["ok"] for c in checks))
    shutil.rmtree(tmp, ignore_errors=True)


def _step_split(m, engines, pipe, B: int, s, device) -> dict:
    """Milliseconds of one step's parts at batch B: one UNet on the CFG pair (eager, and replayed as a CUDA graph
    on a GPU), one msdda K=2 step eager (the step function) and replayed (with and without expert streams), one
    Diffusion-Blend-style step, the prompt encoding and the VAE decode of a generate call."""
    import torch
    from diffusers import DDIMScheduler

    reps = 20 if device.type == "cuda" else 1
    eng = engines["graph_streams"]
    unet = m.unets[1]
    C, H = unet.config.in_channels, unet.config.sample_size
    g = torch.Generator(device=device).manual_seed(1)
    x2 = torch.randn(2 * B, C, H, H, generator=g, device=device, dtype=s.dtype)
    with torch.inference_mode():
        cond = eng.conditioning(B, cfg=True, prompt=[E2E_PROMPT] * B)
    emb = cond.encoder_hidden_states
    t = torch.tensor(500, device=device)
    out = {}

    def unet_call():
        return unet(x2, t, encoder_hidden_states=emb, return_dict=False)[0]

    with torch.inference_mode():
        out["unet_eager_ms"] = wall_ms(unet_call, device, warmup=1, reps=reps)
        if device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            unet_call()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                unet_call()
            out["unet_graph_ms"] = wall_ms(graph.replay, device, warmup=2, reps=reps)
            del graph
        for name in ("graph_streams", "graph_no_streams"):
            sg = _idle_graph(engines[name], "product", B)
            if sg is None:
                continue

            def replay(sg=sg):
                sg.counter.zero_()
                sg.replay()

            out[f"msdda_step_{name}_ms"] = wall_ms(replay, device, warmup=1, reps=reps)
            if name == "graph_streams":
                def eager_step(sg=sg):
                    sg.counter.zero_()
                    sg.step()

                out["msdda_step_eager_ms"] = wall_ms(eager_step, device, warmup=1, reps=reps)
        sched = DDIMScheduler.from_config(m.scheduler)
        sched.set_timesteps(s.steps)
        lat = x2[:B].clone()
        tt = sched.timesteps[len(sched.timesteps) // 2]
        out["db_step_ms"] = wall_ms(lambda: db_step(m.unets[1:], [0.5, 0.5], lat, tt, emb, s.guidance, sched, None, 1.0),
                                    device, warmup=1, reps=reps)
        out["encode_ms"] = wall_ms(lambda: eng.conditioning(B, cfg=True, prompt=[E2E_PROMPT] * B), device, warmup=1,
                                   reps=reps)
        vae = m.vae
        out["decode_ms"] = wall_ms(lambda: vae.decode(lat.to(vae.dtype) / vae.config.scaling_factor,
                                                      return_dict=False)[0], device, warmup=1, reps=max(1, reps // 4))
    return out


# ------------------------------------------------------------------------------------------------ main
def new_record(device) -> dict:
    import torch

    rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "device": str(device),
           "torch": torch.__version__, "checks": {}}
    try:
        import triton

        rec["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        rec.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)))
    else:
        rec.update(gpu=f"cpu ({platform.machine()})", capability=[])
    return rec


def run_section(record: dict, name: str, fn, *a) -> None:
    """Run one section into record["checks"][name]; an exception fails that section only."""
    rec = record["checks"].setdefault(name, {})
    t0 = time.perf_counter()
    try:
        fn(rec, *a)
    except Exception as exc:
        rec.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-2000:])
    rec["wall_s"] = round(time.perf_counter() - t0, 3)
    print(f"  {name}: {'skipped' if 'skipped' in rec else ('ok' if rec.get('ok') else 'FAILED')} "
          f"({rec['wall_s']:.1f} s)", flush=True)


KERNEL_SECTIONS = {"kernels": section_kernels, "launch": section_launch}


def run_kernel_sections(names=("kernels", "launch"), device="cuda", quick=False, record=None) -> dict:
    """The sections that need no models, on ``device`` (on a CPU they run under the Triton interpreter when
    TRITON_INTERPRET=1 was set before msdda.kernels was imported; ``quick``: tiny sizes)."""
    import torch

    device = torch.device(device)
    record = record if record is not None else new_record(device)
    ctx = SimpleNamespace(device=device, quick=quick)
    for name in names:
        run_section(record, name, KERNEL_SECTIONS[name], ctx)
    return record


def run_e2e_section(device="cuda", quick=False, record=None, settings=None) -> dict:
    """The e2e section on ``device`` (``settings``: ``e2e_settings``'s, by default; ``quick``: the tiny models,
    which is how tests/test_gpu_check.py runs it on the CPU)."""
    import torch

    device = torch.device(device)
    record = record if record is not None else new_record(device)
    ctx = SimpleNamespace(device=device, quick=quick, e2e=settings or e2e_settings(quick, device))
    run_section(record, "e2e", section_e2e, ctx)
    return record


def results_path(record: dict) -> Path:
    """bench/results/gpu-<gpu>-<date>.json"""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", record.get("gpu", "gpu")).strip("-")
    return RESULTS / f"gpu-{slug}-{record['time'][:10]}.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="msdda GPU check: build, verify and time every GPU path")
    ap.add_argument("--base", help="base model folder (default: the zoo if trained, else tiny test models)")
    ap.add_argument("--expert", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                    metavar="NAME=PATH")
    ap.add_argument("--batch", type=int, default=2, help="network batch N (2B under CFG)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps for the CUDA-graph check")
    ap.add_argument("--aot-build", type=Path, default=None, help="cmake build folder of libmsdda_step")
    ap.add_argument("--only", default="kernels,launch,e2e,torch,ort_cuda,tensorrt,aot")
    ap.add_argument("--e2e-batches", default=None, help="e2e batch sizes, e.g. 1,8 (default 1,8)")
    ap.add_argument("--e2e-steps", type=int, default=None, help="e2e denoising steps (default 50)")
    ap.add_argument("--quick", action="store_true", help="tiny kernel sizes (a smoke run of the script)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/gpu-<gpu>-<date>.json)")
    args = ap.parse_args(argv)

    reason = no_gpu_reason()
    if reason:
        print(f"gpu_check: {reason}; nothing to check on this machine (run it on a machine with an NVIDIA GPU).")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    only = [s for s in args.only.split(",") if s]
    record = new_record(torch.device("cuda"))
    tmp = Path(tempfile.mkdtemp(prefix="msdda-gpu-check-"))
    cache = tmp / "cache"
    run_kernel_sections([n for n in KERNEL_SECTIONS if n in only], "cuda", args.quick, record)
    if "e2e" in only:
        settings = e2e_settings(False, torch.device("cuda"))
        if args.e2e_batches:
            settings.batches = tuple(int(b) for b in args.e2e_batches.split(","))
        if args.e2e_steps:
            settings.steps = args.e2e_steps
        run_e2e_section("cuda", record=record, settings=settings)
        write_record(record, args.out or results_path(record))   # kept even if a later section crashes
    nets = base = None
    if set(only) & {"torch", "ort_cuda", "tensorrt"}:
        nets, base = _models(args, tmp)
        record["models"] = {"members": list(nets), "class": type(base.unet).__name__,
                            "params_per_member": sum(p.numel() for p in base.unet.parameters())}
    for name, fn, a in (("torch", check_torch_backend, (nets, base, args.batch)),
                        ("ort_cuda", check_ort_cuda, (nets, base, args.batch, cache)),
                        ("tensorrt", check_tensorrt, (nets, base, args.batch, cache, args.steps)),
                        ("aot", check_aot, (args.aot_build or (tmp / "aot-build"),))):
        if name in only:
            run_section(record, name, fn, *a)

    print_table(record)
    out = args.out or results_path(record)
    write_record(record, out)
    print(f"wrote {out}")
    shutil.rmtree(tmp, ignore_errors=True)
    failed = [k for k, v in record["checks"].items() if not v.get("ok") and "skipped" not in v]
    return 1 if failed else 0


def write_record(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, out)


def print_table(record) -> None:
    f = _fmt
    print(f"\n{record['gpu']} (sm_{''.join(map(str, record['capability']))}), torch {record['torch']}")
    print(f"{'check':<22}{'status':<9}{'time':>12}{'vs':>12}{'GB/s':>10}{'launches':>10}  note")
    for name, r in record["checks"].items():
        status = "skip" if "skipped" in r else ("ok" if r.get("ok") else "FAIL")
        if name == "kernels":
            for c in r.get("cases", []):
                st = "ok" if c.get("ok") else "FAIL"
                frac = c.get("frac_of_copy")
                print(f"  {_case_label(c):<56}{st:<5}{f(c.get('ms'), ' ms'):>11}{f(c.get('gbps')):>8} GB/s "
                      f"{f(None if frac is None else 100 * frac):>5}% of copy ({f(c.get('copy_gbps'))} GB/s)"
                      f"{'' if c.get('wrapper_ms') is None else ', wrapper ' + f(c.get('wrapper_ms'), ' ms')}"
                      f"{' ' + c['error'] if 'error' in c else ''}")
            rows = [("kernels", None, None, None, None, f"min {f(r.get('min_frac_of_copy'))} of copy (target 0.85)")]
        elif name == "launch":
            rows = [("launch", None, None, None, None,
                     f"host us/call: plain {f(r.get('plain_us'))}, plan {f(r.get('plan_us'))}, unchecked "
                     f"{f(r.get('plan_unchecked_us'))}, bare jit {f(r.get('bare_jit_us'))}, graph replay "
                     f"{f(r.get('graph_replay_us'))}; graph == eager: {r.get('graph_same_as_eager')}")]
        elif name == "torch":
            rows = [(f"torch/{g}", r.get(g, {}).get("ms"), None, None, r.get(g, {}).get("launches"),
                     f"err {f(r.get(g, {}).get('max_err'))}") for g in ("loop", "vmap")]
        elif name == "tensorrt" and "skipped" not in r:
            rows = [(f"trt/{m}", r.get(m, {}).get("ms"), None, None, r.get(m, {}).get("launches"),
                     f"build {r.get(m, {}).get('build_seconds')}") for m in ("refit", "none")]
            cg = r.get("cuda_graph", {})
            rows.append(("trt/cuda_graph_loop", cg.get("graph_ms"), cg.get("eager_ms"), None,
                         cg.get("launches_graph"), f"diff vs eager {f(cg.get('max_diff_vs_eager'))}"))
        elif name == "e2e" and "batches" in r:
            rows = []
            for B, res in r["batches"].items():
                for meth, v in res.items():
                    if meth != "split":
                        rows.append((f"e2e/b{B}/{meth}", v.get("ms"), None, None, None,
                                     f"peak {f(None if v.get('peak_bytes') is None else v['peak_bytes'] / 2**30)} GiB"))
                sp = res.get("split", {})
                rows.append((f"e2e/b{B}/step", sp.get("msdda_step_graph_streams_ms"), sp.get("msdda_step_eager_ms"),
                             None, None, "; ".join(f"{k[:-3]} {f(v)}" for k, v in sp.items())))
            rows.append(("e2e/targets", None, None, None, None,
                         ", ".join(f"{k} {f(v)} ({r['target_limits'].get(k, '')}: {r['targets_met'].get(k)})"
                                   for k, v in r["targets"].items())))
            rows += [("e2e/check", None, None, None, None,
                      f"{'ok' if c['ok'] else 'FAIL'} {c['check']}: diff {f(c['max_abs_diff'])}") for c in r["checks"]]
        elif name == "aot" and "skipped" not in r:
            rows = [(name, r.get("c_ms"), r.get("python_ms"), None, 1,
                     f"host launch {f(r.get('c_host_launch_us'))} us; diff {f(r.get('max_diff_vs_python_kernel'))}")]
        else:
            rows = [(name, r.get("ms"), None, None, None, r.get("skipped") or r.get("error") or "")]
        for label, t, vs, gbps, launches, note in rows:
            print(f"{label:<22}{status:<9}{f(t, ' ms'):>12}{f(vs, ' ms'):>12}{f(gbps):>10}{f(launches):>10}  {note}")


if __name__ == "__main__":
    sys.exit(main())
