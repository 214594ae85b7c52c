#!/usr/bin/env python3
"""Compile msdda's fused-step Triton kernel ahead of time and emit its cubins as C arrays.

Run by CMake (add_custom_command) at build time; needs no GPU. It imports THE kernel the Python runtime uses,
``msdda.kernels.fused_step.fused_step_kernel``, and compiles it with Triton's own compiler for each target
(GPUTarget("cuda", arch, 32)) and each constexpr variant the C library dispatches on. The generated C file
holds, per (arch, variant): the cubin bytes, the kernel's symbol name, its dynamic shared memory and warps.

The library's variants take the step's scalars by value (TABLE=False), loop over K at run time (K_UNROLL=0:
any number of experts), keep the clamp (CLIP=True; clip = inf is a no-op) and read float32 (W=4). Its pointers
need only 4-byte alignment, so no divisibility is assumed (scalar loads; the Python runtime's JIT specialises
on 16-byte alignment and vectorises).

The kernel's runtime signature is spelled out below (SIGNATURE): if the kernel's parameter list changes, the
build fails here instead of the C launcher packing arguments wrongly.

    python gen_kernels.py --out msdda_step_kernels.c [--archs 80,90] [--repo REPO_ROOT]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

# Compile for the hardware, not the interpreter; keep line info out of the cubins (3x smaller).
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DISABLE_LINE_INFO", "1")

KERNEL = "fused_step_kernel"
# Every parameter of fused_step_kernel in order, with the Triton type the C launcher passes
# (pointers: CUdeviceptr; i32: int32_t; i64: int64_t; fp32: float). "constexpr" ones select a variant.
SIGNATURE = [
    ("raw_ptr", "*fp32"), ("xt_ptr", "*fp32"), ("coeff_ptr", "*fp32"), ("noise_ptr", "*fp32"),
    ("seed_ptr", "*i64"), ("out_ptr", "*fp32"), ("err_ptr", "*i32"), ("table_ptr", "*fp32"), ("step_ptr", "*i64"),
    ("K", "i32"), ("N", "i32"), ("B", "i32"), ("offset", "i64"), ("step", "i32"), ("n_steps", "i32"),
    ("stride_rk", "i64"), ("stride_rg", "i64"), ("stride_rb", "i64"), ("stride_xb", "i64"),
    ("stride_ck", "i64"), ("stride_cb", "i64"), ("stride_nb", "i64"), ("stride_ns", "i64"),
    ("guidance", "fp32"), ("px", "fp32"), ("po", "fp32"), ("mx", "fp32"), ("m0", "fp32"), ("mo", "fp32"),
    ("clip", "fp32"), ("var_fixed", "fp32"), ("lr_a", "fp32"), ("lr_b", "fp32"),
    ("K_UNROLL", "constexpr"), ("VAR_MODE", "constexpr"), ("CFG", "constexpr"), ("CLIP", "constexpr"),
    ("NOISE", "constexpr"), ("CHECK", "constexpr"), ("TABLE", "constexpr"), ("W", "constexpr"),
    ("BLOCK", "constexpr"),
]
BLOCK = 1024
NUM_WARPS = 4
NUM_STAGES = 3
# The variants the C ABI exposes: every variance mode, with/without CFG, given noise or Philox noise; the
# bad-element count is always kept (CHECK=True: the caller passes an int32 counter).
VARIANTS = [dict(K_UNROLL=0, VAR_MODE=v, CFG=c, CLIP=True, NOISE=n, CHECK=True, TABLE=False, W=4, BLOCK=BLOCK)
            for v in (0, 1, 2) for c in (False, True) for n in (1, 2)]


def load_kernel(repo: Path | None):
    try:
        from msdda.kernels import fused_step  # installed (editable or not)
    except ImportError:
        if repo is None:
            raise
        kdir = repo / "kernels"
        for name, path in (("msdda", None), ("msdda.kernels", kdir)):
            if name in sys.modules:
                continue
            if path is None:
                import types
                pkg = types.ModuleType("msdda")
                pkg.__path__ = []
                sys.modules["msdda"] = pkg
            else:
                spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                              submodule_search_locations=[str(path)])
                mod = importlib.util.module_from_spec(spec)
                sys.modules[name] = mod
                spec.loader.exec_module(mod)
        from msdda.kernels import fused_step
    return getattr(fused_step, KERNEL)


def check_signature(kernel) -> None:
    names = list(kernel.arg_names)
    want = [n for n, _ in SIGNATURE]
    if names != want:
        raise SystemExit(f"gen_kernels.py: {KERNEL} parameters changed:\n  kernel: {names}\n  C ABI:  {want}\n"
                         "update SIGNATURE here and the launcher in msdda_step.c together")


def compile_variant(kernel, arch: int, constexprs: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    options = make_backend(target).parse_options({"num_warps": NUM_WARPS, "num_stages": NUM_STAGES})
    signature = {n: t for n, t in SIGNATURE}
    src = ASTSource(fn=kernel, signature=signature, constexprs=dict(constexprs))
    cc = triton.compile(src, target=target, options=options.__dict__)
    md = cc.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise SystemExit(f"gen_kernels.py: {KERNEL} needs global/profile scratch; the C launcher passes none")
    return cc.asm["cubin"], md


def c_bytes(data: bytes, per_line: int = 24) -> str:
    lines = []
    for i in range(0, len(data), per_line):
        lines.append("  " + ",".join(str(b) for b in data[i:i + per_line]) + ",")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--repo", type=Path, default=None)
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.archs.replace(";", ",").split(",") if a.strip()]
    import triton

    t0 = time.perf_counter()
    kernel = load_kernel(args.repo)
    check_signature(kernel)
    parts = [
        "/* Generated by export/aot/gen_kernels.py: do not edit. */",
        f"/* {KERNEL} compiled ahead of time by Triton {triton.__version__} for sm_{', sm_'.join(map(str, archs))}. */",
        "/* Signature: " + ", ".join(f"{n}: {t}" for n, t in SIGNATURE) + " */",
        '#include <stddef.h>',
        '#include "msdda_step_kernels.h"',
        "",
    ]
    table = []
    for arch in archs:
        for i, cx in enumerate(VARIANTS):
            cubin, md = compile_variant(kernel, arch, cx)
            sym = f"msdda_cubin_sm{arch}_v{i}"
            parts.append(f"/* sm_{arch} VAR_MODE={cx['VAR_MODE']} CFG={int(cx['CFG'])} NOISE={cx['NOISE']} "
                         f"CHECK=1 BLOCK={BLOCK}: {len(cubin)} bytes */")
            parts.append(f"static const unsigned char {sym}[{len(cubin)}] = {{\n{c_bytes(cubin)}\n}};")
            table.append(f"  {{{arch}, {cx['VAR_MODE']}, {int(cx['CFG'])}, {cx['NOISE']}, {BLOCK}, {md.num_warps}, "
                         f"{md.shared}, \"{md.name}\", {sym}, sizeof({sym})}},")
    parts.append("const msdda_kernel_variant msdda_kernel_variants[] = {")
    parts.extend(table)
    parts.append("};")
    parts.append(f"const int msdda_kernel_variant_count = {len(table)};")
    parts.append(f'const char msdda_kernel_triton_version[] = "{triton.__version__}";')
    parts.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, args.out)
    print(f"gen_kernels.py: {len(table)} cubins ({', '.join(f'sm_{a}' for a in archs)}) -> {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
