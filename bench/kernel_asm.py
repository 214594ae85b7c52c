#!/usr/bin/env python3
"""What the compiler makes of msdda's kernels for sm_90 (H100/H200), without a GPU.

    python bench/kernel_asm.py [--arch 90] [--json out.json]

Compiles ``compose_kernel`` and ``fused_step_kernel`` with Triton's own compiler and bundled ptxas, for the
sizes and dtypes of issue 10's targets, with the argument specialisation Triton's JIT gives 16-byte aligned
tensors (pointers and multiples of 16 marked divisible by 16), and reports per variant:

- vector widths of the global loads and stores in the PTX (ld.global.v4 = 16 bytes a thread), shared memory and
  barriers (layout conversions), local memory;
- registers and stack from the cubin;
- SASS instructions on the main path per element (the libdevice sin/cos slow path for |x| > 105615, which
  Box-Muller's angle in [0, 2 pi) never takes, is excluded), by class;
- an issue-rate estimate on an H200: time per element if instruction-bound versus memory-bound, with the
  assumptions printed (132 SMs at 1.98 GHz; per SM and clock 128 thread-instructions issued, 64 integer, 16 MUFU;
  3.6 TB/s, the middle of the 3.3-4.0 TB/s device copy measured there). A ratio under 1 means the memory bounds
  the kernel; these are estimates from instruction counts, not measurements.

It also compiles a probe that draws one ``tl.randn`` per element and one that draws ``tl.randn4x`` per four
elements (the kernels' noise), to show what the Philox noise costs per element either way.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the hardware, not the interpreter
REPO = Path(__file__).resolve().parents[1]

H200 = dict(sms=132, ghz=1.98, issue=128, int32=64, mufu=16, copy_tbps=3.6)

_INSTR = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")
_LABEL = re.compile(r"^\.(L_x_\d+):")
_INT_OPS = {"IMAD", "IADD3", "LOP3", "SHF", "LEA", "ISETP", "SEL", "IABS", "PRMT", "VIADD", "IMNMX", "POPC", "FLO",
            "BREV", "SGXT", "BMSK", "LOP", "IADD", "IMUL", "ISCADD", "VIMNMX"}
_SKIP = {"NOP", "BSSY", "BSYNC", "EXIT", "BRA"}


def tools():
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def main_path_ops(cubin: bytes, trips: int = 1) -> list[str]:
    """SASS opcodes on the main path: everything but the blocks a forward conditional branch skips when they
    hold a loop over local memory (libdevice's Payne-Hanek reduction for huge sin/cos arguments), up to the
    first EXIT. A loop left on the main path (a runtime loop over K experts) is counted ``trips`` times."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tools() / "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    items = []
    for line in text.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            items.append(("label", m.group(1)))
            continue
        m = _INSTR.match(line)
        if m:
            items.append(("op", (m.group(2), m.group(3), m.group(4))))
    where = {v: i for i, (k, v) in enumerate(items) if k == "label"}

    def target(args):
        t = re.search(r"\.(L_x_\d+)", args)
        return where.get(t.group(1)) if t else None

    cold = set()
    for i, (k, v) in enumerate(items):
        if k != "op" or v[1] != "BRA" or not v[0]:
            continue
        j = target(v[2])
        if j is None or j <= i:
            continue
        region = [(a, vv) for a, (kk, vv) in enumerate(items[i + 1:j], start=i + 1) if kk == "op"]
        loops = any(vv[1] == "BRA" and (target(vv[2]) or 1 << 30) < a for a, vv in region)
        local = any(vv[1].startswith(("STL", "LDL")) for _, vv in region)
        if loops and local:  # a skipped loop over a local array: the slow path (not a loop over experts)
            cold.update(range(i + 1, j))
    ops = []
    for i, (k, v) in enumerate(items):
        if k != "op" or i in cold:
            continue
        ops.append(v[1])
        if v[1] == "EXIT" and not v[0]:
            break
        j = target(v[2]) if v[1] == "BRA" else None
        if j is not None and j < i and trips > 1:  # a main-path loop: its body again, trips - 1 times
            body = [vv[1] for a, (kk, vv) in enumerate(items[j:i + 1], start=j) if kk == "op" and a not in cold]
            ops.extend(body * (trips - 1))
    return ops


def resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tools() / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                              text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    return dict(zip(("registers", "stack", "shared", "local"), map(int, m.groups()))) if m else {}


def compile_kernel(fn, values: dict, types: dict, constexprs: dict, num_warps: int, arch: int):
    """Compile ``fn`` as Triton's JIT would for these argument values (ints equal to 1 become constexprs,
    multiples of 16 and 16-byte aligned pointers are marked divisible by 16, except do_not_specialize)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    keep = set(getattr(fn, "do_not_specialize", ()) or ())
    keep |= {fn.arg_names[i] for i in keep if isinstance(i, int)}
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        t, v = types[name], values.get(name)
        if t.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]  # tensors from torch's allocator are 256-byte aligned
        elif t in ("i32", "i64") and name not in keep and isinstance(v, int):
            if v == 1:
                consts[name] = 1
                sig[name] = "constexpr"
                continue
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        sig[name] = t
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))


def analyse(cc, elements_per_thread: int, bytes_per_element: float, trips: int = 1) -> dict:
    ptx = cc.asm["ptx"]
    ops = main_path_ops(cc.asm["cubin"], trips)
    cls = collections.Counter(o.split(".")[0] for o in ops)
    per = lambda n: round(n / elements_per_thread, 1)  # noqa: E731
    issued = sum(n for o, n in cls.items() if o not in _SKIP and not o.startswith("U"))
    ints = sum(n for o, n in cls.items() if o in _INT_OPS)
    mufu = cls.get("MUFU", 0)
    h = H200
    clk_per_elem_sm = max(issued / elements_per_thread / h["issue"], ints / elements_per_thread / h["int32"],
                          mufu / elements_per_thread / h["mufu"])
    compute_ps = clk_per_elem_sm / (h["sms"] * h["ghz"] * 1e9) * 1e12
    memory_ps = bytes_per_element / (h["copy_tbps"] * 1e12) * 1e12
    return dict(
        ptx_ld_v4=len(re.findall(r"ld\.global[^\n;]*\.v4", ptx)),
        ptx_ld_v2=len(re.findall(r"ld\.global[^\n;]*\.v2", ptx)),
        ptx_ld_scalar=len(re.findall(r"ld\.global(?:\.[a-z0-9]+)*\.(?:b32|f32|b16|b64|u64|s64)\s", ptx)),
        ptx_st_v4=len(re.findall(r"st\.global[^\n;]*\.v4", ptx)),
        ptx_st_v2=len(re.findall(r"st\.global[^\n;]*\.v2", ptx)),
        ptx_shared=ptx.count("st.shared"), ptx_barriers=ptx.count("bar.sync"),
        **resources(cc.asm["cubin"]),
        sass_main_path_per_element=per(len(ops)), issued_per_element=per(issued), int_per_element=per(ints),
        mufu_per_element=per(mufu), imad_per_element=per(cls.get("IMAD", 0)),
        bytes_per_element=bytes_per_element,
        h200_compute_ps_per_element=round(compute_ps, 2), h200_memory_ps_per_element=round(memory_ps, 2),
        compute_over_memory=round(compute_ps / memory_ps, 2),
        top_ops=dict(cls.most_common(12)),
    )


def _ptr(dtype):
    return "*" + {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}[dtype]


def compose_case(K, B, S, dtype, var_per_element, noise, block, warps, arch):
    from msdda.kernels.compose import compose_kernel, k_unroll

    N = 1
    for d in S:
        N *= d
    W = 4 if dtype == "fp32" else 8
    size = 4 if dtype == "fp32" else 2
    types = dict(mean_ptr=_ptr(dtype), var_ptr=_ptr(dtype), coeff_ptr="*fp32", noise_ptr=_ptr(dtype),
                 seed_ptr="*i64", out_ptr=_ptr(dtype), err_ptr="*i32", K="i32", N="i32", B="i32", offset="i64",
                 **{s: "i32" for s in ("stride_mk", "stride_mb", "stride_vk", "stride_vb", "stride_ck",
                                       "stride_cb", "stride_nb")})
    values = dict(K=K, N=N, B=B, offset=3, stride_mk=B * N, stride_mb=N, stride_vk=B * N if var_per_element else B,
                  stride_vb=N if var_per_element else 1, stride_ck=1, stride_cb=0, stride_nb=N)
    cx = dict(K_UNROLL=k_unroll(K), VAR_PER_ELEMENT=var_per_element, NOISE=noise, CHECK=True, W=W, BLOCK=block)
    cc = compile_kernel(compose_kernel, values, types, cx, warps, arch)
    nbytes = size * (K * (2 if var_per_element else 1) + (1 if noise == 1 else 0) + 1)
    return cc, block // (32 * warps), nbytes


def fused_case(K, B, C, S, dtype, var_mode, cfg, noise, table, block, warps, arch):
    from msdda.kernels.compose import k_unroll
    from msdda.kernels.fused_step import fused_step_kernel

    Ns = 1
    for d in S:
        Ns *= d
    N = C * Ns
    C_out = 2 * C if var_mode != 0 or table else C
    G = 2 if cfg else 1
    W = 4 if dtype == "fp32" else 8
    size = 4 if dtype == "fp32" else 2
    floats = ("guidance", "px", "po", "mx", "m0", "mo", "clip", "var_fixed", "lr_a", "lr_b")
    types = dict(raw_ptr=_ptr(dtype), xt_ptr=_ptr(dtype), coeff_ptr="*fp32", noise_ptr=_ptr(dtype),
                 seed_ptr="*i64", out_ptr=_ptr(dtype), err_ptr="*i32", table_ptr="*fp32", step_ptr="*i64",
                 K="i32", N="i32", B="i32", offset="i64", step="i32", n_steps="i32",
                 **{s: "i32" for s in ("stride_rk", "stride_rg", "stride_rb", "stride_xb", "stride_ck", "stride_cb",
                                       "stride_nb", "stride_ns")}, **{f: "fp32" for f in floats})
    values = dict(K=K, N=N, B=B, offset=3, step=0, n_steps=50, stride_rk=G * B * C_out * Ns, stride_rg=B * C_out * Ns,
                  stride_rb=C_out * Ns, stride_xb=N, stride_ck=1, stride_cb=K, stride_nb=N, stride_ns=B * N)
    cx = dict(K_UNROLL=k_unroll(K), VAR_MODE=-1 if table else var_mode, CFG=cfg, CLIP=False, NOISE=noise, CHECK=True,
              TABLE=table, W=W, BLOCK=block)
    cc = compile_kernel(fused_step_kernel, values, types, cx, warps, arch)
    reads = K * G if (var_mode == 0 and not table) else K * (G + 1)  # u, c, and the conditional variance channel
    nbytes = size * (reads + 1 + (1 if noise == 1 else 0) + 1)  # + x_t, noise, x_prev
    return cc, block // (32 * warps), nbytes


def noise_probe(per_element: bool, arch: int):
    """x + z with z one tl.randn per element, or the kernels' tl.randn4x tile (fp32, BLOCK 2048, 8 warps)."""
    import triton
    import triton.language as tl

    from msdda.kernels.product import philox_normal_tile, tile

    @triton.jit(do_not_specialize=["offset"])
    def probe(x_ptr, seed_ptr, out_ptr, N, offset, ONE: tl.constexpr, BLOCK: tl.constexpr):
        rows, offs, mask = tile(tl.program_id(0), N, BLOCK, 4)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        seed = tl.load(seed_ptr)
        if ONE:
            z = tl.randn(seed, offs.to(tl.int64) + (offset.to(tl.int64) << 32))
        else:
            z = philox_normal_tile(seed, rows, offset, 4)
        tl.store(out_ptr + offs, x + z, mask=mask)

    types = dict(x_ptr="*fp32", seed_ptr="*i64", out_ptr="*fp32", N="i32", offset="i64")
    cc = compile_kernel(probe, dict(N=1 << 20, offset=3), types, dict(ONE=per_element, BLOCK=2048), 8, arch)
    return cc, 8, 8


def cases(arch):
    big, small = (8, (3, 512, 512)), (8, (4, 128, 128))
    for dtype in ("fp32", "fp16"):
        for (B, S), K in ((big, 3), (small, 2)):
            for vpe in (True, False):
                for noise in (1, 2):
                    name = f"compose K={K} {B}x{'x'.join(map(str, S))} {dtype} var={'elem' if vpe else 'k'} " \
                           f"noise={'given' if noise == 1 else 'philox'}"
                    yield name, lambda K=K, B=B, S=S, dtype=dtype, vpe=vpe, noise=noise: compose_case(
                        K, B, S, dtype, vpe, noise, 2048, 8, arch)
        for (B, S), K in ((big, 3), (small, 2)):
            C, S2 = S[0], S[1:]
            for var_mode, table in ((1, False), (0, False), (-1, True)):
                kind = {1: "learned_range", 0: "fixed"}.get(var_mode, "table(per-step mode)")
                name = f"fused K={K} {B}x{'x'.join(map(str, S))} {dtype} cfg {kind} philox"
                yield name, lambda K=K, B=B, C=C, S2=S2, dtype=dtype, var_mode=var_mode, table=table: fused_case(
                    K, B, C, S2, dtype, max(var_mode, 0), True, 2, table, 2048, 8, arch)
    yield "probe: tl.randn per element (fp32)", lambda: noise_probe(True, arch)
    yield "probe: tl.randn4x per 4 elements (fp32)", lambda: noise_probe(False, arch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", default=None, help="regular expression: compile the cases whose names match")
    args = ap.parse_args(argv)
    if not (tools() / "ptxas").exists():
        print("kernel_asm: this triton build has no bundled ptxas/nvdisasm; nothing to compile")
        return 0
    sys.path.insert(0, str(REPO))
    print(f"assumed H200: {H200}")
    out = {}
    for name, build in cases(args.arch):
        if args.only and not re.search(args.only, name):
            continue
        cc, ept, nbytes = build()
        r = analyse(cc, ept, nbytes)
        out[name] = r
        print(f"{name:<58} ld.v4 {r['ptx_ld_v4']:>2} v2 {r['ptx_ld_v2']:>2} st.v4 {r['ptx_st_v4']:>2} "
              f"smem {r['ptx_shared']} regs {r.get('registers', '?'):>3} stack {r.get('stack', '?'):>2} | "
              f"SASS/elem {r['sass_main_path_per_element']:>6} int {r['int_per_element']:>5} "
              f"mufu {r['mufu_per_element']:>4} | {r['bytes_per_element']:>3} B/elem, compute/memory "
              f"{r['compute_over_memory']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(arch=args.arch, assumptions=H200, cases=out), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
