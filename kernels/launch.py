"""How the kernels are launched: the backend choice, the launch configurations, and a prepared launch.

- ``use_triton(device)``: Triton for CUDA tensors, and for every tensor under the Triton interpreter
  (TRITON_INTERPRET=1, set before import); otherwise the wrappers take their float32 torch paths. Chosen once.
- ``tuned(kernel, key)``: the kernel behind ``triton.autotune`` over ``GPU_CONFIGS`` (BLOCK x num_warps), keyed
  per shape class and cached on disk, on GPUs only: the interpreter cannot time configurations, so there one
  configuration (``interpreter_block``) is used.
- ``vector_width(dtype)``: W, elements per 16-byte vector, the kernels' tile row.
- ``run``: one launch of a kernel by the wrappers, with the configuration chosen as above.
- ``PreparedLaunch``: one kernel, one configuration and fixed arguments, resolved once; each ``launch`` then
  passes the few arguments that change straight to Triton's compiled launcher (no binding, no specialisation,
  no autotuning lookups on the host).
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch
import triton

__all__ = ["CAPTURE_CONFIG", "GPU_CONFIGS", "LAUNCH_LOCK", "PreparedLaunch", "TRITON_ON_CPU", "interpreter_block",
           "run", "tuned", "use_triton", "vector_width", "whole_rows"]

TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"

# The Triton interpreter patches triton.language module-wide for each launch, so concurrent launches from several
# threads break it; interpreted launches are serialised. Compiled launches need no lock.
LAUNCH_LOCK = threading.Lock() if TRITON_ON_CPU else contextlib.nullcontext()

# Candidate (elements per program, warps): one to four 16-byte vectors a thread. Small grids (a few samples of
# 64x64 latents) want small blocks to fill every SM; large ones amortise the per-program work over wide blocks.
# Few on purpose: each is a compile on a shape class's first call (about a second each for the Philox variants).
GPU_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((512, 4), (1024, 4), (2048, 8), (4096, 8))]
INTERPRET_BLOCK_MAX = 4096  # the interpreter pays per program, not per element: few, wide programs


def use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or TRITON_ON_CPU


def interpreter_block(n: int) -> int:
    return max(16, min(INTERPRET_BLOCK_MAX, triton.next_power_of_2(n)))


def vector_width(dtype: torch.dtype) -> int:
    """Elements per 16-byte vector load of ``dtype`` (4 for float32, 8 for float16 / bfloat16)."""
    return 8 if dtype.itemsize == 2 else 4


def whole_rows(configs, named_args, **kwargs):
    """Keep the configurations whose block gives every thread at least one whole row of W elements (a smaller
    block would leave threads holding copies of other threads' rows, doing the same work twice)."""
    W = kwargs.get("W", named_args.get("W", 4))
    keep = [c for c in configs if c.kwargs["BLOCK"] >= W * 32 * c.num_warps]
    return keep or configs[-1:]


def tuned(kernel, key):
    """``kernel`` autotuned over GPU_CONFIGS per ``key`` (a list of argument names; tensor dtypes are added by
    Triton). The bad-element counter is restored after the timing runs, so tuning never adds to it; results are
    cached on disk (Triton's autotuning cache) so a process tunes a shape class once."""
    return triton.autotune(configs=GPU_CONFIGS, key=key, restore_value=["err_ptr"], cache_results=True,
                           prune_configs_by={"early_config_prune": whole_rows})(kernel)


CAPTURE_CONFIG = (1024, 4)  # (BLOCK, num_warps) inside a CUDA graph capture, where no configuration is timed


def run(kernel, tuned_kernel, args, meta, n: int, B: int) -> None:
    """Launch ``kernel`` over grid (cdiv(n, BLOCK), B): autotuned on a GPU (the first call of a shape class times
    the configurations; later calls look the choice up), one configuration under the interpreter, and
    CAPTURE_CONFIG while a CUDA graph is being captured (timing runs would break the capture; prepared plans
    tune before any capture)."""
    if TRITON_ON_CPU:
        block = interpreter_block(n)
        with LAUNCH_LOCK:
            kernel[(triton.cdiv(n, block), B)](*args, **meta, BLOCK=block, num_warps=4)
    elif torch.cuda.is_current_stream_capturing():
        block, warps = CAPTURE_CONFIG
        kernel[(triton.cdiv(n, block), B)](*args, **meta, BLOCK=block, num_warps=warps)
    else:
        tuned_kernel[lambda m: (triton.cdiv(n, m["BLOCK"]), B)](*args, **meta)


class PreparedLaunch:
    """One kernel with every argument but a few fixed, resolved once, then launched with no host work beyond
    Triton's own launcher.

    kernel: the @triton.jit function; tuned: the same kernel behind ``tuned`` (run once, on a GPU, to pick the
    configuration); fixed: {name: value} of every argument that never changes (constexprs included, BLOCK
    excluded); slots: the names ``launch`` fills, in the kernel's argument order; example: {name: value} for the
    one tuning run, for every slot and for any fixed argument to replace in that run (it writes its outputs: give
    scratch ones); n, B: elements per sample and samples (the grid is (cdiv(n, BLOCK), B)).

    On a GPU with Triton 3.6 / 3.7 the kernel is compiled once (``warmup``, specialised on the example's pointer
    alignment, which ``launch``'s callers must keep) and ``launch`` calls the compiled kernel's launcher directly
    with the full argument list Triton's JIT would pass (every bound argument in order, constexprs included): no
    binding, specialisation or cache lookups per call. Elsewhere (the interpreter, other Triton versions)
    ``launch`` goes through the JIT with the same arguments."""

    def __init__(self, kernel, tuned, fixed: dict, slots, example: dict, n: int, B: int):
        names = list(kernel.arg_names)
        missing = [nm for nm in names if nm not in fixed and nm not in slots and nm != "BLOCK"]
        if missing:
            raise TypeError(f"PreparedLaunch: no value for {missing}")
        cuts = sorted(names.index(s) for s in slots)
        if [names[i] for i in cuts] != list(slots):
            raise ValueError(f"PreparedLaunch: slots must follow the kernel's argument order, got {list(slots)}")
        if TRITON_ON_CPU:
            block, warps, stages = interpreter_block(n), 4, 1
        elif torch.cuda.is_current_stream_capturing():  # prepared inside a capture: nothing can be timed
            (block, warps), stages = CAPTURE_CONFIG, 3
        else:
            with _TUNE_LOCK:  # best_config is the autotuner's last choice: read it right after this run
                tuned[lambda meta: (triton.cdiv(n, meta["BLOCK"]), B)](**{**fixed, **example})
                best = tuned.best_config
            block, warps, stages = best.kwargs["BLOCK"], best.num_warps, best.num_stages
        self.kernel, self.block, self.num_warps, self.num_stages = kernel, block, warps, stages
        self.grid = (triton.cdiv(n, block), B, 1)
        values = {**fixed, "BLOCK": block}
        bounds = [-1, *cuts, len(names)]
        # the argument list as tuple segments between the slots: a launch only concatenates
        self.segments = [tuple(values[names[j]] for j in range(bounds[i] + 1, bounds[i + 1]))
                         for i in range(len(bounds) - 1)]
        self.compiled = None
        if not TRITON_ON_CPU and triton.__version__.split(".")[:2] in (["3", "6"], ["3", "7"]):
            from triton import knobs
            from triton.runtime import driver

            compiled = kernel.warmup(*self.arguments([example[s] for s in slots]), grid=self.grid, num_warps=warps,
                                     num_stages=stages)
            self.compiled = compiled.result() if hasattr(compiled, "result") else compiled  # (async compile)
            self._device = torch.cuda.current_device()
            self._stream = driver.active.get_current_stream
            self._knobs = knobs.runtime

    def arguments(self, values) -> tuple:
        """Every kernel argument in order, with the slots' ``values``."""
        s = self.segments
        out = s[0]
        for v, seg in zip(values, s[1:]):
            out = out + (v,) + seg
        return out

    def launch(self, *values) -> None:
        """Launch with the slots' values (in ``slots`` order) on the current stream of the current device."""
        args = self.arguments(values)
        c = self.compiled
        if c is None:
            with LAUNCH_LOCK:
                self.kernel[self.grid](*args, num_warps=self.num_warps, num_stages=self.num_stages)
            return
        stream = self._stream(self._device)
        k = self._knobs
        c.run(self.grid[0], self.grid[1], 1, stream, c.function, c.packed_metadata,
              c.launch_metadata(self.grid, stream, *args), k.launch_enter_hook, k.launch_exit_hook, *args)


_TUNE_LOCK = threading.Lock()
