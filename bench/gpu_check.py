#!/usr/bin/env python3
"""Build, verify against torch, and time every GPU path of msdda in one go.

    python bench/gpu_check.py [--base PATH --expert NAME=PATH ...] [--batch 2] [--steps 20] [--aot-build DIR]

On a machine with an NVIDIA GPU it runs, each verified before it is timed:
  compose     the Triton compose kernel vs the same math in eager torch at K=3 x 8x3x512x512 (fp32), achieved GB/s
              next to a measured device-to-device copy, and the CUDA launches per call
  fused_step  fused_expert_step (CFG, learned-range variance, Philox) vs its float64 reference, GB/s and launches
  torch       the torch backend (loop and vmap) vs the modules themselves
  ort_cuda    the ONNX Runtime backend on the CUDA execution provider (when onnxruntime-gpu is installed)
  tensorrt    TensorRT engines (fp16): build time, refit time per expert, forward vs torch, refittable vs
              non-refittable speed, and a CUDA-graph step loop vs the eager loop (same seeds: same x_0)
  aot         libmsdda_step (the C library, built with cmake when --aot-build has none) through ctypes vs
              fused_expert_step: identical output, launch cost
It prints a short table and writes the full record to bench/results/gpu_check-<time>.json.

Without a CUDA GPU it prints why and exits 0, doing nothing.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

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
    """Median milliseconds of fn() on the current stream, by CUDA events."""
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


def copy_gbps(nbytes: int) -> float:
    """Device-to-device copy bandwidth (read + write) at this size."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


# ------------------------------------------------------------------------------------------------ checks
def check_compose(rec: dict) -> None:
    import torch

    from msdda.kernels import compose_gaussians, compose_gaussians_ref

    K, B, C, H, W = 3, 8, 3, 512, 512
    g = torch.Generator(device="cuda").manual_seed(0)
    mean = torch.randn(K, B, C, H, W, device="cuda", generator=g)
    var = torch.rand(K, B, C, H, W, device="cuda", generator=g) + 0.1
    coeff = torch.tensor([0.5, 0.3, 0.2], device="cuda")
    noise = torch.randn(B, C, H, W, device="cuda", generator=g)

    def torch_eager():
        w = coeff.view(K, 1, 1, 1, 1) / var
        prec = w.sum(0)
        return (w * mean).sum(0) / prec + noise / prec.sqrt()

    got = compose_gaussians(mean, var, coeff, noise=noise)
    ref = compose_gaussians_ref(mean[:, :1], var[:, :1], coeff, noise=noise[:1]).float()
    err = (got[:1] - ref).abs().max().item()
    err_eager = (torch_eager() - got).abs().max().item()
    nbytes = (2 * K + 2) * B * C * H * W * 4            # K means, K vars, the noise read; x_prev written
    t_tri = cuda_time(lambda: compose_gaussians(mean, var, coeff, noise=noise, validate=False,
                                                error_count=torch.zeros(1, dtype=torch.int32, device="cuda")))
    t_eager = cuda_time(torch_eager)
    rec.update(shape=[K, B, C, H, W], max_err_vs_ref_f64=err, max_err_eager_vs_triton=err_eager, ok=err < 1e-4,
               triton_ms=t_tri, torch_ms=t_eager, triton_gbps=nbytes / t_tri / 1e6, torch_gbps=nbytes / t_eager / 1e6,
               d2d_copy_gbps=copy_gbps(nbytes), speedup=t_eager / t_tri,
               launches_triton=count_launches(lambda: compose_gaussians(
                   mean, var, coeff, noise=noise, validate=False,
                   error_count=torch.zeros(1, dtype=torch.int32, device="cuda"))),
               launches_torch=count_launches(torch_eager))


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


def check_fused_step(rec: dict) -> None:
    import torch

    from msdda.kernels import fused_expert_step, fused_expert_step_ref

    raw, x_t, coeff, scalars, seeds = _step_inputs(B=8, C=3, H=512, W=512)
    args = dict(guidance_scale=5.0, seed=seeds, offset=7)
    got = fused_expert_step(raw, x_t, coeff, scalars, **args)
    ref = fused_expert_step_ref(raw[:, :, :1].cpu().double(), x_t[:1].cpu().double(), coeff[:1].cpu().double(),
                                scalars, guidance_scale=5.0, seed=seeds[:1].cpu(), offset=7)
    err = (got[:1].cpu().double() - ref).abs().max().item()
    ec = torch.zeros(1, dtype=torch.int32, device="cuda")
    step = lambda: fused_expert_step(raw, x_t, coeff, scalars, validate=False, error_count=ec, **args)  # noqa: E731
    ms = cuda_time(step)
    nbytes = raw.numel() * 4 * 3 // 4 + 2 * x_t.numel() * 4    # u, c and the variance half of c are read
    rec.update(shape=list(raw.shape), max_err_vs_ref_f64=err, ok=err < 1e-3, ms=ms, gbps=nbytes / ms / 1e6,
               d2d_copy_gbps=copy_gbps(nbytes), launches=count_launches(step))


def _models(args, tmp: Path):
    """{name: module}, spec, the base's scheduler config."""
    import torch

    from msdda.loading import load_base, load_expert

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


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="msdda GPU check: build, verify and time every GPU path")
    ap.add_argument("--base", help="base model folder (default: the zoo if trained, else tiny test models)")
    ap.add_argument("--expert", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                    metavar="NAME=PATH")
    ap.add_argument("--batch", type=int, default=2, help="network batch N (2B under CFG)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps for the CUDA-graph check")
    ap.add_argument("--aot-build", type=Path, default=None, help="cmake build folder of libmsdda_step")
    ap.add_argument("--only", default="compose,fused_step,torch,ort_cuda,tensorrt,aot")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/gpu_check-<time>.json)")
    args = ap.parse_args(argv)

    reason = no_gpu_reason()
    if reason:
        print(f"gpu_check: {reason}; nothing to check on this machine (run it on a machine with an NVIDIA GPU).")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    only = set(args.only.split(","))
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
              "gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "checks": {}}
    tmp = Path(tempfile.mkdtemp(prefix="msdda-gpu-check-"))
    cache = tmp / "cache"
    nets = base = None

    def run(name, fn, *a):
        if name not in only:
            return
        rec = record["checks"].setdefault(name, {})
        t0 = time.perf_counter()
        try:
            fn(rec, *a)
        except Exception as exc:
            rec.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-2000:])
        rec["wall_s"] = round(time.perf_counter() - t0, 3)
        print(f"  {name}: {'skipped' if 'skipped' in rec else ('ok' if rec.get('ok') else 'FAILED')} "
              f"({rec['wall_s']:.1f} s)", flush=True)

    run("compose", check_compose)
    run("fused_step", check_fused_step)
    if only & {"torch", "ort_cuda", "tensorrt"}:
        nets, base = _models(args, tmp)
        record["models"] = {"members": list(nets), "class": type(base.unet).__name__,
                            "params_per_member": sum(p.numel() for p in base.unet.parameters())}
    run("torch", check_torch_backend, nets, base, args.batch)
    run("ort_cuda", check_ort_cuda, nets, base, args.batch, cache)
    run("tensorrt", check_tensorrt, nets, base, args.batch, cache, args.steps)
    run("aot", check_aot, args.aot_build or (tmp / "aot-build"))

    print_table(record)
    out = args.out or RESULTS / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {out}")
    shutil.rmtree(tmp, ignore_errors=True)
    failed = [k for k, v in record["checks"].items() if not v.get("ok") and "skipped" not in v]
    return 1 if failed else 0


def print_table(record) -> None:
    def f(v, unit=""):
        return "-" if v is None else (f"{v:.3g}{unit}" if isinstance(v, float) else f"{v}{unit}")

    print(f"\n{record['gpu']} (sm_{''.join(map(str, record['capability']))}), torch {record['torch']}")
    print(f"{'check':<22}{'status':<9}{'time':>12}{'vs':>12}{'GB/s':>10}{'launches':>10}  note")
    for name, r in record["checks"].items():
        status = "skip" if "skipped" in r else ("ok" if r.get("ok") else "FAIL")
        if name == "compose":
            rows = [(name, r.get("triton_ms"), r.get("torch_ms"), r.get("triton_gbps"), r.get("launches_triton"),
                     f"torch {f(r.get('launches_torch'))} launches; d2d copy {f(r.get('d2d_copy_gbps'))} GB/s")]
        elif name == "fused_step":
            rows = [(name, r.get("ms"), None, r.get("gbps"), r.get("launches"),
                     f"d2d copy {f(r.get('d2d_copy_gbps'))} GB/s; err {f(r.get('max_err_vs_ref_f64'))}")]
        elif name == "torch":
            rows = [(f"torch/{g}", r.get(g, {}).get("ms"), None, None, r.get(g, {}).get("launches"),
                     f"err {f(r.get(g, {}).get('max_err'))}") for g in ("loop", "vmap")]
        elif name == "tensorrt" and "skipped" not in r:
            rows = [(f"trt/{m}", r.get(m, {}).get("ms"), None, None, r.get(m, {}).get("launches"),
                     f"build {r.get(m, {}).get('build_seconds')}") for m in ("refit", "none")]
            cg = r.get("cuda_graph", {})
            rows.append(("trt/cuda_graph_loop", cg.get("graph_ms"), cg.get("eager_ms"), None,
                         cg.get("launches_graph"), f"diff vs eager {f(cg.get('max_diff_vs_eager'))}"))
        elif name == "aot" and "skipped" not in r:
            rows = [(name, r.get("c_ms"), r.get("python_ms"), None, 1,
                     f"host launch {f(r.get('c_host_launch_us'))} us; diff {f(r.get('max_diff_vs_python_kernel'))}")]
        else:
            rows = [(name, r.get("ms"), None, None, None, r.get("skipped") or r.get("error") or "")]
        for label, t, vs, gbps, launches, note in rows:
            print(f"{label:<22}{status:<9}{f(t, ' ms'):>12}{f(vs, ' ms'):>12}{f(gbps):>10}{f(launches):>10}  {note}")


if __name__ == "__main__":
    sys.exit(main())
